"""RotaryLayout against the models' own RoPE code (diffusers 0.42.1) and against inline reference formulas.

Every comparison rotates a random (batch, tokens, heads, head_dim) tensor twice, once with the model's
RoPE table and rotation, once with ``RotaryLayout.rotate``, with positions from the frame-major token
order ``token = f * H * W + h * W + w``.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb, get_1d_rotary_pos_embed, get_3d_rotary_pos_embed
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoRotaryPosEmbed
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, WanRotaryPosEmbed
from jaxtyping import TypeCheckError

from freeloc.rotary import RotaryLayout

ATOL = 1e-5


# ------------------------------------------------------------------------------------- helpers
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def grid_positions(frames: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float (t, h, w) positions of the frame-major token order ``token = f*H*W + h*W + w``."""
    tok = torch.arange(frames * height * width)
    t = tok // (height * width)
    h = (tok // width) % height
    w = tok % width
    return t.float(), h.float(), w.float()


def random_qk(tokens: int, head_dim: int, seed: int, batch: int = 2, heads: int = 3) -> torch.Tensor:
    return torch.randn(batch, tokens, heads, head_dim, generator=gen(seed))


def wan_apply_rotary_emb(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """The inner ``apply_rotary_emb`` of diffusers 0.42.1's ``WanAttnProcessor.__call__``, verbatim."""
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


def hand_cos_sin(
    axes_dim: tuple[int, int, int], theta: float, t: torch.Tensor, h: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleaved (S, D) cos/sin built per axis with diffusers' ``get_1d_rotary_pos_embed`` (float64)."""
    parts = [get_1d_rotary_pos_embed(d, p.double(), theta, use_real=True, repeat_interleave_real=True,
                                     freqs_dtype=torch.float64)
             for d, p in zip(axes_dim, (t, h, w), strict=True)]
    return torch.cat([c for c, _ in parts], dim=1), torch.cat([s for _, s in parts], dim=1)


def test_wan_inner_rotation_is_still_the_replicated_one() -> None:
    """Guard: the replicated rotation above must match the installed diffusers source."""
    src = inspect.getsource(WanAttnProcessor.__call__)
    for line in ("x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)", "cos = freqs_cos[..., 0::2]",
                 "sin = freqs_sin[..., 1::2]", "out[..., 0::2] = x1 * cos - x2 * sin",
                 "out[..., 1::2] = x1 * sin + x2 * cos"):
        assert line in src


# ------------------------------------------------------------------------------------- Wan
def test_wan_split() -> None:
    layout = RotaryLayout.wan(128)
    assert (layout.t_dim, layout.h_dim, layout.w_dim) == (44, 42, 42)
    assert layout.theta == 10000.0 and layout.interleaved
    tiny = RotaryLayout.wan(12)
    assert (tiny.t_dim, tiny.h_dim, tiny.w_dim) == (4, 4, 4)


@pytest.mark.parametrize(
    ("head_dim", "max_seq_len", "fhw"),
    [(128, 1024, (5, 3, 4)), (128, 1024, (41, 2, 3)), (12, 32, (13, 4, 4)), (12, 32, (3, 8, 8))],
)
def test_wan_matches_diffusers(head_dim: int, max_seq_len: int, fhw: tuple[int, int, int]) -> None:
    f, hh, ww = fhw
    rope = WanRotaryPosEmbed(attention_head_dim=head_dim, patch_size=(1, 2, 2), max_seq_len=max_seq_len)
    latent = torch.zeros(1, 16, f, 2 * hh, 2 * ww)
    cos, sin = rope(latent)
    s = f * hh * ww
    assert cos.shape == (1, s, 1, head_dim)
    x = random_qk(s, head_dim, seed=head_dim + f)
    ref = wan_apply_rotary_emb(x, cos, sin)
    layout = RotaryLayout.wan(head_dim)
    out = layout.rotate(x, *grid_positions(f, hh, ww))
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)
    assert not torch.allclose(out, x)


@pytest.mark.parametrize("head_dim", [128, 12])
def test_wan_fractional_temporal_positions(head_dim: int) -> None:
    f, hh, ww = 7, 3, 5
    t, h, w = grid_positions(f, hh, ww)
    t = t * 0.37 + 0.125  # PI-like fractional positions
    layout = RotaryLayout.wan(head_dim)
    cos, sin = hand_cos_sin((layout.t_dim, layout.h_dim, layout.w_dim), 10000.0, t, h, w)
    x = random_qk(t.numel(), head_dim, seed=7)
    ref = wan_apply_rotary_emb(x, cos[None, :, None, :], sin[None, :, None, :])
    torch.testing.assert_close(layout.rotate(x, t, h, w), ref, rtol=0, atol=ATOL)


def test_wan_cos_sin_table_matches_diffusers_buffers() -> None:
    layout = RotaryLayout.wan(128)
    rope = WanRotaryPosEmbed(attention_head_dim=128, patch_size=(1, 2, 2), max_seq_len=1024)
    pos = torch.arange(100, dtype=torch.float64)
    zero = torch.zeros(100)
    cos, sin = layout.cos_sin(pos, zero, zero)
    assert cos.dtype == torch.float32 and cos.shape == (100, 64)
    torch.testing.assert_close(cos[:, :22], rope.freqs_cos[:100, :44:2], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[:, :22], rope.freqs_sin[:100, :44:2], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------- HunyuanVideo
@pytest.mark.parametrize("fhw", [(6, 4, 5), (33, 2, 2)])
def test_hunyuan_matches_diffusers(fhw: tuple[int, int, int]) -> None:
    f, hh, ww = fhw
    rope = HunyuanVideoRotaryPosEmbed(patch_size=1, patch_size_t=1, rope_dim=[16, 56, 56], theta=256.0)
    cos, sin = rope(torch.zeros(1, 4, f, hh, ww))
    s = f * hh * ww
    assert cos.shape == (s, 128)
    x = random_qk(s, 128, seed=11)  # (B, S, H, D), as HunyuanVideoAttnProcessor2_0 holds it
    ref = apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1, sequence_dim=1)
    # the function's default layout is (B, H, S, D): the same result after transposing
    ref_bhsd = apply_rotary_emb(x.transpose(1, 2), (cos, sin), use_real=True, use_real_unbind_dim=-1)
    torch.testing.assert_close(ref_bhsd.transpose(1, 2), ref, rtol=0, atol=0)
    layout = RotaryLayout.hunyuan()
    assert (layout.t_dim, layout.h_dim, layout.w_dim, layout.theta) == (16, 56, 56, 256.0)
    torch.testing.assert_close(layout.rotate(x, *grid_positions(f, hh, ww)), ref, rtol=0, atol=ATOL)


def test_hunyuan_tiny_axes() -> None:
    f, hh, ww = 5, 3, 3
    rope = HunyuanVideoRotaryPosEmbed(patch_size=1, patch_size_t=1, rope_dim=[2, 4, 4], theta=256.0)
    cos, sin = rope(torch.zeros(1, 4, f, hh, ww))
    x = random_qk(f * hh * ww, 10, seed=12)
    ref = apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1, sequence_dim=1)
    out = RotaryLayout.hunyuan((2, 4, 4)).rotate(x, *grid_positions(f, hh, ww))
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


# ------------------------------------------------------------------------------------- CogVideoX
@pytest.mark.parametrize(("head_dim", "split"), [(64, (16, 24, 24)), (16, (4, 6, 6))])
@pytest.mark.parametrize("grid_type", ["linspace", "slice"])
def test_cogvideox_matches_diffusers(head_dim: int, split: tuple[int, int, int], grid_type: str) -> None:
    f, gh, gw = 7, 3, 4
    layout = RotaryLayout.cogvideox(head_dim)
    assert (layout.t_dim, layout.h_dim, layout.w_dim) == split
    cos, sin = get_3d_rotary_pos_embed(
        embed_dim=head_dim, crops_coords=((0, 0), (gh, gw)), grid_size=(gh, gw), temporal_size=f,
        theta=10000, use_real=True, grid_type=grid_type, max_size=(gh, gw),
    )
    s = f * gh * gw
    assert cos.shape == (s, head_dim)
    x = random_qk(s, head_dim, seed=13).transpose(1, 2)  # CogVideoXAttnProcessor2_0 holds (B, H, S, D)
    ref = apply_rotary_emb(x, (cos, sin))
    out = layout.rotate(x.transpose(1, 2), *grid_positions(f, gh, gw)).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


# ------------------------------------------------------------------------------------- Open-Sora 2.0
def flux_embed_nd_rotate(x: torch.Tensor, ids: torch.Tensor, axes_dim: tuple[int, ...], theta: float) -> torch.Tensor:
    """Flux / Open-Sora ``EmbedND`` + ``apply_rope``, inline; x is (B, H, L, D), ids is (L, n_axes)."""

    def rope(pos: torch.Tensor, dim: int) -> torch.Tensor:
        scale = torch.arange(0, dim, 2, dtype=torch.float64) / dim
        omega = 1.0 / (theta**scale)
        out = torch.einsum("n,d->nd", pos.double(), omega)
        out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
        return out.view(*out.shape[:-1], 2, 2).float()

    pe = torch.cat([rope(ids[:, i], axes_dim[i]) for i in range(len(axes_dim))], dim=-3)  # (L, D/2, 2, 2)
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    x_out = pe[..., 0] * x_[..., 0] + pe[..., 1] * x_[..., 1]
    return x_out.reshape(*x.shape).type_as(x)


def liger_rotate(x: torch.Tensor, ids: torch.Tensor, axes_dim: tuple[int, ...], theta: float) -> torch.Tensor:
    """Open-Sora ``LigerEmbedND`` tables + the rotate-half rotation of Liger's RoPE kernel; x is (B, H, L, D)."""
    cos_list, sin_list = [], []
    for i, dim in enumerate(axes_dim):
        omega = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        a = torch.outer(ids[:, i].double(), omega)
        cos_list.append(a.cos())
        sin_list.append(a.sin())
    cos = torch.cat(cos_list, dim=-1).repeat(1, 2).float()  # (L, D): pair frequencies t, h, w, then again
    sin = torch.cat(sin_list, dim=-1).repeat(1, 2).float()
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x.float() * cos + rotated_half.float() * sin).type_as(x)


