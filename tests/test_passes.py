"""The chunked backend's planner (``freeloc.attention._passes``): its stacks and passes cover every
attended pair exactly once, compute about the method's density, and its searches find the largest
windows and blocks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support import HEAD_DIM, ROTARY, TOL, VRPR_81, qkv

import freeloc
from freeloc.attention import attend, band_set_for
from freeloc.attention._passes import (
    Pass,
    Stack,
    Window,
    _largest_rectangle,
    _largest_window,
    plan_cost,
    plan_passes,
    plan_stacks,
)
from freeloc.bands import BandSet
from freeloc.methods import Method


def test_chunked_work_is_proportional_and_memory_bounded() -> None:
    """At Wan 480p and 4x length the chunked plan computes about TSA's density and no pass is N^2."""
    f, s = 81, 1560
    n = f * s
    rot = freeloc.RotaryLayout.wan(128)
    tsa = band_set_for(freeloc.TSA(), f, s, rot)
    passes = plan_passes(tsa, s, 128)
    computed = plan_cost(passes, s) / n**2
    density = tsa.token_density(s)
    print(f"TSA: computed {computed:.3f} of dense, token density {density:.3f}")
    assert computed <= 1.15 * density
    # rows a call reads at once: a pass's chunk, or one frame per batch entry of a stack (whose entries
    # are views, no copies)
    largest = max(s if isinstance(p, Stack) else p.rows.stop - p.rows.start if isinstance(p.rows, slice)
                  else len(p.rows) for p in passes)
    assert largest <= 4096
    vrpr = band_set_for(freeloc.VRPR.for_length(f, 21), f, s, rot)
    v_cost = plan_cost(plan_passes(vrpr, s, 128), s) / n**2
    print(f"VRPR: computed {v_cost:.3f} of dense")
    assert v_cost <= 1.05


