"""Gradients through ``attend``: finite differences in float64, and in float32 the same gradients on every
backend that has a backward as a dense masked softmax written out here, for every kind of method, with
text tokens and a text mask, batch > 1 and odd sizes; ``flex`` on CPU (no backward there) refuses
before any work."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

import freeloc
from freeloc.attention import attend, band_set_for
from freeloc.methods import Method

ROT = freeloc.RotaryLayout.wan(12)  # temporal, height, width: 4 channels each
#: Odd sizes: 11 frames of 3 x 3 tokens.
GRID = (11, 3, 3)
METHODS = [
    ("none", None),
    ("vrpr", freeloc.VRPR.for_length(11, 5)),
    ("tsa", freeloc.TSA(d1=2, d2=5, stripe=0.5, sink_group=2, sink_window=3, cap=7)),
    ("sliding", freeloc.SlidingWindow(3)),
    ("pi", freeloc.PI(2.0)),
    ("ntk", freeloc.NTK(2.0)),
    ("yarn", freeloc.YaRN(2.0, trained_frames=6)),
    ("riflex", freeloc.RIFLEx(k=2, num_frames=11)),
]
TEXT = [(0, 0), (3, 2)]  # (text_before, text_after)


def inputs(grid: tuple[int, int, int], text: tuple[int, int], dtype: torch.dtype, seed: int, batch: int = 2,
           heads: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Seeded q, k, v (batch, seq, heads, 12) and a text mask with one padded token per sample (None
    without text)."""
    g = torch.Generator().manual_seed(seed)
    n = text[0] + grid[0] * grid[1] * grid[2] + text[1]
    q, k, v = (torch.randn(batch, n, heads, ROT.head_dim, generator=g).to(dtype) for _ in range(3))
    mask = None
    if sum(text):
        mask = torch.ones(batch, sum(text), dtype=torch.bool)
        mask[0, 0] = False
        mask[-1, -1] = False
    return q, k, v, mask


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, method: Method | None,
                    grid: tuple[int, int, int], text: tuple[int, int], text_mask: torch.Tensor | None) -> torch.Tensor:
    """The attention ``attend`` defines, as one masked softmax over every pair: video pairs of a band at
    that band's temporal positions, pairs with a text token at the original positions (text not rotated),
    padded text keys attended by no query."""
    f, h, w = grid
    s = h * w
    bands = band_set_for(method, f, s, ROT)
    video = slice(text[0], text[0] + f * s)
    frame = torch.arange(f).repeat_interleave(s)
    hp = torch.arange(h, dtype=torch.float64).repeat_interleave(w).repeat(f)
    wp = torch.arange(w, dtype=torch.float64).repeat(f * h)

    def rotated(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # (B, H, Nv, D)
        return ROT.rotate(x[:, video], positions[frame].to(torch.float64), hp, wp, bands.t_freqs).transpose(1, 2)

    def with_text(xv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :video.start].transpose(1, 2), xv, x[:, video.stop:].transpose(1, 2)], dim=2)

    scale = 1 / math.sqrt(q.shape[-1])
    original = torch.arange(f, dtype=torch.float64)
    qo, ko = with_text(rotated(q, original), q), with_text(rotated(k, original), k)
    n = q.shape[1]
    is_text = torch.ones(n, dtype=torch.bool)
    is_text[video] = False
    logits = torch.where(is_text[:, None] | is_text[None, :], qo @ ko.transpose(-1, -2) * scale, float("-inf"))
    video_logits = logits[:, :, video, video]
    for band in bands.bands:
        band_logits = rotated(q, band.q_pos) @ rotated(k, band.k_pos).transpose(-1, -2) * scale
        video_logits = torch.where(band.token_pairs(s), band_logits, video_logits)
    logits = torch.cat([logits[:, :, :, :video.start],
                        torch.cat([logits[:, :, :video.start, video], video_logits,
                                   logits[:, :, video.stop:, video]], dim=2),
                        logits[:, :, :, video.stop:]], dim=3)
    if text_mask is not None:
        keys = torch.cat([text_mask[:, :text[0]], torch.ones(q.shape[0], f * s, dtype=torch.bool),
                          text_mask[:, text[0]:]], dim=1)
        logits = logits.masked_fill(~keys[:, None, None, :], float("-inf"))
    return (torch.softmax(logits, -1) @ v.transpose(1, 2)).transpose(1, 2)


def gradients(fn: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              cotangent: torch.Tensor, wrt: str = "qkv") -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """``fn(q, k, v)`` and the gradients of ``(fn(q, k, v) * cotangent).sum()`` w.r.t. the inputs named in
    ``wrt`` (None for the others)."""
    xs = [x.detach().clone().requires_grad_(name in wrt) for name, x in zip("qkv", (q, k, v), strict=True)]
    out = fn(*xs)
    (out * cotangent).sum().backward()
    return out.detach(), [x.grad for x in xs]