def test_opensora_liger_temporal_channels() -> None:
    layout = RotaryLayout.opensora(liger=True)
    assert not layout.interleaved and layout.head_dim == 128
    assert layout.temporal_channels() == list(range(0, 8)) + list(range(64, 72))
    interleaved = RotaryLayout.opensora(liger=False)
    assert interleaved.temporal_channels() == list(range(16))


@pytest.mark.parametrize("liger", [True, False])
def test_opensora_temporal_rotation_touches_only_temporal_channels(liger: bool) -> None:
    layout = RotaryLayout.opensora(liger=liger)
    n = 10
    x = random_qk(n, 128, seed=21)
    t = torch.arange(1, n + 1, dtype=torch.float32) * 1.5
    zero = torch.zeros(n)
    out = layout.rotate(x, t, zero, zero)
    temporal = torch.zeros(128, dtype=torch.bool)
    temporal[layout.temporal_channels()] = True
    torch.testing.assert_close(out[..., ~temporal], x[..., ~temporal], rtol=0, atol=0)
    assert bool((out[..., temporal] - x[..., temporal]).abs().amax(dim=(0, 2, 3)).gt(1e-3).all())


def test_opensora_interleaved_equals_embed_nd() -> None:
    f, hh, ww = 9, 3, 4
    t, h, w = grid_positions(f, hh, ww)
    t = t * 0.5 + 0.25  # positions are an input (img_ids) in Open-Sora: fractional ones are legal
    ids = torch.stack([t, h, w], dim=-1)
    x = random_qk(t.numel(), 128, seed=22)  # (B, L, H, D)
    ref = flux_embed_nd_rotate(x.transpose(1, 2), ids, (16, 56, 56), 10000.0).transpose(1, 2)
    out = RotaryLayout.opensora(liger=False).rotate(x, t, h, w)
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


