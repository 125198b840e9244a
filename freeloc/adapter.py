"""What every adapter shares: installing a layer plan on a transformer and taking it off exactly.

An adapter knows one architecture. It subclasses ``TransformerAdapter`` and says only what is
true of its model: which modules are self-attention (``attention_layers``),
its rotary layout, how to read the latent grid from a forward call, its temporal patch, a processor
that computes the layer's q/k/v and hands them to ``LayerContext.attend``, and its model data
(``ModelData``: trained lengths, temporal factor, shipped plans). Everything else (plans, the
double-apply check, the grid hook, the undo log) is here.

Adapters are found through ``freeloc.registry``: a package declares its adapter class as an entry
point of the group ``freeloc.adapters``, or code registers one with
``register_adapter``.

Examples:
    >>> data = ModelData(
    ...     classes=(ModelClass("MyVideoTransformer", trained_video_frames=81,
    ...                         variants=(ConfigVariant("my-5b", {"in_channels": 48}, trained_video_frames=121),)),),
    ...     temporal_factor=4)
    >>> data.class_names
    ('MyVideoTransformer',)
    >>> class Config:
    ...     in_channels = 48
    >>> data.model_class("MyVideoTransformer").trained_video_frames_for(Config())
    121
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar

import torch
from torch.utils.hooks import RemovableHandle

from .attention import AttentionOptions, attend, band_set_for
from .attention._opaque import AttendCall, call_key, opaque_attend
from .methods import Method
from .parallel import Ulysses
from .plan import DIRECT, LayerPlan
from .rotary import RotaryLayout
from .session import MARK, Installation, LayerStats, Session, Timer, plan_for

__all__ = [
    "ConfigVariant",
    "FreeLOCProcessor",
    "GridHook",
    "GridState",
    "LayerContext",
    "ModelClass",
    "ModelData",
    "ShippedPlan",
    "TransformerAdapter",
    "UNPUBLISHED",
    "config_matches",
]

#: ``TransformerAdapter.ultravico_band`` of models whose RoPE may need UltraViCo's harmonic band but for
#: which no setting is published: UltraViCo layers must choose one (``beta``, or ``beta: None``).
UNPUBLISHED = "unpublished"

T = TypeVar("T")


def config_matches(config: Any, match: Mapping[str, Any]) -> bool:
    """Whether every ``key: value`` of ``match`` equals the config's (lists compare as lists)."""
    def same(value: Any, want: Any) -> bool:
        return list(value) == want if isinstance(want, list) and value is not None else value == want

    return all(same(getattr(config, k, None), v) for k, v in match.items())


def _frozen_match(owner: str, match: Mapping[str, Any]) -> Mapping[str, Any]:
    if not isinstance(match, Mapping) or not all(isinstance(k, str) for k in match):
        raise ValueError(f"{owner}.match must be a mapping of config key -> value, got {match!r}")
    return MappingProxyType(dict(match))


def _check_frames(owner: str, frames: int | None) -> None:
    if frames is not None and (not isinstance(frames, int) or isinstance(frames, bool) or frames < 1):
        raise ValueError(f"{owner}.trained_video_frames must be a positive int (video frames) or None "
                         f"(unknown: users pass trained_frames=), got {frames!r}")


# ---------------------------------------------------------------------------------------------- model data
@dataclass(frozen=True)
class ConfigVariant:
    """Checkpoints of one class told apart by their config, with their own trained length.

    Args:
        name: what the variant is (shown in documentation), e.g. ``"Wan2.2-TI2V-5B"``.
        match: config keys and values that identify it (every one must equal the config's).
        trained_video_frames: its trained length in video frames; ``None``: not known (users must pass
            ``trained_frames=``).
    """

    name: str
    match: Mapping[str, Any]
    trained_video_frames: int | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "match", _frozen_match("ConfigVariant", self.match))
        _check_frames(f"ConfigVariant {self.name!r}", self.trained_video_frames)


