"""One attention pass that also returns its log-sum-exp (the building block of every backend).

On CPU this uses PyTorch's fused flash kernel for CPU, which returns the LSE exactly; elsewhere a
plain float32 computation bounded by the size of the pass. Rows with no allowed key get
``lse = -inf`` (the fused kernel reports 0 for them, so the caller passes which rows have keys).
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

__all__ = ["attention_with_lse", "prepare_mask", "uses_fused_cpu_kernel"]


def uses_fused_cpu_kernel(q: Tensor) -> bool:
    """Whether :func:`attention_with_lse` runs PyTorch's fused CPU flash kernel for this query."""
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16, torch.float16)


def prepare_mask(mask: Bool[Tensor, "*batch q k"], dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """``(additive bias in dtype, rows that have a key)`` of a bool mask, for :func:`attention_with_lse`;
    the rows are None when every row has a key (checked here once, not on every call)."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    has_key = mask.any(-1)
    return bias, None if bool(has_key.all()) else has_key


def attention_with_lse(
    q: Float[Tensor, "batch heads q dim"],
    k: Float[Tensor, "batch heads k dim"],
    v: Float[Tensor, "batch heads k dim"],
    mask: Bool[Tensor, "*batch q k"] | None,
    scale: float,
    prepared: tuple[Tensor, Tensor | None] | None = None,
) -> tuple[Float[Tensor, "batch heads q dim"], Float[Tensor, "batch heads q"]]:
    """Softmax attention of ``q`` over ``k``/``v`` restricted to ``mask`` (None: all pairs).

    ``mask`` is [q, k], or [batch, 1, q, k] for a per-sample mask.

    ``prepared`` may carry ``(bias, has_key)`` from :func:`prepare_mask` for this mask (reused
    across calls with the same mask). Returns the output (``q.dtype``) and the natural-log LSE of
    the scaled logits (float32).
    """
    if mask is not None and prepared is None:
        prepared = prepare_mask(mask, q.dtype)
    has_key = None if prepared is None else prepared[1]
    if uses_fused_cpu_kernel(q):
        bias = None if prepared is None else prepared[0]
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
    if has_key is not None:
        lse = lse.masked_fill(~has_key, float("-inf"))
    return out, lse
