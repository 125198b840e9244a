"""The ``chunked`` backend's executor: runs a plan's stacks and passes (``freeloc.attention._passes``).

Each pass is one fused attention call with its LSE (``attention_with_lse``); passes are merged online,
exactly, in float32. Memory is bounded by one pass (chunk queries x gathered keys); a stack copies
nothing, but where a stack reads the keys of two bands from one buffer the values are held once per
band of that buffer (twice for VRPR; otherwise they are read in place). No [N, N]
tensor is ever built, and the work is proportional to the band's density (up to the frame/sub-block
rounding at the edges). The masks the passes build are kept with their plan, per device and dtype, up
to ``AttentionOptions.mask_cache_bytes`` per plan.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from ._fused import on_device
from ._kernels import attention_with_lse, prepare_mask, uses_fused_cpu_kernel, uses_fused_kernel
from ._merge import EMPTY_LSE, merge_pass, merge_pass_into_
from ._passes import MaskEntry, Pass, PassPlan, Stack, Window, heads_per_call, pass_bytes
from ._rotations import HeadMajor, KeyBuffers
from .options import AttentionOptions

__all__ = ["run_chunked"]


class _JoinedEntries:
    """The mask of a stack's entries of ``g`` query frames (``_entry_mask``), in the form ``_mask_for``
    reads of a pass: ``pattern`` (the cache key) and ``mask(device)``."""

    def __init__(self, g: int, length: int, s: int) -> None:
        self.g, self.length, self.s = g, length, s
        self.pattern = ("joined stack entries", g, length, s)

    def mask(self, device: torch.device) -> Tensor:
        return _entry_mask(self.g, self.length, self.s).to(device)


def _mask_fits(plan: PassPlan, p: _JoinedEntries, q: Tensor, options: AttentionOptions) -> bool:
    """Whether the joined entries' mask (bool and additive bias) is kept with the plan, or fits in what the
    plan may still keep (``AttentionOptions.mask_cache_bytes``)."""
    if (p.pattern, str(q.device), q.dtype) in plan.masks:
        return True
    size = p.g * p.s * (p.length + p.g - 1) * p.s * (1 + q.element_size())
    return plan.mask_bytes + size <= options.mask_cache_bytes


def _mask_for(plan: PassPlan, p: Pass | _JoinedEntries, q: Tensor, local: dict[tuple, MaskEntry],
              options: AttentionOptions) -> MaskEntry:
    """The mask of pass ``p`` for queries like ``q`` (device, dtype) and its prepared form, from the plan's
    cache or ``local`` (this call's, past the plan's byte budget)."""
    key = (p.pattern, str(q.device), q.dtype)
    hit = plan.masks.get(key) or local.get(key)
    if hit is not None:
        return hit
    m = p.mask(q.device)
    prepared = prepare_mask(m, q.dtype) if uses_fused_kernel(q, masked=True, options=options) else None
    entry = (m, prepared)
    size = m.numel() * (1 + (0 if prepared is None else prepared[0].element_size()))
    if plan.mask_bytes + size <= options.mask_cache_bytes:
        plan.masks[key] = entry
        plan.mask_bytes += size
    else:
        local[key] = entry
    return entry


def _requires_grad(xs: HeadMajor | list[Tensor]) -> bool:
    """Whether any tensor of ``xs`` requires grad (a lazy sequence says it without computing them)."""
    flag = getattr(xs, "requires_grad", None)
    return bool(flag) if flag is not None else any(x.requires_grad for x in xs)


def _frame_windows(x: Float[Tensor, "batch heads tokens dim"], batch: int, start: int, count: int, length: int,
                   s: int, step: int = 1) -> Float[Tensor, "count heads window dim"]:
    """(B, H, T, D) tensor -> (count, H, length * s, D) view: entry ``n`` is the ``length`` frames from
    frame ``start + n * step`` on, of sample ``batch`` (entries overlap when ``length > step``)."""
    sb, sh, st, sd = x.stride()
    return x.as_strided((count, x.shape[1], length * s, x.shape[3]), (step * s * st, sh, st, sd),
                        x.storage_offset() + batch * sb + start * s * st)


#: PyTorch's CPU flash kernel tiles the queries of each batch entry in blocks of 32 rows, of 64 from
#: 192 rows, of 256 from 768 rows. Entries are joined to reach the 256-row tile only: measured, reaching
#: the 64-row tile does not pay for the masked pairs and the mask.
_CPU_TILE_ROWS = (768,)
#: A stack entry may span several query frames (their key windows joined, the pairs outside each frame's
#: window masked) while the masked pairs add at most this fraction to the entry's pairs, and while the
#: plan can keep the mask (``AttentionOptions.mask_cache_bytes``; else one frame an entry).
_MAX_EXTRA_PAIRS = 0.1


def frames_per_entry(tokens_per_frame: int, length: int) -> int:
    """Query frames one entry of a stack takes on the CPU flash kernel: the fewest that reach one of its
    larger query tiles (``_CPU_TILE_ROWS``) while the joined window (``length + g - 1`` key frames, each
    row masked to its own ``length``) adds at most ``_MAX_EXTRA_PAIRS`` masked pairs; 1 where none does
    (a frame that fills the largest tile alone, or a window too short)."""
    s = tokens_per_frame
    if s >= _CPU_TILE_ROWS[0]:
        return 1
    for rows in _CPU_TILE_ROWS:
        g = -(-rows // s)
        if (g - 1) / length <= _MAX_EXTRA_PAIRS:
            return g
    return 1


def _entry_mask(g: int, length: int, s: int) -> Tensor:
    """[g * s, (length + g - 1) * s]: row frame ``a`` of an entry of ``g`` query frames attends key frames
    ``[a, a + length)`` of the joined window."""
    a = torch.arange(g * s)[:, None] // s
    j = torch.arange((length + g - 1) * s)[None, :] // s
    return (j >= a) & (j < a + length)


def run_chunked(
    plan: PassPlan,
    qs: HeadMajor | list[Float[Tensor, "batch heads n dim"]],
    ks: HeadMajor | list[Float[Tensor, "batch heads n dim"]],
    key_buffers: KeyBuffers | dict[tuple[int, ...], Float[Tensor, "batch heads joined dim"]],
    v: Float[Tensor, "batch n heads dim"],
    tokens_per_frame: int,
    scale: float,
    options: AttentionOptions,
    finite_keys: bool | None = None,
    into: Float[Tensor, "batch heads n dim"] | None = None,
    releases: Mapping[int, Sequence[tuple[str, tuple[int, ...]]]] | None = None,
) -> tuple[Float[Tensor, "batch heads n dim"], Float[Tensor, "batch heads n"]]:
    """Merged attention of every video query over the pairs of ``plan``'s stacks and passes (rows outside
    them get output 0 and LSE ``-inf``).

    ``qs[b]``/``ks[b]`` are the video queries/keys rotated at band ``b``'s positions, head-major
    (batch, heads, tokens, dim) with contiguous tokens (``attend`` writes them so); ``key_buffers`` holds,
    for each group of ``key_groups``, its bands' key rotations one after
    the other in one (batch, heads, len * tokens, dim) tensor, as the stacks read them. Each is read when
    a pass first needs it: ``qs``, ``ks`` and ``key_buffers`` may compute it then (``BandRotations``;
    they then say ``requires_grad`` themselves).
    Returns the output (float32) and its LSE, as (batch, heads, tokens, dim) and (batch, heads, tokens).
    ``finite_keys``: whether every key is finite, when the caller knows (``attention_with_lse``).
    ``into``: where to keep the running output, a float32 tensor of the output's shape (any strides: a
    view of the call's output tensor), without autograd; None: a new tensor.
    ``releases``: after pass ``i``, ``qs.release(bands)`` / ``ks.release(bands)`` for each ``(side, bands)``
    of ``releases[i]`` (``release_schedule``: rotations no later pass reads), so that a call holds only
    the rotations still to be read.
    A pass whose own buffers exceed one rotation of the heads runs over a share of the heads at a time
    (``heads_per_call``).
    """
    b, n, h, d = v.shape
    s = tokens_per_frame
    grad = torch.is_grad_enabled() and (v.requires_grad or _requires_grad(qs) or _requires_grad(ks))
    wide = torch.float64 if grad and v.dtype == torch.float64 else torch.float32
    # values: read in place (a head-major view); where a stack reads the keys of several bands from one
    # buffer, repeated once per band of the widest such buffer (consecutive, one tensor), until the last
    # such stack
    vh = v.transpose(1, 2)
    joined = [i for i, p in enumerate(plan) if isinstance(p, Stack) and len(p.key_bands) > 1]
    v_rep: Tensor | None = None
    if joined:
        reps = max(len(plan[i].key_bands) for i in joined)
        v_rep = v.new_empty(b, h, reps * n, d)
        v_rep[:, :, :n].copy_(vh)
        for r in range(1, reps):
            v_rep[:, :, r * n:(r + 1) * n].copy_(v_rep[:, :, :n])
    if into is not None and (grad or into.dtype != wide or tuple(into.shape) != (b, h, n, d)):
        raise ValueError(f"run_chunked: into must be a {wide} tensor of shape {(b, h, n, d)} outside autograd, got "
                         f"{into.dtype} {tuple(into.shape)}")
    out = torch.zeros(b, h, n, d, dtype=wide, device=v.device) if into is None else into.zero_()
    lse = torch.full((b, h, n), EMPTY_LSE, dtype=wide, device=v.device)
    masks: dict[tuple, MaskEntry] = {}  # this call's, past the plan's budget

    def take(x: Tensor, index: slice | Window) -> Tensor:
        return x[:, :, index] if isinstance(index, slice) else index.take(x, s)

    # compiled where the small steps are: passes of many lengths, one kernel for any length after the second
    merge = on_device(merge_pass_into_, v.device, options, dynamic=None)

    def accumulate(rows: Callable[[Tensor], Tensor], o: Tensor, l_: Tensor, first: bool) -> None:
        """Merge a pass into the rows of ``out`` and ``lse`` that ``rows`` views (o, l_ shaped like them)."""
        nonlocal out, lse
        acc_o, acc_l = rows(out), rows(lse)
        o, l_ = o.reshape(acc_o.shape), l_.reshape(acc_l.shape)
        if grad:  # each pass gives new tensors: nothing autograd saved is changed in place
            if first:
                new_o, new_l = o.to(wide), l_.to(wide).clamp_min(EMPTY_LSE)
            else:  # copies of the rows: autograd keeps them, not the whole accumulator
                new_o, new_l = merge_pass(acc_o.clone(), acc_l.clone(), o, l_)
            out, lse = out.clone(), lse.clone()
            rows(out).copy_(new_o)
            rows(lse).copy_(new_l)
        elif first:
            acc_o.copy_(o)
            acc_l.copy_(l_.clamp_min(EMPTY_LSE))
        else:
            merge(acc_o, acc_l, o, l_)

    for index, p in enumerate(plan):
        if isinstance(p, Stack):
            kb = key_buffers[p.key_bands] if len(p.key_bands) > 1 else ks[p.key_bands[0]]
            vb = vh if len(p.key_bands) == 1 else v_rep[:, :, :len(p.key_bands) * n]  # type: ignore[index]
            if joined and index == joined[-1]:
                v_rep = None  # this call's view is the last reference
            # one call per sample, its query frames the kernel's batch; off the fused kernels, which
            # materialise the logits, in groups of frames of at most options.stack_logits logits
            per_frame = h * s * p.length * s
            fused = uses_fused_kernel(v, overlapping=p.length > 1, options=options)
            step = p.num_frames if fused else max(1, options.stack_logits // per_frame)
            # on the CPU flash kernel, entries of g query frames where one frame is too short for its
            # larger tiles (masked: a key outside a row's window gets no weight); finite keys only, as a
            # masked call with a non-finite key runs on the plain path
            g = frames_per_entry(s, p.length) if uses_fused_cpu_kernel(v) and finite_keys else 1
            entries = _JoinedEntries(g, p.length, s) if g > 1 else None
            if entries is not None and not _mask_fits(plan, entries, v, options):
                entries = None  # its mask would be built on every call: one frame an entry
            joined_frames = p.num_frames // g * g if entries is not None else 0
            if entries is not None and joined_frames:
                mask, prepared = _mask_for(plan, entries, v, masks, options)
                count = joined_frames // g
                for i in range(b):
                    f0 = p.frames[0]
                    rows = slice(f0 * s, (f0 + joined_frames) * s)
                    o, l_ = attention_with_lse(_frame_windows(qs[p.band], i, f0, count, g, s, g),
                                               _frame_windows(kb, i, f0 + p.offset, count, p.length + g - 1, s, g),
                                               _frame_windows(vb, i, f0 + p.offset, count, p.length + g - 1, s, g),
                                               mask, scale, prepared, options, finite_keys)
                    accumulate(lambda x, i=i, rows=rows, c=count: x[i, :, rows].unflatten(1, (c, -1)).transpose(0, 1),
                               o, l_, p.first)
            for i in range(b):
                for f0 in range(p.frames[0] + joined_frames, p.frames[1], step):
                    nf = min(step, p.frames[1] - f0)
                    rows = slice(f0 * s, (f0 + nf) * s)
                    o, l_ = attention_with_lse(_frame_windows(qs[p.band], i, f0, nf, 1, s),
                                               _frame_windows(kb, i, f0 + p.offset, nf, p.length, s),
                                               _frame_windows(vb, i, f0 + p.offset, nf, p.length, s), None, scale,
                                               options=options)
                    accumulate(lambda x, i=i, rows=rows, nf=nf: x[i, :, rows].unflatten(1, (nf, s)).transpose(0, 1),
                               o, l_, p.first)
            del kb, vb, o, l_  # the repeated values go with their last stack
            for side, bands in (releases or {}).get(index, ()):
                (qs if side == "q" else ks).release(bands)  # type: ignore[attr-defined]
            continue
        step = heads_per_call(pass_bytes(p, s, d, v.element_size()), n * d * v.element_size(), h)
        for h0 in range(0, h, step):
            hs = slice(h0, min(h, h0 + step)) if step < h else slice(None)
            q = take(qs[p.band][:, hs], p.rows)
            mask, prepared = None, None
            if p.pattern:
                mask, prepared = _mask_for(plan, p, q, masks, options)
            o, l_ = attention_with_lse(q, take(ks[p.band][:, hs], p.keys), take(vh[:, hs], p.keys), mask, scale,
                                       prepared, options, finite_keys)
            del q
            if isinstance(p.rows, slice):
                accumulate(lambda x, r=p.rows, hs=hs: x[:, hs, r], o, l_, p.first)
            else:  # views of the window's rows, shaped (batch, heads, frames, raster[, dim])
                accumulate(lambda x, w=p.rows, hs=hs: w.framed(x[:, hs], s), o, l_, p.first)
            del o, l_
        for side, bands in (releases or {}).get(index, ()):
            (qs if side == "q" else ks).release(bands)  # type: ignore[attr-defined]
    empty = lse <= EMPTY_LSE / 2
    lse = lse.masked_fill(empty, float("-inf")) if grad else lse.masked_fill_(empty, float("-inf"))
    return out, lse