def test_opensora_liger_equals_rotate_half_formula() -> None:
    f, hh, ww = 9, 3, 4
    t, h, w = grid_positions(f, hh, ww)
    ids = torch.stack([t, h, w], dim=-1)
    x = random_qk(t.numel(), 128, seed=23)
    ref = liger_rotate(x.transpose(1, 2), ids, (16, 56, 56), 10000.0).transpose(1, 2)
    out = RotaryLayout.opensora(liger=True).rotate(x, t, h, w)
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


# ------------------------------------------------------------------------------------- generic properties
LAYOUTS = [RotaryLayout.wan(128), RotaryLayout.hunyuan(), RotaryLayout.cogvideox(64),
           RotaryLayout.opensora(liger=True), RotaryLayout.opensora(liger=False), RotaryLayout.wan(12)]


def pair_norms(x: torch.Tensor, layout: RotaryLayout) -> torch.Tensor:
    if layout.interleaved:
        return x.unflatten(-1, (-1, 2)).norm(dim=-1)
    half = layout.head_dim // 2
    return torch.stack((x[..., :half], x[..., half:]), dim=-1).norm(dim=-1)


def random_positions(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = gen(seed)
    return (torch.rand(n, generator=g) * 80, torch.rand(n, generator=g) * 60, torch.rand(n, generator=g) * 100)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.describe())
