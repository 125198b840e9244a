"""Layer plans: which self-attention layer gets which method, as versioned, validated data.

A ``LayerPlan`` holds one method name per self-attention layer (a key of
``METHODS``, or ``"direct"`` for an unchanged layer), optional explicit
parameters per layer, optional per-layer probe scores, the identity of the model the plan was made
for and the model's trained length. It is plain data: JSON in, JSON out.

Parameters are usually left empty (``{}``): the method's setting is then derived at run time from
the length with ``for_length(num_frames, trained_frames)``, so one plan serves every length. The
parameters a layer does give replace those of that derived setting; the others stay derived. At or
below the trained length every layer resolves to ``None`` (plain attention): a plan never changes a
model that is not asked for a longer video than it was trained on.

A plan may also depend on the length: ``ranges`` holds further per-layer assignments, each used from
its ``from_ratio`` times the trained length on (up to the next range's); below the first range the
plan's own ``methods`` apply. One file then holds, say, the probe's plan up to 6x and another past it.

JSON schema (version 1)::

    {"schema": "freeloc.layer_plan", "version": 1,
     "model": {"name": "Wan2.1-T2V-1.3B", "class": "WanTransformer3DModel", "num_layers": 30, ...},
     "trained_frames": 21,
     "layers": [{"method": "tsa", "params": {}}, {"method": "vrpr", "params": {}}, ...],
     "ranges": [{"from_ratio": 6, "layers": [{"method": "tsa", "params": {}}, ...]}],
     "scores": {"position": [...], "context": [...]},
     "meta": {"source": "..."}}

(``"ranges"`` is written only when the plan has some.)

Examples:
    >>> plan = LayerPlan.published("wan2.1-t2v-1.3b")
    >>> plan.num_layers, plan.methods[:3]
    (30, ['tsa', 'tsa', 'vrpr'])
    >>> v = plan.resolve(2, num_frames=81)
    >>> (v.w1, v.w2, v.g1, v.g2, v.cap)
    (10, 14, 2, 8, 20)
    >>> plan.resolve(2, num_frames=21) is None  # not longer than trained: plain attention
    True
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._files import atomic_path
from .methods import METHODS, Method, _is_int, method_from_dict

__all__ = ["LayerPlan", "LengthRange", "DIRECT", "SCHEMA", "VERSION"]

#: Method name of a layer that is left unchanged.
DIRECT = "direct"
#: Value of the ``"schema"`` key of a plan's JSON.
SCHEMA = "freeloc.layer_plan"
#: Version of the JSON schema this module writes and reads.
VERSION = 1

_TOP_KEYS = ("schema", "version", "model", "trained_frames", "layers", "ranges", "scores", "meta")
_LAYER_KEYS = ("method", "params")
_RANGE_KEYS = ("from_ratio", "layers")
#: Parameters a method may leave out of a plan because they are filled from the length at run time.
_RUNTIME_PARAMS: dict[str, tuple[str, ...]] = {"riflex": ("num_frames",)}


def _known_methods() -> list[str]:
    return [DIRECT, *sorted(METHODS)]


def _merged(derived: dict[str, Any], explicit: dict[str, Any]) -> dict[str, Any]:
    """``derived`` with ``explicit``'s values, merged key by key where both are dicts (composed methods)."""
    out = dict(derived)
    for key, value in explicit.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _explicit_method(name: str, params: dict[str, Any], num_frames: int, trained_frames: int) -> Method:
    """The method of a layer with explicit ``params`` at ``num_frames`` (> ``trained_frames``).

    The parameters given replace those of the setting derived from the length (``for_length``); the
    others stay derived, so ``{"d1": 6}`` on a model trained on 33 frames keeps TSA's cap at 32. A
    method that cannot be derived without parameters (RIFLEx's ``k``, key-shift's ``shift``) is built
    from ``params`` and the run-time parameters alone.
    """
    explicit = _with_runtime_params(name, params, num_frames)
    try:
        derived = METHODS[name].for_length(num_frames, trained_frames)
    except ValueError:  # RIFLEx without k, key-shift
        derived = None
    if derived is None:
        return method_from_dict({"method": name, **explicit})
    return method_from_dict(_merged(derived.to_dict(), explicit))


