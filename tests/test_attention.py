"""Band attention: every backend against the dense masked softmax reference, and the reference
against plain SDPA on RoPE-rotated q/k."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from hypothesis import given, settings
from hypothesis import strategies as st

import freeloc
from freeloc.attention import attend, band_set_for, merge_lse
from freeloc.attention.chunked import Stack, plan_cost, plan_passes
from freeloc.attention.flex import BLOCK_SIZE, flex_groups, padded_frame
from freeloc.attention.merge import EMPTY_LSE, merge_into_
from freeloc.attention.reference import MAX_TOKENS

TOL = {torch.float32: 2e-5, torch.bfloat16: 4e-2}

# (frames, height, width): tokens per frame 15 and 21, neither a multiple of 8 nor of 128
GRIDS = [(30, 3, 5), (17, 7, 3)]
VRPR_81 = freeloc.VRPR.for_length(81, 21)
HEAD_DIM = 24
ROTARY = freeloc.RotaryLayout.wan(HEAD_DIM)


def methods() -> list[tuple[str, freeloc.Method | None]]:
    return [
        ("none", None),
        ("vrpr", freeloc.VRPR.for_length(30, 13)),
        ("vrpr-small", freeloc.VRPR(3, 5, 2, 4, 12)),
        ("tsa", freeloc.TSA(d1=3, d2=9, stripe=0.25, sink_group=4, sink_window=6, cap=12)),
        ("tsa-default", freeloc.TSA(cap=12)),
        ("sliding", freeloc.SlidingWindow(4)),
        ("sliding-nosink", freeloc.SlidingWindow(2, sink=False)),
        ("pi", freeloc.PI(2.0)),
        ("ntk", freeloc.NTK(2.0)),
        ("riflex", freeloc.RIFLEx(k=2, num_frames=30)),
    ]


def qkv(n: int, dtype: torch.dtype, seed: int, batch: int = 2, heads: int = 3) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, n, heads, HEAD_DIM, generator=g).to(dtype) for _ in range(3))


@pytest.mark.parametrize("name,method", methods(), ids=[m[0] for m in methods()])
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: "x".join(map(str, g)))
@pytest.mark.parametrize("text", [(0, 0), (6, 0), (0, 5)], ids=["video", "text-before", "text-after"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["chunked", "flex"])
def test_backend_matches_reference(name: str, method: freeloc.Method | None, grid: tuple[int, int, int],
                                   text: tuple[int, int], dtype: torch.dtype, backend: str) -> None:
    f, h, w = grid
    tb, ta = text
    q, k, v = qkv(tb + f * h * w + ta, dtype, seed=hash((name, grid, text)) % 1000)
    kw = dict(grid=grid, method=method, rotary=ROTARY, text_before=tb, text_after=ta)
    ref = attend(q, k, v, backend="reference", **kw)
    out = attend(q, k, v, backend=backend, **kw)
    assert out.dtype == dtype and out.shape == q.shape
    err = (out.float() - ref.float()).abs().max().item()
    assert err < TOL[dtype], f"{backend} vs reference: max error {err}"
    assert ref.float().abs().max() > 0.1  # a real signal, not a degenerate output


def rotate_original(x: torch.Tensor, grid: tuple[int, int, int], t_freqs: torch.Tensor | None = None) -> torch.Tensor:
    f, h, w = grid
    t = torch.arange(f, dtype=torch.float64).repeat_interleave(h * w)
    hp = torch.arange(h, dtype=torch.float64).repeat_interleave(w).repeat(f)
    wp = torch.arange(w, dtype=torch.float64).repeat(f * h)
    return ROTARY.rotate(x, t, hp, wp, t_freqs)


@pytest.mark.parametrize("backend", ["reference", "chunked", "flex", "auto"])
def test_plain_attention_equals_sdpa_on_rotated_qk(backend: str) -> None:
    grid = (9, 3, 5)
    q, k, v = qkv(9 * 15, torch.float32, seed=1)
    expected = F.scaled_dot_product_attention(
        rotate_original(q, grid).transpose(1, 2), rotate_original(k, grid).transpose(1, 2), v.transpose(1, 2)
    ).transpose(1, 2)
    out = attend(q, k, v, grid=grid, method=None, rotary=ROTARY, backend=backend)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def test_reference_is_an_independent_softmax() -> None:
    """The reference (one masked softmax) equals an explicit per-pair loop-free construction for TSA."""
    grid = (12, 2, 3)
    method = freeloc.TSA(d1=2, d2=5, stripe=0.5, sink_group=2, sink_window=3, cap=7)
    q, k, v = qkv(12 * 6, torch.float32, seed=2, batch=1, heads=1)
    bands = band_set_for(method, 12, 6, ROTARY)
    logits = torch.full((72, 72), float("-inf"))
    for b in bands.bands:
        t = torch.arange(12).repeat_interleave(6)
        hp = torch.arange(2, dtype=torch.float64).repeat_interleave(3).repeat(12)
        wp = torch.arange(3, dtype=torch.float64).repeat(24)
        qb = ROTARY.rotate(q, b.q_pos[t], hp, wp)[0, :, 0]
        kb = ROTARY.rotate(k, b.k_pos[t], hp, wp)[0, :, 0]
        m = b.token_pairs(6)
        logits = torch.where(m, qb @ kb.T / math.sqrt(HEAD_DIM), logits)
    expected = torch.softmax(logits, -1) @ v[0, :, 0]
    out = attend(q, k, v, grid=grid, method=method, rotary=ROTARY, backend="reference")[0, :, 0]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "chunked", "flex"])
def test_vrpr_all_near_equals_plain(backend: str) -> None:
    """A VRPR whose near tier covers every pair (w1 >= F) is plain attention."""
    grid = (10, 3, 5)
    q, k, v = qkv(150, torch.float32, seed=3)
    plain = attend(q, k, v, grid=grid, method=None, rotary=ROTARY, backend="reference")
    for vrpr in (freeloc.VRPR(10, 11, 2, 8, 12), freeloc.VRPR.for_length(10, 13), freeloc.VRPR(12, 14, 2, 8, 20)):
        out = attend(q, k, v, grid=grid, method=vrpr, rotary=ROTARY, backend=backend)
        torch.testing.assert_close(out, plain, atol=2e-5, rtol=1e-4)


def test_vrpr_changes_attention_when_out_of_range() -> None:
    grid = (30, 3, 5)
    q, k, v = qkv(450, torch.float32, seed=4)
    plain = attend(q, k, v, grid=grid, method=None, rotary=ROTARY)
    out = attend(q, k, v, grid=grid, method=freeloc.VRPR.for_length(30, 13), rotary=ROTARY)
    assert (out - plain).abs().max() > 1e-3


def test_merge_is_exact_and_empty_band_weighs_zero() -> None:
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(7, 8, generator=g), torch.randn(20, 8, generator=g), torch.randn(20, 8, generator=g)
    s = q @ k.T
    cuts = [(0, 6), (6, 6), (6, 13), (13, 20)]  # (6, 6) is an empty band
    outs, lses = [], []
    for a, b in cuts:
        if a == b:
            outs.append(torch.full((7, 8), float("nan")))
            lses.append(torch.full((7,), float("-inf")))
        else:
            outs.append(torch.softmax(s[:, a:b], -1) @ v[a:b])
            lses.append(torch.logsumexp(s[:, a:b], -1))
    outs[1][2] = 1.0  # a row with keys in no pass
    lses = [torch.cat([x[:2], torch.tensor([float("-inf")]), x[3:]]) for x in lses]
    out, lse = merge_lse(outs, lses)
    keep = torch.arange(7) != 2
    torch.testing.assert_close(out[keep], (torch.softmax(s, -1) @ v)[keep], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse[keep], torch.logsumexp(s, -1)[keep])
    assert torch.equal(out[2], torch.zeros(8)) and lse[2] == float("-inf")


def test_running_merge_equals_merge_lse_with_rows_without_keys() -> None:
    """merge_into_ (the chunked backend's running merge) against merge_lse, pass by pass, with rows that
    have no key in some passes (lse -inf, output 0) and rows that had none yet (EMPTY_LSE)."""
    g = torch.Generator().manual_seed(9)
    rows, dim, passes = 11, 5, 4
    outs = [torch.randn(rows, dim, generator=g) for _ in range(passes)]
    lses = [torch.randn(rows, generator=g) * 4 for _ in range(passes)]
    for i, empty in enumerate([[0, 3], [3, 5], [], [3, 7]]):  # row 3 has keys only in pass 2
        outs[i][empty] = 0.0
        lses[i][empty] = float("-inf")
    acc_o, acc_l = torch.zeros(rows, dim), torch.full((rows,), EMPTY_LSE)
    for o, lse_ in zip(outs, lses, strict=True):
        merge_into_(acc_o, acc_l, o, lse_)
    want_o, want_l = merge_lse(outs, lses)
    torch.testing.assert_close(acc_o, want_o, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(acc_l, want_l)
    torch.testing.assert_close(acc_o[3], outs[2][3], atol=0, rtol=0)  # one pass: its output, bit for bit


def test_merge_in_fp32_for_bf16_parts() -> None:
    g = torch.Generator().manual_seed(6)
    outs = [torch.randn(4, 3, generator=g).bfloat16() for _ in range(2)]
    lses = [torch.randn(4, generator=g) for _ in range(2)]
    out, _ = merge_lse(outs, lses)
    assert out.dtype == torch.float32
    w = torch.softmax(torch.stack(lses), 0)
    torch.testing.assert_close(out, w[0, :, None] * outs[0].float() + w[1, :, None] * outs[1].float())


def test_merge_outputs_is_the_merged_output_in_the_given_dtype() -> None:
    """``merge_outputs`` (the last merge of flex with a dense part, no text): merge_lse's output, converted."""
    from freeloc.attention.merge import merge_outputs, merge_pass_into_

    g = torch.Generator().manual_seed(8)
    outs = [torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g).bfloat16()]
    lses = [torch.randn(6, generator=g), torch.randn(6, generator=g)]
    lses[1][2] = float("-inf")
    got = merge_outputs(outs, lses, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, merge_lse(outs, lses)[0].bfloat16())
    acc_o, acc_l = outs[0].clone(), lses[0].clone()  # the running merge of a bf16 pass: converted first
    merge_pass_into_(acc_o, acc_l, outs[1], lses[1])
    want_o, want_l = merge_lse(outs, lses)
    torch.testing.assert_close(acc_o, want_o, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(acc_l, want_l)


def test_reference_refuses_long_sequences() -> None:
    f, h, w = 10, 30, 28  # 8400 tokens > MAX_TOKENS
    assert f * h * w > MAX_TOKENS
    q = torch.randn(1, f * h * w, 1, HEAD_DIM)
    with pytest.raises(ValueError, match=r"N <= 8192.*N=8400"):
        attend(q, q, q, grid=(f, h, w), method=freeloc.TSA(), rotary=ROTARY, backend="reference")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(grid=(4, 2)), "grid must be"),
        (dict(grid=(4, 2, 0)), "grid must be"),
        (dict(grid=(4, 2, 3), backend="fast"), "backend must be one of"),
        (dict(grid=(5, 2, 3)), r"seq length of q is 24, but .* = 30"),
        (dict(grid=(4, 2, 3), text_before=-1), "text_before must be"),
        (dict(grid=(4, 2, 3), rotary=freeloc.RotaryLayout.wan(36)), "head_dim of q is 24"),
    ],
)
def test_bad_input_errors(kwargs: dict, match: str) -> None:
    q = torch.randn(1, 24, 2, HEAD_DIM)
    args = dict(method=None, rotary=ROTARY) | kwargs
    with pytest.raises(ValueError, match=match):
        attend(q, q, q, **args)


