"""Hook sessions: apply a layer plan to a model through its adapter, and always take it off again.

Hooks are global state on a user's model, so the safe path is the easy one::

    with freeloc.enable(pipe, num_frames=321) as session:
        frames = pipe(prompt=..., num_frames=321).frames[0]
    print(session.report())

or, without a ``with`` block, ``session = freeloc.enable(...); ...; session.remove()``. Leaving the
block (normally or by an exception) or calling ``Session.remove`` restores every processor,
hook and attribute the session changed, in reverse order; removing twice is harmless.

This module is framework-independent: the adapter of each transformer found in the target is looked
up in ``freeloc.registry`` (entry points of the group ``freeloc.adapters``), by the transformer's
class name.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .attention import AttentionOptions
from .attention.options import BACKENDS
from .methods import METHODS
from .plan import DIRECT, LayerPlan

if TYPE_CHECKING:
    from .adapter import ShippedPlan

__all__ = ["Session", "Installation", "LayerStats", "enable", "plan_for", "METHOD_CHOICES", "MARK"]

#: The attribute of a transformer holding the ``Installation`` of the session applied to it.
MARK = "_freeloc_installation"

#: Held while a session is applied or removed: enabling and removing are atomic, so two threads cannot
#: both apply a session to one model.
_LOCK = threading.RLock()

#: Values of ``method=``: the layer plan ("freeloc"), one method on every layer, or no change.
METHOD_CHOICES = ("freeloc", DIRECT, *sorted(m for m in METHODS if m != "key-shift"))


@dataclass
class LayerStats:
    """What one hooked self-attention layer did during a session."""

    model: str
    layer: int
    method: str  # the plan's entry in effect at the last call's length (a length range may change it)
    calls: int = 0
    max_abs_distance: float = 0.0  # largest |temporal relative distance| used in attention
    density: float = 1.0  # fraction of video token pairs attended
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Installation:
    """What a session changed on one transformer, kept on the transformer (attribute ``MARK``).

    The undo steps are objects that refer to the modules they change, so a ``copy.deepcopy`` or a
    pickled-and-loaded copy of a hooked model holds the record of its own changes:
    ``Session.of(copy).remove()`` restores the copy.
    """

    def __init__(self, name: str, plan: LayerPlan) -> None:
        self.name = name
        self.plan = plan
        self.layers: list[LayerStats] = []
        self._steps: list[Callable[[], None]] = []

    def undo(self, step: Callable[[], None]) -> None:
        """Register an undo step; steps run in reverse order on ``remove``."""
        self._steps.append(step)

    def remove(self) -> list[Exception]:
        """Run every undo step (the rest still run when one fails); returns the failures."""
        errors: list[Exception] = []
        with _LOCK:
            while self._steps:
                step = self._steps.pop()
                try:
                    step()
                except Exception as e:  # keep undoing the rest, then report
                    errors.append(e)
        return errors


@dataclass
class Session:
    """An applied plan: per-layer statistics and the undo log that removes it."""

    plan: LayerPlan | None = None
    #: Called with (layer context, q, k, v, method, text kwargs) before each hooked attention (set it
    #: before installing; the probe uses it to see a layer's own q/k).
    observer: Callable[..., None] | None = None
    installations: list[Installation] = field(default_factory=list)
    _undo: list[Callable[[], None]] = field(default_factory=list)
    _active: bool = True

    @classmethod
    def of(cls, target: torch.nn.Module | Any) -> Session:
        """The session applied to ``target`` (a transformer, or a pipeline and its transformers).

        Works on copies too: ``copy.deepcopy`` of a hooked model, or one pickled and loaded, carries
        freeloc's changes with it, and ``Session.of(copy).remove()`` takes them off the copy.

        Raises:
            ValueError: if freeloc is not applied to ``target``.
        """
        modules = [target] if isinstance(target, torch.nn.Module) else [
            m for m in vars(target).values() if isinstance(m, torch.nn.Module)]
        found = [r for m in modules if isinstance(r := getattr(m, MARK, None), Installation)]
        if not found:
            raise ValueError(f"freeloc is not applied to this {type(target).__name__}")
        session = cls(plan=found[0].plan)
        for record in found:
            session.add(record)
        return session

    @property
    def layers(self) -> list[LayerStats]:
        """Per hooked layer statistics, transformer by transformer."""
        return [s for record in self.installations for s in record.layers]

    def add(self, record: Installation) -> None:
        """Take ``record`` into the session: ``remove`` undoes it."""
        self.installations.append(record)
        self._undo.append(record.remove)

    def on_remove(self, undo: Callable[[], None]) -> None:
        """Register an undo step; steps run in reverse order on ``remove``."""
        self._undo.append(undo)

    @property
    def active(self) -> bool:
        return self._active

    def remove(self) -> None:
        """Restore the model exactly as it was. Safe to call more than once."""
        errors: list[Exception] = []
        with _LOCK:
            while self._undo:
                undo = self._undo.pop()
                try:
                    errors += undo() or []
                except Exception as e:  # keep undoing the rest, then report
                    errors.append(e)
            self._active = False
        if errors:
            raise RuntimeError(f"freeloc: {len(errors)} undo step(s) failed while removing: {errors}") from errors[0]

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def report(self) -> str:
        """A table: per layer, the method, calls, max |temporal relative distance|, density, time.

        Calls inside a graph compiled by ``torch.compile`` are not counted (statistics stay off the
        compiled path).
        """
        lines = [f"{'model':12} {'layer':>5} {'method':15} {'calls':>5} {'max |r|':>8} {'density':>8} {'time s':>8}"]
        for s in self.layers:
            lines.append(f"{s.model:12} {s.layer:5d} {s.method:15} {s.calls:5d} {s.max_abs_distance:8.1f} "
                         f"{s.density:8.3f} {s.seconds:8.3f}")
        return "\n".join(lines)

    def stats(self) -> list[dict[str, Any]]:
        return [s.as_dict() for s in self.layers]


class Timer:
    """Adds the wall time of a block to a ``LayerStats`` (eager calls only: ``LayerContext`` uses none inside
    a compiled graph, where a clock cannot be traced)."""

    def __init__(self, stats: LayerStats) -> None:
        self.stats = stats

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.stats.seconds += time.perf_counter() - self.t0
        self.stats.calls += 1


def plan_for(method: str, plan: LayerPlan | str | Path | None, num_layers: int,
             shipped: ShippedPlan | None, model_name: str, method_params: dict[str, Any] | None = None,
             uniform: str = "vrpr") -> LayerPlan:
    """The layer plan a session applies, with clear errors.

    ``method="freeloc"``: ``plan`` (a LayerPlan, a JSON path, or ``"uniform"``: the ``uniform`` method,
    VRPR unless the model has no RoPE, on every layer),
    or the shipped plan ``shipped`` when the model matches one. Any other method: that method on
    every layer (``plan`` must then be None), with ``method_params`` (e.g. ``{"k": 4}`` for RIFLEx;
    the parameters not given: derived from the length).
    """
    if method not in METHOD_CHOICES:
        raise ValueError(f"method must be one of {list(METHOD_CHOICES)}, got {method!r}")
    if method != "freeloc":
        if plan is not None:
            raise ValueError(f"plan= is only used with method='freeloc', got method={method!r} and a plan")
        if method == "riflex" and not (method_params or {}).get("k"):
            raise ValueError("method='riflex' needs its intrinsic frequency index: method_params={'k': K} "
                             "(1-based; published: HunyuanVideo 4, CogVideoX-5B 2; on the command line "
                             "--params 'riflex:{\"k\": K}')")
        return LayerPlan.uniform(method, num_layers, **(method_params or {}))
    if method_params:
        raise ValueError(f"method_params is for a single method on every layer, not method='freeloc' "
                         f"(put per-layer parameters in the plan), got {method_params!r}")
    if plan is None:
        if shipped is None:
            raise ValueError(
                f"no shipped layer plan matches {model_name} ({num_layers} self-attention layers): run "
                f"`freeloc probe` on it and pass plan=PATH, or pass plan='uniform' ({uniform} on every layer)")
        resolved = shipped.load()
    elif isinstance(plan, LayerPlan):
        resolved = plan
    elif plan == "uniform":
        resolved = LayerPlan.uniform(uniform, num_layers)
    elif isinstance(plan, (str, Path)):
        resolved = LayerPlan.load(plan)
    else:
        raise ValueError(f"plan must be None, 'uniform', a path to a plan JSON or a LayerPlan, got {plan!r}")
    resolved.check_layers(num_layers)
    return resolved


def enable(target: torch.nn.Module | Any, num_frames: int | None = None, plan: LayerPlan | str | Path | None = None,
           method: str = "freeloc", *, adapter: Any = None, trained_frames: int | None = None,
           backend: str = "auto", method_params: dict[str, Any] | None = None,
           observer: Callable[..., None] | None = None, temporal_factor: int | None = None,
           attention: AttentionOptions | None = None) -> Session:
    """Apply FreeLOC (or a baseline) to a pipeline or transformer; use as a context manager.

    Args:
        target: a diffusers pipeline (every transformer it holds is patched) or a transformer module.
        num_frames: the video length in **video** frames (converted with the model's VAE factor);
            ``None`` takes the grid from each forward's latent.
        plan: see ``plan_for``.
        method: ``"freeloc"`` (the layer plan), ``"direct"`` (no change), or one method on every
            layer: ``"vrpr"``, ``"tsa"``, ``"pi"``, ``"ntk"``, ``"yarn"``, ``"riflex"``, ``"sliding-window"``.
        adapter: an adapter class (a ``TransformerAdapter`` subclass) to use
            instead of the one the registry finds for the model's class.
        trained_frames: the trained length in video frames, overriding the model's data.
        backend: attention backend for ``freeloc.attention.attend``.
        method_params: parameters of a single ``method`` on every layer, e.g. ``{"k": 4}`` for RIFLEx or
            ``{"window": 10}`` for the sliding window; the parameters not given are derived from the length.
        observer: called with each hooked layer's attention inputs (used by the probe).
        temporal_factor: video frames per latent frame, overriding the pipeline's and the model data's
            (1 for a model without temporal compression); ``latent = (video - 1) // factor + 1``.
        attention: tuning settings of every hooked layer's ``freeloc.attention.attend`` call
            (``AttentionOptions``); None: the defaults.

    Returns:
        The ``Session``; leaving its ``with`` block or ``Session.remove`` undoes everything.
        Without a ``with`` block, call ``Session.remove`` when done.
    """
    from .registry import adapters_for  # the registry imports the adapter base, which imports this module

    if attention is not None and not isinstance(attention, AttentionOptions):
        raise TypeError(f"attention must be a freeloc.AttentionOptions or None, got {type(attention).__name__} "
                        f"({attention!r})")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    found = adapters_for(target, adapter)
    session = Session(observer=observer)
    with _LOCK:  # the double-apply check and the install are one step
        try:
            for name, module, adapter_cls in found:
                adapter_cls(module, name=name).install(
                    session, method=method, plan=plan, num_frames=num_frames, trained_frames=trained_frames,
                    backend=backend, pipeline=None if module is target else target, method_params=method_params,
                    temporal_factor=temporal_factor, attention=attention)
        except BaseException:
            session.remove()
            raise
    return session
