"""Band attention: every backend against the dense masked softmax reference, and the reference
against plain SDPA on RoPE-rotated q/k."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

import freeloc
from freeloc.attention import attend, band_set_for, merge_lse
from freeloc.attention.chunked import plan_cost, plan_passes
from freeloc.attention.flex import BLOCK_SIZE, flex_groups
from freeloc.attention.reference import MAX_TOKENS

TOL = {torch.float32: 2e-5, torch.bfloat16: 4e-2}

# (frames, height, width): tokens per frame 15 and 21, neither a multiple of 8 nor of 128
GRIDS = [(30, 3, 5), (17, 7, 3)]
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
    out, lse = merge_lse(outs, lses)
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))


def test_merge_in_fp32_for_bf16_parts() -> None:
    g = torch.Generator().manual_seed(6)
    outs = [torch.randn(4, 3, generator=g).bfloat16() for _ in range(2)]
    lses = [torch.randn(4, generator=g) for _ in range(2)]
    out, _ = merge_lse(outs, lses)
    assert out.dtype == torch.float32


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
    computed = plan_cost(passes) / n**2
    density = tsa.token_density(s)
    print(f"TSA: computed {computed:.3f} of dense, token density {density:.3f}")
    assert computed <= 1.15 * density
    largest = max(p.rows.stop - p.rows.start if isinstance(p.rows, slice) else len(p.rows) for p in passes)
    assert largest <= 4096
    vrpr = band_set_for(freeloc.VRPR.for_length(f, 21), f, s, rot)
    v_cost = plan_cost(plan_passes(vrpr, s, 128)) / n**2
    print(f"VRPR: computed {v_cost:.3f} of dense")
    assert v_cost <= 1.05


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
        for rep, tokens, members in group.segments:
            cols = torch.arange(n) if tokens is None else tokens
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
    """TSA's local and striped tiers use the original positions: q and k are rotated for them once."""
    calls: list[int] = []
    original = freeloc.RotaryLayout.rotate_temporal
    monkeypatch.setattr(freeloc.RotaryLayout, "rotate_temporal",
                        lambda self, x, cos, sin: calls.append(1) or original(self, x, cos, sin))
    method = freeloc.TSA(d1=3, d2=9, stripe=0.25, sink_group=4, sink_window=6, cap=12)
    bands = band_set_for(method, 19, 15, ROTARY)
    assert [b.name for b in bands.bands] == ["local", "striped", "sink"]
    q, k, v = qkv(19 * 15, torch.float32, seed=6)
    out = attend(q, k, v, grid=(19, 3, 5), method=method, rotary=ROTARY, backend="chunked")
    assert len(calls) == 4  # (local = striped, sink) for q and for k
    monkeypatch.setattr(freeloc.RotaryLayout, "rotate_temporal", original)
    ref = attend(q, k, v, grid=(19, 3, 5), method=method, rotary=ROTARY, backend="reference")
    torch.testing.assert_close(out, ref, rtol=0, atol=TOL[torch.float32])


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
