"""The chunked backend's executor (``freeloc.attention._chunked``): stacks and passes against the reference,
with the planner's options, memory-bounded stacks off the fused kernels, key buffers written in place,
and masks kept with their plan."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from support import HEAD_DIM, ROTARY, SMALL_TSA, TOL, qkv

import freeloc
from freeloc.attention import AttentionOptions, attend, band_set_for
from freeloc.attention import _chunked as chunked
from freeloc.attention._passes import Pass, Stack, plan_passes
from freeloc.attention._planning import ChunkedPart, plan_attention
from freeloc.methods import Method


@pytest.mark.parametrize("method", [freeloc.VRPR.for_length(30, 13), SMALL_TSA, freeloc.SlidingWindow(4)],
                         ids=["vrpr", "tsa", "sliding"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_with_and_without_stacks_matches_reference(method: Method, dtype: torch.dtype) -> None:
    """Both planner modes, stacks on (the default) and off (``AttentionOptions(stacking=False)``), give the
    reference's numbers (batch 3: one stacked call per sample)."""
    grid = (30, 6, 10)
    q, k, v = qkv(6 + 30 * 60, dtype, seed=21, batch=3)
    kw = dict(grid=grid, method=method, rotary=ROTARY, text_before=6)
    ref = attend(q, k, v, backend="reference", **kw).float()
    for stacking in (True, False):
        options = AttentionOptions(stacking=stacking)
        plan = plan_passes(band_set_for(method, 30, 60, ROTARY).aligned(), 60, HEAD_DIM, options)
        assert any(isinstance(p, Stack) for p in plan) == stacking
        err = (attend(q, k, v, backend="chunked", options=options, **kw).float() - ref).abs().max().item()
        print(f"stacking={stacking}: {len(plan)} calls, max error {err:.2e}")
        assert err < TOL[dtype]


def test_stacks_off_the_fused_kernel_run_in_bounded_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """float64 (no fused CPU kernel: the logits are materialised) splits each stack into groups of query
    frames under ``AttentionOptions.stack_logits``, and still matches the reference."""
    calls: list[tuple[int, int]] = []  # stacked calls (query frames as the batch): (frames, logits)
    original = chunked.attention_with_lse

    def record(q: torch.Tensor, k: torch.Tensor, *a: object, **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
        if q.stride(0) == 60 * HEAD_DIM:
            calls.append((q.shape[0], q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]))
        return original(q, k, *a, **kw)

    monkeypatch.setattr(chunked, "attention_with_lse", record)
    grid = (30, 6, 10)
    method = freeloc.VRPR.for_length(30, 13)
    q, k, v = qkv(30 * 60, torch.float64, seed=25, batch=2)
    kw = dict(grid=grid, method=method, rotary=ROTARY)
    ref = attend(q, k, v, backend="reference", **kw)
    limit = 3 * 3 * 60 * 60 * 12  # three query frames of 3 heads over 12-frame windows
    out = attend(q, k, v, backend="chunked", options=AttentionOptions(stack_logits=limit), **kw)
    print(f"stacked calls (frames, logits): {sorted(set(calls))}")
    stacks = [p for p in plan_passes(band_set_for(method, 30, 60, ROTARY).aligned(), 60, HEAD_DIM)
              if isinstance(p, Stack)]
    assert max(n for _, n in calls) <= limit
    assert len(calls) > 2 * len(stacks)  # split: more calls than one per stack and sample
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_stack_key_buffers_are_described_by_the_plan_and_written_in_place(spy: Callable[..., list]) -> None:
    """VRPR's far-past and far-future keys are read by one stack as one buffer: the plan names that group,
    ``attend`` writes both rotations straight into it (each band's keys are a view of its slot), and the
    executor reads the buffer it is handed; the numbers are the reference's."""
    grid, s = (30, 6, 10), 60
    method = freeloc.VRPR.for_length(30, 13)
    q, k, v = qkv(30 * s, torch.float32, seed=23)
    bands = band_set_for(method, 30, s, ROTARY)
    plan = plan_attention(q, bands, grid, 0, 0, "chunked", AttentionOptions())
    names = [tuple(plan.bands.bands[i].name for i in group) for group in plan.rotations.key_buffers]
    assert plan.rotations.head_major and ("far-future", "far-past") in names, names
    runs = spy(freeloc.attention, "run_chunked")
    out = attend(q, k, v, grid=grid, method=method, rotary=ROTARY, backend="chunked",
                 options=AttentionOptions(head_group=q.shape[2]))  # all heads in one call of the executor
    (args, _), = runs
    ks, key_buffers = args[2], args[3]
    assert set(key_buffers) == set(plan.rotations.key_buffers)
    for group, buf in key_buffers.items():
        n = 30 * s
        for slot, band in enumerate(group):
            assert ks[band].data_ptr() == buf[:, :, slot * n:].data_ptr()  # the band's keys are its slot
    torch.testing.assert_close(out, attend(q, k, v, grid=grid, method=method, rotary=ROTARY, backend="reference"),
                               atol=TOL[torch.float32], rtol=0)


