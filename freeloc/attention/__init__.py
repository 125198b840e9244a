"""Band-split self-attention, merged exactly by log-sum-exp.

``attend`` is the one entry point: give it q, k, v **before** RoPE, the video token grid, a
method (``VRPR``, ``TSA``, ``SlidingWindow``, a
baseline, or ``None`` for plain RoPE attention) and the model's ``RotaryLayout``.
Three backends compute the same numbers:

* ``reference``: dense masked softmax over [N, N] (tests; N <= 8192 by default);
* ``chunked``: exact, computes only the key frames each band needs, memory bounded by a chunk
  (default on CPU; it runs on CUDA too, but there its masked calls for TSA's stripe are slow);
* ``flex``: ``flex_attention`` with block masks from frame-level tables (default on CUDA; there the
  sliding windows of the bands without a stripe run on the fused dense kernel instead, see
  ``AttentionOptions.unstriped``).

How a call runs: validate -> the method's bands at this grid -> a plan (pure, cached: the rotations
and the parts of the call, each bound to one backend) -> rotate -> run the parts -> one merge by
log-sum-exp (docs/method.md §7). Every tuning setting is an ``AttentionOptions``.

Examples:
    >>> import torch, freeloc
    >>> q, k, v = (torch.randn(1, 30 * 6, 2, 24) for _ in range(3))
    >>> out = freeloc.attention.attend(q, k, v, grid=(30, 2, 3), method=freeloc.VRPR.for_length(30, 13),
    ...                                rotary=freeloc.RotaryLayout.wan(24))
    >>> out.shape
    torch.Size([1, 180, 2, 24])
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812
from jaxtyping import Bool, Float
from torch import Tensor

from ..bands import BandSet
from ..methods import Method
from ..rotary import RotaryLayout
from ._chunked import run_chunked
from ._flex import run_flex
from ._fused import on_device
from ._kernels import attention_with_lse, surely_finite
from ._merge import merge_lse, merge_outputs
from ._passes import release_schedule
from ._planning import AttentionPlan, ChunkedPart, DensePart, FlexPart, ReferencePart, ScaledPart, plan_attention
from ._reference import reference_attention
from ._rotations import BandRotations, HeadMajor, KeyBuffers, rotate_bands, rotate_original
from ._scaled import run_scaled
from .memory import head_group_size
from .options import BACKENDS, DEFAULT_OPTIONS, AttentionOptions

__all__ = ["attend", "AttentionOptions", "BACKENDS", "band_set_for"]


@functools.lru_cache(maxsize=128)
def band_set_for(method: Method | None, num_frames: int, tokens_per_frame: int,
                 rotary: RotaryLayout | None) -> BandSet:
    """The (cached) band set of ``method`` at this grid; ``None`` gives plain attention."""
    if method is None:
        return BandSet.plain(num_frames)
    if not isinstance(method, Method):
        raise TypeError(f"method must be a freeloc method (VRPR, TSA, SlidingWindow, PI, NTK, YaRN, RIFLEx) "
                        f"or None, got {type(method).__name__}")
    return method.band_set(num_frames, tokens_per_frame, rotary)


def attend(
    q: Float[Tensor, "batch seq heads dim"],
    k: Float[Tensor, "batch seq heads dim"],
    v: Float[Tensor, "batch seq heads dim"],
    *,
    grid: tuple[int, ...],
    method: Method | None,
    rotary: RotaryLayout | None,
    backend: str = "auto",
    text_before: int = 0,
    text_after: int = 0,
    text_mask: Bool[Tensor, "batch text"] | None = None,
    scale: float | None = None,
    options: AttentionOptions | None = None,
) -> Float[Tensor, "batch seq heads dim"]:
    """Self-attention with a temporal-position or attention-pattern method, merged exactly by LSE.

    Args:
        q: (batch, seq, heads, head_dim) **before** RoPE; seq = text_before + F*H'*W' + text_after.
        k: keys, shaped like ``q``, before RoPE.
        v: values, shaped like ``q``.
        grid: ``(F, H', W')`` of the video tokens (frame-major order ``f*H'*W' + h*W' + w``).
        method: a method object, or ``None`` for plain RoPE attention over all pairs.
        rotary: the model's rotary layout (which channels are temporal, pairing, theta); ``None`` for a
            model without RoPE: nothing is rotated and only attention-pattern methods apply (TSA,
            sliding window; their band positions have no effect).
        backend: ``"auto"`` (``flex`` on CUDA, ``chunked`` elsewhere), ``"reference"``, ``"chunked"``, ``"flex"``.
        text_before: number of non-video tokens before the video tokens. They are not rotated (their
            own positions are left as they are), attend every token and are attended by every token,
            densely, with the original positions of the video tokens.
        text_after: number of non-video tokens after the video tokens, treated like ``text_before``'s.
        text_mask: (batch, text_before + text_after) bool, False for text tokens that no query may
            attend (prompt padding), in sequence order; None: every text token is attended.
        scale: softmax scale, default ``1 / sqrt(head_dim)``.
        options: tuning settings (``AttentionOptions``); None: the defaults.

    Returns:
        (batch, seq, heads, head_dim) in ``q``'s dtype.

    Gradients: where q, k or v requires grad (and grad mode is on), the output is differentiable on the
    ``reference`` and ``chunked`` backends, and on ``flex`` on CUDA; float64 inputs are then computed in
    float64 throughout. ``flex`` on CPU has no backward (``flex_attention`` refuses it there): such a call
    raises before any work. Under autograd the chunked backend keeps what its backward needs, so its
    memory is no longer bounded by one pass (docs/concepts.md, "Gradients").
    """
    options = DEFAULT_OPTIONS if options is None else options
    f, hh, ww = _check_inputs(q, k, v, grid, method, rotary, backend, text_before, text_after, text_mask, scale,
                              options)
    if q.numel() == 0:  # no sample or no head: nothing to attend
        return q.new_empty(q.shape)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not surely_finite(v):  # NaN or infinite values (or a sum that overflows: the same result, slower)
        return _with_non_finite_values(
            lambda values: _attend(q, k, values, f, hh, ww, method, rotary, backend, text_before, text_after,
                                   text_mask, scale, options), v)
    return _attend(q, k, v, f, hh, ww, method, rotary, backend, text_before, text_after, text_mask, scale, options)


def _with_non_finite_values(run: Callable[[Tensor], Tensor], v: Tensor) -> Tensor:
    """``run(v)`` for values with NaN or infinite entries, where only the rows that attend such a value are
    touched by it (a product ``0 * nan`` in a kernel would touch every row that reads the key): the
    output with those entries 0, then, per output channel, NaN where a row gives weight to a NaN value
    (or to both infinities), +-inf where it gives weight to that infinity alone."""
    out = run(torch.where(torch.isfinite(v), v, 0.0))
    pos, neg, nan = (run(kind(v).to(v.dtype)) > 0 for kind in (torch.isposinf, torch.isneginf, torch.isnan))
    out = torch.where(pos, float("inf"), out)
    out = torch.where(neg, torch.where(pos, float("nan"), float("-inf")), out)
    return torch.where(nan, float("nan"), out)


def _attend(q: Tensor, k: Tensor, v: Tensor, f: int, hh: int, ww: int, method: Method | None,
            rotary: RotaryLayout | None, backend: str, text_before: int, text_after: int, text_mask: Tensor | None,
            scale: float, options: AttentionOptions) -> Tensor:
    """``attend`` after its checks: the heads in groups (``freeloc.attention.memory.head_group_size``), on
    whichever backend the plan chose, each group's output written into one output tensor."""
    plan = plan_attention(q, band_set_for(method, f, hh * ww, rotary), (f, hh, ww), text_before, text_after, backend,
                          options)
    heads = q.shape[2]
    group = head_group_size(plan, q.shape[0], heads, q.shape[-1], q.dtype, options, rotary is not None)
    if group >= heads:
        return _attend_heads(plan, q, k, v, rotary, text_mask, scale, options)
    slices = [slice(h0, min(heads, h0 + group)) for h0 in range(0, heads, group)]
    if _needs_grad(q, k, v):  # new tensors, joined: nothing autograd records is written in place
        return torch.cat([_attend_heads(plan, q[:, :, h], k[:, :, h], v[:, :, h], rotary, text_mask, scale, options)
                          for h in slices], dim=2)
    out = q.new_empty(q.shape)
    for h in slices:
        _attend_heads(plan, q[:, :, h], k[:, :, h], v[:, :, h], rotary, text_mask, scale, options, out[:, :, h])
    return out


def _attend_heads(plan: AttentionPlan, q: Tensor, k: Tensor, v: Tensor, rotary: RotaryLayout | None,
                  text_mask: Tensor | None, scale: float, options: AttentionOptions,
                  into: Tensor | None = None) -> Tensor:
    """The call for the heads of ``q``, ``k``, ``v`` (all of them, or one group), written into ``into``
    (shaped like ``q``) where given; returns the output."""
    out = _attend_plan(plan, q, k, v, rotary, text_mask, scale, options, into)
    if into is None or out is into:
        return out
    return into.copy_(out)


def _attend_plan(plan: AttentionPlan, q: Tensor, k: Tensor, v: Tensor, rotary: RotaryLayout | None,
                 text_mask: Tensor | None, scale: float, options: AttentionOptions, into: Tensor | None) -> Tensor:
    """The output of ``plan`` for these heads; a single chunked part over float32 inputs without text keeps
    its running output in ``into`` (then returned), else a new tensor is returned."""
    grad = _needs_grad(q, k, v)
    wide = torch.float64 if grad and q.dtype == torch.float64 else torch.float32  # the merges' dtype
    f, hh, ww = plan.grid
    text_before = plan.text_before
    video = slice(text_before, text_before + f * hh * ww)
    key_mask = None  # [batch, 1, 1, seq] for the text tokens' padding, when given
    if text_mask is not None:
        key_mask = torch.cat([text_mask[:, :text_before], torch.ones(q.shape[0], video.stop - video.start,
                              dtype=torch.bool, device=q.device), text_mask[:, text_before:]], dim=1)
        key_mask = key_mask.to(q.device)[:, None, None, :]
    first = plan.parts[0]
    if isinstance(first, DensePart):
        qo, ko = (rotate_original(plan, x, rotary, options).transpose(1, 2) for x in (q, k))
        out = F.scaled_dot_product_attention(qo, ko, v.transpose(1, 2), attn_mask=key_mask, scale=scale)
        return out.transpose(1, 2)
    if isinstance(first, ReferencePart):
        qs, ks, _ = rotate_bands(plan, q[:, video], k[:, video], rotary, options)
        qo, ko = (rotate_original(plan, x, rotary, options).transpose(1, 2) for x in (q, k))
        out = reference_attention(qo, ko, v.transpose(1, 2), [x.transpose(1, 2) for x in qs],
                                  [x.transpose(1, 2) for x in ks], first.bands, hh * ww, video, scale, key_mask,
                                  options.max_dense_tokens, wide, rows_beyond=first.bands.scales_logits())
        return out.transpose(1, 2)
    # the video parts' outputs and LSEs by frame (B, H, F, S[, D]), merged once
    in_place = (into is not None and not grad and q.dtype == wide and not (plan.text_before or plan.text_after)
                and len(plan.parts) == 1 and isinstance(first, ChunkedPart))
    # each rotation computed when a part first reads it (the chunked backend: when a pass first needs it)
    rotations = BandRotations(plan, q[:, video], k[:, video], rotary, options)
    outs, lses = _run_video_parts(plan, rotations, k, v, scale, options, into.transpose(1, 2) if in_place else None)
    if in_place:
        return into
    if not (plan.text_before or plan.text_after):
        if len(outs) == 1:
            out = outs[0].to(q.dtype)
        elif grad:  # eager, in the working dtype
            out = merge_lse(outs, lses, wide)[0].to(q.dtype)
        else:
            out = on_device(merge_outputs, q.device, options)(outs, lses, q.dtype)
        return out.flatten(2, 3).transpose(1, 2)
    return _with_text(plan, q, k, v, outs, lses, rotary, key_mask, text_mask, scale, options, grad)


def _needs_grad(*xs: Tensor) -> bool:
    """Whether a call on these tensors is recorded for autograd."""
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _run_video_parts(plan: AttentionPlan, rotations: BandRotations, k: Tensor, v: Tensor, scale: float,
                     options: AttentionOptions, into: Tensor | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """Each video part's output and LSE, by frame; ``into``: the running output of a single chunked part
    (``run_chunked``)."""
    f, s = plan.grid[0], plan.tokens_per_frame
    video = slice(plan.text_before, plan.text_before + f * s)
    outs: list[Tensor] = []
    lses: list[Tensor] = []
    # for the masked calls (attention_with_lse), once: a rotation keeps a key finite or not
    chunked = any(isinstance(p, ChunkedPart) for p in plan.parts)
    finite_keys = surely_finite(k[:, video]) if chunked else None
    # a single video part reads the rotations alone: each is dropped after the last pass that reads it
    releases = None
    if len(plan.parts) == 1 and isinstance(plan.parts[0], ChunkedPart):
        rot, n = plan.rotations, len(plan.bands.bands)
        sources = (rot.q_source, rot.k_source) if rotations.rotary is not None else ((0,) * n, (0,) * n)
        releases = release_schedule(plan.parts[0].passes, *sources, rot.key_buffers)
    for part in plan.parts:
        if isinstance(part, ChunkedPart):
            o, l_ = run_chunked(part.passes, HeadMajor(rotations, "q"), HeadMajor(rotations, "k"),
                                KeyBuffers(rotations), v[:, video], s, scale, options, finite_keys, into, releases)
            outs.append(o.unflatten(2, (f, s)))
            lses.append(l_.unflatten(2, (f, s)))
        elif isinstance(part, FlexPart):
            o_f, l_f = run_flex(part, HeadMajor(rotations, "q")[:], HeadMajor(rotations, "k")[:],
                                plan.rotations.q_source, v[:, video].transpose(1, 2), scale, options)
            outs += o_f
            lses += l_f
        elif isinstance(part, ScaledPart):
            o_s, l_s = run_scaled(part, plan.backend, HeadMajor(rotations, "q")[0], HeadMajor(rotations, "k")[0],
                                       v[:, video].transpose(1, 2), scale, options)
            outs.append(o_s)
            lses.append(l_s)
    return outs, lses


def _with_text(plan: AttentionPlan, q: Tensor, k: Tensor, v: Tensor, outs: list[Tensor], lses: list[Tensor],
               rotary: RotaryLayout | None, key_mask: Tensor | None, text_mask: Tensor | None, scale: float,
               options: AttentionOptions, grad: bool) -> Tensor:
    """The text part: video queries over the text keys, merged with the video parts; text queries over
    every key. Dense, at the original positions."""
    f, s = plan.grid[0], plan.tokens_per_frame
    video = slice(plan.text_before, plan.text_before + f * s)
    qo, ko = (rotate_original(plan, x, rotary, options).transpose(1, 2) for x in (q, k))
    vh = v.transpose(1, 2)
    text_keys = torch.cat([ko[:, :, :video.start], ko[:, :, video.stop:]], dim=2)
    text_vals = torch.cat([vh[:, :, :video.start], vh[:, :, video.stop:]], dim=2)
    text_key_mask = None if text_mask is None else text_mask.to(q.device)[:, None, None, :].expand(-1, 1, f * s, -1)
    out_t, lse_t = attention_with_lse(qo[:, :, video], text_keys, text_vals, text_key_mask, scale, options=options)
    parts = [*outs, out_t.unflatten(2, (f, s))], [*lses, lse_t.unflatten(2, (f, s))]
    if grad:  # eager, in the working dtype
        out_v, _ = merge_lse(*parts, torch.float64 if q.dtype == torch.float64 else torch.float32)
    else:
        out_v, _ = on_device(merge_lse, q.device, options)(*parts)
    pieces = [out_v.flatten(2, 3).to(q.dtype)]
    if video.start:
        pieces.insert(0, F.scaled_dot_product_attention(qo[:, :, :video.start], ko, vh, attn_mask=key_mask,
                                                        scale=scale))
    if video.stop < q.shape[1]:
        pieces.append(F.scaled_dot_product_attention(qo[:, :, video.stop:], ko, vh, attn_mask=key_mask, scale=scale))
    return torch.cat(pieces, dim=2).transpose(1, 2)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, grid: object, method: object, rotary: object, backend: object,
                  text_before: object, text_after: object, text_mask: Tensor | None, scale: object,
                  options: object) -> tuple[int, int, int]:
    """Every argument of ``attend`` checked, with errors that name the value and what is accepted;
    returns the grid."""
    if not isinstance(options, AttentionOptions):
        raise TypeError(f"options must be a freeloc.AttentionOptions or None, got {type(options).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if rotary is not None and not isinstance(rotary, RotaryLayout):
        raise TypeError(f"rotary must be a freeloc.RotaryLayout or None (no RoPE), got {type(rotary).__name__}")
    ok = (isinstance(grid, (tuple, list)) and len(grid) == 3
          and all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid))
    if not ok:
        raise ValueError(f"grid must be (frames, height, width) of positive ints (video tokens), got {grid!r}")
    f, hh, ww = (int(g) for g in grid)  # type: ignore[union-attr]
    for label, value in (("text_before", text_before), ("text_after", text_after)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{label} must be an int >= 0, got {value!r}")
    n = text_before + f * hh * ww + text_after  # type: ignore[operator]
    if q.ndim != 4 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"q, k, v must have the same shape (batch, seq, heads, dim), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must have one floating-point dtype (float16, bfloat16, float32 or float64), got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[1] != n:
        raise ValueError(f"seq length of q is {q.shape[1]}, but text_before + F*H'*W' + text_after = "
                         f"{text_before} + {f}*{hh}*{ww} + {text_after} = {n}")
    n_text = text_before + text_after  # type: ignore[operator]
    if text_mask is not None and (text_mask.dtype != torch.bool or tuple(text_mask.shape) != (q.shape[0], n_text)):
        raise ValueError(f"text_mask must be a bool tensor of shape (batch, text tokens) = "
                         f"({q.shape[0]}, {n_text}), got {tuple(text_mask.shape)} {text_mask.dtype}")
    if isinstance(rotary, RotaryLayout) and q.shape[-1] != rotary.head_dim:
        raise ValueError(f"head_dim of q is {q.shape[-1]}, the rotary layout has {rotary.head_dim} channels")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"scale must be a finite number > 0 (the softmax scale) or None for 1 / sqrt(head_dim), "
                         f"got {scale!r}")
    if backend == "flex" and q.device.type == "cpu" and _needs_grad(q, k, v):
        raise ValueError("backend='flex' has no backward on CPU (flex_attention refuses gradients there), and q, k "
                         "or v requires grad: use backend='chunked' (or 'reference' for small inputs), or run "
                         "under torch.no_grad()")
    if rotary is None and isinstance(method, Method) and method.changes_positions:
        raise ValueError(f"{type(method).__name__} changes temporal positions, but rotary=None (a model without "
                         f"RoPE): only attention-pattern methods apply (TSA, SlidingWindow) or method=None")
    return f, hh, ww
