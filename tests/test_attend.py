"""``attend`` as a user calls it: every backend against the dense masked softmax reference, the reference
against plain SDPA on RoPE-rotated q/k, text tokens, models without RoPE, and bad input."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from support import GRIDS, HEAD_DIM, ROTARY, SMALL_TSA, TOL, methods, qkv, rotate_original

import freeloc
from freeloc.attention import attend, band_set_for
from freeloc.methods import Method


@pytest.mark.parametrize("name,method", methods(), ids=[m[0] for m in methods()])
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: "x".join(map(str, g)))
@pytest.mark.parametrize("text", [(0, 0), (6, 0), (0, 5)], ids=["video", "text-before", "text-after"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["chunked", "flex"])
def test_backend_matches_reference(name: str, method: Method | None, grid: tuple[int, int, int],
                                   text: tuple[int, int], dtype: torch.dtype, backend: str,
                                   matches_reference: Callable[..., torch.Tensor]) -> None:
    f, h, w = grid
    tb, ta = text
    q, k, v = qkv(tb + f * h * w + ta, dtype, seed=hash((name, grid, text)) % 1000)
    matches_reference(q, k, v, backend=backend, grid=grid, method=method, rotary=ROTARY, text_before=tb,
                      text_after=ta)


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


def test_token_pairs_rows_are_rows_of_token_pairs() -> None:
    """``Band.token_pairs_rows`` (the reference's rows for long sequences) is a row slice of ``token_pairs``,
    striped bands included."""
    method = freeloc.TSA(d1=2, d2=5, stripe=0.5, sink_group=2, sink_window=3, cap=7)
    for band in band_set_for(method, 12, 6, ROTARY).bands:
        whole = band.token_pairs(6)
        for start, stop in ((0, 72), (5, 17), (71, 72), (30, 30)):
            assert torch.equal(band.token_pairs_rows(6, start, stop), whole[start:stop])


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


def test_reference_refuses_long_sequences_before_any_work(spy: Callable[..., list]) -> None:
    """The reference materialises [N, N] logits: past ``AttentionOptions.max_dense_tokens`` (8192 by default)
    it refuses, before rotating anything."""
    from freeloc.attention import _rotations

    rotations = spy(_rotations, "rotate_bands")
    f, h, w = 10, 30, 28  # 8400 tokens
    q = torch.randn(1, f * h * w, 1, HEAD_DIM)
    with pytest.raises(ValueError, match=r"N <= 8192 tokens \(AttentionOptions.max_dense_tokens\), got N=8400"):
        attend(q, q, q, grid=(f, h, w), method=freeloc.TSA(), rotary=ROTARY, backend="reference")
    small = q[:, :4 * 30 * 28]
    with pytest.raises(ValueError, match=r"N <= 1000 tokens .*got N=3360"):
        attend(small, small, small, grid=(4, 30, 28), method=freeloc.TSA(), rotary=ROTARY, backend="reference",
               options=freeloc.AttentionOptions(max_dense_tokens=1000))
    assert rotations == []


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(grid=(4, 2)), "grid must be"),
        (dict(grid=(4, 2, 0)), "grid must be"),
        (dict(grid=(4, 2, 3), backend="fast"), "backend must be one of"),
        (dict(grid=(5, 2, 3)), r"seq length of q is 24, but .* = 30"),
        (dict(grid=(4, 2, 3), text_before=-1), "text_before must be"),
        (dict(grid=(4, 2, 3), rotary=freeloc.RotaryLayout.wan(36)), "head_dim of q is 24"),
        (dict(grid=(4, 2, 3), text_before=True), "text_before must be an int >= 0, got True"),
        (dict(grid=(4, 2, 3), scale=float("nan")), "scale must be a finite number > 0 .*got nan"),
        (dict(grid=(4, 2, 3), scale=-0.5), "scale must be a finite number > 0 .*got -0.5"),
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


def test_options_must_be_attention_options() -> None:
    q = torch.randn(1, 24, 2, HEAD_DIM)
    with pytest.raises(Exception, match=r"options"):  # noqa: B017
        attend(q, q, q, grid=(4, 2, 3), method=None, rotary=ROTARY, options={"layout": "packed"})  # type: ignore[arg-type]


@pytest.mark.parametrize("name,method", methods()[:6], ids=[m[0] for m in methods()[:6]])
@pytest.mark.parametrize("text", [(6, 0), (0, 5)], ids=["text-before", "text-after"])
@pytest.mark.parametrize("backend", ["chunked", "flex"])
def test_text_padding_mask(name: str, method: Method | None, text: tuple[int, int], backend: str) -> None:
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
def test_without_rope(method: Method | None, backend: str) -> None:
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
def test_position_methods_need_rope(method: Method) -> None:
    q = torch.randn(1, 24, 2, HEAD_DIM)
    with pytest.raises(ValueError, match="changes temporal positions, but rotary=None|needs the model's RotaryLayout"):
        attend(q, q, q, grid=(4, 2, 3), method=method, rotary=None)


def test_bands_with_equal_positions_share_one_rotation(monkeypatch: pytest.MonkeyPatch) -> None:
    """TSA's local and striped tiers use the original positions: q and k are rotated for them once, each
    band's rotation is one pass over q or k, and the sink keys (temporal position 0) get the spatial
    rotation alone (all heads in one group: each group rotates its own heads)."""
    calls: list[bool] = []
    original = freeloc.RotaryLayout.rotate_split
    monkeypatch.setattr(freeloc.RotaryLayout, "rotate_split", lambda self, x, temporal, spatial, out=None:
                        calls.append(temporal is not None) or original(self, x, temporal, spatial, out))
    method = SMALL_TSA
    bands = band_set_for(method, 19, 15, ROTARY)
    assert [b.name for b in bands.bands] == ["local", "striped", "sink"]
    q, k, v = qkv(19 * 15, torch.float32, seed=6)
    out = attend(q, k, v, grid=(19, 3, 5), method=method, rotary=ROTARY, backend="chunked",
                 options=freeloc.AttentionOptions(head_group=q.shape[2]))
    # q: local = striped, sink; k: local = striped, sink (spatial only); each written when a pass first reads it
    assert sorted(calls) == [False, True, True, True], calls
    monkeypatch.setattr(freeloc.RotaryLayout, "rotate_split", original)
    ref = attend(q, k, v, grid=(19, 3, 5), method=method, rotary=ROTARY, backend="reference")
    torch.testing.assert_close(out, ref, rtol=0, atol=TOL[torch.float32])


def test_rotation_tables_are_shared_between_queries_and_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cached cos/sin tables (on the device): the spatial one serves every rotation of q and k, and TSA's
    sink keys (temporal position 0) need no temporal table. The tables are as small as their angles
    allow: one row per place in a frame for the spatial pairs, one row per frame for the temporal ones."""
    from freeloc.attention import _rotations

    _rotations.cos_sin.cache_clear()  # counted below: a fresh cache
    tables: list[tuple[tuple[int, ...] | None, tuple[int, ...]]] = []
    original = freeloc.RotaryLayout.rotate_split
    monkeypatch.setattr(freeloc.RotaryLayout, "rotate_split", lambda self, x, temporal, spatial, out=None:
                        tables.append((None if temporal is None else tuple(temporal[0].shape),
                                       tuple(spatial[0].shape))) or original(self, x, temporal, spatial, out))
    q, k, v = qkv(19 * 15, torch.float32, seed=8)
    method = SMALL_TSA
    attend(q, k, v, grid=(19, 3, 5), method=method, rotary=ROTARY, backend="chunked",
           options=freeloc.AttentionOptions(head_group=q.shape[2]))  # one group: each group rotates its heads
    # the spatial table; temporal: local = striped and sink for q, local = striped for k
    assert _rotations.cos_sin.cache_info().currsize == 1 + 2 + 1
    tp, sp = ROTARY.t_dim // 2, (HEAD_DIM - ROTARY.t_dim) // 2
    assert sorted(tables, key=str) == sorted([((19, 1, tp), (1, 15, sp))] * 3 + [(None, (1, 15, sp))], key=str)


@pytest.mark.parametrize("which,match", [
    ("int", r"one floating-point dtype .* got torch.int64, torch.int64, torch.int64"),
    ("mixed", r"one floating-point dtype .* got torch.float32, torch.float64, torch.float32"),
    ("device", r"one device, got cpu, meta, cpu"),
])
def test_inputs_attend_cannot_compute_are_refused(which: str, match: str) -> None:
    """Integer q/k/v (which the kernels would truncate), mixed dtypes and mixed devices: one clear error each
    (``attend``'s own, checked without the test-time type checker, which refuses some of them first)."""
    import inspect

    q = torch.randn(1, 24, 2, HEAD_DIM)
    qkv_ = {"int": (q.long(), q.long(), q.long()), "mixed": (q, q.double(), q), "device": (q, q.to("meta"), q)}[which]
    with pytest.raises(ValueError, match=match):
        inspect.unwrap(attend)(*qkv_, grid=(4, 2, 3), method=freeloc.TSA(cap=2), rotary=ROTARY)


@pytest.mark.parametrize("backend", ["reference", "chunked", "flex"])
@pytest.mark.parametrize("empty", ["batch", "heads"])
def test_no_sample_or_no_head_gives_an_empty_output(backend: str, empty: str) -> None:
    """A batch of 0 samples (or 0 heads) is attended by every backend and method: an empty output of q's shape."""
    b, h = (0, 2) if empty == "batch" else (1, 0)
    q = torch.randn(b, 5 + 30 * 6, h, HEAD_DIM)
    for method in (None, freeloc.TSA(cap=4), freeloc.VRPR.for_length(30, 13)):
        out = attend(q, q, q, grid=(30, 2, 3), method=method, rotary=ROTARY, backend=backend, text_before=5)
        assert out.shape == q.shape and out.dtype == q.dtype


def _rows_touched_by(q: torch.Tensor, k: torch.Tensor, method: Method | None, grid: tuple[int, int, int], key: int,
                     which: str) -> torch.Tensor:
    """Video query rows (batch 1, head 1) whose output a non-finite entry of token ``key``'s key or value
    makes non-finite, from the method's bands alone: every row that attends the token, for a value or
    a NaN key; for an infinite key, the rows whose logit with it is NaN or +inf (a logit of -inf only
    drops the key)."""
    f, h, w = grid
    s = h * w
    bands = band_set_for(method, f, s, ROTARY)
    frame = torch.arange(f).repeat_interleave(s)
    hp = torch.arange(h, dtype=torch.float64).repeat_interleave(w).repeat(f)
    wp = torch.arange(w, dtype=torch.float64).repeat(f * h)
    touched = torch.zeros(f * s, dtype=torch.bool)
    for band in bands.bands:
        attends = band.token_pairs(s)[:, key]
        if which == "v" or bool(torch.isnan(k).any()):
            touched |= attends
            continue
        qb = ROTARY.rotate(q, band.q_pos[frame].double(), hp, wp, bands.t_freqs)[0, :, 0]
        kb = ROTARY.rotate(k, band.k_pos[frame].double(), hp, wp, bands.t_freqs)[0, key, 0]
        logit = qb @ kb
        touched |= attends & (torch.isnan(logit) | torch.isposinf(logit))
    return touched


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("which", ["k", "v"])
@pytest.mark.parametrize("name,method", [("tsa", SMALL_TSA), ("vrpr", freeloc.VRPR.for_length(30, 13)),
                                         ("none", None)], ids=["tsa", "vrpr", "none"])
def test_a_non_finite_key_or_value_touches_only_the_rows_that_attend_it(name: str, method: Method | None,
                                                                        which: str, bad: float) -> None:
    """One NaN or infinite entry in one token's key or value: on every backend, the rows with a non-finite
    output are exactly those that attend the token (for an infinite key: those whose logit with it is NaN
    or +inf), as the method's bands say."""
    grid = (30, 3, 5)
    key = 7 * 15 + 4  # frame 7, a token inside the frame
    q, k, v = qkv(30 * 15, torch.float32, seed=31, batch=1, heads=1)
    {"k": k, "v": v}[which][0, key, 0, 3] = bad
    want = _rows_touched_by(q, k, method, grid, key, which)
    assert want.any() and (name != "tsa" or not want.all())  # TSA: a strict subset of the rows
    for backend in ("reference", "chunked", "flex"):
        out = attend(q, k, v, grid=grid, method=method, rotary=ROTARY, backend=backend)[0, :, 0]
        got = ~torch.isfinite(out).all(-1)
        print(f"{backend}: {int(got.sum())} non-finite rows, {int(want.sum())} expected")
        assert torch.equal(got, want), f"{backend}: rows {torch.nonzero(got != want).flatten().tolist()} differ"