@dataclass(frozen=True)
class ModelClass:
    """One transformer class an adapter handles, found by ``type(transformer).__name__``.

    Args:
        name: the class name, e.g. ``"WanTransformer3DModel"``.
        trained_video_frames: the trained length in video frames; ``None``: not known.
        variants: config variants with another trained length; the last one that matches wins.
        note: why the trained length is what it is, or why it is not known (shown in the error that
            asks for ``trained_frames=``).
    """

    name: str
    trained_video_frames: int | None
    variants: tuple[ConfigVariant, ...] = ()
    note: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"ModelClass.name must be a class name, got {self.name!r}")
        _check_frames(f"ModelClass {self.name!r}", self.trained_video_frames)
        if not isinstance(self.variants, tuple) or not all(isinstance(v, ConfigVariant) for v in self.variants):
            raise ValueError(f"ModelClass {self.name!r}: variants must be a tuple of ConfigVariant, "
                             f"got {self.variants!r}")

    def trained_video_frames_for(self, config: Any) -> int | None:
        """The trained length (video frames) of a model with this config; ``None``: not known."""
        frames = self.trained_video_frames
        for variant in self.variants:
            if config_matches(config, variant.match):
                frames = variant.trained_video_frames
        return frames


@dataclass(frozen=True)
class ShippedPlan:
    """A layer plan shipped with an adapter: the file ``plans/<name>.json`` of the import package ``package``.

    Args:
        name: the plan's name (``LayerPlan.published(name)``), unique among all installed adapters.
        model_class: the class name of the transformers it is for.
        match: config keys and values of the models it is for (e.g. layer and head counts).
        package: the import package that holds ``plans/<name>.json`` as package data (in an
            adapter's module: ``__package__``).
    """

    name: str
    model_class: str
    match: Mapping[str, Any]
    package: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "match", _frozen_match("ShippedPlan", self.match))
        if not self.name or "/" in self.name or self.name.endswith(".json"):
            raise ValueError(f"ShippedPlan.name must be a plain name (the file is plans/<name>.json), "
                             f"got {self.name!r}")

    @property
    def resource(self) -> str:
        """Where the file lies: ``<package>/plans/<name>.json``."""
        return f"{self.package}/plans/{self.name}.json"

    def applies_to(self, transformer: torch.nn.Module) -> bool:
        """Whether the plan is for this transformer (its class name and config)."""
        return type(transformer).__name__ == self.model_class and config_matches(
            getattr(transformer, "config", None), self.match)

    def load(self) -> LayerPlan:
        """The plan, read from the package data."""
        try:
            text = resources.files(self.package).joinpath("plans", f"{self.name}.json").read_text(encoding="utf-8")
        except (ModuleNotFoundError, FileNotFoundError) as e:
            raise FileNotFoundError(f"the shipped plan {self.name!r} should be the package data file {self.resource}, "
                                    f"which is missing ({e}); declare plans/*.json as package data of "
                                    f"{self.package!r} and reinstall") from e
        return LayerPlan.from_json(text)


