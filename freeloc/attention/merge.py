"""Exact merge of attention passes over disjoint key sets by their log-sum-exp.

For passes ``b`` with outputs ``o_b`` (softmax over the pass's keys) and natural-log LSE ``l_b``:
``out = sum_b exp(l_b - L) o_b`` with ``L = logsumexp_b l_b``. This equals one softmax over the
union of the keys. A pass with no key for a row has ``l_b = -inf`` and weight 0. The merge is done
in float32 whatever the input dtype.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["merge_lse", "MergeAccumulator"]


def merge_lse(
    outs: list[Float[Tensor, "*rows dim"]], lses: list[Float[Tensor, " *rows"]]
) -> tuple[Float[Tensor, "*rows dim"], Float[Tensor, " *rows"]]:
    """Merge passes exactly; returns the merged output (float32) and the merged LSE.

    Example:
        >>> import torch
        >>> q, k, v = torch.randn(4, 8), torch.randn(10, 8), torch.randn(10, 8)
        >>> s = q @ k.T
        >>> parts = [(torch.softmax(s[:, a:b], -1) @ v[a:b], torch.logsumexp(s[:, a:b], -1))
        ...          for a, b in [(0, 3), (3, 10)]]
        >>> out, _ = merge_lse([p[0] for p in parts], [p[1] for p in parts])
        >>> torch.allclose(out, torch.softmax(s, -1) @ v, atol=1e-6)
        True
    """
    if not outs or len(outs) != len(lses):
        raise ValueError(f"merge_lse needs as many outputs as LSEs (>= 1), got {len(outs)} and {len(lses)}")
    acc = MergeAccumulator()
    for o, lse in zip(outs, lses, strict=True):
        acc.add(o, lse)
    return acc.result()


class MergeAccumulator:
    """Online version of :func:`merge_lse`: add passes one at a time, keep only the running result."""

    def __init__(self) -> None:
        self.out: Tensor | None = None
        self.lse: Tensor | None = None

    def add(self, out: Float[Tensor, "*rows dim"], lse: Float[Tensor, " *rows"]) -> None:
        out = out.float()
        lse = lse.float()
        # rows without keys: lse -inf; kernels may leave NaN or garbage in their output
        empty = torch.isneginf(lse)
        out = torch.where(empty[..., None], 0.0, out)
        if self.out is None or self.lse is None:
            self.out, self.lse = out, lse
            return
        new = torch.logaddexp(self.lse, lse)
        safe = torch.where(torch.isneginf(new), 0.0, new)
        w_old = torch.exp(self.lse - safe)[..., None]
        w_new = torch.exp(lse - safe)[..., None]
        self.out = self.out * w_old + out * w_new
        self.lse = new

    def result(self) -> tuple[Tensor, Tensor]:
        if self.out is None or self.lse is None:
            raise ValueError("no attention pass was added")
        return self.out, self.lse
