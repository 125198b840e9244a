"""One attention pass that also returns its log-sum-exp (the building block of every backend).

On CPU this uses PyTorch's fused flash kernel for CPU, which returns the LSE exactly; elsewhere a
plain float32 computation bounded by the size of the pass. Rows with no allowed key get
``lse = -inf`` (the fused kernel reports 0 for them, so the caller passes which rows have keys).
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

__all__ = ["attention_with_lse"]


def attention_with_lse(
    q: Float[Tensor, "batch heads q dim"],
    k: Float[Tensor, "batch heads k dim"],
    v: Float[Tensor, "batch heads k dim"],
    mask: Bool[Tensor, "q k"] | None,
    scale: float,
) -> tuple[Float[Tensor, "batch heads q dim"], Float[Tensor, "batch heads q"]]:
    """Softmax attention of ``q`` over ``k``/``v`` restricted to ``mask`` (None: all pairs).

    Returns the output (``q.dtype``) and the natural-log LSE of the scaled logits (float32).
    """
    has_key = None if mask is None else mask.any(-1)
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16, torch.float16):
        bias = None
        if mask is not None:
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias, scale=scale
        )
    else:
        s = torch.matmul(q.float() * scale, k.float().transpose(-1, -2))
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - torch.where(torch.isneginf(lse), 0.0, lse)[..., None])
        out = torch.matmul(p, v.float()).to(q.dtype)
    lse = lse.float()
    if has_key is not None and not bool(has_key.all()):
        lse = lse.masked_fill(~has_key, float("-inf"))
    return out, lse
