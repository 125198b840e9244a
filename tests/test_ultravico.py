"""UltraViCo: positive logits of pairs beyond half the trained length scaled by alpha, on the dense reference,
in one flex call (eager on the CPU) and in chunks of query rows (chunked).

The expected outputs are computed here from scratch (rotated q and k, one logit matrix, the decay, one
softmax), not from the method's bands.
"""

from __future__ import annotations

import math

import pytest
import torch
from support import HEAD_DIM, ROTARY, qkv, rotate_original, tiny_wan_and_run

import freeloc
from freeloc.attention import attend
from freeloc.attention._planning import plan_attention
from freeloc.attention._scaled import scaled_refusal
from freeloc.bands import Band, BandSet


def dense_ultravico(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int, int], alpha: float,
                    window: int, text_before: int = 0, text_after: int = 0,
                    harmonic: tuple[float, float, int, int] | None = None) -> torch.Tensor:
    """``harmonic``: ``(beta, period, halfwidth, harmonics)``: positive logits of video pairs within
    ``halfwidth`` frames of a multiple ``1..harmonics`` of ``period`` are scaled by ``beta`` instead."""
    f, h, w = grid
    n = f * h * w
    video = slice(text_before, text_before + n)
    qr, kr = q.clone(), k.clone()
    qr[:, video], kr[:, video] = rotate_original(q[:, video], grid), rotate_original(k[:, video], grid)
    logits = torch.einsum("bqhd,bkhd->bhqk", qr.double(), kr.double()) / math.sqrt(q.shape[-1])
    frame = torch.arange(f).repeat_interleave(h * w)
    far = torch.zeros(q.shape[1], q.shape[1], dtype=torch.bool)
    far[video, video] = (frame[:, None] - frame[None, :]).abs() > window
    scale = torch.where(far, alpha, 1.0)
    if harmonic is not None:
        beta, period, halfwidth, harmonics = harmonic
        distance = (frame[:, None] - frame[None, :]).abs()
        near_multiple = torch.zeros_like(distance, dtype=torch.bool)
        for m in range(1, harmonics + 1):
            near_multiple |= (distance - m * period).abs() <= halfwidth
        band = torch.zeros_like(far)
        band[video, video] = near_multiple
        scale = torch.where(band, beta, scale)
    logits = torch.where(logits > 0, scale * logits, logits)
    return torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v.double()).to(q.dtype)


@pytest.mark.parametrize("text", [(0, 0), (4, 0), (0, 3)], ids=["video", "text-before", "text-after"])
@pytest.mark.parametrize("grid", [(13, 2, 3), (9, 3, 1)], ids=["13x2x3", "9x3x1"])
@pytest.mark.parametrize("backend", ["reference", "auto", "flex", "chunked"])
def test_matches_the_dense_definition(text: tuple[int, int], grid: tuple[int, int, int], backend: str) -> None:
    f, h, w = grid
    tb, ta = text
    method = freeloc.UltraViCo(alpha=0.7, window=3)
    q, k, v = qkv(tb + f * h * w + ta, torch.float32, seed=f + tb, batch=2, heads=3)
    want = dense_ultravico(q, k, v, grid, 0.7, 3, tb, ta)
    got = attend(q, k, v, grid=grid, method=method, rotary=ROTARY, backend=backend, text_before=tb, text_after=ta)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    plain = attend(q, k, v, grid=grid, method=None, rotary=ROTARY, backend="reference", text_before=tb, text_after=ta)
    assert (got - plain).abs().max() > 1e-3  # the decay changed the output


