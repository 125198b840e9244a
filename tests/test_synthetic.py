"""Tests for the synthetic bouncing-shape clips and their pixel-only metrics."""

from __future__ import annotations

import dataclasses
import math
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from freeloc.synthetic import (
    BACKGROUND,
    CONDITION_DIM,
    PALETTE,
    ClipSpec,
    color_consistency,
    condition,
    dynamic_degree,
    evaluate,
    evaluate_generated,
    fit_spec,
    freeze_fraction,
    motion_error,
    palette_fidelity,
    random_spec,
    render,
    repetition,
    shape_count_consistency,
    shape_presence,
    trajectory,
)

SEEDS = [0, 1, 2, 3, 5, 6, 7, 11]


def _spec_with_shapes(min_shapes: int) -> ClipSpec:
    for seed in range(100):
        spec = random_spec(seed)
        if spec.num_shapes >= min_shapes:
            return spec
    raise AssertionError("no spec found")


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
def test_shape_removed_in_half_the_frames(min_shapes: int) -> None:
    spec = _spec_with_shapes(min_shapes)
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


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), frame_size=st.sampled_from([24, 32, 48]), size=st.integers(2, 4))
def test_trajectories_stay_inside_the_frame(seed: int, frame_size: int, size: int) -> None:
    spec = random_spec(seed, frame_size=frame_size, size=size)
    num_frames = 8 * 16
    centers = trajectory(spec, num_frames)
    assert centers.shape == (num_frames, spec.num_shapes, 2)
    assert bool((centers - size >= 0).all()) and bool((centers + size <= frame_size - 1).all())
    step = (centers[1:] - centers[:-1]).abs()
    bound = torch.tensor(spec.velocities).abs()[None]
    assert bool((step <= bound + 1e-5).all())
    # Away from bounces each shape moves at exactly its speed.
    speeds = torch.tensor(spec.speeds)[None]
    assert bool(((step.norm(dim=-1) - speeds).abs() < 1e-4).float().mean() > 0.5)
    # Every shape bounces at least once in 8x the length: the motion is not a straight line.
    signs = torch.sign(centers[1:] - centers[:-1])
    assert bool((signs != signs[:1]).any(dim=-1).any(dim=0).all())


def test_render_is_deterministic_and_exact() -> None:
    spec = _spec_with_shapes(3)
    a, b = render(spec, 40), render(dataclasses.replace(spec), 40)
    assert a.shape == (40, 3, spec.frame_size, spec.frame_size)
    assert torch.equal(a, b)
    assert random_spec(123) == random_spec(123)
    colors = torch.tensor((*PALETTE, BACKGROUND))
    pixels = a.permute(0, 2, 3, 1).reshape(-1, 1, 3)
    assert bool((pixels == colors[None]).all(dim=-1).any(dim=-1).all())
    for color in spec.colors:  # every shape is visible in the first frame
        assert bool((a[0].permute(1, 2, 0) == torch.tensor(PALETTE[color])).all(dim=-1).any())


def test_render_matches_trajectory() -> None:
    spec = ClipSpec(1, (2,), ("square",), ((1.0, -2.0),), ((10.0, 20.0),), size=3, frame_size=32)
    video = render(spec, 5)
    for t, (y, x) in enumerate(trajectory(spec, 5)[:, 0].tolist()):
        blue = (video[t].permute(1, 2, 0) == torch.tensor(PALETTE[2])).all(dim=-1)
        ys, xs = torch.nonzero(blue, as_tuple=True)
        assert blue.sum() == 49
        assert math.isclose(ys.float().mean().item(), y) and math.isclose(xs.float().mean().item(), x)
    assert trajectory(spec, 5)[:, 0].tolist() == [[10.0, 20.0], [11.0, 18.0], [12.0, 16.0], [13.0, 14.0], [14.0, 12.0]]


def test_bounce_reflects_position_and_velocity() -> None:
    spec = ClipSpec(1, (0,), ("disc",), ((2.0, 1.0),), ((24.0, 27.0),), size=3, frame_size=32)
    ys = trajectory(spec, 6)[:, 0, 0].tolist()
    xs = trajectory(spec, 6)[:, 0, 1].tolist()
    assert ys == [24.0, 26.0, 28.0, 26.0, 24.0, 22.0]  # upper bound 28 = 32 - 1 - 3
    assert xs == [27.0, 28.0, 27.0, 26.0, 25.0, 24.0]


def test_condition_vectors() -> None:
    specs = [random_spec(s) for s in range(12)]
    vectors = torch.stack([condition(s) for s in specs])
    assert vectors.shape == (12, CONDITION_DIM) and CONDITION_DIM == 37
    assert bool((vectors.abs() <= 1).all())
    for spec, vec in zip(specs, vectors, strict=True):
        slots = vec[:-1].view(3, 12)
        assert slots[:, 0].tolist() == [1.0 if i < spec.num_shapes else 0.0 for i in range(3)]
        assert bool((slots[spec.num_shapes :] == 0).all())
        for i, color in enumerate(spec.colors):
            assert slots[i, 1:7].argmax().item() == color and slots[i, 1:7].sum().item() == 1.0
        assert math.isclose(vec[-1].item(), spec.num_shapes / 3, rel_tol=1e-6)
    distinct = {tuple(v.tolist()) for v in vectors}
    assert len(distinct) == len({s for s in specs})
    assert len(distinct) > 1


def test_invalid_specs_are_rejected() -> None:
    good = dict(num_shapes=1, colors=(0,), shape_kinds=("disc",), velocities=((1.0, 1.0),), positions=((10.0, 10.0),))
    ClipSpec(**good)
    for bad in (
        {"num_shapes": 4},
        {"velocities": ((0.0, 1.0),)},
        {"velocities": ((3.0, 3.0),)},
        {"shape_kinds": ("triangle",)},
        {"colors": (6,)},
        {"positions": ((1.0, 10.0),)},
    ):
        with pytest.raises(ValueError):
            ClipSpec(**{**good, **bad})


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


def test_random_spec_starts_over_when_the_first_shapes_leave_no_room() -> None:
    """24 px frames with half-size 4: a shape near the middle blocks every other start; the draw must not hang."""
    t0 = time.perf_counter()
    specs = [random_spec(seed, frame_size=24, size=4) for seed in range(300)]
    print(f"300 specs in {time.perf_counter() - t0:.2f} s")
    assert {s.num_shapes for s in specs} == {1, 2, 3}
    with pytest.raises(ValueError, match="cannot place [23] non-overlapping shapes of half-size 4 in a 11 x 11 frame"):
        for seed in range(50):
            random_spec(seed, frame_size=11, size=4)


def test_random_spec_is_unchanged_for_the_training_data() -> None:
    """The shipped model's data: the first draws of the default generator, pinned."""
    spec = random_spec(0)
    assert (spec.num_shapes, spec.colors, spec.shape_kinds) == (3, (3, 4, 2), ("disc", "disc", "disc"))
    assert spec.velocities == ((2.0, -1.0), (1.0, -2.0), (2.0, 1.0))
    assert spec.positions == ((3.0, 21.0), (17.0, 15.0), (25.0, 25.0))


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
