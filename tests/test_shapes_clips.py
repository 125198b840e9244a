"""The synthetic clips of the shapes test bed: specs, trajectories, rendering and the condition vector."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from freeloc.shapes.clips import (
    BACKGROUND,
    CONDITION_DIM,
    PALETTE,
    ClipSpec,
    condition,
    random_spec,
    render,
    trajectory,
)


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


def test_render_is_deterministic_and_exact(spec_with_shapes: Callable[[int], ClipSpec]) -> None:
    spec = spec_with_shapes(3)
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
