"""One attention pass that also returns its log-sum-exp (the building block of every backend).

On CPU this uses PyTorch's fused flash kernel for CPU, which returns the LSE exactly. On CUDA it uses
a fused kernel that returns the LSE (cuDNN's, then FlashAttention's, then the memory-efficient one:
``CUDA_KERNELS``; with a mask, cuDNN's or the memory-efficient one), the first one that is
**checked** to work here: on first use for a (device, dtype, head dim, masked or not, overlapping key
windows or not), each candidate runs a small random problem of that kind and its output and LSE are
compared with a plain float32 computation; a candidate that raises or disagrees is skipped from then
on (``checked_kernels`` says what was chosen). The candidates and the device types they are tried on
are ``AttentionOptions``' ``fused_kernels`` and ``fused_devices``. PyTorch
reaches these kernels through private operators whose signatures and return layouts have changed
between releases; the check makes a wrong or missing one a slower call instead of a wrong result.
Elsewhere (float64, or no kernel passed) a plain float32 computation runs, in row chunks of at most
``AttentionOptions.float_logits`` logits. Rows with no allowed key get ``lse = -inf`` and a zero
output (the fused kernels report 0 or NaN for them, so the caller passes which rows have keys).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .options import DEFAULT_OPTIONS, AttentionOptions

__all__ = ["CUDA_KERNELS", "FusedKernel", "attention_with_lse", "checked_kernels", "choose_kernel", "fused_kernel_for",
           "prepare_mask", "surely_finite", "uses_fused_cpu_kernel", "uses_fused_kernel"]


def uses_fused_cpu_kernel(q: Tensor) -> bool:
    """Whether ``attention_with_lse`` runs PyTorch's fused CPU flash kernel for this query."""
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class FusedKernel:
    """A fused attention kernel that returns the LSE: ``run(q, k, v, bias or None, scale) -> (out, lse)``
    with q, k, v (batch, heads, tokens, dim) and ``bias`` additive, (batch, heads, q, k), in q's dtype."""

    name: str
    run: Callable[[Tensor, Tensor, Tensor, Tensor | None, float], tuple[Tensor, Tensor]]
    dtypes: tuple[torch.dtype, ...]
    masked: bool  # accepts a bias
    max_head_dim: int


def _lse_rows(lse: Tensor, q: Tensor) -> Tensor:
    """The kernels' LSE as (batch, heads, q): some add a trailing 1, some pad the rows."""
    b, h, n, _ = q.shape
    return lse.reshape(b, h, -1)[:, :, :n]