def plan_coverage(bands: BandSet, s: int, head_dim: int,
                  plan: tuple | None = None) -> tuple[torch.Tensor, list[Stack]]:
    """[bands, F, F] how many times the chunked plan (or ``plan``) computes each frame pair of each band
    (stacks and unstriped passes), and the plan's stacks."""
    f = bands.num_frames
    count = torch.zeros(len(bands.bands), f, f, dtype=torch.long)
    stacks = []
    for p in plan_passes(bands, s, head_dim) if plan is None else plan:
        if isinstance(p, Stack):
            stacks.append(p)
            for i in range(*p.frames):
                for x in range(i + p.offset, i + p.offset + p.length):
                    count[p.key_bands[x // f], i, x % f] += 1
        elif bands.bands[p.band].stripe is None:
            rows = torch.arange(p.rows.start // s, p.rows.stop // s)
            keys = torch.arange(p.keys.start // s, p.keys.stop // s) if isinstance(p.keys, slice) else \
                torch.cat([torch.arange(a, b) for a, b in p.keys.runs])
            ok = torch.ones(len(rows), len(keys), dtype=torch.bool) if p.frame_ok is None else p.frame_ok
            count[p.band, rows[:, None], keys[None, :]] += ok.long()
    return count, stacks


@pytest.mark.parametrize("name,method,f,s", [("vrpr", freeloc.VRPR.for_length(30, 13), 30, 15),
                                             ("vrpr-81", VRPR_81, 81, 60), ("tsa-81", freeloc.TSA(cap=20), 81, 60),
                                             ("sliding", freeloc.SlidingWindow(4), 30, 15)],
                         ids=["vrpr", "vrpr-81", "tsa-81", "sliding"])
def test_stacks_and_passes_cover_each_pair_once(name: str, method: Method, f: int, s: int) -> None:
    """The chunked plan's stacks (sliding key windows in one call) and passes compute every attended
    frame pair of every unstriped band exactly once; VRPR's far tiers run as one stack over a buffer of
    both their key rotations; stacks never hold a striped band."""
    bands = band_set_for(method, f, s, ROTARY).aligned()
    count, stacks = plan_coverage(bands, s, HEAD_DIM)
    print(f"{name}: {len(stacks)} stacks " + ", ".join(
        f"{p.key_bands} frames {p.frames} window {p.offset:+d}..{p.offset + p.length:+d}" for p in stacks))
    assert stacks
    for b, band in enumerate(bands.bands):
        if band.stripe is None:
            assert torch.equal(count[b], band.pairs.long()), band.name
    for p in stacks:
        assert all(bands.bands[b].stripe is None for b in p.key_bands)
        assert all(torch.equal(bands.bands[b].q_pos, bands.bands[p.band].q_pos) for b in p.key_bands)
    if name.startswith("vrpr"):
        names = {tuple(bands.bands[b].name for b in p.key_bands) for p in stacks}
        assert ("far-future", "far-past") in names, names


@pytest.mark.slow
@pytest.mark.parametrize("name,method,f", [("vrpr", freeloc.VRPR.for_length(30, 13), 30),
                                           ("vrpr-81", VRPR_81, 81), ("tsa-81", freeloc.TSA(cap=20), 81),
                                           ("sliding", freeloc.SlidingWindow(4), 30)],
                         ids=["vrpr", "vrpr-81", "tsa-81", "sliding"])
@pytest.mark.parametrize("min_frames", [1, 8, 40])
@pytest.mark.parametrize("small_blocks", [0, 16, 64])
def test_plan_stacks_and_the_rest_cover_each_pair_once(name: str, method: Method, f: int,
                                                       min_frames: int, small_blocks: int) -> None:
    """``plan_stacks`` (the stacks ``AttentionOptions(unstriped="stacks")`` runs on the dense kernel) and the
    band set it leaves hold every pair once; its stacks span at least ``min_frames`` query frames, and so do its
    blocks, but for at most ``small_blocks`` smaller ones, used only where they finish every unstriped band."""
    bands = band_set_for(method, f, 60, ROTARY).aligned()
    plan, rest = plan_stacks(bands, 60, min_frames, small_blocks)
    count, stacks = plan_coverage(bands, 60, HEAD_DIM, plan)
    blocks = [p for p in plan if not isinstance(p, Stack)]  # unmasked passes: query frames x key frames
    small = [p for p in blocks if (p.rows.stop - p.rows.start) // 60 < min_frames]
    assert len(stacks) + len(blocks) == len(plan)
    left = torch.zeros_like(count) if rest is None else torch.stack([b.pairs.long() for b in rest.bands])
    covered = int(count.sum())
    total = sum(int(b.pairs.sum()) for b in bands.bands)
    print(f"{name}, min_frames={min_frames}, small_blocks={small_blocks}: {len(stacks)} stacks and "
          f"{len(blocks)} blocks ({len(small)} small) cover {covered} of {total} frame pairs")
    assert torch.equal(count + left, torch.stack([b.pairs.long() for b in bands.bands]))
    assert all(p.num_frames >= min_frames for p in stacks)
    assert all(p.frame_ok is None and p.near is None and bands.bands[p.band].stripe is None for p in blocks)
    assert len(small) <= small_blocks
    if small:  # they finish the unstriped bands: the rest is striped pairs alone
        assert rest is None or all(b.stripe is not None or b.is_empty() for b in rest.bands)
    if rest is not None:
        assert [b.stripe for b in rest.bands] == [b.stripe for b in bands.bands]
    if min_frames <= 8 and f == 81:  # VRPR: nearly all; TSA: its local tier, a third of its pairs
        assert covered >= (0.95 if name == "vrpr-81" else 0.35) * total
    if name == "tsa-81" and min_frames == 8 and small_blocks >= 16:  # all but the striped tier
        assert len(small) == 14 and [b.name for b in rest.bands if not b.is_empty()] == ["striped"]
    if name == "vrpr-81" and min_frames == 8:  # 44 small blocks finish it, or none are used
        assert (rest is None) == (small_blocks >= 44) and len(small) == (44 if small_blocks >= 44 else 0)


@pytest.mark.parametrize("grid", [(30, 3, 5), (19, 6, 10), (20, 10, 12)], ids=["15", "60", "120"])
def test_striped_passes_cover_the_stripe_once(grid: tuple[int, int, int]) -> None:
    """Token level: a striped band's passes (spatial sub-blocks, interior ones batched into one call each)
    compute every attended token pair of the band exactly once, and nothing else unmasked."""
    f, h, w = grid
    s = h * w
    bands = band_set_for(freeloc.TSA(cap=12), f, s, ROTARY).aligned()
    b = next(i for i, band in enumerate(bands.bands) if band.stripe is not None)
    count = torch.zeros(f * s, f * s, dtype=torch.long)
    batched = 0
    for p in plan_passes(bands, s, HEAD_DIM):
        if not isinstance(p, Pass) or p.band != b:
            continue
        blocks = p.rows.blocks if isinstance(p.rows, Window) else 1
        batched += blocks > 1

        def block_tokens(index: slice | Window, j: int) -> torch.Tensor:
            if isinstance(index, slice):
                return torch.arange(index.start, index.stop)
            r0, r1 = index.raster
            return Window(index.runs, (r0 + j * index.step, r1 + j * index.step)).tokens(s)

        rows = [block_tokens(p.rows, j) for j in range(blocks)]
        keys = [block_tokens(p.keys, j) for j in range(blocks)]
        m = p.mask(torch.device("cpu"))
        for r, k_ in zip(rows, keys, strict=True):
            count[r[:, None], k_[None, :]] += torch.ones(len(r), len(k_), dtype=torch.long) if m is None else m.long()
    print(f"grid {grid}: {batched} batched calls of the striped band")
    assert batched > 0
    assert torch.equal(count, bands.bands[b].token_pairs(s).long())


@st.composite
def any_method(draw: st.DrawFn) -> Method:
    kind = draw(st.sampled_from(["vrpr", "tsa", "sliding"]))
    if kind == "vrpr":
        w1 = draw(st.integers(1, 6))
        w2 = draw(st.integers(w1 + 1, 12))
        g1 = draw(st.integers(1, 3))
        g2 = draw(st.integers(g1 + 1, 6))
        return freeloc.VRPR(w1, w2, g1, g2, draw(st.integers(w2, 30)))
    if kind == "tsa":
        d1 = draw(st.integers(0, 5))
        return freeloc.TSA(d1=d1, d2=draw(st.integers(d1 + 1, 12)), stripe=draw(st.sampled_from([0.1, 0.3, 0.6])),
                           sink_group=draw(st.integers(1, 4)), sink_window=draw(st.integers(1, 6)), cap=30)
    return freeloc.SlidingWindow(draw(st.integers(0, 8)), sink=draw(st.booleans()))


@pytest.mark.slow
@given(any_method(), st.integers(2, 40), st.integers(1, 4), st.integers(1, 5), st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_chunked_plans_are_exact_for_any_method(method: Method, f: int, h: int, w: int, seed: int) -> None:
    """Whatever stacks and passes the planner picks (any tier widths, lengths, frame sizes), the chunked
    backend gives the reference's numbers, and its stacks and passes compute every frame pair of every
    unstriped band once."""
    bands = band_set_for(method, f, h * w, ROTARY).aligned()
    count, _ = plan_coverage(bands, h * w, HEAD_DIM)
    for b, band in enumerate(bands.bands):
        if band.stripe is None:
            assert torch.equal(count[b], band.pairs.long()), band.name
    q, k, v = qkv(f * h * w, torch.float32, seed=seed, batch=2, heads=2)
    kw = dict(grid=(f, h, w), method=method, rotary=ROTARY)
    err = (attend(q, k, v, backend="chunked", **kw) - attend(q, k, v, backend="reference", **kw)).abs().max()
    assert err < TOL[torch.float32]


@given(st.integers(1, 9), st.integers(1, 14), st.integers(0, 2**32 - 1), st.floats(0.2, 0.95))
@settings(max_examples=150, deadline=None)
def test_largest_window_is_the_largest(f: int, m: int, seed: int, density: float) -> None:
    """The planner's window search against brute force over every (rows, offset, length)."""
    keys = torch.rand(f, m, generator=torch.Generator().manual_seed(seed)) < density
    area, f0, f1, off, length = _largest_window(keys)
    best = 0
    for i0 in range(f):
        for i1 in range(i0 + 1, f + 1):
            for c in range(-f, m + 1):
                for n in range(1, m + 1):
                    if all(0 <= i + c and i + c + n <= m and bool(keys[i, i + c:i + c + n].all())
                           for i in range(i0, i1)):
                        best = max(best, (i1 - i0) * n)
    assert area == best
    if area:
        assert (f1 - f0) * length == area
        assert all(bool(keys[i, i + off:i + off + length].all()) and i + off >= 0 for i in range(f0, f1))


@given(st.integers(1, 9), st.integers(1, 10), st.integers(1, 4), st.integers(0, 2**32 - 1), st.floats(0.3, 0.97))
@settings(max_examples=150, deadline=None)
def test_largest_rectangle_is_the_largest(f: int, m: int, min_rows: int, seed: int, density: float) -> None:
    """``plan_stacks``'s block search against brute force over every (row range, column range)."""
    pairs = torch.rand(f, m, generator=torch.Generator().manual_seed(seed)) < density
    area, f0, f1, k0, k1 = _largest_rectangle(pairs, min_rows)
    best = max([(i1 - i0) * (c1 - c0) for i0 in range(f) for i1 in range(i0 + min_rows, f + 1)
                for c0 in range(m) for c1 in range(c0 + 1, m + 1) if bool(pairs[i0:i1, c0:c1].all())], default=0)
    assert area == best
    if area:
        assert (f1 - f0) * (k1 - k0) == area and f1 - f0 >= min_rows and bool(pairs[f0:f1, k0:k1].all())