@pytest.mark.parametrize("text", [(0, 0), (4, 3)], ids=["video", "text-both"])
@pytest.mark.parametrize("backend", ["reference", "auto", "flex", "chunked"])
def test_the_harmonic_band_matches_the_dense_definition(text: tuple[int, int], backend: str) -> None:
    grid, (tb, ta) = (17, 2, 1), text
    method = freeloc.UltraViCo(alpha=0.8, window=2, beta=0.5, period=5.5, halfwidth=1, harmonics=2)
    assert [b.name for b in method.band_set(17, 2).bands] == ["within", "beyond", "harmonic"]
    q, k, v = qkv(tb + 34 + ta, torch.float32, seed=11, batch=2, heads=3)
    q, k = 3 * q, 3 * k  # logits large enough that the factors matter
    want = dense_ultravico(q, k, v, grid, 0.8, 2, tb, ta, harmonic=(0.5, 5.5, 1, 2))
    got = attend(q, k, v, grid=grid, method=method, rotary=ROTARY, backend=backend, text_before=tb, text_after=ta)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    alpha_only = attend(q, k, v, grid=grid, method=freeloc.UltraViCo(alpha=0.8, window=2), rotary=ROTARY,
                        backend=backend, text_before=tb, text_after=ta)
    assert (got - alpha_only).abs().max() > 1e-3  # the band changed the output
    qb, kb, vb = (q / 3).bfloat16(), (k / 3).bfloat16(), v.bfloat16()  # bf16 at the usual logit scale
    in_bf16 = attend(qb, kb, vb, grid=grid, method=method, rotary=ROTARY, backend=backend, text_before=tb,
                     text_after=ta)
    want_bf16 = dense_ultravico(qb.float(), kb.float(), vb.float(), grid, 0.8, 2, tb, ta, harmonic=(0.5, 5.5, 1, 2))
    torch.testing.assert_close(in_bf16.float(), want_bf16, atol=4e-2, rtol=0)


def test_the_published_hunyuan_band() -> None:
    # distances 46-54 and 96-104 latent frames at 132 frames (4x HunyuanVideo's 33), as the reference code
    bands = {b.name: b.pairs for b in freeloc.UltraViCo(window=16, beta=0.6, period=50).band_set(132, 1).bands}
    distance = (torch.arange(132)[:, None] - torch.arange(132)[None, :]).abs()
    assert sorted(distance[bands["harmonic"]].unique().tolist()) == [*range(46, 55), *range(96, 105)]
    assert distance[bands["within"]].max() == 16 and distance[bands["beyond"]].min() == 17
    assert bool((bands["within"] ^ bands["beyond"] ^ bands["harmonic"]).all())  # one band per pair


@pytest.mark.parametrize("text", [(0, 0), (5, 2)], ids=["video", "text-both"])
@pytest.mark.parametrize("max_dense", [30, 12, 5], ids=["2-chunks", "N/4-rows", "1-row"])
def test_beyond_max_dense_tokens_it_runs_in_rows_with_the_same_numbers(text: tuple[int, int], max_dense: int) -> None:
    grid, (tb, ta) = (13, 2, 2), text
    n = tb + 52 + ta
    method = freeloc.UltraViCo(alpha=0.7, window=2, beta=0.5, period=5, halfwidth=1)
    q, k, v = qkv(n, torch.float32, seed=12, batch=2, heads=3)
    mask = torch.ones(2, tb + ta, dtype=torch.bool)
    if tb:
        mask[1, 0] = False  # one padded text key in the second sample
    kw = dict(grid=grid, method=method, rotary=ROTARY, text_before=tb, text_after=ta, text_mask=mask if tb else None)
    dense = attend(q, k, v, **kw)
    rows = attend(q, k, v, options=freeloc.AttentionOptions(max_dense_tokens=max_dense), **kw)
    torch.testing.assert_close(rows, dense, atol=1e-6, rtol=1e-5)
    want = dense_ultravico(q, k, v, grid, 0.7, 2, tb, ta, harmonic=(0.5, 5, 1, 4)) if not tb else dense
    torch.testing.assert_close(rows, want, atol=2e-5, rtol=1e-4)
    plain = freeloc.AttentionOptions(max_dense_tokens=max_dense)
    with pytest.raises(ValueError, match=f"accepts N <= {max_dense} tokens .* got N={n}; use backend='chunked'"):
        attend(q, k, v, grid=grid, method=freeloc.TSA(cap=2), rotary=ROTARY, backend="reference", options=plain,
               text_before=tb, text_after=ta)