@pytest.mark.parametrize("cache_bytes", [64 * 2**20, 0], ids=["cached", "over-budget"])
def test_chunked_masks_are_built_once_per_plan_and_outputs_do_not_change(
        cache_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunked backend keeps the masks its plan built (``AttentionOptions.mask_cache_bytes``); past the
    byte budget it rebuilds them per call."""
    built: list[int] = []
    original = Pass.mask
    monkeypatch.setattr(Pass, "mask", lambda self, device: built.append(1) or original(self, device))
    grid = (19, 3, 5)
    # a method no other test runs: its plan (and the masks kept with it) is new here
    method = freeloc.TSA(d1=3, d2=9, stripe=0.25, sink_group=4, sink_window=5, cap=12)
    q, k, v = qkv(19 * 15, torch.float32, seed=5)
    # all heads in one group: past the budget, each call of the executor builds its masks once
    kw = dict(grid=grid, method=method, rotary=ROTARY,
              options=AttentionOptions(mask_cache_bytes=cache_bytes, head_group=q.shape[2]))
    ref = attend(q, k, v, backend="reference", **kw)
    first = attend(q, k, v, backend="chunked", **kw)
    after_first = len(built)
    second = attend(q, k, v, backend="chunked", **kw)
    third = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend="chunked", **kw)  # another dtype
    print(f"masks built: {after_first} on the first call, {len(built)} after three calls")
    assert after_first > 0 and torch.equal(first, second)
    torch.testing.assert_close(first, ref, rtol=0, atol=TOL[torch.float32])
    torch.testing.assert_close(third.float(), ref, rtol=0, atol=TOL[torch.bfloat16])
    if cache_bytes:
        assert len(built) == 2 * after_first  # the second call reused them; bf16 built its own prepared masks
    else:
        assert len(built) == 3 * after_first


def test_a_plan_with_stacks_only_leaves_other_rows_empty() -> None:
    """A chunked part over some pairs only (the stacks the flex backend leaves to the dense kernel): rows
    outside it get output 0 and LSE -inf, so that the merge weighs them 0."""
    q, k, v = qkv(19 * 35, torch.float32, seed=3)
    bands = band_set_for(SMALL_TSA, 19, 35, ROTARY)
    options = AttentionOptions(unstriped="stacks", small_blocks=0, stack_min_frames=12)
    plan = plan_attention(q, bands, (19, 5, 7), 0, 0, "flex", options)
    part = next(p for p in plan.parts if isinstance(p, ChunkedPart))
    rows = torch.zeros(19 * 35, dtype=torch.bool)
    for p in part.passes:
        rows[p.rows] = True
    assert bool(rows.any()) and not bool(rows.all())
    from freeloc.attention._rotations import rotate_bands

    qs, ks, buffers = rotate_bands(plan, q, k, ROTARY, options)
    out, lse = chunked.run_chunked(part.passes, [x.transpose(1, 2) for x in qs], [x.transpose(1, 2) for x in ks],
                                   buffers, v, 35, HEAD_DIM**-0.5, options)
    print(f"{int(rows.sum())} of {19 * 35} rows in the stacks")
    assert bool(torch.isneginf(lse[:, :, ~rows]).all()) and bool((out[:, :, ~rows] == 0).all())
    assert bool(torch.isfinite(lse[:, :, rows]).all())


def test_stack_entries_join_query_frames_for_the_cpu_kernels_larger_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where one frame is below the CPU flash kernel's 256-row tiles (768 rows), a stack's entries take several
    query frames over a joined key window, masked per row. Checked with the tile set to 192 rows, so that at 60
    tokens a frame VRPR's far stack (54 key frames a query frame) runs entries of 4 query frames over 57 key
    frames at a size the reference can check: the output and the gradients equal the one-frame entries' and
    the reference's."""
    from freeloc.attention._chunked import frames_per_entry

    assert frames_per_entry(168, 54) == 5 and frames_per_entry(168, 19) == 1 and frames_per_entry(1560, 54) == 1
    assert frames_per_entry(60, 54) == 1  # 13 frames would add 22% masked pairs
    monkeypatch.setattr(chunked, "_CPU_TILE_ROWS", (192,))
    assert frames_per_entry(60, 54) == 4
    method = freeloc.VRPR.for_length(81, 21)
    q, k, v = qkv(81 * 60, torch.float32, seed=29, heads=2, head_dim=64)
    rotary = freeloc.RotaryLayout.wan(64)
    shapes: list[tuple[int, int]] = []  # (query rows, keys) of each entry
    original = chunked.attention_with_lse

    def spy(q_, k_, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        shapes.append((q_.shape[-2], k_.shape[-2]))
        return original(q_, k_, *args, **kw)

    def run() -> tuple[torch.Tensor, ...]:
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
        out = attend(qg, kg, vg, grid=(81, 6, 10), method=method, rotary=rotary, backend="chunked")
        out.square().sum().backward()
        return out.detach(), qg.grad, kg.grad, vg.grad

    monkeypatch.setattr(chunked, "attention_with_lse", spy)
    joined = run()
    assert (4 * 60, 57 * 60) in shapes, sorted(set(shapes))
    monkeypatch.setattr(chunked, "frames_per_entry", lambda s, length: 1)
    shapes.clear()
    single = run()
    assert (4 * 60, 57 * 60) not in shapes and (60, 54 * 60) in shapes
    for a, b in zip(joined, single, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        reference = attend(q, k, v, grid=(81, 6, 10), method=method, rotary=rotary, backend="reference")
    torch.testing.assert_close(joined[0], reference, atol=TOL[torch.float32], rtol=0)
    # a mask the plan could not keep would be built on every call: one frame an entry instead
    monkeypatch.undo()
    monkeypatch.setattr(chunked, "_CPU_TILE_ROWS", (192,))
    monkeypatch.setattr(chunked, "attention_with_lse", spy)
    shapes.clear()
    with torch.no_grad():
        small_cache = attend(q, k, v, grid=(81, 6, 10), method=method, rotary=rotary, backend="chunked",
                             options=AttentionOptions(mask_cache_bytes=2**20))
    assert (4 * 60, 57 * 60) not in shapes and (60, 54 * 60) in shapes
    torch.testing.assert_close(small_cache, reference, atol=TOL[torch.float32], rtol=0)