@pytest.mark.parametrize("text", TEXT, ids=["video", "text"])
@pytest.mark.parametrize("name,method", METHODS, ids=[m[0] for m in METHODS])
def test_gradients_match_a_dense_softmax(name: str, method: Method | None, text: tuple[int, int]) -> None:
    """float32, batch 2, 3 heads, 11 frames of 3 x 3: the reference's and the chunked backend's output and
    gradients w.r.t. q, k and v agree with the dense masked softmax above (and with each other)."""
    q, k, v, mask = inputs(GRID, text, torch.float32, seed=1)
    cot = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    kw = dict(grid=GRID, method=method, rotary=ROT, text_before=text[0], text_after=text[1], text_mask=mask)
    want_out, want = gradients(lambda a, b, c: dense_attention(a, b, c, method, GRID, text, mask), q, k, v, cot)
    for backend in ("reference", "chunked"):
        out, got = gradients(lambda a, b, c, be=backend: attend(a, b, c, backend=be, **kw), q, k, v, cot)
        torch.testing.assert_close(out, want_out, atol=2e-5, rtol=1e-4)
        for x, g, g_want in zip("qkv", got, want, strict=True):
            assert g is not None and g_want is not None
            err = (g - g_want).abs().max().item()
            print(f"{backend} d{x}: max |error| {err:.1e}, max |grad| {g_want.abs().max().item():.2f}")
            torch.testing.assert_close(g, g_want, atol=1e-4, rtol=1e-4)
        assert want[0].abs().max() > 0.1


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("name,method", METHODS, ids=[m[0] for m in METHODS])
def test_gradcheck_float64(name: str, method: Method | None, backend: str) -> None:
    """float64 gradients w.r.t. q, k and v equal finite differences (fast gradcheck: random directions),
    with text before and after the video, a text mask, batch 2 and 11 frames of 1 x 3 tokens."""
    grid, text = (11, 1, 3), (2, 1)
    q, k, v, mask = inputs(grid, text, torch.float64, seed=3, heads=2)

    def fn(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return attend(a, b, c, grid=grid, method=method, rotary=ROT, backend=backend, text_before=text[0],
                      text_after=text[1], text_mask=mask)

    args = tuple(x.requires_grad_() for x in (q, k, v))
    assert torch.autograd.gradcheck(fn, args, fast_mode=True)


@pytest.mark.slow
@pytest.mark.parametrize("name,method", [METHODS[1], METHODS[2]], ids=["vrpr", "tsa"])
def test_full_gradcheck_chunked(name: str, method: Method) -> None:
    """The whole float64 Jacobian of the chunked backend (every input element), at a tiny size with text."""
    grid, text = (11, 1, 2), (1, 1)
    q, k, v, mask = inputs(grid, text, torch.float64, seed=4, batch=1, heads=1)

    def fn(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return attend(a, b, c, grid=grid, method=method, rotary=ROT, backend="chunked", text_before=text[0],
                      text_after=text[1], text_mask=mask)

    assert torch.autograd.gradcheck(fn, tuple(x.requires_grad_() for x in (q, k, v)))


@pytest.mark.parametrize("wrt", ["q", "k", "v"])
@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_gradient_wrt_one_input(backend: str, wrt: str) -> None:
    """Only one of q, k, v requires grad: its gradient is the dense softmax's, the others get none."""
    method = METHODS[2][1]
    q, k, v, mask = inputs(GRID, (2, 0), torch.float32, seed=5)
    cot = torch.randn(q.shape, generator=torch.Generator().manual_seed(6))
    kw = dict(grid=GRID, method=method, rotary=ROT, text_before=2, text_mask=mask)
    _, want = gradients(lambda a, b, c: dense_attention(a, b, c, method, GRID, (2, 0), mask), q, k, v, cot, wrt)
    _, got = gradients(lambda a, b, c: attend(a, b, c, backend=backend, **kw), q, k, v, cot, wrt)
    for x, g, g_want in zip("qkv", got, want, strict=True):
        if x == wrt:
            assert g is not None and g_want is not None
            torch.testing.assert_close(g, g_want, atol=1e-4, rtol=1e-4)
        else:
            assert g is None


@pytest.mark.parametrize("name,method", [METHODS[1], METHODS[2]], ids=["vrpr", "tsa"])
def test_bfloat16_gradients_follow_float32(name: str, method: Method) -> None:
    """bfloat16 on the chunked backend (the fused CPU kernel forward): the gradients are those of the
    float32 reference, within bfloat16's precision."""
    q, k, v, _ = inputs(GRID, (0, 0), torch.float32, seed=7)
    cot = torch.randn(q.shape, generator=torch.Generator().manual_seed(8))
    kw = dict(grid=GRID, method=method, rotary=ROT)
    _, want = gradients(lambda a, b, c: attend(a, b, c, backend="reference", **kw), q, k, v, cot)
    low = [x.bfloat16() for x in (q, k, v)]
    out, got = gradients(lambda a, b, c: attend(a, b, c, backend="chunked", **kw), *low, cot.bfloat16())
    assert out.dtype == torch.bfloat16
    for g, g_want in zip(got, want, strict=True):
        assert g is not None and g_want is not None and g.dtype == torch.bfloat16
        scale = g_want.abs().max().item()
        err = (g.float() - g_want).abs().max().item()
        print(f"max |error| {err:.2e} of max |grad| {scale:.2f}")
        assert err < 0.03 * scale


def test_flex_on_cpu_refuses_gradients_before_any_work(spy: Callable[..., list]) -> None:
    """``flex_attention`` has no backward on CPU: with an input that requires grad, ``backend="flex"`` raises
    one error naming the backend and what to use instead, before rotating anything; under
    ``torch.no_grad()`` the same call runs."""
    from freeloc.attention import _rotations

    rotations = spy(_rotations, "rotate_bands")
    q, k, v, _ = inputs(GRID, (0, 0), torch.float32, seed=9)
    kw = dict(grid=GRID, method=METHODS[2][1], rotary=ROT, backend="flex")
    with pytest.raises(ValueError, match=r"backend='flex' has no backward on CPU .*use backend='chunked'"):
        attend(q, k, v.requires_grad_(), **kw)
    assert rotations == []
    with torch.no_grad():
        out = attend(q, k, v, **kw)
    torch.testing.assert_close(out, attend(q, k, v.detach(), **{**kw, "backend": "reference"}), atol=2e-5,
                               rtol=1e-4)