def test_rotation_preserves_pair_norms(layout: RotaryLayout) -> None:
    n = 17
    x = random_qk(n, layout.head_dim, seed=31)
    out = layout.rotate(x, *random_positions(n, 32))
    torch.testing.assert_close(pair_norms(out, layout), pair_norms(x, layout), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, x)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.describe())
def test_rotation_inverse(layout: RotaryLayout) -> None:
    n = 17
    x = random_qk(n, layout.head_dim, seed=33)
    cos, sin = layout.cos_sin(*random_positions(n, 34))
    back = layout.apply(layout.apply(x, cos, sin), cos, -sin)
    torch.testing.assert_close(back, x, rtol=0, atol=ATOL)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.describe())
def test_relative_property(layout: RotaryLayout) -> None:
    """<R(p) q, R(p') k> depends on p - p' only: shifting every position by the same amount keeps the logits."""
    n = 12
    q = random_qk(n, layout.head_dim, seed=35, batch=1, heads=1)
    k = random_qk(n, layout.head_dim, seed=36, batch=1, heads=1)
    t, h, w = random_positions(n, 37)

    def logits(shift: float) -> torch.Tensor:
        qr = layout.rotate(q, t + shift, h, w)[0, :, 0]
        kr = layout.rotate(k, t + shift, h, w)[0, :, 0]
        return qr @ kr.T

    torch.testing.assert_close(logits(13.0), logits(0.0), rtol=1e-4, atol=1e-4)


def test_bf16_in_bf16_out() -> None:
    layout = RotaryLayout.wan(128)
    n = 8
    x = random_qk(n, 128, seed=38)
    out = layout.rotate(x.bfloat16(), *random_positions(n, 39))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), layout.rotate(x, *random_positions(n, 39)), rtol=2e-2, atol=2e-2)


def test_t_freqs_override() -> None:
    layout = RotaryLayout.wan(128)
    n = 6
    t, h, w = random_positions(n, 40)
    halved = layout.temporal_freqs() / 2
    a = layout.angles(t, h, w, t_freqs=halved)
    torch.testing.assert_close(a, layout.angles(t / 2, h, w), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="t_freqs"):
        layout.angles(t, h, w, t_freqs=halved[:-1])


def test_temporal_freqs() -> None:
    layout = RotaryLayout.hunyuan()
    m = torch.arange(8, dtype=torch.float64)
    torch.testing.assert_close(layout.temporal_freqs(), 256.0 ** (-2 * m / 16), rtol=1e-12, atol=0)
    assert layout.temporal_freqs().dtype == torch.float64
    assert math.isclose(float(layout.temporal_freqs()[0]), 1.0)


