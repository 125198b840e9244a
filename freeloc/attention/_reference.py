"""The ``reference`` backend: dense masked softmax over the full [N, N] logit matrix.

It builds every logit with the positions of the band that holds the pair, masks the pairs no band
holds, and takes one softmax: no LSE merge, no chunking. It is the definition the other backends
are tested against, and it refuses sequences longer than ``AttentionOptions.max_dense_tokens`` (it
materialises batch x heads x N x N float32 logits: 8192 tokens, the default, are 256 MiB per batch
element and head).
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..bands import BandSet

__all__ = ["reference_attention"]


def reference_attention(
    q_orig: Float[Tensor, "batch heads n dim"],
    k_orig: Float[Tensor, "batch heads n dim"],
    v: Float[Tensor, "batch heads n dim"],
    qs: list[Float[Tensor, "batch heads nv dim"]],
    ks: list[Float[Tensor, "batch heads nv dim"]],
    band_set: BandSet,
    tokens_per_frame: int,
    video: slice,
    scale: float,
    key_mask: Bool[Tensor, "batch 1 1 n"] | None = None,
    max_tokens: int = 8192,
    wide: torch.dtype = torch.float32,
) -> Float[Tensor, "batch heads n dim"]:
    """Dense masked softmax attention, computed in ``wide`` (float32, or float64).

    ``q_orig``/``k_orig`` are all tokens rotated with the original positions (text not rotated);
    ``qs[b]``/``ks[b]`` the video tokens rotated with band ``b``'s positions; ``video`` locates the
    video tokens in the sequence. Pairs with a text token use the original positions, densely;
    ``key_mask`` (False: a padded text key) removes keys per sample. A band with a
    ``positive_logit_scale`` has its positive logits multiplied by it.
    """
    n = v.shape[2]
    if n > max_tokens:
        raise ValueError(f"the reference backend materialises [N, N] logits and accepts N <= {max_tokens} "
                         f"tokens (AttentionOptions.max_dense_tokens), got N={n}; use backend='chunked' (CPU) "
                         f"or 'flex' (CUDA)")
    logits = torch.matmul(q_orig.to(wide), k_orig.to(wide).transpose(-1, -2)) * scale
    text = torch.ones(n, dtype=torch.bool, device=v.device)
    text[video] = False
    allowed = text[:, None] | text[None, :]
    vid = torch.full((video.stop - video.start,) * 2, float("-inf"), dtype=wide, device=v.device)
    vid = vid.expand(*logits.shape[:2], -1, -1).clone()
    vid_allowed = torch.zeros(vid.shape[-2:], dtype=torch.bool, device=v.device)
    for qb, kb, band in zip(qs, ks, band_set.bands, strict=True):
        m = band.token_pairs(tokens_per_frame).to(v.device)
        lb = torch.matmul(qb.to(wide), kb.to(wide).transpose(-1, -2)) * scale
        if band.positive_logit_scale is not None:
            lb = torch.where(lb > 0, lb * band.positive_logit_scale, lb)
        vid = torch.where(m, lb, vid)
        vid_allowed |= m
    logits[:, :, video, video] = vid
    allowed[video, video] = vid_allowed
    logits = logits.masked_fill(~allowed, float("-inf"))
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    return torch.matmul(p, v.to(wide)).to(v.dtype)