def test_bad_method_type() -> None:
    """A string is refused; under the test-time type checker the checker's own error names the parameter."""
    q = torch.randn(1, 24, 2, HEAD_DIM)
    with pytest.raises(Exception, match="method"):  # noqa: B017
        attend(q, q, q, grid=(4, 2, 3), method="vrpr", rotary=ROTARY)  # type: ignore[arg-type]


def test_mismatched_shapes() -> None:
    q = torch.randn(1, 24, 2, HEAD_DIM)
    with pytest.raises(Exception, match=r"same shape|parameter .k."):  # noqa: B017
        attend(q, q[:, :20], q, grid=(4, 2, 3), method=None, rotary=ROTARY)


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


def plan_coverage(bands: freeloc.BandSet, s: int, head_dim: int,
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
def test_stacks_and_passes_cover_each_pair_once(name: str, method: freeloc.Method, f: int, s: int) -> None:
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


@pytest.mark.parametrize("name,method,f", [("vrpr", freeloc.VRPR.for_length(30, 13), 30),
                                           ("vrpr-81", VRPR_81, 81), ("tsa-81", freeloc.TSA(cap=20), 81),
                                           ("sliding", freeloc.SlidingWindow(4), 30)],
                         ids=["vrpr", "vrpr-81", "tsa-81", "sliding"])
@pytest.mark.parametrize("min_frames", [1, 8, 40])
@pytest.mark.parametrize("small_blocks", [0, 16, 64])
def test_plan_stacks_and_the_rest_cover_each_pair_once(name: str, method: freeloc.Method, f: int,
                                                       min_frames: int, small_blocks: int) -> None:
    """``plan_stacks`` (the stacks ``flex.UNSTRIPED = "stacks"`` runs on the dense kernel) and the band set it
    leaves hold every pair once; its stacks span at least ``min_frames`` query frames, and so do its
    blocks, but for at most ``small_blocks`` smaller ones, used only where they finish every unstriped band."""
    from freeloc.attention.chunked import plan_stacks

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
    from freeloc.attention.chunked import Pass, Window

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


@pytest.mark.parametrize("method", [freeloc.VRPR.for_length(30, 13), dict(methods())["tsa"], freeloc.SlidingWindow(4)],
                         ids=["vrpr", "tsa", "sliding"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_with_and_without_stacks_matches_reference(method: freeloc.Method, dtype: torch.dtype,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Both planner modes, stacks on (the default) and off, give the reference's numbers (batch 3: one
    stacked call per sample)."""
    from freeloc.attention import chunked

    grid = (30, 6, 10)
    q, k, v = qkv(6 + 30 * 60, dtype, seed=21, batch=3)
    kw = dict(grid=grid, method=method, rotary=ROTARY, text_before=6)
    ref = attend(q, k, v, backend="reference", **kw).float()
    for stacking in (True, False):
        monkeypatch.setattr(chunked, "STACKING", stacking)
        chunked.plan_passes.cache_clear()
        plan = plan_passes(band_set_for(method, 30, 60, ROTARY).aligned(), 60, HEAD_DIM)
        assert any(isinstance(p, Stack) for p in plan) == stacking
        err = (attend(q, k, v, backend="chunked", **kw).float() - ref).abs().max().item()
        print(f"stacking={stacking}: {len(plan)} calls, max error {err:.2e}")
        assert err < TOL[dtype]
    chunked.plan_passes.cache_clear()


def test_stacks_off_the_fused_kernel_run_in_bounded_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """float64 (no fused CPU kernel: the logits are materialised) splits each stack into groups of query
    frames under STACK_LOGITS, and still matches the reference."""
    from freeloc.attention import chunked

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
    monkeypatch.setattr(chunked, "STACK_LOGITS", limit)
    out = attend(q, k, v, backend="chunked", **kw)
    print(f"stacked calls (frames, logits): {sorted(set(calls))}")
    stacks = [p for p in plan_passes(band_set_for(method, 30, 60, ROTARY).aligned(), 60, HEAD_DIM)
              if isinstance(p, Stack)]
    assert max(n for _, n in calls) <= limit
    assert len(calls) > 2 * len(stacks)  # split: more calls than one per stack and sample
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_stack_key_buffer_is_written_in_place_by_attend(monkeypatch: pytest.MonkeyPatch) -> None:
    """attend writes VRPR's far-past and far-future keys into one buffer (no copy for the far stack);
    given separate tensors, the chunked backend copies them into one and computes the same numbers."""
    from freeloc.attention import chunked

    grid, s = (30, 6, 10), 60
    method = freeloc.VRPR.for_length(30, 13)
    bands = band_set_for(method, 30, s, ROTARY).aligned()
    assert chunked.key_groups(bands, s, HEAD_DIM)
    found: list[bool] = []
    original = chunked._consecutive
    monkeypatch.setattr(chunked, "_consecutive", lambda parts: found.append(original(parts) is not None)
                        or original(parts))
    q, k, v = qkv(30 * s, torch.float32, seed=23)
    out = attend(q, k, v, grid=grid, method=method, rotary=ROTARY, backend="chunked")
    assert found and all(found)
    # the same bands' rotations as separate tensors (the copy path)
    t, hp, wp = (x.float() for x in freeloc.attention._spatial_positions(*grid))
    qs = [ROTARY.rotate(q, b.q_pos[t.long()], hp, wp, bands.t_freqs) for b in bands.bands]
    ks = [ROTARY.rotate(k, b.k_pos[t.long()], hp, wp, bands.t_freqs) for b in bands.bands]
    found.clear()
    o, _ = chunked.chunked_band_attention(qs, ks, v, bands, s, 1 / math.sqrt(HEAD_DIM))
    assert found and not any(found)
    torch.testing.assert_close(o.transpose(1, 2), out, atol=1e-5, rtol=1e-5)


@st.composite
def any_method(draw: st.DrawFn) -> freeloc.Method:
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


@given(any_method(), st.integers(2, 40), st.integers(1, 4), st.integers(1, 5), st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_chunked_plans_are_exact_for_any_method(method: freeloc.Method, f: int, h: int, w: int, seed: int) -> None:
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
    from freeloc.attention.chunked import _largest_window

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
    from freeloc.attention.chunked import _largest_rectangle

    pairs = torch.rand(f, m, generator=torch.Generator().manual_seed(seed)) < density
    area, f0, f1, k0, k1 = _largest_rectangle(pairs, min_rows)
    best = max([(i1 - i0) * (c1 - c0) for i0 in range(f) for i1 in range(i0 + min_rows, f + 1)
                for c0 in range(m) for c1 in range(c0 + 1, m + 1) if bool(pairs[i0:i1, c0:c1].all())], default=0)
    assert area == best
    if area:
        assert (f1 - f0) * (k1 - k0) == area and f1 - f0 >= min_rows and bool(pairs[f0:f1, k0:k1].all())


@pytest.mark.parametrize("method", [freeloc.TSA(d1=2, d2=6, stripe=0.2, cap=12), freeloc.VRPR(2, 4, 2, 3, 8)],
                         ids=["tsa", "vrpr"])
@pytest.mark.parametrize("grid", [(12, 5, 7), (6, 16, 16), (13, 1, 3)])
def test_flex_block_masks_match_token_masks(grid: tuple[int, int, int], method: freeloc.Method) -> None:
    """Each flex call's BlockMask (partial + full blocks) is exactly the tiling of its token mask, and its
    mask_mod is that token mask."""
    f, h, w = grid
    s = h * w
    bs = band_set_for(method, f, s, ROTARY).aligned()
    n = f * s
    groups = flex_groups(bs, s)
    assert len(groups) < len(bs.bands)  # some bands share a call
    covered = torch.zeros(n, n, dtype=torch.long)
    for group in groups:
        # expected token mask of the call: query token x key token of the concatenated segments
        blocks = []
        for rep, frames, members in group.segments:
            cols = torch.arange(n) if frames is None else (frames[:, None] * s + torch.arange(s)).flatten()
            seg = torch.zeros(n, len(cols), dtype=torch.bool)
            for i in members:
                used = bs.bands[i].pairs.any(0)
                assert torch.equal(bs.bands[i].k_pos[used], bs.bands[rep].k_pos[used])
                assert torch.equal(bs.bands[i].q_pos, bs.bands[group.bands[0]].q_pos)
                seg |= bs.bands[i].token_pairs(s)[:, cols]
            blocks.append(seg)
            covered[:, cols] += seg.long()
        tok = torch.cat(blocks, dim=1)
        nk = tok.shape[1]
        bm = group.block_mask(s, torch.device("cpu"))
        q_idx, kv_idx = torch.arange(n)[:, None], torch.arange(nk)[None, :]
        assert torch.equal(bm.mask_mod(0, 0, q_idx, kv_idx), tok)
        qb, kb = -(-n // BLOCK_SIZE), -(-nk // BLOCK_SIZE)
        padded = torch.zeros(qb * BLOCK_SIZE, kb * BLOCK_SIZE, dtype=torch.bool)
        padded[:n, :nk] = tok
        tiles = padded.view(qb, BLOCK_SIZE, kb, BLOCK_SIZE)
        any_t, full_t = group.block_table(s)
        assert torch.equal(any_t, tiles.any(3).any(1))
        assert torch.equal(full_t, tiles.all(3).all(1))
        assert torch.equal(bm.to_dense()[0, 0].bool()[:qb, :kb], any_t)
    assert torch.equal(covered.bool(), bs.token_mask(s)) and int(covered.max()) == 1  # each pair once


@pytest.mark.parametrize("method", [freeloc.TSA(d1=2, d2=6, stripe=0.2, cap=12), freeloc.TSA(d1=1, d2=3, cap=4),
                                    freeloc.VRPR(2, 4, 2, 3, 8), freeloc.SlidingWindow(2)],
                         ids=["tsa", "tsa-wide-stripe", "vrpr", "sliding"])
@pytest.mark.parametrize("grid", [(9, 5, 7), (5, 11, 11), (4, 16, 16), (3, 13, 11), (4, 10, 13)])
@pytest.mark.parametrize("key_block", [128, 64])
def test_flex_frame_aligned_tables_and_masks(grid: tuple[int, int, int], method: freeloc.Method, key_block: int,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Frame-aligned layout (each frame padded to whole 128-token blocks; striped calls with key blocks of
    ``STRIPE_KEY_BLOCK`` and their keys shifted by the call's tiling): every call's block table is the
    tiling of its token mask over the real queries, padding keys are never attended, the eager mask_mod
    is the token mask, and the compiled kernel's mask_mod (stripe and padding test, no frame table) agrees
    with it on every partial block, the only blocks where the compiled kernel evaluates it."""
    from freeloc.attention import flex

    monkeypatch.setattr(flex, "STRIPE_KEY_BLOCK", key_block)
    f, h, w = grid
    s = h * w
    p = padded_frame(s)
    bs = band_set_for(method, f, s, ROTARY).aligned()
    groups = flex_groups(bs, s, by_stripe=True)
    covered = torch.zeros(f * s, f * s, dtype=torch.long)
    real_q = (torch.arange(f * p) % p) < s
    for group in groups:
        assert len({bs.bands[i].stripe for i in group.bands}) == 1  # one stripe width per call
        kb, shift = group.tiling(s)
        striped = group.stripe_width(s) < s
        assert kb == (key_block if striped else BLOCK_SIZE) and 0 <= shift <= p - s and (shift == 0 or kb < 128)
        c = group.num_key_frames
        key_frames = torch.cat([torch.arange(f) if fr is None else fr for _, fr, _ in group.segments])
        tok = torch.zeros(f, p, c, p, dtype=torch.bool)  # expected mask, padded coordinates
        at = 0
        for _rep, frames, members in group.segments:
            cols = torch.arange(f) if frames is None else frames
            for i in members:
                band = bs.bands[i].token_pairs(s).view(f, s, f, s)[:, :, cols]
                tok[:, :s, at:at + len(cols), shift:shift + s] |= band
            at += len(cols)
        tok = tok.view(f * p, c * p)
        tok[~real_q] = False  # padding queries: output dropped, their mask does not matter
        real_tok = tok.view(f, p, c, p)[:, :s, :, shift:shift + s]
        cov = covered.view(f, s, f, s)
        cov.index_add_(2, key_frames, real_tok.long())
        tiles = tok.view(f * p // BLOCK_SIZE, BLOCK_SIZE, c * p // kb, kb)
        rows = real_q.view(f * p // BLOCK_SIZE, BLOCK_SIZE)[:, :, None, None]
        any_t, full_t = group.block_table(s, aligned=True)
        assert torch.equal(any_t, tiles.any(3).any(1))
        assert torch.equal(full_t, (tiles | ~rows).all(3).all(1))
        q_idx, kv_idx = torch.arange(f * p)[:, None], torch.arange(c * p)[None, :]
        eager = group.mask_mod(s, torch.device("cpu"), aligned=True)(0, 0, q_idx, kv_idx)
        assert torch.equal(eager & real_q[:, None], tok)
        key_raster = kv_idx[0] % p - shift
        assert not eager[:, (key_raster < 0) | (key_raster >= s)].any()  # padding keys never attended
        cheap = group.mask_mod(s, torch.device("cpu"), aligned=True, frame_table=False)(0, 0, q_idx, kv_idx)
        partial = (any_t & ~full_t).repeat_interleave(BLOCK_SIZE, 0).repeat_interleave(kb, 1)
        assert torch.equal((cheap & partial)[real_q], (tok & partial)[real_q])
        assert bool(partial.any()) == (bool(tok.any()) and (s % BLOCK_SIZE != 0 or striped))
    assert torch.equal(covered.bool(), bs.token_mask(s)) and int(covered.max()) == 1  # each pair once


@pytest.mark.parametrize("text", [(0, 0), (6, 0)], ids=["video", "text-before"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_flex_stripe_key_blocks_of_64_match_reference(text: tuple[int, int], dtype: torch.dtype,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``STRIPE_KEY_BLOCK = 64``: the striped calls' keys shifted inside their padded frames (by 25 tokens
    here, 130 tokens per frame) give the same numbers."""
    from freeloc.attention import flex

    monkeypatch.setattr(flex, "LAYOUT", "aligned")
    monkeypatch.setattr(flex, "STRIPE_KEY_BLOCK", 64)
    grid, tb = (9, 10, 13), text[0]
    method = freeloc.TSA(d1=2, d2=5, stripe=0.2, sink_group=2, sink_window=3, cap=6)
    bs = band_set_for(method, 9, 130, ROTARY).aligned()
    assert [g.tiling(130) for g in flex_groups(bs, 130, by_stripe=True) if g.stripe_width(130) < 130] == [(64, 25)]
    pads: list[int] = []
    original = flex._pad_into
    monkeypatch.setattr(flex, "_pad_into", lambda dst, parts, s, p, shift=0: pads.append(shift)
                        or original(dst, parts, s, p, shift))
    q, k, v = qkv(tb + 9 * 130 + text[1], dtype, seed=11)
    kw = dict(grid=grid, method=method, rotary=ROTARY, text_before=tb, text_after=text[1])
    out = attend(q, k, v, backend="flex", **kw)
    assert 25 in pads  # the striped call's keys and values were written shifted
    torch.testing.assert_close(out.float(), attend(q, k, v, backend="reference", **kw).float(), rtol=0,
                               atol=TOL[dtype])


def test_stripe_tiling_at_the_wan_frame_size() -> None:
    """At 1560 tokens per frame and the TSA stripe (195): key blocks of 64 with the keys shifted by 2
    tokens, so that each 128-query block away from the frame edges touches 9 key blocks, 4 of them whole
    (with blocks of 128: 5, 1 whole); no other shift touches fewer blocks."""
    from freeloc.attention import flex
    from freeloc.bands import gap_and_span

    assert flex.stripe_tiling(1560, 195, 64) == (64, 2) and flex.stripe_tiling(1560, 195, 128) == (128, 0)
    assert flex.stripe_tiling(1560, 1560, 64) == (128, 0)  # no stripe: whole frames, blocks of 128

    def counts(kb: int, shift: int) -> tuple[list[int], list[int]]:
        qlo, qhi = flex._query_pieces(1560)
        klo, khi, whole = flex._key_pieces(1560, kb, shift)
        gap, span = gap_and_span(qlo, qhi, klo, khi)
        return ((195 > gap) & (klo <= khi)[None, :]).sum(1).tolist(), ((195 > span) & whole[None, :]).sum(1).tolist()

    touched, full = counts(64, 2)
    assert touched[2:10] == [9] * 8 and full[2:10] == [4] * 8
    assert counts(128, 0)[0][2:10] == [5] * 8 and counts(128, 0)[1][2:10] == [1] * 8
    assert all(sum(counts(64, d)[0]) >= sum(touched) for d in range(padded_frame(1560) - 1560 + 1))
    with pytest.raises(ValueError, match="key block must be 128 or 64, got 32"):
        flex.stripe_tiling(1560, 195, 32)


def test_stripe_key_block_auto_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """``STRIPE_KEY_BLOCK = "auto"`` (the default): key blocks of 64 for 2-byte floats with head dim 128 (where
    the flex kernel's own key tile is 64), 128 otherwise; an explicit 128 or 64 wins; anything else is refused."""
    from freeloc.attention import flex

    assert flex.STRIPE_KEY_BLOCK == "auto"
    assert flex.stripe_key_block(torch.bfloat16, 128) == 64 and flex.stripe_key_block(torch.float16, 128) == 64
    assert flex.stripe_key_block(torch.float32, 128) == 128 and flex.stripe_key_block(torch.bfloat16, 64) == 128
    assert flex.stripe_key_block() == 128 and flex.stripe_tiling(1560, 195) == (128, 0)
    monkeypatch.setattr(flex, "STRIPE_KEY_BLOCK", 64)
    assert flex.stripe_key_block(torch.float32, 64) == 64 and flex.stripe_tiling(1560, 195) == (64, 2)
    monkeypatch.setattr(flex, "STRIPE_KEY_BLOCK", 128)
    assert flex.stripe_key_block(torch.bfloat16, 128) == 128
    for bad in (32, "64", True):
        monkeypatch.setattr(flex, "STRIPE_KEY_BLOCK", bad)
        with pytest.raises(ValueError, match=f"STRIPE_KEY_BLOCK must be 'auto', 128 or 64, got {bad!r}"):
            flex.stripe_key_block(torch.bfloat16, 128)


@pytest.mark.parametrize("name,method", methods()[:6], ids=[m[0] for m in methods()[:6]])
@pytest.mark.parametrize("text", [(0, 0), (6, 0), (0, 5)], ids=["video", "text-before", "text-after"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_flex_frame_aligned_layout_matches_reference(name: str, method: freeloc.Method | None,
                                                     text: tuple[int, int], dtype: torch.dtype,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The frame-aligned layout (padded frames, calls split by stripe width) computes the same numbers."""
    from freeloc.attention import flex

    monkeypatch.setattr(flex, "LAYOUT", "aligned")
    grid = (13, 5, 7)  # 35 tokens per frame, padded to 128
    tb, ta = text
    q, k, v = qkv(tb + 13 * 35 + ta, dtype, seed=len(name) + 7)
    kw = dict(grid=grid, method=method, rotary=ROTARY, text_before=tb, text_after=ta)
    out = attend(q, k, v, backend="flex", **kw)
    ref = attend(q, k, v, backend="reference", **kw)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=TOL[dtype])


def test_flex_frame_aligned_pads_each_query_rotation_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """TSA's local and striped calls share one query rotation, so they share one padded copy of it."""
    from freeloc.attention import flex

    monkeypatch.setattr(flex, "LAYOUT", "aligned")
    pads: list[int] = []
    original = flex._pad_into
    monkeypatch.setattr(flex, "_pad_into", lambda dst, parts, s, p, shift=0: pads.append(1)
                        or original(dst, parts, s, p, shift))
    q, k, v = qkv(19 * 15, torch.float32, seed=4)
    method = freeloc.TSA(d1=3, d2=9, stripe=0.25, sink_group=4, sink_window=6, cap=12)
    out = attend(q, k, v, grid=(19, 3, 5), method=method, rotary=ROTARY, backend="flex")
    assert len(pads) == 2 + 3 * 2  # queries: local = striped, sink; keys and values of the three calls
    ref = attend(q, k, v, grid=(19, 3, 5), method=method, rotary=ROTARY, backend="reference")
    torch.testing.assert_close(out, ref, rtol=0, atol=TOL[torch.float32])


@pytest.mark.parametrize("name,method", methods()[:6], ids=[m[0] for m in methods()[:6]])
@pytest.mark.parametrize("text", [(0, 0), (6, 0), (0, 5)], ids=["video", "text-before", "text-after"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["packed", "aligned"])
@pytest.mark.parametrize("mode", ["chunked", "stacks"])
def test_flex_with_a_part_on_chunked_matches_reference(
        name: str, method: freeloc.Method | None, text: tuple[int, int], dtype: torch.dtype, layout: str,
        mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``flex.UNSTRIPED = "chunked"``: the bands without a stripe run as the chunked backend runs them, the
    striped ones on flex; ``"stacks"``: the sliding windows of the unstriped bands run as stacks, the rest
    on flex. Merged by LSE: the same numbers."""
    from freeloc.attention import chunked, flex

    monkeypatch.setattr(flex, "UNSTRIPED", mode)
    monkeypatch.setattr(flex, "LAYOUT", layout)
    ran: dict[str, list[str]] = {"chunked": [], "flex": []}
    for mod, fn in ((chunked, "chunked_band_attention"), (flex, "flex_band_parts")):
        original = getattr(mod, fn)

        def spy(*args: object, _original: object = original, _key: str = mod.__name__.split(".")[-1]) -> object:
            ran[_key] += [b.name for b in args[3].bands if not b.is_empty()]  # type: ignore[attr-defined]
            return _original(*args)  # type: ignore[operator]

        monkeypatch.setattr(mod, fn, spy)
        import freeloc.attention as attention_module

        monkeypatch.setattr(attention_module, fn, spy)
    grid = (19, 5, 7)
    tb, ta = text
    q, k, v = qkv(tb + 19 * 35 + ta, dtype, seed=len(name) + 11)
    kw = dict(grid=grid, method=method, rotary=ROTARY, text_before=tb, text_after=ta)
    out = attend(q, k, v, backend="flex", **kw)
    ref = attend(q, k, v, backend="reference", **kw)
    print(f"{name}: on chunked {ran['chunked']}, on flex {ran['flex']}")
    bands = band_set_for(method, 19, 35, ROTARY).bands if method is not None else ()
    striped = {b.name for b in bands if b.stripe is not None and b.stripe < 35 and not b.is_empty()}
    if mode == "chunked":
        assert set(ran["flex"]) == striped
        assert not striped & set(ran["chunked"])
    else:  # the chunked part is the stacks' plan; flex gets what they leave, striped bands included
        assert striped <= set(ran["flex"])
    if method is not None:
        assert ran["chunked"]  # every method here has bands without a stripe, and sliding windows
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=TOL[dtype])


@pytest.mark.parametrize("text", [(0, 0), (6, 0)], ids=["video", "text-before"])
def test_flex_parts_are_merged_once_by_frame(text: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """With the dense part on the chunked backend, the flex calls' outputs are not merged on their own: the
    chunked part (float32) and each flex call (bf16, views of the padded output by frame) go into one merge,
    which writes q's dtype when there is no text; the same numbers as the reference."""
    import freeloc.attention as attention_module
    from freeloc.attention import flex

    monkeypatch.setattr(flex, "UNSTRIPED", "stacks")
    monkeypatch.setattr(flex, "LAYOUT", "aligned")
    merged: list[list[tuple[torch.dtype, int, bool]]] = []
    for name in ("merge_outputs", "merge_lse"):
        original = getattr(attention_module, name)

        def spy(outs: list[torch.Tensor], lses: list[torch.Tensor], *rest: object, _original: object = original,
                _name: str = name) -> object:
            merged.append([(o.dtype, o.ndim, o.is_contiguous()) for o in outs] + [_name])  # type: ignore[list-item]
            return _original(outs, lses, *rest)  # type: ignore[operator]

        monkeypatch.setattr(attention_module, name, spy)
    method = freeloc.TSA(d1=2, d2=5, stripe=0.2, sink_group=2, sink_window=3, cap=6)
    tb, ta = text
    q, k, v = qkv(tb + 9 * 130 + ta, torch.bfloat16, seed=21)
    kw = dict(grid=(9, 10, 13), method=method, rotary=ROTARY, text_before=tb, text_after=ta)
    out = attend(q, k, v, backend="flex", **kw)
    video_merge = "merge_outputs" if tb + ta == 0 else "merge_lse"
    assert merged[0] == [(torch.float32, 5, True), (torch.bfloat16, 5, False), video_merge]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), attend(q, k, v, backend="reference", **kw).float(), rtol=0,
                               atol=TOL[torch.bfloat16])


def test_split_striped_keeps_band_indices() -> None:
    from freeloc.attention import flex

    bs = band_set_for(freeloc.TSA(d1=3, d2=9, stripe=0.25, sink_group=4, sink_window=6, cap=12), 19, 35, ROTARY)
    unstriped, striped = flex.split_striped(bs, 35)
    assert unstriped is not None and striped is not None
    assert len(unstriped.bands) == len(striped.bands) == len(bs.bands)
    for whole, a, b in zip(bs.bands, unstriped.bands, striped.bands, strict=True):
        assert torch.equal(a.pairs | b.pairs, whole.pairs) and not bool((a.pairs & b.pairs).any())
        assert torch.equal(a.q_pos, whole.q_pos) and torch.equal(b.k_pos, whole.k_pos)
    assert [b.name for b in striped.bands if not b.is_empty()] == ["striped"]
    vrpr = band_set_for(freeloc.VRPR.for_length(30, 13), 30, 35, ROTARY)
    assert flex.split_striped(vrpr, 35)[1] is None  # no stripe: all on chunked


def test_unstriped_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from freeloc.attention import flex

    monkeypatch.setattr(flex, "UNSTRIPED", "cudnn")
    q, k, v = qkv(9 * 15, torch.float32, seed=2)
    want = r"UNSTRIPED must be one of \('auto', 'flex', 'stacks', 'chunked'\), got 'cudnn'"
    with pytest.raises(ValueError, match=want):
        attend(q, k, v, grid=(9, 3, 5), method=freeloc.SlidingWindow(2), rotary=ROTARY, backend="flex")


def test_flex_layout_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: frame-aligned on CUDA for striped band sets (TSA) whose padding is small; packed otherwise."""
    from freeloc.attention import flex

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    tsa, vrpr = (band_set_for(m, 81, 1560, ROTARY) for m in (freeloc.TSA(cap=20), freeloc.VRPR.for_length(81, 21)))
    assert flex.use_aligned(tsa, 1560, cuda)  # pads 104 of 1560 tokens
    assert not flex.use_aligned(vrpr, 1560, cuda)  # no stripe: packed
    assert not flex.use_aligned(band_set_for(freeloc.TSA(cap=20), 81, 100, ROTARY), 100, cuda)  # pads 28 of 100
    assert not flex.use_aligned(tsa, 1560, cpu)  # eager on CPU
    monkeypatch.setattr(flex, "LAYOUT", "aligned")
    assert flex.use_aligned(vrpr, 100, cpu)
    monkeypatch.setattr(flex, "LAYOUT", "tiled")
    with pytest.raises(ValueError, match=r"LAYOUT must be 'auto', 'aligned' or 'packed', got 'tiled'"):
        flex.use_aligned(vrpr, 100, cpu)


@pytest.mark.parametrize("name,method", methods()[:6], ids=[m[0] for m in methods()[:6]])
@pytest.mark.parametrize("text", [(6, 0), (0, 5)], ids=["text-before", "text-after"])
@pytest.mark.parametrize("backend", ["chunked", "flex"])
def test_text_padding_mask(name: str, method: freeloc.Method | None, text: tuple[int, int], backend: str) -> None:
    """Padded text keys (text_mask False) are attended by no query, on every backend as in the reference."""
    grid = (17, 7, 3)
    tb, ta = text
    n = tb + 17 * 21 + ta
    q, k, v = qkv(n, torch.float32, seed=11)
    mask = torch.ones(2, tb + ta, dtype=torch.bool)
    mask[0, -2:] = False
    mask[1, 0] = False
    kw = dict(grid=grid, method=method, rotary=ROTARY, text_before=tb, text_after=ta, text_mask=mask)
    ref = attend(q, k, v, backend="reference", **kw)
    out = attend(q, k, v, backend=backend, **kw)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    padded = tb - 1 if tb else n - 1  # sample 0's last text token is padding
    v2 = v.clone()
    v2[0, padded] += 100.0
    again = attend(q, k, v2, backend=backend, **kw)
    assert torch.equal(again[0, tb:tb + 17 * 21], out[0, tb:tb + 17 * 21])
    unmasked = attend(q, k, v2, backend=backend, **(kw | dict(text_mask=None)))
    assert (unmasked[0] - out[0]).abs().max() > 1.0


def test_text_mask_shape_error() -> None:
    q = torch.randn(2, 24 + 3, 2, HEAD_DIM)
    with pytest.raises(ValueError, match=r"text_mask must be a bool tensor of shape \(batch, text tokens\) = \(2, 3\)"):
        attend(q, q, q, grid=(4, 2, 3), method=None, rotary=ROTARY, text_after=3,
               text_mask=torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("method", [None, freeloc.TSA(d1=2, d2=5, stripe=0.3, cap=6), freeloc.SlidingWindow(3)],
                         ids=["none", "tsa", "sliding"])
@pytest.mark.parametrize("backend", ["chunked", "flex", "reference"])
def test_without_rope(method: freeloc.Method | None, backend: str) -> None:
    """rotary=None (a model without RoPE): nothing is rotated; the pattern is a plain masked softmax."""
    grid = (12, 3, 5)
    q, k, v = qkv(4 + 180, torch.float32, seed=12)
    out = attend(q, k, v, grid=grid, method=method, rotary=None, backend=backend, text_before=4)
    allowed = torch.ones(184, 184, dtype=torch.bool)
    if method is not None:
        allowed[4:, 4:] = method.band_set(12, 15).token_mask(15)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(HEAD_DIM)
    expected = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s.masked_fill(~allowed, float("-inf")), -1), v)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method", [freeloc.VRPR(3, 5, 2, 4, 8), freeloc.PI(2.0), freeloc.NTK(2.0)],
                         ids=["vrpr", "pi", "ntk"])
def test_position_methods_need_rope(method: freeloc.Method) -> None:
    q = torch.randn(1, 24, 2, HEAD_DIM)
    with pytest.raises(ValueError, match="changes temporal positions, but rotary=None|needs the model's RotaryLayout"):
        attend(q, q, q, grid=(4, 2, 3), method=method, rotary=None)


@pytest.mark.parametrize("cache_bytes", [None, 0], ids=["cached", "over-budget"])
def test_chunked_masks_are_built_once_per_plan_and_outputs_do_not_change(
        cache_bytes: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunked backend keeps the masks its plan built; past the byte budget it rebuilds them per call."""
    from freeloc.attention import chunked

    if cache_bytes is not None:
        monkeypatch.setattr(chunked, "MASK_CACHE_BYTES", cache_bytes)
    chunked.plan_passes.cache_clear()
    built: list[int] = []
    original = chunked.Pass.mask
    monkeypatch.setattr(chunked.Pass, "mask", lambda self, device: built.append(1) or original(self, device))
    grid = (19, 3, 5)
    method = freeloc.TSA(d1=3, d2=9, stripe=0.25, sink_group=4, sink_window=6, cap=12)
    q, k, v = qkv(19 * 15, torch.float32, seed=5)
    kw = dict(grid=grid, method=method, rotary=ROTARY)
    ref = attend(q, k, v, backend="reference", **kw)
    first = attend(q, k, v, backend="chunked", **kw)
    after_first = len(built)
    second = attend(q, k, v, backend="chunked", **kw)
    third = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend="chunked", **kw)  # another dtype
    print(f"masks built: {after_first} on the first call, {len(built)} after three calls")
    assert after_first > 0 and torch.equal(first, second)
    torch.testing.assert_close(first, ref, rtol=0, atol=TOL[torch.float32])
    torch.testing.assert_close(third.float(), ref, rtol=0, atol=TOL[torch.bfloat16])
    if cache_bytes is None:
        assert len(built) == 2 * after_first  # the second call reused them; bf16 built its own prepared masks
    else:
        assert len(built) == 3 * after_first
    chunked.plan_passes.cache_clear()


def test_bands_with_equal_positions_share_one_rotation(monkeypatch: pytest.MonkeyPatch) -> None:
    """TSA's local and striped tiers use the original positions: q and k are rotated for them once, each
    band's rotation is one pass over q or k, and the sink keys (temporal position 0) get the spatial
    rotation alone."""
    calls: list[bool] = []
    original = freeloc.RotaryLayout.rotate_split
    monkeypatch.setattr(freeloc.RotaryLayout, "rotate_split", lambda self, x, temporal, spatial, out=None:
                        calls.append(temporal is not None) or original(self, x, temporal, spatial, out))
    method = freeloc.TSA(d1=3, d2=9, stripe=0.25, sink_group=4, sink_window=6, cap=12)
    bands = band_set_for(method, 19, 15, ROTARY)
    assert [b.name for b in bands.bands] == ["local", "striped", "sink"]
    q, k, v = qkv(19 * 15, torch.float32, seed=6)
    out = attend(q, k, v, grid=(19, 3, 5), method=method, rotary=ROTARY, backend="chunked")
    assert calls == [True, True, True, False]  # q: local = striped, sink; k: local = striped, sink (spatial only)
    monkeypatch.setattr(freeloc.RotaryLayout, "rotate_split", original)
    ref = attend(q, k, v, grid=(19, 3, 5), method=method, rotary=ROTARY, backend="reference")
    torch.testing.assert_close(out, ref, rtol=0, atol=TOL[torch.float32])


def test_rotation_tables_are_shared_between_queries_and_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cached cos/sin tables (on the device): the spatial one serves every rotation of q and k, and TSA's
    sink keys (temporal position 0) need no temporal table. The tables are as small as their angles
    allow: one row per place in a frame for the spatial pairs, one row per frame for the temporal ones."""
    from freeloc import attention

    attention._cos_sin.cache_clear()
    tables: list[tuple[tuple[int, ...] | None, tuple[int, ...]]] = []
    original = freeloc.RotaryLayout.rotate_split
    monkeypatch.setattr(freeloc.RotaryLayout, "rotate_split", lambda self, x, temporal, spatial, out=None:
                        tables.append((None if temporal is None else tuple(temporal[0].shape),
                                       tuple(spatial[0].shape))) or original(self, x, temporal, spatial, out))
    q, k, v = qkv(19 * 15, torch.float32, seed=8)
    method = freeloc.TSA(d1=3, d2=9, stripe=0.25, sink_group=4, sink_window=6, cap=12)
    attend(q, k, v, grid=(19, 3, 5), method=method, rotary=ROTARY, backend="chunked")
    # the spatial table; temporal: local = striped and sink for q, local = striped for k
    assert attention._cos_sin.cache_info().currsize == 1 + 2 + 1
    tp, sp = ROTARY.t_dim // 2, (HEAD_DIM - ROTARY.t_dim) // 2
    assert tables == [((19, 1, tp), (1, 15, sp))] * 3 + [(None, (1, 15, sp))]


def test_flex_falls_back_to_the_plain_kernel_where_tma_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch or GPU that refuses kernel_options={'USE_TMA': True}: one warning, the plain kernel from then on."""
    from freeloc.attention import flex

    monkeypatch.setattr(flex, "_kernel_options", lambda device: None if str(device) in flex._NO_TMA
                        else {"USE_TMA": True})
    monkeypatch.setattr(flex, "_NO_TMA", set())
    calls: list[object] = []

    def fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(kw.get("kernel_options"))
        if "kernel_options" in kw:
            raise RuntimeError("USE_TMA is not supported here")
        return q, q[..., 0]

    q = torch.randn(1, 2, 8, 4)
    with pytest.warns(UserWarning, match=r"failed \(RuntimeError: USE_TMA is not supported here\); using the "
                                         r"kernel without TMA on cpu"):
        out, _ = flex._run(fake, q, q, q, None, 1.0)
    assert torch.equal(out, q) and calls == [{"USE_TMA": True}, None] and flex._NO_TMA == {"cpu"}
    flex._run(fake, q, q, q, None, 1.0)  # no second try with TMA
    assert calls == [{"USE_TMA": True}, None, None]


def test_flex_auto_key_blocks_at_head_dim_128_in_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``STRIPE_KEY_BLOCK = "auto"``, bf16 q, k, v of head dim 128 run the striped call with key blocks of
    64 (keys shifted in their padded frames) and float32 ones with 128; both give the reference's numbers."""
    from freeloc.attention import flex

    monkeypatch.setattr(flex, "LAYOUT", "aligned")
    runs: list[int] = []
    original = flex._run
    monkeypatch.setattr(flex, "_run", lambda fn, q, k, v, bm, scale, key_block=128: runs.append(key_block)
                        or original(fn, q, k, v, bm, scale, key_block))
    rotary = freeloc.RotaryLayout.wan(128)
    method = freeloc.TSA(d1=2, d2=5, stripe=0.2, sink_group=2, sink_window=3, cap=6)
    kw = dict(grid=(9, 10, 13), method=method, rotary=rotary)
    g = torch.Generator().manual_seed(5)
    base = [torch.randn(1, 9 * 130, 2, 128, generator=g) for _ in range(3)]
    for dtype, striped_block in ((torch.bfloat16, 64), (torch.float32, 128)):
        runs.clear()
        q, k, v = (x.to(dtype) for x in base)
        out = attend(q, k, v, backend="flex", **kw)
        assert striped_block in runs and set(runs) <= {128, striped_block}
        torch.testing.assert_close(out.float(), attend(q, k, v, backend="reference", **kw).float(), rtol=0,
                                   atol=TOL[dtype])


def test_flex_falls_back_to_key_blocks_of_128_where_64_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiled striped call with key blocks of 64 that fails (a torch or GPU that refuses them): one
    warning, the same numbers from key blocks of 128, and 128 from then on; out of memory is not retried."""
    from freeloc.attention import flex

    monkeypatch.setattr(flex, "LAYOUT", "aligned")
    monkeypatch.setattr(flex, "STRIPE_KEY_BLOCK", 64)
    monkeypatch.setattr(flex, "_compiled_here", lambda q: True)  # as on CUDA (the calls still run eagerly)
    monkeypatch.setattr(flex, "_NO_SMALL_KEY_BLOCKS", set())
    runs: list[int] = []
    original = flex._run

    def run(fn: object, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bm: object, scale: float,
            key_block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        runs.append(key_block)
        if key_block == 64:
            raise RuntimeError("BLOCK_N 64 is not supported here")
        return original(fn, q, k, v, bm, scale, key_block)

    monkeypatch.setattr(flex, "_run", run)
    method = freeloc.TSA(d1=2, d2=5, stripe=0.2, sink_group=2, sink_window=3, cap=6)
    kw = dict(grid=(9, 10, 13), method=method, rotary=ROTARY)
    q, k, v = qkv(9 * 130, torch.float32, seed=12)
    with pytest.warns(UserWarning, match=r"key blocks of 64 failed \(RuntimeError: BLOCK_N 64 is not supported "
                                         r"here\); using key blocks of 128 on cpu"):
        out = attend(q, k, v, backend="flex", **kw)
    assert 64 in runs and flex._NO_SMALL_KEY_BLOCKS == {"cpu"}
    torch.testing.assert_close(out, attend(q, k, v, backend="reference", **kw), rtol=0, atol=TOL[torch.float32])
    runs.clear()
    attend(q, k, v, backend="flex", **kw)  # no second try with 64
    assert runs and 64 not in runs
    flex._NO_SMALL_KEY_BLOCKS.clear()
    monkeypatch.setattr(flex, "_run", lambda *a, **kw: (_ for _ in ()).throw(torch.OutOfMemoryError("no memory")))
    with pytest.raises(torch.OutOfMemoryError):
        attend(q, k, v, backend="flex", **kw)
    assert not flex._NO_SMALL_KEY_BLOCKS


def test_flex_key_blocks_of_64_ask_the_kernel_for_key_tiles_of_64(monkeypatch: pytest.MonkeyPatch) -> None:
    """A block mask with key blocks of 64 needs the kernel's key tile to divide it: on CUDA ``_run`` asks
    for ``BLOCK_N = 64`` (with TMA where it works, without where it failed); ``KERNEL_OPTIONS`` go on top."""
    from freeloc.attention import flex

    calls: list[object] = []

    def fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(kw.get("kernel_options"))
        return q, q[..., 0]

    q = torch.randn(1, 2, 8, 4)
    monkeypatch.setattr(flex, "_compiled_here", lambda q: True)  # as on CUDA
    monkeypatch.setattr(flex, "_kernel_options", lambda device: {"USE_TMA": True})
    flex._run(fake, q, q, q, None, 1.0, key_block=64)
    flex._run(fake, q, q, q, None, 1.0)
    monkeypatch.setattr(flex, "_kernel_options", lambda device: None)
    flex._run(fake, q, q, q, None, 1.0, key_block=64)
    flex._run(fake, q, q, q, None, 1.0)
    monkeypatch.setattr(flex, "KERNEL_OPTIONS", {"num_warps": 8, "BLOCK_N": 32})  # tuning: over the library's
    flex._run(fake, q, q, q, None, 1.0, key_block=64)
    assert calls == [{"USE_TMA": True, "BLOCK_N": 64}, {"USE_TMA": True}, {"BLOCK_N": 64}, None,
                     {"num_warps": 8, "BLOCK_N": 32}]


@pytest.mark.parametrize("name,method", [("vrpr", freeloc.VRPR(1, 2, 2, 2, 4)), ("tsa", freeloc.TSA(d1=1, d2=3, cap=4)),
                                         ("sliding", freeloc.SlidingWindow(2, sink=False))],
                         ids=["vrpr", "tsa", "sliding"])
def test_flex_matches_reference_with_frames_larger_than_a_block(name: str, method: freeloc.Method) -> None:
    """256 tokens per frame (two 128-token blocks): segments and tiles align with frames, unlike the small grids."""
    grid = (7, 16, 16)
    q, k, v = qkv(7 * 256 + 4, torch.float32, seed=21)
    kw = dict(grid=grid, method=method, rotary=ROTARY, text_before=4)
    out = attend(q, k, v, backend="flex", **kw)
    ref = attend(q, k, v, backend="reference", **kw)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_fused_steps_fall_back_to_eager_where_compiling_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA rotations and merges run compiled; where compiling fails: one warning, then the eager function."""
    from freeloc.attention import fused

    tries: list[str] = []

    def broken(fn: object, dynamic: bool | None = False) -> object:
        def run(*args: object) -> torch.Tensor:
            tries.append(fn.__name__)
            raise RuntimeError("no C compiler")
        return run

    monkeypatch.setattr(fused, "_fuse_here", lambda device: True)
    monkeypatch.setattr(fused, "_compiled", broken)
    monkeypatch.setattr(fused, "_EAGER", set())
    x = torch.randn(2, 6, 3, HEAD_DIM)
    cos, sin = ROTARY.cos_sin(torch.arange(6.0), torch.zeros(6), torch.arange(6.0))
    rotate = fused.on_device(freeloc.RotaryLayout.apply, x.device)
    with pytest.warns(UserWarning, match=r"compiling RotaryLayout.apply failed \(RuntimeError: no C compiler\); "
                                         r"running it eagerly"):
        out = rotate(ROTARY, x, cos, sin)
    assert torch.equal(out, ROTARY.apply(x, cos, sin))
    rotate(ROTARY, x, cos, sin)
    fused.on_device(freeloc.RotaryLayout.apply, x.device)(ROTARY, x, cos, sin)
    assert tries == ["apply"]  # not tried again


@given(st.integers(1, 6), st.integers(1, 7), st.integers(2, 9), st.data())
@settings(max_examples=60, deadline=None)
def test_flex_packed_mask_intervals_equal_the_width_table(f: int, c: int, s: int, data: st.DataObject) -> None:
    """The packed layout's mask_mod (a few intervals per query frame) is exactly ``width[qf, kc] > |raster
    distance|`` for any table of stripe widths, padding rows and columns included."""
    from freeloc.attention.flex import FlexGroup

    cells = data.draw(st.lists(st.sampled_from([0, 0, 1, 2, s - 1, s, s + 3]), min_size=f * c, max_size=f * c))
    width = torch.zeros(f + 1, c + 1, dtype=torch.int32)
    width[:f, :c] = torch.tensor(cells, dtype=torch.int32).view(f, c)
    group = FlexGroup((0,), ((0, None, (0,)),), width)
    nq, nk = f * s + 5, c * s + 7  # with padding tokens past the last frame and column
    q_idx, kv_idx = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
    got = group.mask_mod(s, torch.device("cpu"))(0, 0, q_idx, kv_idx)
    qf, kc = (q_idx // s).clamp(max=f), (kv_idx // s).clamp(max=c)
    assert torch.equal(got, width[qf, kc] > (q_idx % s - kv_idx % s).abs())