def test_wrong_head_dim_names_both_sizes() -> None:
    layout = RotaryLayout.wan(128)
    x = torch.zeros(1, 4, 2, 64)
    zero = torch.zeros(4)
    with pytest.raises(ValueError) as info:
        layout.rotate(x, zero, zero, zero)
    assert "64" in str(info.value) and "128" in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"t_dim": 3, "h_dim": 4, "w_dim": 4},
        {"t_dim": 4, "h_dim": 5, "w_dim": 4},
        {"t_dim": 4, "h_dim": 4, "w_dim": 7},
        {"t_dim": -2, "h_dim": 4, "w_dim": 4},
        {"t_dim": 0, "h_dim": 4, "w_dim": 4},
        {"t_dim": 4, "h_dim": 4, "w_dim": 4, "theta": 1.0},
        {"t_dim": 4, "h_dim": 4, "w_dim": 4, "theta": 0.5},
        {"t_dim": 4, "h_dim": 4, "w_dim": 4, "theta": -10000.0},
    ],
)
def test_invalid_layouts(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="RotaryLayout"):
        RotaryLayout(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs", [{"t_dim": 4.0, "h_dim": 4, "w_dim": 4}, {"t_dim": 4, "h_dim": 4, "w_dim": 4,
                                                                          "theta": "10000"}])