@dataclass(frozen=True)
class ModelData:
    """Every number an adapter knows about its models, declared on the adapter class.

    Args:
        classes: the transformer classes the adapter handles, with their trained lengths.
        temporal_factor: video frames per latent frame of the model family's VAE (``latent = (video - 1)
            // factor + 1``); a pipeline's ``vae_scale_factor_temporal`` and ``enable(temporal_factor=)``
            take precedence.
        plans: layer plans shipped with the adapter.
    """

    classes: tuple[ModelClass, ...]
    temporal_factor: int
    plans: tuple[ShippedPlan, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.classes, tuple) or not self.classes or not all(
                isinstance(c, ModelClass) for c in self.classes):
            raise ValueError(f"ModelData.classes must be a non-empty tuple of ModelClass, got {self.classes!r}")
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise ValueError(f"ModelData.classes names a class twice: {names}")
        if not isinstance(self.temporal_factor, int) or isinstance(self.temporal_factor, bool) or \
                self.temporal_factor < 1:
            raise ValueError(f"ModelData.temporal_factor must be a positive int (video frames per latent frame), "
                             f"got {self.temporal_factor!r}")
        if not isinstance(self.plans, tuple) or not all(isinstance(p, ShippedPlan) for p in self.plans):
            raise ValueError(f"ModelData.plans must be a tuple of ShippedPlan, got {self.plans!r}")
        for p in self.plans:
            if p.model_class not in names:
                raise ValueError(f"ShippedPlan {p.name!r} is for {p.model_class!r}, which is not one of this "
                                 f"adapter's classes {names}")

    @property
    def class_names(self) -> tuple[str, ...]:
        """The class names of the transformers the adapter handles."""
        return tuple(c.name for c in self.classes)

    def model_class(self, name: str) -> ModelClass:
        """The declaration of the class ``name``."""
        for c in self.classes:
            if c.name == name:
                return c
        raise KeyError(f"{name!r} is not one of the declared classes {list(self.class_names)}")


# ---------------------------------------------------------------------------------------------- runtime state
class GridState:
    """The latent grid ``(F, H', W')`` of the current forward, set by the adapter's pre-hook."""

    def __init__(self, expected_frames: int | None) -> None:
        self.value: tuple[int, int, int] | None = None
        self.expected_frames = expected_frames

    def set(self, value: tuple[int, int, int]) -> None:
        if self.expected_frames is not None and value[0] != self.expected_frames:
            raise ValueError(f"freeloc was enabled for num_frames giving {self.expected_frames} latent frames, "
                             f"but the transformer got {value[0]}; pass the same num_frames to the pipeline")
        self.value = value


class GridHook:
    """The transformer's forward pre-hook: records the grid of each call in ``state``.

    An object rather than a closure, so that it lives on the module like the rest of the state: a
    ``copy.deepcopy`` of the model gets its own hook and grid, and the model pickles.
    """

    def __init__(self, adapter: TransformerAdapter, state: GridState, identity: bool = False) -> None:
        self.adapter = adapter
        self.state = state
        self.identity = identity  # every layer runs its own processor: the grid serves statistics only

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self.identity and torch.compiler.is_compiling():  # no statistics in a traced graph
            return
        self.state.set(self.adapter.grid_from_call(args, kwargs))


@torch.compiler.assume_constant_result
def _traced_method(ctx: LayerContext, frames: int) -> Method | None:
    """``LayerContext.method`` inside a traced graph: run in Python while tracing, a constant in the graph."""
    method = ctx.plan.resolve(ctx.layer, frames, ctx.trained_frames)
    ctx.last_method = method
    return method


@torch.compiler.assume_constant_result
def _traced_call_key(ctx: LayerContext, f: int, h: int, w: int, text_before: int, text_after: int) -> str:
    """The key of the layer's ``attend`` call at this grid (see ``freeloc.attention._opaque``), made while tracing."""
    method = ctx.plan.resolve(ctx.layer, f, ctx.trained_frames)
    return call_key(AttendCall((f, h, w), method, ctx.rotary, ctx.backend, text_before, text_after, ctx.options))


