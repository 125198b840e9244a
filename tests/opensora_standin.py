"""A small stand-in for Open-Sora 2.0's ``MMDiTModel`` (hpcaitech/Open-Sora, ``opensora.models.mmdit``).

The real package cannot be installed here (it needs flash-attn, liger-kernel and colossalai), so the
tests run the Open-Sora adapter on this model, which reproduces the module interface the adapter
relies on: ``double_blocks[i]`` / ``single_blocks[i]`` with ``set_processor`` and processors called as
``processor(block, img, txt, vec, pe)`` and ``processor(block, x, vec, pe)``; the forward signature
``(img, img_ids, txt, txt_ids, timesteps, y_vec, ...)`` with ``img_ids[..., 0]`` the temporal index;
the sequence ``[text, video]``; ``pe`` from ``EmbedND`` (interleaved pairs) or, with
``use_liger_rope``, a ``(cos, sin)`` pair applied rotate-half. Flash attention, Liger kernels and
gradient checkpointing are replaced by plain PyTorch equivalents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn


def rope(pos: Tensor, dim: int, theta: float) -> Tensor:
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta**scale)
    out = torch.einsum("...n,d->...nd", pos.double(), omega)
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return out.reshape(*out.shape[:-1], 2, 2).float()


def liger_rope(pos: Tensor, dim: int, theta: float) -> tuple[Tensor, Tensor]:
    scale = torch.arange(0, dim, 2, dtype=torch.float32, device=pos.device) / dim
    omega = 1.0 / (theta**scale)
    out = torch.einsum("...n,d->...nd", pos.float(), omega)
    return out.cos(), out.sin()


def apply_rope(xq: Tensor, xk: Tensor, freqs_cis: Tensor) -> tuple[Tensor, Tensor]:
    xq_ = xq.float().reshape(*xq.shape[:-1], -1, 1, 2)
    xk_ = xk.float().reshape(*xk.shape[:-1], -1, 1, 2)
    xq_out = freqs_cis[..., 0] * xq_[..., 0] + freqs_cis[..., 1] * xq_[..., 1]
    xk_out = freqs_cis[..., 0] * xk_[..., 0] + freqs_cis[..., 1] * xk_[..., 1]
    return xq_out.reshape(*xq.shape).type_as(xq), xk_out.reshape(*xk.shape).type_as(xk)


def apply_liger_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Liger's rope, in plain PyTorch: rotate-half with cos/sin of shape (B, L, D) (first half repeated)."""
    c, s = cos[:, None], sin[:, None]  # (B, 1, L, D)

    def rot(x: Tensor) -> Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return (x.float() * c + rotated.float() * s).to(x.dtype)

    return rot(q), rot(k)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor | tuple[Tensor, Tensor]) -> Tensor:
    """(B, H, L, D) q/k/v, RoPE from ``pe``, softmax attention; returns (B, L, H*D)."""
    if isinstance(pe, torch.Tensor):
        q, k = apply_rope(q, k, pe)
    else:
        q, k = apply_liger_rope(q, k, *pe)
    x = F.scaled_dot_product_attention(q, k, v)
    return x.transpose(1, 2).flatten(2)


class EmbedND(nn.Module):
    def __init__(self, dim: int, theta: float, axes_dim: list[int]) -> None:
        super().__init__()
        self.dim, self.theta, self.axes_dim = dim, theta, axes_dim

    def forward(self, ids: Tensor) -> Tensor:
        emb = torch.cat([rope(ids[..., i], self.axes_dim[i], self.theta) for i in range(ids.shape[-1])], dim=-3)
        return emb.unsqueeze(1)


class LigerEmbedND(EmbedND):
    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        pairs = [liger_rope(ids[..., i], self.axes_dim[i], self.theta) for i in range(ids.shape[-1])]
        cos = torch.cat([p[0] for p in pairs], dim=-1).repeat(1, 1, 2).contiguous()
        sin = torch.cat([p[1] for p in pairs], dim=-1).repeat(1, 1, 2).contiguous()
        return cos, sin


def timestep_embedding(t: Tensor, dim: int, max_period: int = 10000, time_factor: float = 1000.0) -> Tensor:
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.in_layer, self.out_layer = nn.Linear(in_dim, hidden_dim), nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(1 + 0.1 * torch.randn(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(dim), RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, fused_qkv: bool = True) -> None:
        super().__init__()
        self.num_heads, self.fused_qkv = num_heads, fused_qkv
        if fused_qkv:
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        else:
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim, bias=qkv_bias) for _ in range(3))
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


@dataclass
class ModulationOut:
    shift: Tensor
    scale: Tensor
    gate: Tensor


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool) -> None:
        super().__init__()
        self.is_double, self.multiplier = double, 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec: Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.is_double else None


def _heads(x: Tensor, h: int) -> Tensor:
    """(B, L, H*D) -> (B, H, L, D)."""
    return x.unflatten(2, (h, -1)).transpose(1, 2)


def _qkv(attn: SelfAttention, x: Tensor, h: int) -> tuple[Tensor, Tensor, Tensor]:
    if attn.fused_qkv:
        q, k, v = attn.qkv(x).chunk(3, dim=-1)
    else:
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    q, k, v = _heads(q, h), _heads(k, h), _heads(v, h)
    q, k = attn.norm(q, k, v)
    return q, k, v