def test_bf16_follows_fp32() -> None:
    grid = (11, 2, 2)
    q, k, v = qkv(44, torch.float32, seed=5)
    method = freeloc.UltraViCo(alpha=0.9, window=2)
    want = attend(q, k, v, grid=grid, method=method, rotary=ROTARY)
    got = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), grid=grid, method=method, rotary=ROTARY)
    torch.testing.assert_close(got.float(), want, atol=4e-2, rtol=0)


def test_alpha_one_and_a_window_beyond_the_video_are_plain_attention() -> None:
    grid = (8, 2, 2)
    q, k, v = qkv(32, torch.float32, seed=6)
    plain = attend(q, k, v, grid=grid, method=None, rotary=ROTARY, backend="reference")
    for method in (freeloc.UltraViCo(alpha=1.0, window=2), freeloc.UltraViCo(alpha=0.5, window=7)):
        torch.testing.assert_close(attend(q, k, v, grid=grid, method=method, rotary=ROTARY), plain,
                                   atol=2e-6, rtol=1e-5)


def test_setting_for_a_length() -> None:
    assert freeloc.UltraViCo.for_length(21, 21) is None
    assert freeloc.UltraViCo.for_length(81, 21) == freeloc.UltraViCo(alpha=0.9, window=10)
    bands = freeloc.UltraViCo.for_length(81, 21).band_set(81, 4)
    assert [b.positive_logit_scale for b in bands.bands] == [None, 0.9] and bands.scales_logits()
    assert not bands.is_plain()


@pytest.mark.parametrize("backend", ["flex", "chunked"])
def test_padded_text_keys_match_the_reference(backend: str) -> None:
    grid, tb, ta = (11, 3, 1), 4, 2
    method = freeloc.UltraViCo(alpha=0.6, window=2, beta=0.5, period=4, halfwidth=1)
    q, k, v = qkv(tb + 33 + ta, torch.float32, seed=13, batch=2, heads=3)
    mask = torch.ones(2, tb + ta, dtype=torch.bool)
    mask[1, 0] = mask[0, -1] = False
    kw = dict(grid=grid, method=method, rotary=ROTARY, text_before=tb, text_after=ta, text_mask=mask)
    want = attend(q, k, v, backend="reference", **kw)
    torch.testing.assert_close(attend(q, k, v, backend=backend, **kw), want, atol=2e-6, rtol=1e-5)
    assert (want - attend(q, k, v, backend="reference", **{**kw, "method": None})).abs().max() > 1e-3


@pytest.mark.parametrize("float_logits", [10**6, 97, 1], ids=["one-chunk", "odd-rows", "1-row"])
def test_chunked_rows_give_the_same_numbers_at_any_chunk(float_logits: int) -> None:
    grid = (13, 2, 3)
    method = freeloc.UltraViCo(alpha=0.7, window=3, beta=0.5, period=5, halfwidth=1)
    q, k, v = qkv(5 + 78, torch.float32, seed=14, batch=2, heads=3)
    kw = dict(grid=grid, method=method, rotary=ROTARY, text_before=5)
    want = attend(q, k, v, backend="reference", **kw)
    got = attend(q, k, v, backend="chunked", options=freeloc.AttentionOptions(float_logits=float_logits), **kw)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


