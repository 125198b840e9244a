"""The loss probe: each layer's method at each length, chosen by the model's own loss on real clips.

``freeloc.probe`` measures how strongly a layer reacts when its positions or its context are perturbed;
a strong reaction does not say whether a correction helps that layer. Given clean clips at the target
lengths, the model's training loss does. For each length ratio ``r`` in ``batches``, every layer runs
``base`` (e.g. TSA: bounded context for all) and then one layer at a time switches to ``candidate``
(e.g. TSA+VRPR: the same context at re-encoded positions); the model denoises the given noisy clips
each time, and the layer's relative gain is

    gain = (loss(base everywhere) - loss(candidate on that layer)) / loss(base everywhere),

the mean squared error between the model's output and the given target (for a flow-matching model such
as Wan, ``noise - x0``). Its z-score is the mean of the per-row paired differences of squared errors (a
row: one clip at one timestep) over their standard error. A layer takes ``candidate`` from ``r`` on when
its gain exceeds ``margin`` and its z-score ``min_z``, and ``base`` otherwise; below the smallest ratio
every layer runs ``below`` (default ``direct``). One plan with one length range per ratio results; each
ratio's gains and z-scores are kept in its scores (``loss_gain_4x``, ``loss_z_4x``, ...).

On the shapes test bed the gains rank the layers as the leave-one-out ablation of sampled videos does
(benchmarks/RESULTS.md), which the attention and output scores do not.

Cost: ``len(items) * (1 + layers)`` forwards of the model per ratio, at that ratio's length.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._progress import Progress, reporter
from .plan import LayerPlan, LengthRange
from .probing import model_identity, trained_tokens

__all__ = ["probe_loss", "check_min_z", "loss_score_name", "z_score_name"]

#: One denoising example: the model's forward keyword arguments and the output it should give.
Batch = tuple[dict[str, Any], Tensor]


def loss_score_name(ratio: float | int) -> str:
    """The plan's score key for the gains at ``ratio``: ``loss_gain_4x``, ``loss_gain_2.5x``."""
    return f"loss_gain_{float(ratio):g}x"


def _check(batches: Any, base: str, candidate: str, below: str, margin: Any) -> list[float]:
    """The sorted ratios of ``batches``, or ``ValueError`` naming what is wrong, before any forward."""
    if not isinstance(batches, Mapping) or not batches:
        raise ValueError(f"probe_loss: batches must be a non-empty mapping of length ratio -> [(inputs, target), "
                         f"...], got {type(batches).__name__}")
    for ratio, items in batches.items():
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not math.isfinite(ratio) or ratio <= 1:
            raise ValueError(f"probe_loss: each key of batches must be a length ratio > 1, got {ratio!r}")
        if not isinstance(items, Sequence) or isinstance(items, (str, bytes)) or not items:
            raise ValueError(f"probe_loss: batches[{ratio!r}] must be a non-empty list of (inputs, target) pairs, "
                             f"got {items!r:.80}")
        for i, item in enumerate(items):
            if (not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], dict)
                    or not isinstance(item[1], Tensor)):
                raise ValueError(f"probe_loss: batches[{ratio!r}][{i}] must be a pair (forward keyword arguments "
                                 f"as a dict, target tensor), got {type(item).__name__}")
    for label, name in (("base", base), ("candidate", candidate), ("below", below)):
        try:
            LayerPlan.uniform(name, 1)
        except (ValueError, TypeError) as err:
            raise ValueError(f"probe_loss: {label}: {err}") from None
    if base == candidate:
        raise ValueError(f"probe_loss: candidate must differ from base, got {candidate!r} for both")
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not math.isfinite(margin):
        raise ValueError(f"probe_loss: margin must be a finite number (a relative loss gain), got {margin!r}")
    return sorted(float(r) for r in batches)


def z_score_name(ratio: float | int) -> str:
    """The plan's score key for the gains' z-scores at ``ratio``: ``loss_z_4x``."""
    return f"loss_z_{float(ratio):g}x"


def _z(diff: Tensor) -> float:
    """The mean of the paired differences over its standard error (0 for no difference; +-inf when every
    difference is the same non-zero value; 0 with a single difference, which has no error estimate)."""
    mean = float(diff.mean())
    if diff.numel() < 2:
        return 0.0
    se = float(diff.std()) / math.sqrt(diff.numel())
    if se == 0.0:
        return 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    return mean / se


def check_min_z(min_z: Any) -> None:
    """Raise ``ValueError`` unless ``min_z`` is a number (a z-score; NaN is not)."""
    if not isinstance(min_z, (int, float)) or isinstance(min_z, bool) or math.isnan(min_z):
        raise ValueError(f"probe_loss: min_z must be a number (a z-score), got {min_z!r}")


def _output(out: Any) -> Tensor:
    out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
    return out.detach().float()


