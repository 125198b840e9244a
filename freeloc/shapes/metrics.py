"""Pixel-only quality metrics of a video against the clip it should show (``freeloc.shapes.clips``).

The metrics read pixels only (no learned model). Shapes are detected per palette colour as
8-connected components of pixels within ``tol`` (L-inf) of that colour and of at least
``MIN_PIXELS`` pixels. Frames in which two shapes of the spec overlap (so that one may be partly
hidden) are left out of the detection-based metrics, so real clips score exactly. ``evaluate``
gives every metric of one video, ``evaluate_generated`` the means over generated videos, each
scored from where its own first frame put the shapes (``fit_spec``); ``bootstrap_mean`` gives a mean
over clips with its 95% bootstrap interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from .._progress import Progress, reporter
from .clips import BACKGROUND, PALETTE, ClipSpec, render, trajectory

__all__ = [
    "MIN_PIXELS",
    "bootstrap_mean",
    "color_consistency",
    "dynamic_degree",
    "evaluate",
    "evaluate_generated",
    "fit_spec",
    "frames_right",
    "freeze_fraction",
    "motion_error",
    "nanmean",
    "palette_fidelity",
    "repetition",
    "shape_count_consistency",
    "shape_presence",
]

#: Smallest connected component counted as a shape.
MIN_PIXELS = 4
#: Mean absolute difference below which two frames count as the same.
_FREEZE_TOL = 1e-3


def _near(video: Tensor, colors: Tensor, tol: float) -> Tensor:
    """``(T, K, H, W)`` mask of pixels within ``tol`` (L-inf) of each of the ``(K, 3)`` colours."""
    return (video[:, None] - colors[None, :, :, None, None]).abs().amax(dim=2) <= tol


def _components(mask: Tensor) -> tuple[Tensor, Tensor]:
    """8-connected components of a ``(B, H, W)`` boolean mask.

    Returns:
        ``counts`` ``(B,)``: components with at least ``MIN_PIXELS`` pixels, and ``kept`` ``(B, H, W)``:
        the pixels belonging to those components.
    """
    b, h, w = mask.shape
    ids = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, h, w).expand(b, h, w)
    labels = torch.where(mask, ids, torch.zeros(()))
    for _ in range(h * w):  # max-label propagation until stable
        grown = F.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0]
        grown = torch.where(mask, grown, torch.zeros(()))
        if torch.equal(grown, labels):
            break
        labels = grown
    flat = labels.long().view(b, -1)
    sizes = torch.zeros(b, h * w + 1).scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32))
    sizes[:, 0] = 0
    big = sizes >= MIN_PIXELS
    counts = big.sum(dim=1)
    kept = torch.gather(big, 1, flat).view(b, h, w)
    return counts, kept


def _detect(video: Tensor, tol: float) -> tuple[Tensor, Tensor]:
    """Per palette colour: component counts ``(T, P)`` and kept-pixel masks ``(T, P, H, W)``."""
    t, _, h, w = video.shape
    near = _near(video.float(), torch.tensor(PALETTE), tol)
    counts, kept = _components(near.reshape(-1, h, w))
    return counts.view(t, len(PALETTE)), kept.view(t, len(PALETTE), h, w)


def _clear_frames(spec: ClipSpec, num_frames: int) -> Tensor:
    """``(T,)`` mask of frames in which no two shapes of the spec overlap (by their true centres)."""
    centers = trajectory(spec, num_frames)
    gap = (centers[:, :, None] - centers[:, None, :]).abs().amax(dim=-1)  # (T, n, n) Chebyshev
    gap = gap + torch.eye(spec.num_shapes) * 1e9
    return (gap > 2 * spec.size + 0.5).all(dim=-1).all(dim=-1)


def _masked_mean(values: Tensor, mask: Tensor) -> float:
    """Mean of boolean ``values`` where ``mask``; over all entries when ``mask`` is empty."""
    if not bool(mask.any()):
        mask = torch.ones_like(mask)
    return float(values[mask].float().mean().item())


def palette_fidelity(video: Float[Tensor, "frames 3 height width"], tol: float = 0.15) -> float:
    """Fraction of pixels within ``tol`` (L-inf) of the background or a palette colour.

    Args:
        video: ``(T, 3, H, W)`` video in [0, 1].
        tol: L-inf colour tolerance.

    Returns:
        A value in [0, 1]; 1.0 for rendered clips.
    """
    colors = torch.tensor((*PALETTE, BACKGROUND))
    return float(_near(video.float(), colors, tol).any(dim=1).float().mean().item())


def _expected_counts(spec: ClipSpec) -> Tensor:
    expected = torch.zeros(len(PALETTE), dtype=torch.long)
    expected[list(spec.colors)] = 1
    return expected


def shape_count_consistency(video: Float[Tensor, "frames 3 height width"], spec: ClipSpec, tol: float = 0.15) -> float:
    """Fraction of frames whose detected per-colour shape counts equal the spec's.

    A frame matches when, for all six palette colours, the number of 8-connected components of at
    least ``MIN_PIXELS`` pixels near that colour is 1 for the spec's colours and 0 otherwise.
    Frames where shapes of the spec overlap are not scored (all frames are, if every frame overlaps).

    Args:
        video: ``(T, 3, H, W)`` video in [0, 1].
        spec: The clip spec the video should show.
        tol: L-inf colour tolerance.

    Returns:
        A value in [0, 1]; 1.0 for rendered clips.
    """
    counts, _ = _detect(video, tol)
    match = (counts == _expected_counts(spec)[None]).all(dim=1)
    return _masked_mean(match, _clear_frames(spec, video.shape[0]))


def shape_presence(video: Float[Tensor, "frames 3 height width"], spec: ClipSpec, tol: float = 0.15) -> float:
    """Shapes detected per frame (any palette colour), divided by the number of shapes the spec asks for.

    Unlike the consistency metrics it does not need the right colours: 0 for frames left empty, about 1
    when as many shapes are drawn as asked, above 1 for extra ones. Every frame is scored.

    Args:
        video: ``(T, 3, H, W)`` video in [0, 1].
        spec: The clip spec the video should show.
        tol: L-inf colour tolerance.

    Returns:
        A value >= 0; 1.0 for rendered clips without overlaps, slightly less when shapes overlap.
    """
    counts, _ = _detect(video, tol)
    return float(counts.sum(dim=1).float().mean().item()) / spec.num_shapes


def color_consistency(video: Float[Tensor, "frames 3 height width"], spec: ClipSpec, tol: float = 0.15) -> float:
    """Fraction of frames whose set of detected colours equals the spec's colours.

    A colour is detected when it has at least one component of ``MIN_PIXELS`` pixels. Frames where
    shapes of the spec overlap are not scored.

    Args:
        video: ``(T, 3, H, W)`` video in [0, 1].
        spec: The clip spec the video should show.
        tol: L-inf colour tolerance.

    Returns:
        A value in [0, 1]; 1.0 for rendered clips.
    """
    counts, _ = _detect(video, tol)
    match = ((counts > 0) == (_expected_counts(spec)[None] > 0)).all(dim=1)
    return _masked_mean(match, _clear_frames(spec, video.shape[0]))


def _displacements(video: Tensor, spec: ClipSpec, tol: float) -> tuple[Tensor, Tensor, Tensor]:
    """Tracked displacement per frame pair and shape, true speeds, and the mask of pairs to score.

    Each shape is tracked by its colour: the centroid of that colour's kept component pixels. A pair
    ``(t, t + 1)`` is scored for shape ``i`` when the shape is detected in both frames, no shapes of the
    spec overlap in either frame, and the true motion has no bounce in between (true displacement
    equal to ``|v|``).

    Returns:
        ``disp`` ``(T - 1, n)``, ``speed`` ``(T - 1, n)``, ``valid`` ``(T - 1, n)`` boolean.
    """
    t, _, h, w = video.shape
    _, kept = _detect(video, tol)
    kept = kept[:, list(spec.colors)].float()  # (T, n, H, W)
    area = kept.sum(dim=(2, 3))
    ys = torch.arange(h, dtype=torch.float32)
    xs = torch.arange(w, dtype=torch.float32)
    cy = (kept.sum(dim=3) * ys).sum(dim=2) / area.clamp(min=1)
    cx = (kept.sum(dim=2) * xs).sum(dim=2) / area.clamp(min=1)
    cent = torch.stack([cy, cx], dim=-1)
    disp = (cent[1:] - cent[:-1]).norm(dim=-1)
    speed = torch.tensor(spec.speeds).expand_as(disp)
    true = trajectory(spec, t)
    no_bounce = ((true[1:] - true[:-1]).norm(dim=-1) - speed).abs() < 1e-4
    present = area > 0
    clear = _clear_frames(spec, t)[:, None]
    valid = present[1:] & present[:-1] & clear[1:] & clear[:-1] & no_bounce
    return disp, speed, valid


def motion_error(video: Float[Tensor, "frames 3 height width"], spec: ClipSpec, tol: float = 0.15) -> float:
    """Mean ``| tracked displacement per frame - true speed |`` in pixels.

    Averaged over the scored (frame pair, shape) entries (see ``dynamic_degree`` for which pairs are
    scored: both frames show the shape, no overlap, no bounce in between).

    Args:
        video: ``(T, 3, H, W)`` video in [0, 1].
        spec: The clip spec the video should show.
        tol: L-inf colour tolerance.

    Returns:
        A value >= 0, lower is better (0 for rendered clips with integer velocities); NaN when no pair
        can be scored (a single frame, or no shape ever detected).
    """
    disp, speed, valid = _displacements(video, spec, tol)
    if not bool(valid.any()):
        return float("nan")
    return float((disp - speed).abs()[valid].mean().item())


def dynamic_degree(video: Float[Tensor, "frames 3 height width"], spec: ClipSpec, tol: float = 0.15) -> float:
    """Mean tracked centroid displacement per frame divided by the mean true speed.

    Shapes are tracked by colour; a pair ``(t, t + 1)`` is scored for a shape when it is detected in both
    frames, no two shapes of the spec overlap in either frame and the true motion does not bounce in
    between.

    Args:
        video: ``(T, 3, H, W)`` video in [0, 1].
        spec: The clip spec the video should show.
        tol: L-inf colour tolerance.

    Returns:
        A value >= 0: about 1 for rendered clips, 0 for a frozen video; NaN when no pair can be scored.
    """
    disp, speed, valid = _displacements(video, spec, tol)
    if not bool(valid.any()):
        return float("nan")
    return float((disp[valid].mean() / speed[valid].mean()).item())


def freeze_fraction(video: Float[Tensor, "frames 3 height width"]) -> float:
    """Fraction of consecutive frame pairs whose mean absolute difference is below 1e-3.

    Args:
        video: ``(T, 3, H, W)`` video.

    Returns:
        A value in [0, 1] (0.0 for a single frame): 0 for rendered clips, 1 for a frozen video.
    """
    if video.shape[0] < 2:
        return 0.0
    diff = (video[1:].float() - video[:-1].float()).abs().mean(dim=(1, 2, 3))
    return float((diff < _FREEZE_TOL).float().mean().item())


def _pairwise_diff(video: Tensor) -> Tensor:
    flat = video.float().reshape(video.shape[0], -1)
    return torch.cdist(flat[None], flat[None], p=1)[0] / flat.shape[1]


def repetition(video: Float[Tensor, "frames 3 height width"], spec: ClipSpec) -> float:
    """Strongest unexplained temporal repetition.

    For each lag ``L >= 2``, consider the frame pairs ``(t - L, t)`` whose *true* frames (``render(spec)``)
    differ (mean absolute difference >= 1e-3), so that repetition genuinely present in the periodic
    bouncing motion is excluded. The score for the lag is the fraction of those pairs whose video frames
    are nearly equal (mean absolute difference < 1e-3). The result is the maximum over lags that have at
    least one such pair.

    Args:
        video: ``(T, 3, H, W)`` video in [0, 1].
        spec: The clip spec the video should show.

    Returns:
        A value in [0, 1]: 0 for rendered clips, 1 for a frozen video; 0.0 when no lag can be scored.
    """
    t = video.shape[0]
    if t < 3:
        return 0.0
    same = _pairwise_diff(video) < _FREEZE_TOL
    true_differs = _pairwise_diff(render(spec, t)) >= _FREEZE_TOL
    idx = torch.arange(t)
    lag = idx[:, None] - idx[None, :]
    use = (lag >= 2) & true_differs
    lags = lag[use]
    eligible = torch.zeros(t).scatter_add_(0, lags, torch.ones(lags.shape[0]))
    repeated = torch.zeros(t).scatter_add_(0, lags, same[use].float())
    scored = eligible > 0
    if not bool(scored.any()):
        return 0.0
    return float((repeated[scored] / eligible[scored]).max().item())


def fit_spec(video: Float[Tensor, "frames 3 height width"], spec: ClipSpec, tol: float = 0.15) -> ClipSpec:
    """The spec with its start positions read from the video's first frame.

    For a model that is asked for shapes, colours and velocities but chooses where they start, this is
    the clip the video should show: each shape's start centre is the rounded centroid of its colour's
    detected pixels in frame 0 (clamped to the valid range); a shape not detected in frame 0 keeps
    the spec's position. The metrics then measure whether the video keeps its own start moving as asked.

    Args:
        video: ``(T, 3, H, W)`` video in [0, 1].
        spec: The clip spec the video was asked for.
        tol: L-inf colour tolerance.

    Returns:
        A new ``ClipSpec`` (equal to ``spec`` for a rendered clip of it).
    """
    _, kept = _detect(video[:1], tol)
    lo, hi = spec.size, spec.frame_size - 1 - spec.size
    grid = torch.arange(spec.frame_size, dtype=torch.float32)
    positions = []
    for c, start in zip(spec.colors, spec.positions, strict=True):
        mask = kept[0, c].float()
        area = float(mask.sum())
        if area == 0:
            positions.append(start)
            continue
        y = float((mask.sum(dim=1) * grid).sum()) / area
        x = float((mask.sum(dim=0) * grid).sum()) / area
        positions.append((float(min(max(round(y), lo), hi)), float(min(max(round(x), lo), hi))))
    return ClipSpec(spec.num_shapes, spec.colors, spec.shape_kinds, spec.velocities, tuple(positions),
                    size=spec.size, frame_size=spec.frame_size)


def frames_right(video: Float[Tensor, "frames 3 height width"], spec: ClipSpec,
                 tol: float = 0.15) -> tuple[Bool[Tensor, " frames"], Bool[Tensor, " frames"]]:
    """Per frame: whether it shows the right shape count for every colour (so also the right colours),
    and whether it is scored at all (frames where the spec's shapes overlap are not), as
    ``shape_count_consistency`` judges them.

    Args:
        video: ``(T, 3, H, W)`` video in [0, 1].
        spec: The clip spec the video should show (usually ``fit_spec`` of it).
        tol: L-inf colour tolerance.

    Returns:
        ``(right, scored)``, two bool tensors of ``T`` frames.
    """
    counts, _ = _detect(video, tol)
    expected = _expected_counts(spec)[None]
    return (counts == expected).all(dim=1), _clear_frames(spec, video.shape[0]).bool()


def evaluate(video: Float[Tensor, "frames 3 height width"], spec: ClipSpec) -> dict[str, float]:
    """All metrics for one video.

    Args:
        video: ``(T, 3, H, W)`` video in [0, 1].
        spec: The clip spec the video should show.

    Returns:
        ``palette_fidelity``, ``shape_presence``, ``shape_count_consistency``, ``color_consistency``, ``motion_error``,
        ``dynamic_degree``, ``freeze_fraction`` and ``repetition``.
    """
    return {
        "palette_fidelity": palette_fidelity(video),
        "shape_presence": shape_presence(video, spec),
        "shape_count_consistency": shape_count_consistency(video, spec),
        "color_consistency": color_consistency(video, spec),
        "motion_error": motion_error(video, spec),
        "dynamic_degree": dynamic_degree(video, spec),
        "freeze_fraction": freeze_fraction(video),
        "repetition": repetition(video, spec),
    }


def evaluate_generated(videos: Float[Tensor, "batch frames 3 height width"], specs: list[ClipSpec], *,
                       progress: Progress = False) -> dict[str, float]:
    """Mean metrics of generated videos, each scored against its asked clip from its own start.

    Each video is scored with ``evaluate`` against ``fit_spec`` of its spec; the means skip
    NaN entries (a metric with no scorable frame pair) and are NaN only when every video is NaN.

    Args:
        videos: ``(B, T, 3, H, W)`` videos in [0, 1].
        specs: The ``B`` clip specs the videos were asked for.
        progress: ``True`` writes a status line over the videos to stderr, a callable receives
            ``(done, total)`` videos (``freeloc._progress``); ``False`` (default) is silent.

    Returns:
        The ``evaluate`` keys, each averaged over the videos.
    """
    if len(specs) != videos.shape[0]:
        raise ValueError(f"need one spec per video: {videos.shape[0]} videos, {len(specs)} specs")
    report = reporter(progress, "scoring clips")
    report(0, len(specs))
    rows = []
    for done, (v, s) in enumerate(zip(videos, specs, strict=True), start=1):
        rows.append(evaluate(v, fit_spec(v, s)))
        report(done, len(specs))
    return {key: nanmean([r[key] for r in rows]) for key in rows[0]}


def nanmean(values: Sequence[float]) -> float:
    """The mean of ``values`` with NaN entries skipped; NaN when every entry is NaN (or there are none)."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def bootstrap_mean(values: Sequence[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """The mean of per-clip values (NaN skipped) and its 95% bootstrap interval.

    For a paired interval of two methods on the same clips, pass the per-clip differences.

    Args:
        values: One value per clip.
        resamples: Resamples of the clips, with replacement.
        seed: Seed of the resampling.

    Returns:
        ``(mean, low, high)``: the mean and the 2.5 / 97.5 percentiles of the resampled means; all NaN
        when every value is NaN.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    kept = torch.tensor([v for v in values if not math.isnan(v)], dtype=torch.float64)
    if kept.numel() == 0:
        return float("nan"), float("nan"), float("nan")
    g = torch.Generator().manual_seed(seed)
    means = kept[torch.randint(kept.numel(), (resamples, kept.numel()), generator=g)].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return float(kept.mean()), lo, hi