def test_gradients_on_chunked_match_the_reference() -> None:
    grid = (9, 2, 3)
    method = freeloc.UltraViCo(alpha=0.7, window=2, beta=0.5, period=4, halfwidth=1)
    q, k, v = qkv(3 + 54 + 2, torch.float32, seed=15, batch=2, heads=2)
    cot = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    grads = {}
    for backend in ("reference", "chunked"):
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out = attend(*xs, grid=grid, method=method, rotary=ROTARY, backend=backend, text_before=3, text_after=2)
        (out * cot).sum().backward()
        grads[backend] = [x.grad for x in xs]
    for g, g_ref in zip(grads["chunked"], grads["reference"], strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)
        assert g_ref.abs().max() > 0.1


def test_what_cannot_run_it_is_refused_clearly() -> None:
    q, k, v = qkv(36, torch.float32, seed=7, batch=1, heads=1, head_dim=HEAD_DIM)
    method = freeloc.UltraViCo(window=2)
    small = freeloc.AttentionOptions(max_dense_tokens=20)
    with pytest.raises(ValueError, match="flex on CPU runs eagerly .* N <= 20 video tokens .* got N=36; use "
                                         "backend='chunked' on CPU"):
        attend(q, k, v, grid=(9, 2, 2), method=method, rotary=ROTARY, backend="flex", options=small)
    pos = torch.arange(4, dtype=torch.float64)
    everything, near = torch.ones(4, 4, dtype=torch.bool), (pos[:, None] - pos[None, :]).abs() <= 1
    cases = [((Band("a", near, pos, pos), Band("b", ~near, pos, pos, positive_logit_scale=0.5)), None),
             ((Band("a", near, pos, pos, positive_logit_scale=0.5),), "its bands leave frame pairs out"),
             ((Band("a", near, pos, pos), Band("b", ~near, pos + 1, pos, positive_logit_scale=0.5)),
              "its bands have different positions"),
             ((Band("a", everything, pos, pos, stripe=1, positive_logit_scale=0.5),), "a band is striped")]
    for bands, why in cases:
        band_set = BandSet(4, bands, label="made-up")
        assert scaled_refusal(band_set) == why
        if why is not None:
            for backend in ("flex", "chunked"):
                with pytest.raises(ValueError, match=f"backend='{backend}' computes .* which made-up does not fit "
                                                     f"\\({why}\\); use backend='reference'"):
                    plan_attention(q, band_set, (4, 3, 3), 0, 0, backend, freeloc.AttentionOptions())
            auto = plan_attention(q, band_set, (4, 3, 3), 0, 0, "auto", freeloc.AttentionOptions())
            assert auto.backend == "reference"  # what fits no factor table falls back to the definition
    for bad in (dict(alpha=0.0), dict(alpha=1.5), dict(window=-1)):
        with pytest.raises(ValueError, match="UltraViCo\\.(alpha must be in \\(0, 1\\]|window must be an int)"):
            freeloc.UltraViCo(**bad)
    for bad, message in ((dict(beta=0.6), "beta and UltraViCo.period go together"),
                         (dict(period=50), "got beta=None and period=50"),
                         (dict(beta=1.5, period=50), "beta must be in \\(0, 1\\] or None, got 1.5"),
                         (dict(beta=0.6, period=0), "period must be a number of frames > 0 or None, got 0"),
                         (dict(beta=0.6, period=50, halfwidth=-1), "halfwidth must be an int >= 0"),
                         (dict(beta=0.6, period=50, harmonics=0), "harmonics must be an int >= 1, got 0")):
        with pytest.raises(ValueError, match=message):
            freeloc.UltraViCo(**bad)


def test_a_hooked_model_runs_it_and_is_clean_after() -> None:
    pytest.importorskip("diffusers", reason="the hooked model is a diffusers Wan (extra 'diffusers')")
    model, run = tiny_wan_and_run()
    plain = run()
    with freeloc.enable(model, method="ultravico", trained_frames=9) as session:  # 3 latent frames: 4x
        out = run()
    assert [s.calls for s in session.layers] == [1, 1] and torch.isfinite(out).all()
    assert not torch.equal(out, plain) and torch.equal(run(), plain)