def _aligned_bias(bias: Tensor | None, q: Tensor) -> Tensor | None:
    """The bias as (batch, heads, q, k), its rows 16-element aligned in memory (the kernels read them
    so): the key dim padded, a view of the real keys passed."""
    if bias is None:
        return None
    nk = bias.shape[-1]
    padded = -(-nk // 16) * 16
    if padded != nk or bias.stride(-2) % 16:
        full = bias.new_empty(*bias.shape[:-1], padded)
        full[..., :nk].copy_(bias)
        bias = full[..., :nk]
    return bias.expand(q.shape[0], q.shape[1], q.shape[2], nk)


def _cudnn(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, _aligned_bias(bias, q), True, 0.0, False,
                                                             False, scale=scale)
    return res[0], _lse_rows(res[1], q)


def _flash(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
    return res[0], _lse_rows(res[1], q)


def _efficient(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, _aligned_bias(bias, q), True, 0.0, False,
                                                                 scale=scale)
    return res[0], _lse_rows(res[1], q)


_HALF = (torch.float16, torch.bfloat16)
#: The CUDA candidates, in order of preference (cuDNN's kernel is the one PyTorch's SDPA picks on Hopper).
CUDA_KERNELS: tuple[FusedKernel, ...] = (
    FusedKernel("cudnn", _cudnn, _HALF, masked=True, max_head_dim=128),
    FusedKernel("flash", _flash, _HALF, masked=False, max_head_dim=256),
    FusedKernel("efficient", _efficient, (torch.float32, *_HALF), masked=True, max_head_dim=512),
)

#: What the checks found on this process's devices: (device, dtype, head dim, masked, overlapping keys,
#: candidates) -> the kernel that passed its check, or None.
_CHOSEN: dict[tuple[str, torch.dtype, int, bool, bool, tuple[FusedKernel, ...]], FusedKernel | None] = {}


def checked_kernels() -> dict[tuple[str, torch.dtype, int, bool, bool], str | None]:
    """What ``fused_kernel_for`` chose so far, per (device, dtype, head dim, masked, overlapping
    key windows): the kernel's name, or None where every candidate failed its check."""
    return {key[:5]: None if k is None else k.name for key, k in _CHOSEN.items()}


def _candidates(options: AttentionOptions) -> tuple[FusedKernel, ...]:
    return CUDA_KERNELS if options.fused_kernels is None else options.fused_kernels


def _overlapping(k: Tensor) -> bool:
    """Whether the batch entries of ``k`` share memory (a stack's sliding key windows)."""
    return k.shape[0] > 1 and 0 < k.stride(0) < k.shape[2] * k.stride(2)


def _float_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float,
                     float_logits: int = DEFAULT_OPTIONS.float_logits,
                     wide: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Plain attention computed in ``wide`` (float32, or float64), in row chunks of at most
    ``float_logits`` logits."""
    b, h, n, _ = q.shape
    step = max(1, float_logits // max(1, b * h * k.shape[2]))
    outs, lses = [], []
    kf, vf = k.to(wide).transpose(-1, -2), v.to(wide)
    for r in range(0, n, step):
        s = torch.matmul(q[:, :, r:r + step].to(wide) * scale, kf)
        if mask is not None:
            s = s.masked_fill(~mask[..., r:r + step, :], float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - torch.where(torch.isneginf(lse), 0.0, lse)[..., None])
        outs.append(torch.matmul(p, vf).to(q.dtype))
        lses.append(lse)
    return (outs[0], lses[0]) if len(outs) == 1 else (torch.cat(outs, 2), torch.cat(lses, 2))


def _check(kernel: FusedKernel, device: torch.device, dtype: torch.dtype, head_dim: int, masked: bool,
           overlapping: bool) -> bool:
    """Run ``kernel`` on a small random problem of this kind and compare with ``_float_attention``."""
    g = torch.Generator().manual_seed(0)
    b, h, nq, nk = 2, 3, 37, 53

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype)

    q = rand(b, h, nq, head_dim)
    if overlapping:  # sliding windows of one buffer, as a stack reads them (batch stride < window)
        base_q = rand(1, h, b * nq, head_dim)
        q = base_q.as_strided((b, h, nq, head_dim), (nq * head_dim, base_q.stride(1), head_dim, 1))
        base_k, base_v = rand(1, h, nk + 11, head_dim), rand(1, h, nk + 11, head_dim)
        k = base_k.as_strided((b, h, nk, head_dim), (11 * head_dim, base_k.stride(1), head_dim, 1))
        v = base_v.as_strided((b, h, nk, head_dim), (11 * head_dim, base_v.stride(1), head_dim, 1))
    else:
        k, v = rand(b, h, nk, head_dim), rand(b, h, nk, head_dim)
    mask = torch.rand(b, 1, nq, nk, generator=g).to(device) < 0.7 if masked else None
    if mask is not None:
        mask[..., 0] = True
    scale = head_dim**-0.5
    want_o, want_l = _float_attention(q, k, v, mask, scale)
    try:
        bias = None if mask is None else prepare_mask(mask, dtype)[0]
        out, lse = kernel.run(q, k, v, bias, scale)
        tol = 1e-3 if dtype == torch.float32 else 3e-2
        return (out.shape == want_o.shape and lse.shape == want_l.shape
                and bool(torch.allclose(out.float(), want_o.float(), atol=tol, rtol=tol))
                and bool(torch.allclose(lse.float(), want_l, atol=tol, rtol=tol)))
    except Exception as err:  # not built, not for this GPU or this layout: the next candidate
        warnings.warn(f"fused attention kernel {kernel.name!r} unavailable for {dtype}, head dim {head_dim}"
                      f"{', masked' if masked else ''}{', overlapping keys' if overlapping else ''} on {device} "
                      f"({type(err).__name__}: {str(err)[:200]}); trying the next one", stacklevel=4)
        return False


def fused_kernel_for(q: Tensor, masked: bool = False, overlapping: bool = False,
                     options: AttentionOptions = DEFAULT_OPTIONS) -> FusedKernel | None:
    """The checked fused kernel for calls like this one (see the module docstring), or None: queries like
    ``q``, with a mask or not, with key windows that overlap between batch entries or not."""
    if q.device.type not in options.fused_devices or uses_fused_cpu_kernel(q):
        return None
    candidates = _candidates(options)
    key = (str(q.device), q.dtype, q.shape[-1], masked, overlapping, candidates)
    if key not in _CHOSEN:
        _CHOSEN[key] = choose_kernel(candidates, q.device, q.dtype, q.shape[-1], masked, overlapping)
    return _CHOSEN[key]


def _after_failure(kernel: FusedKernel, q: Tensor, masked: bool, overlapping: bool, err: Exception,
                   options: AttentionOptions) -> None:
    """A checked kernel failed on a real call: the next candidate that passes its check takes its place
    for this kind of call (or none: the float32 path)."""
    candidates = _candidates(options)
    key = (str(q.device), q.dtype, q.shape[-1], masked, overlapping, candidates)
    later = candidates[candidates.index(kernel) + 1:] if kernel in candidates else ()
    _CHOSEN[key] = choose_kernel(later, q.device, q.dtype, q.shape[-1], masked, overlapping)
    warnings.warn(f"fused attention kernel {kernel.name!r} failed on a call of shape q {tuple(q.shape)} "
                  f"({type(err).__name__}: {str(err)[:200]}); using "
                  f"{'the float32 path' if _CHOSEN[key] is None else repr(_CHOSEN[key].name)} for such calls",
                  stacklevel=3)


def choose_kernel(candidates: tuple[FusedKernel, ...], device: torch.device, dtype: torch.dtype, head_dim: int,
                  masked: bool, overlapping: bool) -> FusedKernel | None:
    """The first of ``candidates`` made for this kind of call that passes its check here, or None."""
    return next((c for c in candidates
                 if dtype in c.dtypes and head_dim <= c.max_head_dim and (c.masked or not masked)
                 and _check(c, device, dtype, head_dim, masked, overlapping)), None)


def uses_fused_kernel(q: Tensor, masked: bool = False, overlapping: bool = False,
                      options: AttentionOptions = DEFAULT_OPTIONS) -> bool:
    """Whether ``attention_with_lse`` runs a fused kernel (which tiles: its memory does not grow with
    the number of logits) for calls like this one (see ``fused_kernel_for``)."""
    return uses_fused_cpu_kernel(q) or fused_kernel_for(q, masked, overlapping, options) is not None


def surely_finite(x: Tensor) -> bool:
    """Whether every entry of ``x`` is finite, from the sum alone (one cheap reduction): a NaN or an
    infinity always makes the sum non-finite; a sum that overflows says False for finite entries."""
    return bool(torch.isfinite(x.sum(dtype=torch.float32 if x.element_size() < 4 else x.dtype)))


def prepare_mask(mask: Bool[Tensor, "*batch q k"], dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """``(additive bias in dtype, rows that have a key)`` of a bool mask, for ``attention_with_lse``;
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
    options: AttentionOptions = DEFAULT_OPTIONS,
    finite_keys: bool | None = None,
) -> tuple[Float[Tensor, "batch heads q dim"], Float[Tensor, "batch heads q"]]:
    """Softmax attention of ``q`` over ``k``/``v`` restricted to ``mask`` (None: all pairs).

    ``mask`` is [q, k], or [batch, 1, q, k] for a per-sample mask.

    ``prepared`` may carry ``(bias, has_key)`` from ``prepare_mask`` for this mask (reused
    across calls with the same mask). Returns the output (``q.dtype``) and the natural-log LSE of
    the scaled logits (float32).

    The fused kernels mask by adding -inf, which leaves a NaN or +inf logit NaN, so with a NaN or
    infinite key a masked call runs on the plain path, which replaces the masked logits: a key
    touches only the rows that attend it. ``finite_keys``: whether every key is finite, when the
    caller knows (None: checked here, for a masked call; False where unsure: the plain path is exact
    for finite keys too).

    Where q, k or v requires grad (and grad mode is on), both results are differentiable
    (``_AttentionWithLSE``): the forward is the same call, and float64 inputs are then computed in
    float64, their LSE too.
    """
    fused = mask is None or (surely_finite(k) if finite_keys is None else finite_keys)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _AttentionWithLSE.apply(q, k, v, mask, scale, prepared, options, fused)
    return _attention_with_lse(q, k, v, mask, scale, prepared, options, fused)


def _attention_with_lse(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float,
                        prepared: tuple[Tensor, Tensor | None] | None, options: AttentionOptions, fused: bool,
                        wide: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """``attention_with_lse`` without autograd; ``fused``: a fused kernel may run; ``wide``: the dtype of
    the plain path (float32 or float64) and of the LSE."""
    cuda_kernel = fused_kernel_for(q, mask is not None, _overlapping(k), options) if fused else None
    if mask is not None and prepared is None and (cuda_kernel is not None or uses_fused_cpu_kernel(q)) and fused:
        prepared = prepare_mask(mask, q.dtype)
    has_key = None if prepared is None or not fused else prepared[1]
    if uses_fused_cpu_kernel(q) and fused:
        bias = None if prepared is None else prepared[0]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias, scale=scale
        )
    elif cuda_kernel is not None:
        try:
            out, lse = cuda_kernel.run(q, k, v, None if prepared is None else prepared[0], scale)
        except RuntimeError as err:  # passed its check, fails here (a size or layout it does not take)
            _after_failure(cuda_kernel, q, mask is not None, _overlapping(k), err, options)
            return _attention_with_lse(q, k, v, mask, scale, prepared, options, fused, wide)
    else:
        out, lse = _float_attention(q, k, v, mask, scale, options.float_logits, wide)
    lse = lse.to(wide)
    if has_key is not None:
        lse = lse.masked_fill(~has_key, float("-inf"))
        if cuda_kernel is not None:
            out = out.masked_fill(~has_key[..., None], 0.0)
    return out, lse


class _AttentionWithLSE(torch.autograd.Function):
    """``attention_with_lse`` for autograd: the forward is the no-grad call (a fused kernel where one
    runs; float64 inputs in float64), the backward recomputes the probabilities in row chunks of at
    most ``AttentionOptions.float_logits`` logits and takes the gradient of both the output and the LSE:
    for ``O = P V``, ``L = logsumexp(S)``, ``P = softmax(S)``:
    ``dS = P * (dO V^T - rowsum(dO * O) + dL)``, ``dQ = scale dS K``, ``dK = scale dS^T Q``, ``dV = P^T dO``.
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float,
                prepared: tuple[Tensor, Tensor | None] | None, options: AttentionOptions,
                fused: bool) -> tuple[Tensor, Tensor]:
        wide = torch.float64 if q.dtype == torch.float64 else torch.float32
        out, lse = _attention_with_lse(q, k, v, mask, scale, prepared, options, fused, wide)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.scale, ctx.float_logits = mask, scale, options.float_logits
        return out, lse

    @staticmethod
    def backward(ctx: Any, d_out: Tensor, d_lse: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        mask, scale = ctx.mask, ctx.scale
        wide = lse.dtype
        b, h, n, _ = q.shape
        step = max(1, ctx.float_logits // max(1, b * h * k.shape[2]))
        kf, vf = k.to(wide), v.to(wide)
        # rowsum(dO * O) - dL: the part of dS common to a row
        empty = torch.isneginf(lse)  # rows without keys: every probability 0, whatever their output
        common = torch.where(empty, 0.0, (d_out.to(wide) * out.to(wide)).sum(-1) - d_lse.to(wide))
        shift = torch.where(empty, 0.0, lse)
        dq = torch.empty(q.shape, dtype=wide, device=q.device)
        dk = torch.zeros(torch.broadcast_shapes(k.shape, (b, h, *k.shape[2:])), dtype=wide, device=q.device)
        dv = torch.zeros_like(dk)
        for r in range(0, n, step):
            rows = slice(r, r + step)
            qr, dor = q[:, :, rows].to(wide), d_out[:, :, rows].to(wide)
            s = torch.matmul(qr * scale, kf.transpose(-1, -2))
            if mask is not None:
                s = s.masked_fill(~mask[..., rows, :], float("-inf"))
            p = torch.exp(s - shift[:, :, rows, None])
            ds = p * (torch.matmul(dor, vf.transpose(-1, -2)) - common[:, :, rows, None])
            dq[:, :, rows] = torch.matmul(ds, kf) * scale
            dk += torch.matmul(ds.transpose(-1, -2), qr) * scale
            dv += torch.matmul(p.transpose(-1, -2), dor)
        return (dq.to(q.dtype), dk.sum_to_size(k.shape).to(k.dtype), dv.sum_to_size(v.shape).to(v.dtype),
                None, None, None, None, None)
