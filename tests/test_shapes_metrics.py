"""The pixel-only metrics of the shapes test bed: real clips score perfectly, damaged ones clearly worse."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest
import torch

from freeloc.shapes import metrics
from freeloc.shapes.clips import BACKGROUND, PALETTE, ClipSpec, random_spec, render
from freeloc.shapes.metrics import (
    color_consistency,
    dynamic_degree,
    evaluate,
    evaluate_generated,
    fit_spec,
    freeze_fraction,
    motion_error,
    palette_fidelity,
    repetition,
    shape_count_consistency,
    shape_presence,
)

SEEDS = [0, 1, 2, 3, 5, 6, 7, 11]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("num_frames", [16, 64, 128])
def test_real_clips_score_near_perfect(seed: int, num_frames: int) -> None:
    spec = random_spec(seed)
    scores = evaluate(render(spec, num_frames), spec)
    assert scores["palette_fidelity"] == 1.0
    assert scores["shape_presence"] >= 0.95
    assert scores["shape_count_consistency"] == 1.0
    assert scores["color_consistency"] == 1.0
    assert scores["motion_error"] < 0.3
    assert 0.8 <= scores["dynamic_degree"] <= 1.2
    assert scores["freeze_fraction"] == 0.0
    assert scores["repetition"] == 0.0


def test_seeds_cover_all_shape_counts() -> None:
    assert {random_spec(s).num_shapes for s in SEEDS} == {1, 2, 3}


@pytest.mark.parametrize("seed", [0, 3, 7])
def test_gaussian_noise_lowers_palette_fidelity(seed: int) -> None:
    spec = random_spec(seed)
    video = render(spec, 32)
    noisy = (video + 0.2 * torch.randn(video.shape, generator=torch.Generator().manual_seed(seed))).clamp(0, 1)
    assert palette_fidelity(video) == 1.0
    assert palette_fidelity(noisy) < 0.5


@pytest.mark.parametrize("seed", [0, 3, 7])
def test_frozen_video(seed: int) -> None:
    spec = random_spec(seed)
    video = render(spec, 48)
    frozen = video[:1].repeat(48, 1, 1, 1)
    assert freeze_fraction(frozen) == 1.0
    assert dynamic_degree(frozen, spec) < 0.1
    assert repetition(frozen, spec) == 1.0
    assert motion_error(frozen, spec) > 1.0


@pytest.mark.parametrize("seed", [0, 3, 7])
def test_color_change_in_second_half(seed: int) -> None:
    spec = random_spec(seed)
    unused = next(c for c in range(len(PALETTE)) if c not in spec.colors)
    changed = dataclasses.replace(spec, colors=(unused, *spec.colors[1:]))
    video = torch.cat([render(spec, 64)[:32], render(changed, 64)[32:]])
    assert color_consistency(render(spec, 64), spec) == 1.0
    assert color_consistency(video, spec) <= 0.6
    assert shape_count_consistency(video, spec) <= 0.6


def _drop_first_shape(spec: ClipSpec) -> ClipSpec:
    return ClipSpec(
        spec.num_shapes - 1,
        spec.colors[1:],
        spec.shape_kinds[1:],
        spec.velocities[1:],
        spec.positions[1:],
        size=spec.size,
        frame_size=spec.frame_size,
    )


@pytest.mark.parametrize("min_shapes", [2, 3])
def test_shape_removed_in_half_the_frames(min_shapes: int,
                                          spec_with_shapes: Callable[[int], ClipSpec]) -> None:
    spec = spec_with_shapes(min_shapes)
    full, fewer = render(spec, 64), render(_drop_first_shape(spec), 64)
    video = torch.cat([full[:32], fewer[32:]])
    assert shape_count_consistency(full, spec) == 1.0
    assert shape_count_consistency(video, spec) <= 0.6
    assert color_consistency(video, spec) <= 0.6


@pytest.mark.parametrize("seed", [0, 3, 7])
def test_shuffled_video_has_larger_motion_error(seed: int) -> None:
    spec = random_spec(seed)
    video = render(spec, 64)
    shuffled = video[torch.randperm(64, generator=torch.Generator().manual_seed(seed))]
    real_error = motion_error(video, spec)
    assert motion_error(shuffled, spec) > real_error + 2.0
    assert palette_fidelity(shuffled) == 1.0  # each frame is still a valid frame


@pytest.mark.parametrize("seed", range(6))
def test_fit_spec_reads_the_start_from_the_first_frame(seed: int) -> None:
    spec = random_spec(seed)
    assert fit_spec(render(spec, 8), spec) == spec  # a rendered clip of the spec: unchanged
    moved = ClipSpec(spec.num_shapes, spec.colors, spec.shape_kinds, spec.velocities,
                     tuple((float(spec.size + 2 + 9 * i), float(spec.size + 1 + 9 * i))
                           for i in range(spec.num_shapes)))
    video = render(moved, 24)
    fitted = fit_spec(video, spec)  # asked for spec's shapes, the video chose moved's layout
    assert fitted == moved
    scores = evaluate(video, fitted)
    assert scores["motion_error"] < 0.3 and scores["shape_count_consistency"] == 1.0 and scores["repetition"] == 0.0


def test_fit_spec_keeps_a_shape_missing_from_frame_zero() -> None:
    spec = random_spec(4)
    video = render(spec, 6)
    video[0] = torch.tensor(BACKGROUND).view(3, 1, 1)
    assert fit_spec(video, spec).positions == spec.positions


@pytest.mark.parametrize("seed", SEEDS[:4])
def test_shape_presence_sees_vanishing_and_extra_shapes(seed: int) -> None:
    spec = random_spec(seed)
    video = render(spec, 12)
    empty = video.clone()
    empty[:] = torch.tensor(BACKGROUND).view(3, 1, 1)
    assert shape_presence(empty, spec) == 0.0
    half = video.clone()
    half[6:] = empty[6:]
    assert shape_presence(half, spec) == pytest.approx(0.5 * shape_presence(video, spec))
    extra = video.clone()
    extra[:, :, 0:3, 0:3] = torch.tensor(PALETTE[[c for c in range(6) if c not in spec.colors][0]]).view(3, 1, 1)
    assert shape_presence(extra, spec) > shape_presence(video, spec)


def test_evaluate_generated_averages_fitted_scores_and_skips_nan() -> None:
    specs = [random_spec(s) for s in (0, 1)]
    videos = torch.stack([render(s, 10) for s in specs])
    videos[1] = torch.tensor(BACKGROUND).view(1, 3, 1, 1)  # empty: no motion can be tracked (NaN)
    scores = evaluate_generated(videos, specs)
    assert scores["shape_presence"] == pytest.approx(evaluate(videos[0], specs[0])["shape_presence"] / 2)
    assert math.isnan(evaluate(videos[1], specs[1])["motion_error"])
    assert scores["motion_error"] == evaluate(videos[0], specs[0])["motion_error"]
    with pytest.raises(ValueError, match="need one spec per video: 2 videos, 1 specs"):
        evaluate_generated(videos, specs[:1])
    calls: list[tuple[int, int]] = []
    again = evaluate_generated(videos, specs, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 2), (1, 2), (2, 2)]  # one step per video
    assert again["shape_presence"] == scores["shape_presence"]


def test_bootstrap_mean_covers_the_mean_skips_nan_and_refuses_no_resamples() -> None:
    assert metrics.bootstrap_mean([0.25] * 8) == (0.25, 0.25, 0.25)
    mean, lo, hi = metrics.bootstrap_mean([0.0, 1.0] * 8)
    assert mean == 0.5 and 0.1 < lo < 0.5 < hi < 0.9
    # the same seed gives the same interval; NaN clips are left out
    assert metrics.bootstrap_mean([0.0, 1.0, 0.5] * 4) == metrics.bootstrap_mean([0.0, 1.0, 0.5] * 4)
    assert metrics.bootstrap_mean([float("nan"), 2.0, 2.0]) == (2.0, 2.0, 2.0)
    assert all(math.isnan(v) for v in metrics.bootstrap_mean([float("nan")]))
    with pytest.raises(ValueError, match="resamples must be >= 1, got 0"):
        metrics.bootstrap_mean([1.0], resamples=0)