def probe_loss(target: Any, batches: Mapping[float | int, Sequence[Batch]], *, base: str = "tsa",
               candidate: str = "tsa+vrpr", below: str = "direct", margin: float = 0.0, min_z: float = 0.0,
               layers: list[int] | None = None, trained_frames: int | None = None,
               temporal_factor: int | None = None, progress: Progress = True) -> LayerPlan:
    """Choose, per length ratio and layer, between ``base`` and ``candidate`` by the model's loss.

    Args:
        target: a transformer module or a pipeline (its ``transformer`` is probed).
        batches: for each length ratio (> 1), the examples to denoise at that length: pairs of the
            transformer's forward keyword arguments (noisy latents of real clips ``ratio`` times the
            trained length, timestep, conditioning) and the output it should give (flow matching:
            ``noise - x0``). Several timesteps and clips make the gains steadier.
        base: the method of every layer that does not take ``candidate``, from the smallest ratio on.
        candidate: the method a layer takes at a ratio where it lowers the loss.
        below: every layer's method below the smallest ratio.
        margin: the relative loss gain a layer's switch must exceed (0: any gain).
        min_z: the z-score the gain must exceed as well: its mean over the examples' batch rows (clip and
            timestep) divided by its standard error, each row's paired difference of squared errors
            (0: any gain; 2: a gain about twice its standard error).
        layers: the layers that may switch (default all); the others keep ``base``.
        trained_frames: the trained length in video frames, as in ``freeloc.enable``.
        temporal_factor: video frames per latent frame, as in ``freeloc.enable``.
        progress: ``True`` writes a status line over the forwards to stderr; a callable receives
            ``(done, total)``; ``False``: silent.

    Returns:
        The plan: ``below`` on every layer, then one length range per ratio; the gains in its scores and
        the rule, the examples per ratio and the cost in its ``meta``.

    Raises:
        ValueError: if a ratio, an example, a method name, ``margin`` or ``layers`` is not accepted, or a
            target's shape differs from the model's output; the model is left as it was.
    """
    import freeloc
    from freeloc.registry import adapters_for

    ratios = _check(batches, base, candidate, below, margin)
    check_min_z(min_z)
    name, module, adapter_cls = adapters_for(target)[0]
    adapter = adapter_cls(module, name=name)
    enable_kw: dict[str, Any] = dict(trained_frames=trained_frames, temporal_factor=temporal_factor)
    with freeloc.enable(module, method="direct", **enable_kw) as s:
        n_layers = len(s.layers)
    switchable = list(range(n_layers)) if layers is None else sorted(set(layers))
    if not switchable or any(not isinstance(i, int) or not 0 <= i < n_layers for i in switchable):
        raise ValueError(f"probe_loss: layers must be a non-empty list of layers in 0..{n_layers - 1}, got {layers}")
    data_factor, t_latent = trained_tokens(adapter, None if module is target else target, trained_frames,
                                           temporal_factor)

    by_ratio = {float(r): list(items) for r, items in batches.items()}
    total = sum(len(by_ratio[r]) * (1 + len(switchable)) for r in ratios)
    report = reporter(progress, "loss probe: forwards")
    done = 0
    report(done, total)
    t0 = time.perf_counter()

    def errors(plan: LayerPlan, items: list[Batch]) -> Tensor:
        """The squared error of every example's every batch row (float64), in order."""
        nonlocal done
        rows = []
        with freeloc.enable(module, plan=plan, **enable_kw), torch.no_grad():
            for kwargs, want in items:
                got = _output(module(**kwargs))
                if got.shape != want.shape:
                    raise ValueError(f"probe_loss: a target has shape {tuple(want.shape)}, the model's output "
                                     f"{tuple(got.shape)}")
                rows.append((got - want.to(got.device).float()).pow(2).flatten(1).mean(1).double().cpu())
                done += 1
                report(done, total)
        return torch.cat(rows)

    scores: dict[str, list[float]] = {}
    ranges = []
    for ratio in ratios:
        items = by_ratio[ratio]
        reference = errors(LayerPlan.uniform(base, n_layers), items)
        scale = max(float(reference.mean()), 1e-30)
        gains = [0.0] * n_layers
        zs = [0.0] * n_layers
        for layer in switchable:
            plan = LayerPlan.uniform(base, n_layers)
            plan.methods[layer] = candidate
            diff = reference - errors(plan, items)  # > 0 where the switch lowers the error
            gains[layer] = float(diff.mean()) / scale
            zs[layer] = _z(diff)
        scores[loss_score_name(ratio)] = gains
        scores[z_score_name(ratio)] = zs
        ranges.append(LengthRange(ratio, [candidate if g > margin and z > min_z else base
                                          for g, z in zip(gains, zs, strict=True)]))
    seconds = time.perf_counter() - t0
    return LayerPlan(methods=[below] * n_layers, params=[{} for _ in range(n_layers)], ranges=ranges,
                     scores=scores, model=model_identity(module, n_layers), trained_frames=t_latent,
                     meta={"source": "freeloc.probe_loss",
                           "rule": {"name": "loss", "base": base, "candidate": candidate, "below": below,
                                    "margin": margin, "min_z": min_z, "ratios": ratios, "layers": switchable},
                           "probe": {"examples": {f"{r:g}": len(by_ratio[r]) for r in ratios},
                                     "temporal_factor": data_factor},
                           "cost": {"seconds": round(seconds, 3), "forwards": total}})