def test_wrongly_typed_layouts(kwargs: dict[str, object]) -> None:
    # the layout's own ValueError, or first the test run's jaxtyping/beartype hook (TypeCheckError)
    with pytest.raises((ValueError, TypeCheckError), match="t_dim|theta"):
        RotaryLayout(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("head_dim", [9, 15])
def test_wan_constructor_rejects_odd_split(head_dim: int) -> None:
    with pytest.raises(ValueError, match="t_dim"):
        RotaryLayout.wan(head_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.describe())
def test_rotation_into_out_gives_the_same_numbers(layout: RotaryLayout, dtype: torch.dtype) -> None:
    """``out=`` (here a head-major buffer seen as (batch, tokens, heads, dim)) gets exactly what the
    allocating call returns, for the full rotation and the temporal one."""
    g = torch.Generator().manual_seed(3)
    b, n, h, d = 2, 30, 3, layout.head_dim
    x = torch.randn(b, n, h, d, generator=g).to(dtype)
    t, hp, wp = (torch.randint(0, 9, (n,), generator=g).double() for _ in range(3))
    cos, sin = layout.cos_sin(t, hp, wp)
    tcos, tsin = layout.temporal_cos_sin(t * 1.5)
    for fn, args in ((layout.apply, (cos, sin)), (layout.rotate_temporal, (tcos, tsin))):
        want = fn(x, *args)
        out = torch.full((b, h, n, d), float("nan"), dtype=dtype).transpose(1, 2)
        got = fn(x, *args, out=out)
        assert got is out and got.dtype == dtype
        assert torch.equal(got, want)


@pytest.mark.parametrize("compiling", [False, True], ids=["eager", "traced-path"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.describe())
def test_tables_by_frame_give_the_per_token_rotation(layout: RotaryLayout, dtype: torch.dtype, compiling: bool,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A table with one row per place in a frame ``[1, S, pairs]`` (the spatial rotation) or one row per
    frame ``[F, 1, t_pairs]`` (a temporal rotation) rotates exactly as the same table repeated per token,
    allocating or into ``out`` (a head-major view), on the CPU's complex path and on the path compiled
    kernels trace (``compiling``); a table that fits no frame split is refused with its shape."""
    if compiling:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    g = torch.Generator().manual_seed(4)
    b, f, s, h, d = 2, 5, 7, 3, layout.head_dim
    x = torch.randn(b, f * s, h, d, generator=g).to(dtype)
    hp, wp = torch.randint(0, 9, (s,), generator=g).double(), torch.randint(0, 9, (s,), generator=g).double()
    spatial = layout.cos_sin(torch.zeros(s, dtype=torch.float64), hp, wp)
    temporal = layout.temporal_cos_sin(torch.rand(f, generator=g).double() * 20)
    cases = ((layout.apply, [t[None] for t in spatial], [t.repeat(f, 1) for t in spatial]),
             (layout.rotate_temporal, [t[:, None] for t in temporal], [t.repeat_interleave(s, 0) for t in temporal]))
    for fn, framed, per_token in cases:
        want = fn(x, *per_token)
        assert torch.equal(fn(x, *framed), want)
        out = torch.full((b, h, f * s, d), float("nan"), dtype=dtype).transpose(1, 2)
        assert fn(x, *framed, out=out) is out and torch.equal(out, want)
    with pytest.raises(ValueError, match=r"by frame must be .* for 35 tokens, got \(4, 1, "):
        layout.rotate_temporal(x, *[t[:4, None] for t in temporal])


@pytest.mark.parametrize("compiling", [False, True], ids=["eager", "traced-path"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.describe())
def test_rotate_split_is_the_rotation_of_each_part(layout: RotaryLayout, dtype: torch.dtype, compiling: bool,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``rotate_split`` with a temporal table by frame and a spatial table by place gives exactly what
    :meth:`apply` gives from the per-token table of those positions; with one part None, that part's
    channels stay as they are (the temporal part alone is :meth:`rotate_temporal`); per-token tables and
    ``out`` (a head-major view) give the same numbers."""
    if compiling:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    g = torch.Generator().manual_seed(6)
    b, f, s, h, d = 2, 5, 7, 3, layout.head_dim
    x = torch.randn(b, f * s, h, d, generator=g).to(dtype)
    t_frame = torch.rand(f, generator=g).double() * 20
    hp, wp = torch.randint(0, 9, (s,), generator=g).double(), torch.randint(0, 9, (s,), generator=g).double()
    tab_t = tuple(c[:, None] for c in layout.temporal_cos_sin(t_frame))
    tab_s = tuple(c[None] for c in layout.spatial_cos_sin(hp, wp))
    per_token_t = tuple(c.repeat_interleave(s, 0) for c in layout.temporal_cos_sin(t_frame))
    full = layout.cos_sin(t_frame.repeat_interleave(s), hp.repeat(f), wp.repeat(f))
    spatial_only = layout.cos_sin(torch.zeros(f * s, dtype=torch.float64), hp.repeat(f), wp.repeat(f))
    tc = set(layout.temporal_channels())
    sc = [c for c in range(d) if c not in tc]
    cases = [((tab_t, tab_s), layout.apply(x, *full)), ((per_token_t, tab_s), layout.apply(x, *full)),
             ((tab_t, None), layout.rotate_temporal(x, *per_token_t)), ((None, tab_s), layout.apply(x, *spatial_only))]
    for (temporal, spatial), want in cases:  # float32 arithmetic on other vector lanes: the last bit may differ
        got = layout.rotate_split(x, temporal, spatial)
        assert got.dtype == dtype
        torch.testing.assert_close(got, want)
        out = torch.full((b, h, f * s, d), float("nan"), dtype=dtype).transpose(1, 2)
        assert layout.rotate_split(x, temporal, spatial, out=out) is out and torch.equal(out, got)
    kept = layout.rotate_split(x, tab_t, None)
    assert torch.equal(kept[..., sc], x[..., sc]) and not torch.equal(kept[..., sorted(tc)], x[..., sorted(tc)])


@pytest.mark.parametrize("compiling", [False, True], ids=["eager", "traced-path"])
@pytest.mark.parametrize("layout", [RotaryLayout(4, 0, 0), RotaryLayout(4, 0, 0, interleaved=False),
                                    RotaryLayout(4, 2, 0), RotaryLayout(6, 0, 2, interleaved=False)],
                         ids=lambda x: x.describe())
def test_rotate_split_without_height_or_width_channels(layout: RotaryLayout, compiling: bool,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Layouts with no height and/or width channels (a temporal-only RoPE): the same rotation as :meth:`apply`."""
    if compiling:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 6, 2, layout.head_dim, generator=g)
    t, hp, wp = torch.arange(3.0).double(), torch.zeros(2).double(), torch.arange(2.0).double()
    temporal = tuple(c[:, None] for c in layout.temporal_cos_sin(t))
    spatial = tuple(c[None] for c in layout.spatial_cos_sin(hp, wp))
    want = layout.apply(x, *layout.cos_sin(t.repeat_interleave(2), hp.repeat(3), wp.repeat(3)))
    torch.testing.assert_close(layout.rotate_split(x, temporal, spatial), want)
