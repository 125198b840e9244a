"""The ``reference`` backend: dense masked softmax over the full [N, N] logit matrix.

It builds every logit with the positions of the band that holds the pair, masks the pairs no band
holds, and takes one softmax: no LSE merge, no chunking. It is the definition the other backends
are tested against, and it refuses sequences longer than ``AttentionOptions.max_dense_tokens`` (it
materialises batch x heads x N x N float32 logits: 8192 tokens, the default, are 256 MiB per batch
element and head). For methods that scale logits (UltraViCo) it instead
computes longer sequences in chunks of query rows, each of at most ``max_dense_tokens ** 2`` logits
per batch element and head: the same numbers, row by row, in bounded memory.
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
    rows_beyond: bool = False,
) -> Float[Tensor, "batch heads n dim"]:
    """Dense masked softmax attention, computed in ``wide`` (float32, or float64).

    ``q_orig``/``k_orig`` are all tokens rotated with the original positions (text not rotated);
    ``qs[b]``/``ks[b]`` the video tokens rotated with band ``b``'s positions; ``video`` locates the
    video tokens in the sequence. Pairs with a text token use the original positions, densely;
    ``key_mask`` (False: a padded text key) removes keys per sample. A band with a
    ``positive_logit_scale`` has its positive logits multiplied by it. ``rows_beyond``: past
    ``max_tokens``, compute the query rows in chunks of ``max_tokens ** 2 // N`` instead of refusing.
    """
    n = v.shape[2]
    if n > max_tokens and not rows_beyond:
        raise ValueError(f"the reference backend materialises [N, N] logits and accepts N <= {max_tokens} "
                         f"tokens (AttentionOptions.max_dense_tokens), got N={n}; use backend='chunked' (CPU) "
                         f"or 'flex' (CUDA)")
    chunk = n if n <= max_tokens else max(1, max_tokens * max_tokens // n)
    text = torch.ones(n, dtype=torch.bool, device=v.device)
    text[video] = False
    vw = v.to(wide)
    out = []
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        logits = torch.matmul(q_orig[:, :, r0:r1].to(wide), k_orig.to(wide).transpose(-1, -2)) * scale
        allowed = text[r0:r1, None] | text[None, :]
        v0, v1 = max(r0, video.start), min(r1, video.stop)  # the video query rows of this chunk
        if v0 < v1:
            a, b = v0 - video.start, v1 - video.start  # in video coordinates
            vid = torch.full((*logits.shape[:2], v1 - v0, video.stop - video.start), float("-inf"), dtype=wide,
                             device=v.device)
            vid_allowed = torch.zeros(vid.shape[-2:], dtype=torch.bool, device=v.device)
            for qb, kb, band in zip(qs, ks, band_set.bands, strict=True):
                m = band.token_pairs_rows(tokens_per_frame, a, b).to(v.device)
                lb = torch.matmul(qb[:, :, a:b].to(wide), kb.to(wide).transpose(-1, -2)) * scale
                if band.positive_logit_scale is not None:
                    lb = torch.where(lb > 0, lb * band.positive_logit_scale, lb)
                vid = torch.where(m, lb, vid)
                vid_allowed |= m
            logits[:, :, v0 - r0:v1 - r0, video] = vid
            allowed[v0 - r0:v1 - r0, video] = vid_allowed
        logits = logits.masked_fill(~allowed, float("-inf"))
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask, float("-inf"))
        out.append(torch.matmul(torch.softmax(logits, dim=-1), vw))
    return torch.cat(out, dim=2).to(v.dtype)