def _with_runtime_params(name: str, params: dict[str, Any], num_frames: int) -> dict[str, Any]:
    """``params`` plus the run-time parameters (``num_frames`` for RIFLEx) the plan left out."""
    out = dict(params)
    for key in _RUNTIME_PARAMS.get(name, ()):
        out.setdefault(key, num_frames)
    return out


@dataclass
class LengthRange:
    """The per-layer methods of a plan from ``from_ratio`` times the trained length on.

    Args:
        from_ratio: the first length ratio ``num_frames / trained_frames`` (> 1) the range applies to.
        methods: one method name per layer, as ``LayerPlan.methods``.
        params: per-layer explicit parameters, as ``LayerPlan.params`` (empty: ``{}`` for every layer).
    """

    from_ratio: float | int
    methods: list[str]
    params: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.params and isinstance(self.methods, list):
            self.params = [{} for _ in self.methods]


@dataclass
class LayerPlan:
    """Per-layer assignment of methods for one model.

    Args:
        methods: one method name per self-attention layer, in layer order: a key of
            ``METHODS`` (``"vrpr"``, ``"tsa"``, ``"pi"``, ``"ntk"``, ``"yarn"``,
            ``"riflex"``, ``"sliding-window"``) or ``"direct"`` (unchanged).
        params: per-layer explicit parameters of the method (``{}``: derive them at run time from
            the length; those not given are derived). An empty list means ``{}`` for every layer.
            RIFLEx may give only ``k``; its ``num_frames`` is then the run-time length.
        scores: optional per-layer scores, e.g. ``{"position": [...], "context": [...]}`` from a
            probe; every list has one value per layer.
        model: identity of the model the plan is for (name, class, layer and head counts...).
        trained_frames: the model's trained length in temporal tokens (latent frames), if known.
        meta: free-form information (source, rule, probe settings). Must be JSON-serializable.
        ranges: per-layer methods for longer lengths (``LengthRange``), in increasing ``from_ratio``;
            below the first, ``methods`` and ``params`` apply.

    Raises:
        ValueError: when a method name is unknown, parameters are invalid, or list lengths differ.
    """

    methods: list[str]
    params: list[dict[str, Any]] = field(default_factory=list)
    scores: dict[str, list[float]] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    trained_frames: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    ranges: list[LengthRange] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.params and self.methods:
            self.params = [{} for _ in self.methods]
        self.validate()

    # ------------------------------------------------------------------ validation
    @property
    def num_layers(self) -> int:
        """Number of self-attention layers the plan covers."""
        return len(self.methods)

    def validate(self) -> None:
        """Check the whole plan; called on construction and before serialization.

        Raises:
            ValueError: naming the layer, the value got and what is accepted.
        """
        if not isinstance(self.methods, list) or not all(isinstance(m, str) for m in self.methods):
            raise ValueError(f"LayerPlan.methods must be a list of method names, got {self.methods!r}")
        n = len(self.methods)
        if not isinstance(self.params, list) or len(self.params) != n:
            got = len(self.params) if isinstance(self.params, list) else type(self.params).__name__
            raise ValueError(f"LayerPlan.params must be a list with one dict per layer ({n} layers), "
                             f"got {got}")
        if self.trained_frames is not None and (not _is_int(self.trained_frames) or self.trained_frames < 1):
            raise ValueError(
                f"LayerPlan.trained_frames must be a positive int (temporal tokens) or None, "
                f"got {self.trained_frames!r}"
            )
        for i, (name, params) in enumerate(zip(self.methods, self.params, strict=True)):
            _validate_layer(i, name, params, self.trained_frames)
        if not isinstance(self.ranges, list) or not all(isinstance(r, LengthRange) for r in self.ranges):
            raise ValueError(f"LayerPlan.ranges must be a list of LengthRange, got {self.ranges!r}")
        last = 1.0
        for r in self.ranges:
            ratio = r.from_ratio
            if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not ratio > last:
                raise ValueError(f"LayerPlan.ranges: from_ratio must be a number > 1 and larger than the previous "
                                 f"range's, got {ratio!r} after {last:g}")
            last = float(ratio)
            if not isinstance(r.methods, list) or len(r.methods) != n or not isinstance(r.params, list) \
                    or len(r.params) != n:
                raise ValueError(f"LayerPlan.ranges (from {ratio:g}x): methods and params need one entry per layer "
                                 f"({n} layers), got {r.methods!r}")
            for i, (name, params) in enumerate(zip(r.methods, r.params, strict=True)):
                try:
                    _validate_layer(i, name, params, self.trained_frames)
                except ValueError as err:
                    raise ValueError(f"LayerPlan.ranges (from {ratio:g}x): {err}") from None
        if not isinstance(self.scores, dict):
            raise ValueError(f"LayerPlan.scores must be a dict of name -> list of floats, "
                             f"got {self.scores!r}")
        for key, values in self.scores.items():
            if not isinstance(key, str):
                raise ValueError(f"LayerPlan.scores keys must be strings, got {key!r}")
            if not isinstance(values, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
            ):
                raise ValueError(f"LayerPlan.scores[{key!r}] must be a list of numbers, got {values!r}")
            if len(values) != n:
                raise ValueError(
                    f"LayerPlan.scores[{key!r}] has {len(values)} values but the plan has {n} layers; "
                    f"accepted: one score per layer"
                )
        if not isinstance(self.model, dict):
            raise ValueError(f"LayerPlan.model must be a dict, got {self.model!r}")
        if not isinstance(self.meta, dict):
            raise ValueError(f"LayerPlan.meta must be a dict, got {self.meta!r}")
        model_layers = self.model.get("num_layers")
        if model_layers is not None and model_layers != n:
            raise ValueError(
                f"LayerPlan.model['num_layers'] is {model_layers!r} but the plan has {n} layers; "
                f"they must agree"
            )

    def check_layers(self, num_layers: int) -> None:
        """Check that the plan fits a model with ``num_layers`` self-attention layers.

        Raises:
            ValueError: naming both counts when they differ.
        """
        if num_layers != self.num_layers:
            name = self.model.get("name")
            made_for = f" (made for {name})" if name else ""
            raise ValueError(
                f"the layer plan{made_for} has {self.num_layers} layers but the model has {num_layers} "
                f"self-attention layers; a plan must have exactly one entry per layer"
            )

    def check_for_model(self, model_class: str, trained_frames: int, num_frames: int | None = None) -> None:
        """Check, before anything is installed, what would otherwise fail or go wrong at the first forward.

        Every layer is resolved at ``num_frames`` temporal tokens (or, unknown or not longer than
        ``trained_frames``, at twice the trained length), so that a method that cannot be built (a RIFLEx
        layer without ``k``, VRPR with a trained length of 1) raises here, naming the layer. A plan made for
        another model class, and an explicit VRPR ``cap`` above the model's trained range (``T - 1``) on a
        layer that re-encodes at that length, give a warning: they may be deliberate.

        Raises:
            ValueError: naming the layer, its method and what is wrong.
        """
        made_for = self.model.get("class")
        if made_for and made_for != model_class:
            warnings.warn(f"the layer plan was made for {made_for} ({self.model.get('name', 'no name')}), and is "
                          f"applied to a {model_class}: its per-layer choices belong to the other model; "
                          f"run `freeloc probe` on this one for its own plan", UserWarning, stacklevel=4)
        if num_frames is not None and num_frames > trained_frames:
            lengths = [num_frames]  # the one length this model will run at
        else:  # any length: one inside the base assignment and one inside each range
            lengths = [2 * trained_frames if not self.ranges or self.ranges[0].from_ratio > 2
                       else trained_frames + 1]
            lengths += [max(trained_frames + 1, math.ceil(r.from_ratio * trained_frames)) for r in self.ranges]
        for f in lengths:
            methods, params = self.methods_at(f, trained_frames)
            for layer, name in enumerate(methods):
                try:
                    method = self.resolve(layer, f, trained_frames)
                except ValueError as err:
                    text = str(err)
                    raise ValueError(text if text.startswith("layer ") else f"layer {layer} ({name!r}): {text}") \
                        from err
                cap = getattr(method, "cap", None)
                re_encodes = method is not None and not getattr(method, "is_identity_for", lambda n: False)(f)
                if name == "vrpr" and "cap" in params[layer] and re_encodes and cap > trained_frames - 1:
                    warnings.warn(f"layer {layer}: VRPR cap={cap} is beyond the model's trained range of relative "
                                  f"distances (|r| <= T - 1 = {trained_frames - 1}): distances up to {cap} are "
                                  f"out of distribution", UserWarning, stacklevel=4)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def uniform(cls, method: str, num_layers: int, **params: Any) -> LayerPlan:
        """The same method (and parameters) on every layer.

        Args:
            method: a method name (see ``LayerPlan``), or ``"direct"``.
            num_layers: number of self-attention layers.
            **params: explicit parameters for every layer (those not given: derived from the length at run time).

        Examples:
            >>> LayerPlan.uniform("tsa", 4).summary()
            '4 layers: tsa 4 (0-3)'
        """
        if not _is_int(num_layers) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        return cls(methods=[method] * num_layers, params=[dict(params) for _ in range(num_layers)])

    @classmethod
    def from_lists(
        cls,
        tsa_layers: Sequence[int],
        vrpr_layers: Sequence[int],
        num_layers: int,
        *,
        trained_frames: int | None = None,
        model: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> LayerPlan:
        """A FreeLOC plan from its two layer lists (as the reference code publishes them).

        Layers in neither list are ``"direct"``.

        Args:
            tsa_layers: indices of the layers that get TSA.
            vrpr_layers: indices of the layers that get VRPR.
            num_layers: number of self-attention layers.
            trained_frames: the model's trained length in temporal tokens.
            model: identity of the model.
            meta: free-form information.

        Raises:
            ValueError: for an index out of range, listed twice, or in both lists.

        Examples:
            >>> LayerPlan.from_lists([0, 2], [1], num_layers=4).methods
            ['tsa', 'vrpr', 'tsa', 'direct']
        """
        if not _is_int(num_layers) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        methods = [DIRECT] * num_layers
        owner: dict[int, str] = {}
        lists = (("tsa_layers", "tsa", tsa_layers), ("vrpr_layers", "vrpr", vrpr_layers))
        for list_name, method, layers in lists:
            for layer in layers:
                if not _is_int(layer) or not 0 <= layer < num_layers:
                    raise ValueError(
                        f"layer index {layer!r} in {list_name} is out of range for num_layers={num_layers}; "
                        f"accepted: 0..{num_layers - 1}"
                    )
                if layer in owner:
                    where = "twice in " + list_name if owner[layer] == list_name else (
                        f"in both {owner[layer]} and {list_name}")
                    raise ValueError(f"layer {layer} is listed {where}; each layer gets one method")
                owner[layer] = list_name
                methods[layer] = method
        return cls(
            methods=methods,
            trained_frames=trained_frames,
            model=dict(model or {}),
            meta=dict(meta or {}),
        )

    @staticmethod
    def shipped() -> list[str]:
        """Names of the plans shipped with the installed adapters (for ``published``).

        Each adapter declares its plans (``freeloc.adapter.ShippedPlan``); they are found through
        ``freeloc.registry``.
        """
        from .registry import shipped_plans  # the registry imports the adapters, which import this module

        return sorted(shipped_plans())

    @classmethod
    def published(cls, name: str) -> LayerPlan:
        """Load a plan shipped with an installed adapter, e.g. ``"wan2.1-t2v-1.3b"``.

        Raises:
            ValueError: when no plan of that name is shipped (the message lists those that are).
        """
        from .registry import shipped_plans

        plans = shipped_plans()
        key = name[: -len(".json")] if name.endswith(".json") else name
        if key not in plans:
            raise ValueError(f"no shipped layer plan named {name!r}; shipped plans: {sorted(plans)}")
        return plans[key].load()

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        """The plan as a JSON-ready dict (the schema in the module docstring)."""
        self.validate()
        return {
            "schema": SCHEMA,
            "version": VERSION,
            "model": dict(self.model),
            "trained_frames": self.trained_frames,
            "layers": [{"method": m, "params": dict(p)}
                       for m, p in zip(self.methods, self.params, strict=True)],
            **({"ranges": [{"from_ratio": r.from_ratio,
                            "layers": [{"method": m, "params": dict(p)}
                                       for m, p in zip(r.methods, r.params, strict=True)]}
                           for r in self.ranges]} if self.ranges else {}),
            "scores": {k: list(v) for k, v in self.scores.items()},
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, data: Any) -> LayerPlan:
        """Build a plan from ``to_dict``'s output, validating everything.

        Raises:
            ValueError: wrong schema name, unsupported version, unknown keys or method names, bad
                parameters, or scores whose length differs from the layer count.
        """
        if not isinstance(data, dict):
            raise ValueError(f"a layer plan must be a JSON object, got {type(data).__name__}")
        schema = data.get("schema")
        if schema != SCHEMA:
            raise ValueError(f"not a layer plan: 'schema' is {schema!r}, expected {SCHEMA!r}")
        version = data.get("version")
        if version != VERSION:
            raise ValueError(f"unsupported layer plan version {version!r}; "
                             f"this freeloc reads version {VERSION}")
        unknown = sorted(set(data) - set(_TOP_KEYS))
        if unknown:
            raise ValueError(f"layer plan has unknown key(s) {unknown}; accepted: {list(_TOP_KEYS)}")
        methods, params = _layers_from(data.get("layers"), "layer plan 'layers'")
        ranges = data.get("ranges") or []
        if not isinstance(ranges, list):
            raise ValueError(f"layer plan 'ranges' must be a list of {{from_ratio, layers}}, got {ranges!r}")
        length_ranges = []
        for entry in ranges:
            if not isinstance(entry, dict) or sorted(entry) != sorted(_RANGE_KEYS):
                raise ValueError(f"layer plan 'ranges': each entry must have exactly the keys {list(_RANGE_KEYS)}, "
                                 f"got {entry!r}")
            r_methods, r_params = _layers_from(entry["layers"], f"layer plan range from {entry['from_ratio']}x")
            length_ranges.append(LengthRange(entry["from_ratio"], r_methods, r_params))
        scores = data.get("scores") or {}
        if not isinstance(scores, dict):
            raise ValueError(f"layer plan 'scores' must be an object of name -> list of numbers, "
                             f"got {scores!r}")
        for key, values in scores.items():
            if not isinstance(values, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
            ):
                raise ValueError(f"layer plan scores[{key!r}] must be a list of numbers, got {values!r}")
        for key in ("model", "meta"):
            value = data.get(key) or {}
            if not isinstance(value, dict):
                raise ValueError(f"layer plan {key!r} must be an object, got {value!r}")
        trained = data.get("trained_frames")
        if trained is not None and (not _is_int(trained) or trained < 1):
            raise ValueError(f"layer plan 'trained_frames' must be a positive int or null, got {trained!r}")
        return cls(
            methods=methods,
            params=params,
            scores={str(k): [float(v) for v in vs] for k, vs in scores.items()},
            model=dict(data.get("model") or {}),
            trained_frames=trained,
            meta=dict(data.get("meta") or {}),
            ranges=length_ranges,
        )

    def to_json(self) -> str:
        """The plan as JSON text (one layer per line, so that diffs stay readable)."""
        d = self.to_dict()
        parts = []
        for key, value in d.items():
            if key == "layers":
                body = ",\n".join("    " + json.dumps(layer) for layer in value)
                text = "[\n" + body + "\n  ]"
            elif key == "ranges":
                body = ",\n".join(f"    {{\"from_ratio\": {json.dumps(r['from_ratio'])}, \"layers\": [\n"
                                  + ",\n".join("      " + json.dumps(layer) for layer in r["layers"]) + "\n    ]}"
                                  for r in value)
                text = "[\n" + body + "\n  ]"
            elif key == "scores" and value:
                body = ",\n".join(f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items())
                text = "{\n" + body + "\n  }"
            else:
                text = json.dumps(value, indent=2).replace("\n", "\n  ")
            parts.append(f"  {json.dumps(key)}: {text}")
        return "{\n" + ",\n".join(parts) + "\n}"

    @classmethod
    def from_json(cls, text: str) -> LayerPlan:
        """Parse and validate a plan from JSON text.

        Raises:
            ValueError: for invalid JSON or an invalid plan (see ``from_dict``).
        """
        try:
            data = json.loads(text)
            return cls.from_dict(data)
        except json.JSONDecodeError as e:
            raise ValueError(f"layer plan is not valid JSON: {e}") from e
        except RecursionError:  # a plan is a few levels deep; Python's parser stops at about a thousand
            raise ValueError("layer plan is nested too deeply to be a plan (JSON nesting past Python's recursion "
                             "limit); a plan's JSON is at most a few levels deep") from None

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON to ``path``; returns the path."""
        path = Path(path)
        with atomic_path(path) as tmp:  # whole or not at all
            tmp.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> LayerPlan:
        """Read a plan written by ``save``.

        Raises:
            ValueError: when the file's content is not a valid plan (the message names the file).
        """
        path = Path(path)
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    # ------------------------------------------------------------------ use
    def layers_of(self, method: str) -> list[int]:
        """Indices of the layers that use ``method``.

        Examples:
            >>> LayerPlan.from_lists([0, 2], [1], num_layers=3).layers_of("tsa")
            [0, 2]
        """
        return [i for i, m in enumerate(self.methods) if m == method]

    def methods_at(self, num_frames: int, trained_frames: int | None) -> tuple[list[str], list[dict[str, Any]]]:
        """The per-layer methods and parameters that apply at ``num_frames`` temporal tokens: those of the
        last range whose ``from_ratio`` the length ratio reaches, else the plan's own.

        Examples:
            >>> plan = LayerPlan(["vrpr", "tsa"], ranges=[LengthRange(6, ["tsa+vrpr", "tsa"])])
            >>> plan.methods_at(81, 21)[0], plan.methods_at(126, 21)[0]
            (['vrpr', 'tsa'], ['tsa+vrpr', 'tsa'])
        """
        if self.ranges and trained_frames is not None:
            for r in reversed(self.ranges):
                if num_frames >= r.from_ratio * trained_frames:
                    return r.methods, r.params
        return self.methods, self.params

    def with_defaults(self, method: str, defaults: dict[str, Any]) -> LayerPlan:
        """A copy in which the layers of ``method`` (at any length) that set none of ``defaults``' keys get them.

        ``defaults`` is a setting taken as a whole (an adapter's published setting for its model, such
        as UltraViCo's harmonic band for HunyuanVideo): a layer that sets any of its keys keeps its own
        params as they are; the other layers get ``defaults`` beside their own params.

        Examples:
            >>> plan = LayerPlan(methods=["ultravico", "ultravico", "tsa"], params=[{"beta": None}, {"alpha": 0.8}, {}])
            >>> plan.with_defaults("ultravico", {"beta": 0.6, "period": 50}).params
            [{'beta': None}, {'beta': 0.6, 'period': 50, 'alpha': 0.8}, {}]
        """
        def fill(methods: list[str], params: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [{**defaults, **p} if m == method and not set(p) & set(defaults) else dict(p)
                    for m, p in zip(methods, params, strict=True)]

        return LayerPlan(methods=list(self.methods), params=fill(self.methods, self.params),
                         scores={k: list(v) for k, v in self.scores.items()}, model=dict(self.model),
                         trained_frames=self.trained_frames, meta=json.loads(json.dumps(self.meta)),
                         ranges=[LengthRange(r.from_ratio, list(r.methods), fill(r.methods, r.params))
                                 for r in self.ranges])

    def params_of(self, method: str) -> list[dict[str, Any]]:
        """The params of every layer of ``method``, at any length (the base assignment, then each range)."""
        layers = [zip(self.methods, self.params, strict=True)]
        layers += [zip(r.methods, r.params, strict=True) for r in self.ranges]
        return [p for entries in layers for m, p in entries if m == method]

    def all_methods(self) -> set[str]:
        """Every method name the plan uses, at any length."""
        return set(self.methods).union(*(r.methods for r in self.ranges))

    def resolve(self, layer: int, num_frames: int, trained_frames: int | None = None) -> Method | None:
        """The method instance for ``layer`` at ``num_frames`` temporal tokens.

        Args:
            layer: layer index, ``0 <= layer < num_layers``.
            num_frames: length of the video in temporal tokens (latent frames).
            trained_frames: the model's trained length in temporal tokens; defaults to the plan's.

        Returns:
            ``None`` for plain attention: a ``"direct"`` layer, or any layer when ``num_frames`` is not
            longer than the trained length (every method is the identity there). Otherwise the method
            built from the layer's explicit parameters, or ``for_length(num_frames, trained_frames)``
            when it has none.

        Raises:
            ValueError: layer index out of range, bad frame counts, no trained length known, or a
                RIFLEx layer without ``k``.
        """
        if not _is_int(layer) or not 0 <= layer < self.num_layers:
            raise ValueError(
                f"layer index {layer!r} is out of range for a plan of {self.num_layers} layers; "
                f"accepted: 0..{self.num_layers - 1}"
            )
        if not _is_int(num_frames) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive int (temporal tokens), got {num_frames!r}")
        t = trained_frames if trained_frames is not None else self.trained_frames
        methods, layer_params = self.methods_at(num_frames, t)
        name = methods[layer]
        if name == DIRECT:
            return None
        if t is None:
            raise ValueError(
                f"layer {layer} ({name!r}) needs the model's trained length: pass trained_frames= "
                f"or set LayerPlan.trained_frames (temporal tokens, e.g. 21 for Wan2.1)"
            )
        if not _is_int(t) or t < 1:
            raise ValueError(f"trained_frames must be a positive int (temporal tokens), got {t!r}")
        if num_frames <= t:
            return None
        params = layer_params[layer]
        if params:
            return _explicit_method(name, params, num_frames, t)
        if name == "riflex":
            raise ValueError(
                f"layer {layer} uses 'riflex', which needs its intrinsic frequency index k: give it in the "
                f"layer's params, e.g. {{'k': 4}} (published k: HunyuanVideo 4, CogVideoX-5B 2)"
            )
        return METHODS[name].for_length(num_frames, t)

    def summary(self) -> str:
        """A short human description: layer count, and how many and which layers use each method.

        Examples:
            >>> LayerPlan.from_lists([0, 2], [1], num_layers=4, trained_frames=21).summary()
            '4 layers: tsa 2 (0, 2), vrpr 1 (1), direct 1 (3); trained_frames 21'
            >>> LayerPlan.from_lists([0, 1, 2, 5], [3, 4], num_layers=6).summary()
            '6 layers: tsa 4 (0-2, 5), vrpr 2 (3-4)'
        """
        counts = Counter(self.methods)
        text = f"{self.num_layers} layers: " + ", ".join(f"{m} {c} ({_ranges(self.layers_of(m))})"
                                                          for m, c in counts.most_common())
        extras = []
        if self.model.get("name"):
            extras.append(f"model {self.model['name']}")
        if self.trained_frames is not None:
            extras.append(f"trained_frames {self.trained_frames}")
        if any(self.params):
            extras.append(f"{sum(1 for p in self.params if p)} with explicit params")
        for r in self.ranges:
            extras.append(f"from {r.from_ratio:g}x: " + ", ".join(
                f"{m} {c}" for m, c in Counter(r.methods).most_common()))
        return text + ("; " + ", ".join(extras) if extras else "")


def _ranges(layers: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"``."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _layers_from(layers: Any, what: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Methods and params of a JSON list of ``{method, params}`` layers, validated."""
    if not isinstance(layers, list) or not layers:
        raise ValueError(f"{what} must be a non-empty list of {{method, params}}, got {layers!r}")
    methods: list[str] = []
    params: list[dict[str, Any]] = []
    for i, entry in enumerate(layers):
        if not isinstance(entry, dict) or "method" not in entry:
            raise ValueError(f"layer {i}: expected {{'method': name, 'params': {{...}}}}, got {entry!r}")
        extra = sorted(set(entry) - set(_LAYER_KEYS))
        if extra:
            raise ValueError(f"layer {i}: unknown key(s) {extra}; accepted: {list(_LAYER_KEYS)}")
        name, p = entry["method"], entry.get("params", {})
        _validate_layer(i, name, p)
        methods.append(name)
        params.append(dict(p))
    return methods, params


#: trained lengths (latent frames) at which a plan that does not know its model's checks explicit
#: parameters: Wan's, and one long enough for any length-dependent bound.
_NOMINAL_TRAINED = (21, 1024)


def _validate_layer(index: int, name: object, params: object, trained_frames: int | None = None) -> None:
    """Check one layer's method name and parameters (constructing the method when params are given).

    The method is built at twice ``trained_frames``; when the trained length is not known, parameters
    that are valid at some trained length (say a VRPR ``w1`` of 25, valid from 25 trained frames on) pass
    here and are checked against the model's own length by ``LayerPlan.check_for_model``.
    """
    if not isinstance(name, str) or (name != DIRECT and name not in METHODS):
        raise ValueError(f"layer {index}: unknown method {name!r}; known methods: {_known_methods()}")
    if not isinstance(params, dict):
        raise ValueError(f"layer {index} ({name!r}): params must be a dict, got {params!r}")
    if not params:
        return
    if name == DIRECT:
        raise ValueError(f"layer {index} is 'direct' (unchanged) and takes no params, got {params!r}")
    first: ValueError | None = None
    for trained in (trained_frames,) if trained_frames is not None else _NOMINAL_TRAINED:
        try:  # names, types and ranges of the values given
            _explicit_method(name, params, 2 * trained, trained)
            return
        except ValueError as e:
            first = first or e
    at = f" at {trained_frames} trained frames" if trained_frames is not None else ""
    raise ValueError(f"layer {index} ({name!r}): bad params {params!r}{at}: {first}") from first