class DoubleStreamBlockProcessor:
    def __call__(self, attn: nn.Module, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        img_mod1, img_mod2 = attn.img_mod(vec)
        txt_mod1, txt_mod2 = attn.txt_mod(vec)
        img_q, img_k, img_v = _qkv(attn.img_attn, (1 + img_mod1.scale) * attn.img_norm1(img) + img_mod1.shift,
                                   attn.num_heads)
        txt_q, txt_k, txt_v = _qkv(attn.txt_attn, (1 + txt_mod1.scale) * attn.txt_norm1(txt) + txt_mod1.shift,
                                   attn.num_heads)
        q, k, v = (torch.cat(pair, dim=2) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        attn1 = attention(q, k, v, pe=pe)
        txt_attn, img_attn = attn1[:, : txt_q.shape[2]], attn1[:, txt_q.shape[2]:]
        img = img + img_mod1.gate * attn.img_attn.proj(img_attn)
        img = img + img_mod2.gate * attn.img_mlp((1 + img_mod2.scale) * attn.img_norm2(img) + img_mod2.shift)
        txt = txt + txt_mod1.gate * attn.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * attn.txt_mlp((1 + txt_mod2.scale) * attn.txt_norm2(txt) + txt_mod2.shift)
        return img, txt


def _mlp(hidden: int, ratio: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, int(hidden * ratio)), nn.GELU(approximate="tanh"),
                         nn.Linear(int(hidden * ratio), hidden))


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, fused_qkv: bool = True) -> None:
        super().__init__()
        self.num_heads, self.hidden_size, self.head_dim = num_heads, hidden_size, hidden_size // num_heads
        for side in ("img", "txt"):
            setattr(self, f"{side}_mod", Modulation(hidden_size, double=True))
            setattr(self, f"{side}_norm1", nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{side}_attn", SelfAttention(hidden_size, num_heads, fused_qkv=fused_qkv))
            setattr(self, f"{side}_norm2", nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{side}_mlp", _mlp(hidden_size, mlp_ratio))
        self.set_processor(DoubleStreamBlockProcessor())

    def set_processor(self, processor: object) -> None:
        self.processor = processor

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        return self.processor(self, img, txt, vec, pe)


class SingleStreamBlockProcessor:
    def __call__(self, attn: nn.Module, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        mod, _ = attn.modulation(vec)
        x_mod = (1 + mod.scale) * attn.pre_norm(x) + mod.shift
        qkv, mlp = torch.split(attn.linear1(x_mod), [3 * attn.hidden_size, attn.mlp_hidden_dim], dim=-1)
        q, k, v = (_heads(t, attn.num_heads) for t in qkv.chunk(3, dim=-1))
        q, k = attn.norm(q, k, v)
        attn_1 = attention(q, k, v, pe=pe)
        return x + mod.gate * attn.linear2(torch.cat((attn_1, attn.mlp_act(mlp)), 2))


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, hidden_size // num_heads
        self.fused_qkv = True
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(self.head_dim)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)
        self.set_processor(SingleStreamBlockProcessor())

    def set_processor(self, processor: object) -> None:
        self.processor = processor

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        return self.processor(self, x, vec, pe)


@dataclass
class MMDiTConfig:
    in_channels: int = 8
    vec_in_dim: int = 8
    context_in_dim: int = 16
    hidden_size: int = 48
    mlp_ratio: float = 2.0
    num_heads: int = 2
    depth: int = 1
    depth_single_blocks: int = 1
    axes_dim: list[int] = field(default_factory=lambda: [8, 8, 8])
    theta: int = 10000
    use_liger_rope: bool = False
    patch_size: int = 2


class MMDiTModel(nn.Module):
    def __init__(self, config: MMDiTConfig) -> None:
        super().__init__()
        self.config = config
        self.hidden_size, self.num_heads = config.hidden_size, config.num_heads
        pe_cls = LigerEmbedND if config.use_liger_rope else EmbedND
        self.pe_embedder = pe_cls(config.hidden_size // config.num_heads, config.theta, config.axes_dim)
        self.img_in = nn.Linear(config.in_channels, config.hidden_size)
        self.time_in = MLPEmbedder(256, config.hidden_size)
        self.vector_in = MLPEmbedder(config.vec_in_dim, config.hidden_size)
        self.txt_in = nn.Linear(config.context_in_dim, config.hidden_size)
        self.double_blocks = nn.ModuleList(
            [DoubleStreamBlock(config.hidden_size, config.num_heads, config.mlp_ratio) for _ in range(config.depth)])
        self.single_blocks = nn.ModuleList(
            [SingleStreamBlock(config.hidden_size, config.num_heads, config.mlp_ratio)
             for _ in range(config.depth_single_blocks)])
        self.final = nn.Linear(config.hidden_size, config.in_channels)

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y_vec: Tensor,
                cond: Tensor | None = None, guidance: Tensor | None = None) -> Tensor:
        img, txt = self.img_in(img), self.txt_in(txt)
        vec = self.time_in(timestep_embedding(timesteps, 256)) + self.vector_in(y_vec)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe)
        img = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            img = block(img, vec, pe)
        return self.final(img[:, txt.shape[1]:])


def make_ids(batch: int, frames: int, height: int, width: int) -> Tensor:
    """``img_ids`` as Open-Sora builds them: (t, h, w) per token, frame-major."""
    t = torch.arange(frames).repeat_interleave(height * width)
    h = torch.arange(height).repeat_interleave(width).repeat(frames)
    w = torch.arange(width).repeat(frames * height)
    return torch.stack([t, h, w], dim=-1).float()[None].expand(batch, -1, -1)
