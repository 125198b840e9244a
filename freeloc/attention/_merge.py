"""Exact merge of attention passes over disjoint key sets by their log-sum-exp.

For passes ``b`` with outputs ``o_b`` (softmax over the pass's keys) and natural-log LSE ``l_b``:
``out = sum_b exp(l_b - L) o_b`` with ``L = logsumexp_b l_b``. This equals one softmax over the
union of the keys. A pass with no key for a row has ``l_b = -inf`` and weight 0. The merge is done
in float32 whatever the input dtype.
"""

from __future__ import annotations

import inspect

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["EMPTY_LSE", "merge_into_", "merge_lse", "merge_outputs", "merge_pass", "merge_pass_into_"]

#: A finite stand-in for ``-inf`` in running LSEs: ``exp(EMPTY_LSE - x)`` is exactly 0 for any real
#: LSE ``x``, and unlike ``-inf`` it never makes ``-inf - (-inf) = nan``, so no guards are needed.
EMPTY_LSE = -1e30


def merge_lse(
    outs: list[Float[Tensor, "*rows dim"]], lses: list[Float[Tensor, " *rows"]], wide: torch.dtype = torch.float32,
) -> tuple[Float[Tensor, "*rows dim"], Float[Tensor, " *rows"]]:
    """Merge passes exactly; returns the merged output and the merged LSE, in ``wide`` (float32, or
    float64).

    One expression of all passes at once (inputs in any dtype, views are fine): compiled on CUDA it is
    a single kernel that reads each pass once. Rows without keys in a pass (``lse = -inf``) weigh zero
    whatever that pass's output; rows without keys in any pass get output 0 and LSE ``-inf``.

    Examples:
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
    lse = torch.stack([x.to(wide) for x in lses])
    # any shift gives the same result: no gradient flows through it
    top = lse.amax(0).detach()
    top = torch.where(torch.isneginf(top), 0.0, top)
    weight = torch.exp(lse - top)
    total = weight.sum(0)
    out = torch.zeros(outs[0].shape, dtype=wide, device=outs[0].device)
    # a pass counts unless it has no key for the row (its output is then arbitrary); a NaN or an
    # infinite LSE (a non-finite logit) stays NaN, in the output too
    for i, o in enumerate(outs):
        out = out + torch.where(torch.isneginf(lse[i, ..., None]), 0.0, o.to(wide) * weight[i, ..., None])
    out = torch.where(total[..., None] == 0, 0.0, out / total.clamp_min(1e-30)[..., None])
    return out, top + torch.log(total)


def merge_into_(
    acc_out: Float[Tensor, "*rows dim"], acc_lse: Float[Tensor, " *rows"],
    out: Float[Tensor, "*rows dim"], lse: Float[Tensor, " *rows"],
) -> None:
    """Merge a pass into a running (output, LSE) in place (both float32; views are fine).

    The running LSE uses ``EMPTY_LSE`` for rows without keys yet; the pass's LSE may be ``-inf``
    there, and its output must be finite (0) on its rows without keys, as
    ``attention_with_lse`` (``freeloc.attention._kernels``) returns it. Convert the final LSE with
    ``lse.masked_fill(lse <= EMPTY_LSE / 2, -inf)``.
    """
    # the pass's weight in the merged output is exp(lse - new) = sigmoid(lse - acc_lse): three in-place
    # operations (a pass with lse = -inf weighs 0, a running LSE at EMPTY_LSE weighs 0 against a real one)
    w = torch.sigmoid(lse - acc_lse)
    acc_out.lerp_(out, w[..., None])
    torch.logaddexp(acc_lse, lse, out=acc_lse)


def merge_pass(
    acc_out: Float[Tensor, "*rows dim"], acc_lse: Float[Tensor, " *rows"],
    out: Float[Tensor, "*rows dim"], lse: Float[Tensor, " *rows"],
) -> tuple[Float[Tensor, "*rows dim"], Float[Tensor, " *rows"]]:
    """``merge_into_`` out of place, for autograd: the merged (output, LSE) in the running result's dtype."""
    w = torch.sigmoid(lse - acc_lse)
    return torch.lerp(acc_out, out.to(acc_out.dtype), w[..., None]), torch.logaddexp(acc_lse, lse.to(acc_lse.dtype))


def merge_pass_into_(
    acc_out: Float[Tensor, "*rows dim"], acc_lse: Float[Tensor, " *rows"],
    out: Float[Tensor, "*rows dim"], lse: Float[Tensor, " *rows"],
) -> None:
    """``merge_into_`` for a pass output in any dtype (a fused kernel's bf16): compiled on CUDA
    (``on_device`` of ``freeloc.attention._fused``), the conversion and the merge are one kernel."""
    _MERGE_INTO(acc_out, acc_lse, out.float(), lse)


# as written, for the compiled call: a run-time type-checking wrapper is not traceable
_MERGE_INTO = inspect.unwrap(merge_into_)


def merge_outputs(outs: list[Float[Tensor, "*rows dim"]], lses: list[Float[Tensor, " *rows"]],
                  dtype: torch.dtype) -> Float[Tensor, "*rows dim"]:
    """The output of ``merge_lse`` alone, in ``dtype``: compiled on CUDA, one kernel writes it in that
    dtype (no float32 copy of the merged output)."""
    return _MERGE_LSE(outs, lses)[0].to(dtype)


_MERGE_LSE = inspect.unwrap(merge_lse)