class LayerContext:
    """One hooked self-attention layer: its plan entry, the grid, statistics, and the attention call.

    Inside a graph traced by ``torch.compile`` or ``torch.export``, the method is resolved while tracing
    (a constant of the graph; the shapes it depends on are guarded), ``attend`` is the opaque operator
    ``torch.ops.freeloc.attend``, and no statistics are recorded.
    """

    def __init__(self, grid: GridState, rotary: RotaryLayout | None, plan: LayerPlan, layer: int, trained_frames: int,
                 stats: LayerStats, backend: str, options: AttentionOptions | None = None) -> None:
        self.grid = grid
        self.rotary = rotary
        self.plan = plan
        self.layer = layer
        self.trained_frames = trained_frames
        self.stats = stats
        self.backend = backend
        self.options = options  # attention tuning settings, passed to every attend call of the layer
        self.last_method: Method | None = None
        self.module: torch.nn.Module | None = None  # the hooked layer, set by the adapter's install
        self.observer: Callable[..., None] | None = None  # sees each attend call's inputs (the probe)
        #: diffusers' ParallelConfig of the layer (``enable_parallelism``), set through the processor
        self.parallel_config: Any = None

    def method(self) -> Method | None:
        """The layer's method at the current grid; None: run the model's own processor."""
        grid = self.grid.value
        if grid is None:
            return None
        if torch.compiler.is_compiling():
            return _traced_method(self, grid[0])
        method = self.plan.resolve(self.layer, grid[0], self.trained_frames)
        self.last_method = method
        # the plan's entry at this length: a length range may replace the plan's own
        self.stats.method = self.plan.methods_at(grid[0], self.trained_frames)[0][self.layer]
        return method

    def timer(self) -> AbstractContextManager[None]:
        """Times a block into the layer's statistics and counts it as one call."""
        return nullcontext() if torch.compiler.is_compiling() else Timer(self.stats)

    def passthrough(self, call: Callable[[], T]) -> T:
        """Run the original processor (timed); its temporal distances reach F - 1."""
        if torch.compiler.is_compiling():
            return call()
        with Timer(self.stats):
            out = call()
        if self.grid.value is not None:
            self.stats.max_abs_distance = max(self.stats.max_abs_distance, float(self.grid.value[0] - 1))
        return out

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, method: Method, *, text_before: int = 0,
               text_after: int = 0, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``freeloc.attention.attend`` on the layer's q/k/v (before RoPE), recording statistics.

        ``method`` is what ``method()`` returned for this call.
        """
        grid = self.grid.value
        assert grid is not None
        ulysses = None if self.parallel_config is None else Ulysses.from_config(self.parallel_config)
        if ulysses is not None:  # this rank's shard of the video tokens: attend on the full grid, its heads
            f, h, w = grid
            heads = q.shape[2]

            def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                if self.observer is not None:  # the probe sees every head, as on one process
                    self.observer(self, *(ulysses.gather_heads(x, heads) for x in (q, k, v)), method,
                                  dict(text_before=text_before, text_after=text_after, text_mask=text_mask))
                return self._attend(q, k, v, method, text_before, text_after, text_mask, observe=False)

            return ulysses.attend(run, q, k, v, f * h * w, text_before, text_after)
        return self._attend(q, k, v, method, text_before, text_after, text_mask)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, method: Method, text_before: int,
                text_after: int, text_mask: torch.Tensor | None, observe: bool = True) -> torch.Tensor:
        grid = self.grid.value
        assert grid is not None
        if torch.compiler.is_compiling():
            key = _traced_call_key(self, *grid, text_before, text_after)
            return opaque_attend(q, k, v, text_mask, key)
        if observe and self.observer is not None:
            self.observer(self, q, k, v, method, dict(text_before=text_before, text_after=text_after,
                                                      text_mask=text_mask))
        out = attend(q, k, v, grid=grid, method=method, rotary=self.rotary, backend=self.backend,
                     text_before=text_before, text_after=text_after, text_mask=text_mask, options=self.options)
        f, h, w = grid
        bands = band_set_for(method, f, h * w, self.rotary)
        r = max(float(b.relative_distance()[b.pairs].abs().max()) for b in bands.bands if bool(b.pairs.any()))
        self.stats.max_abs_distance = max(self.stats.max_abs_distance, r)
        self.stats.density = bands.token_density(h * w)
        return out


class FreeLOCProcessor:
    """Base of the adapters' processors: the original processor, the layer context, introspection.

    diffusers' ``set_attention_backend`` / ``reset_attention_backend`` reach the original processor through
    ``_attention_backend``: a layer that runs the original (nothing to change at this length) uses the
    backend the user chose, and keeps it after removal. The layers freeloc computes use ``attend``'s own
    kernels (``freeloc.enable(backend=..., attention=...)``).

    diffusers' ``enable_parallelism`` reaches both through ``_parallel_config``: the layers freeloc computes
    run Ulysses context parallelism (``freeloc.parallel``), the original gets the configuration too.
    """

    def __init__(self, original: Any, ctx: LayerContext) -> None:
        self.original = original
        self.ctx = ctx
        ctx.parallel_config = getattr(original, "_parallel_config", None)

    @property
    def _attention_backend(self) -> Any:
        return getattr(self.original, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value: Any) -> None:
        if hasattr(self.original, "_attention_backend"):
            self.original._attention_backend = value

    @property
    def _parallel_config(self) -> Any:
        return self.ctx.parallel_config

    @_parallel_config.setter
    def _parallel_config(self, value: Any) -> None:
        # diffusers' enable_parallelism sets this on every processor that has it: the layers freeloc
        # computes run Ulysses with it, and the original (for the layers it runs, and after removal) gets it too
        self.ctx.parallel_config = value
        if hasattr(self.original, "_parallel_config"):
            self.original._parallel_config = value

    @property
    def trained_frames(self) -> int:
        return self.ctx.trained_frames

    @property
    def rotary(self) -> RotaryLayout | None:
        return self.ctx.rotary

    @property
    def last_method(self) -> Method | None:
        return self.ctx.last_method


# ---------------------------------------------------------------------------------------------- the adapter
class TransformerAdapter:
    """Base class of the adapters: subclasses declare ``model_data`` and fill in the model-specific parts."""

    #: The transformer classes this adapter handles, their trained lengths, temporal factor and shipped plans.
    model_data: ClassVar[ModelData]
    #: UltraViCo's harmonic band on these models: ``None`` where UltraViCo has none (Wan, and the
    #: default); a published setting such as ``{"beta": 0.6, "period": 50}`` (HunyuanVideo), given to
    #: the UltraViCo layers that set neither key; or ``UNPUBLISHED`` where the models' RoPE may need
    #: one and none is published: UltraViCo layers must then set ``beta`` (``None``: the decay alone).
    ultravico_band: ClassVar[Mapping[str, Any] | str | None] = None

    def __init__(self, transformer: torch.nn.Module, name: str = "transformer") -> None:
        self.transformer = transformer
        self.name = name

    # ------------------------------------------------------------------ model-specific
    def attention_layers(self) -> list[torch.nn.Module]:
        """The self-attention modules, in plan order (each has ``processor`` and ``set_processor``)."""
        raise NotImplementedError

    def rotary_layout(self) -> RotaryLayout | None:
        """The model's rotary layout; ``None`` for a model without RoPE (attention-pattern methods only)."""
        raise NotImplementedError

    def grid_from_call(self, args: tuple, kwargs: dict[str, Any]) -> tuple[int, int, int]:
        """``(F, H', W')`` in tokens, from the transformer's forward arguments."""
        raise NotImplementedError

    def temporal_patch(self) -> int:
        """Latent frames per temporal token (1 unless the model patches time)."""
        return 1

    def make_processor(self, original: Any, ctx: LayerContext) -> Any:
        """The replacement processor of the layer ``ctx.module`` (whose processor is ``original``)."""
        raise NotImplementedError

    def rotary_layout_or_none(self) -> RotaryLayout | None:
        """``rotary_layout()``, or ``None`` where freeloc cannot rotate the model's RoPE (the error says why)."""
        try:
            return self.rotary_layout()
        except ValueError:
            return None

    def synthetic_inputs(self, frames: int, seed: int = 0, latent_size: tuple[int, int] | None = None
                         ) -> dict[str, Any]:
        """Forward keyword arguments for probing at ``frames`` temporal tokens (Gaussian latents of the
        target shape, Gaussian text embeddings of the model's width, timestep 500 of 1000)."""
        raise NotImplementedError(f"{type(self).__name__} has no synthetic probe inputs: pass inputs= to "
                                  f"freeloc.probe (the transformer's forward keyword arguments)")

    def check_supported(self, method: str, plan: LayerPlan) -> None:
        """Raise a clear error if the plan needs something this model lacks (e.g. RoPE)."""

    # ------------------------------------------------------------------ context parallelism
    def context_parallel_plan(self) -> dict[str, Any] | None:
        """Where diffusers' context parallelism splits and gathers this model's tokens (diffusers'
        ``cp_plan`` format), for a model diffusers has no plan for; ``None``: the model's own ``_cp_plan``."""
        return None

    def context_parallel_processor(self, original: Any, tokens: GridState) -> Any:
        """A processor that runs the layer whose processor is ``original`` under Ulysses context parallelism
        (with ``context_parallel_plan``); ``tokens`` holds the grid of the current forward (every rank's
        tokens). Only called when ``context_parallel_plan`` gives a plan."""
        raise NotImplementedError(f"{type(self).__name__} gives a context-parallel plan but no processor for it")

    # ------------------------------------------------------------------ data
    def trained_video_frames(self) -> int:
        """The trained length in video frames, from ``model_data`` (by class, then config variant)."""
        cls = type(self.transformer).__name__
        data = self.model_data
        if cls not in data.class_names:
            raise ValueError(f"the trained length of {cls} is not known to {type(self).__name__}, which declares "
                             f"{list(data.class_names)}; pass trained_frames= (video frames) to freeloc.enable")
        entry = data.model_class(cls)
        frames = entry.trained_video_frames_for(getattr(self.transformer, "config", None))
        if frames is None:
            raise ValueError(f"the trained length of {cls} is not known to freeloc ({entry.note}); pass "
                             f"trained_frames= (video frames) to freeloc.enable")
        return frames

    def shipped_plan(self) -> ShippedPlan | None:
        """The shipped plan whose model matches this transformer's class and config, if any."""
        return next((p for p in self.model_data.plans if p.applies_to(self.transformer)), None)

    def video_to_latent(self, frames: int, factor: int) -> int:
        """Temporal tokens of ``frames`` video frames: ``((frames - 1) // factor + 1) // temporal_patch``."""
        return ((frames - 1) // factor + 1) // self.temporal_patch()

    def _with_ultravico_band(self, plan: LayerPlan, rotary: RotaryLayout | None, trained: int) -> LayerPlan:
        """``plan`` with this model's UltraViCo band (``ultravico_band``) in its UltraViCo layers, or a clear
        error where the band must be chosen and a layer does not choose it."""
        band = self.ultravico_band
        if band is None or rotary is None or "ultravico" not in plan.all_methods():
            return plan
        if not isinstance(band, str):
            return plan.with_defaults("ultravico", dict(band))
        if all("beta" in p for p in plan.params_of("ultravico")):
            return plan
        periods = [p for p in (2 * math.pi / rotary.temporal_freqs()).tolist() if p > trained]
        hint = (f" (the shortest temporal RoPE period longer than the trained {trained} temporal positions is "
                f"{min(periods):.1f})" if periods else "")
        raise ValueError(
            f"UltraViCo on {type(self.transformer).__name__} ({self.name}): besides the decay beyond half the "
            f"trained length, UltraViCo scales the positive logits near multiples of a RoPE period close to the "
            f"trained length by beta (published for HunyuanVideo: beta=0.6, period=50; Wan needs none), and no "
            f"such setting is published for this model. Choose it: method_params={{'beta': B, 'period': P}}"
            f"{hint}, or method_params={{'beta': None}} for the decay alone (in a plan: the UltraViCo layers' "
            f"params; on the command line: --params 'ultravico:{{\"beta\": null}}')")

    # ------------------------------------------------------------------ install
    def install(self, session: Session, *, method: str, plan: LayerPlan | str | None, num_frames: int | None,
                trained_frames: int | None, backend: str, pipeline: Any = None,
                method_params: dict[str, Any] | None = None, temporal_factor: int | None = None,
                attention: AttentionOptions | None = None) -> None:
        """Validate everything, then install the grid hook and the processors, registering each undo."""
        tr = self.transformer
        if getattr(tr, MARK, None) is not None:
            raise RuntimeError(f"freeloc is already applied to this {type(tr).__name__} ({self.name}); remove "
                               f"that session first (leave its with-block or call .remove())")
        for label, value, unit in (("num_frames", num_frames, "video frames"),
                                   ("trained_frames", trained_frames, "video frames"),
                                   ("temporal_factor", temporal_factor, "video frames per latent frame")):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{label} must be a positive int ({unit}), got {value!r}")
        factor = temporal_factor or int(getattr(pipeline, "vae_scale_factor_temporal", 0)
                                        or self.model_data.temporal_factor)
        video_t = trained_frames if trained_frames is not None else self.trained_video_frames()
        t_latent = self.video_to_latent(video_t, factor)
        expected = None if num_frames is None else self.video_to_latent(num_frames, factor)
        layers = self.attention_layers()
        try:
            rotary, no_layout = self.rotary_layout(), None
        except ValueError as err:  # a RoPE freeloc cannot apply: only layers left unchanged are possible
            rotary, no_layout = None, err
        layer_plan = plan_for(method, plan, len(layers), self.shipped_plan(), f"{type(tr).__name__}({self.name})",
                              method_params, uniform="tsa" if rotary is None and no_layout is None else "vrpr")
        if no_layout is not None and layer_plan.all_methods() - {DIRECT}:
            raise no_layout
        layer_plan = self._with_ultravico_band(layer_plan, rotary, t_latent)
        self.check_supported(method, layer_plan)
        layer_plan.check_for_model(type(tr).__name__, t_latent, expected)
        grid = GridState(expected)

        # Every change is recorded on the transformer itself (``Installation``), so a copy of the model
        # carries a record of its own changes and can be removed like the original.
        record = Installation(self.name, layer_plan)
        setattr(tr, MARK, record)
        record.undo(DeleteAttribute(tr, MARK))
        session.add(record)
        identity = layer_plan.all_methods() <= {DIRECT}
        handle = tr.register_forward_pre_hook(GridHook(self, grid, identity), with_kwargs=True)
        record.undo(RemoveHook(handle))
        session.plan = layer_plan
        for i, attn in enumerate(layers):
            stats = LayerStats(self.name, i, layer_plan.methods[i])
            record.layers.append(stats)
            original = attn.processor
            ctx = LayerContext(grid, rotary, layer_plan, i, t_latent, stats, backend, attention)
            ctx.module = attn
            ctx.observer = session.observer
            attn.set_processor(self.make_processor(original, ctx))
            record.undo(RestoreProcessor(attn, original, attn.processor))


# ---------------------------------------------------------------------------------------------- undo steps
# Objects rather than closures: they refer to the modules they change, so a deepcopy of a hooked model
# gets steps that undo the copy's changes, and a hooked model pickles.
class DeleteAttribute:
    """Undo: delete the attribute ``name`` of ``obj``."""

    def __init__(self, obj: object, name: str) -> None:
        self.obj, self.name = obj, name

    def __call__(self) -> None:
        if hasattr(self.obj, self.name):
            delattr(self.obj, self.name)


class RemoveHook:
    """Undo: remove a hook by its handle."""

    def __init__(self, handle: RemovableHandle) -> None:
        self.handle = handle

    def __call__(self) -> None:
        self.handle.remove()


class RestoreProcessor:
    """Undo: give an attention module back its processor.

    That is the processor freeloc's processor (``installed``) wraps at removal: the one it replaced, or
    the context-parallel processor ``freeloc.parallel.enable_parallelism`` put in its place since.
    """

    def __init__(self, attn: torch.nn.Module, processor: Any, installed: Any = None) -> None:
        self.attn, self.processor, self.installed = attn, processor, installed

    def __call__(self) -> None:
        self.attn.set_processor(getattr(self.installed, "original", self.processor))  # type: ignore[operator]
