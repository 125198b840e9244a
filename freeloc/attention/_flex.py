"""The ``flex`` backend's executor: runs a plan's flex calls (``FlexPart``).

Each call (``FlexGroup``) is one ``flex_attention`` with its block
mask; the keys of its segments are concatenated (packed layout) or written into padded frames
(frame-aligned layout), and the outputs and LSEs are returned by frame, not merged: the caller merges
every part of a call in one pass.

On CUDA (``AttentionOptions.flex_compiled``) the compiled kernel runs; its tables are captured
tensors, so calls with the same shapes reuse one compiled kernel. On Hopper GPUs it loads its tiles
with TMA (``AttentionOptions.use_tma``), falling back to the plain kernel where that fails, and a
striped call with key blocks of 64 that fails falls back to its plan with key blocks of 128; both
fallbacks warn once and hold for that device from then on. Elsewhere the eager implementation runs,
which materialises the score matrix: it is for checking semantics on small shapes and refuses
sequences longer than ``AttentionOptions.max_dense_tokens``.
"""

from __future__ import annotations

import functools
import warnings
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from ._flex_groups import BLOCK_SIZE, padded_frame
from ._fused import recompile_limit_at_least
from .options import AttentionOptions

if TYPE_CHECKING:
    from ._planning import FlexPart

__all__ = ["check_eager_size", "flex_function", "run_flex"]

# what failed on this process's devices: the fallbacks hold from then on
_NO_TMA: set[str] = set()  # devices where the kernel with TMA loads failed once
_NO_SMALL_KEY_BLOCKS: set[str] = set()  # devices where a striped call with key blocks of 64 failed once


@functools.lru_cache(maxsize=1)
def _compiled_flex() -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=64)
def _device_calls(part: FlexPart, device_str: str) -> tuple[tuple[Any, Any, tuple], ...]:
    """Per call of ``part``: the group, its block mask on the device, and its segments as (band of the
    keys, key frames: None for every frame, a slice for consecutive ones, else an index tensor on the
    device)."""
    device = torch.device(device_str)
    s = part.tokens_per_frame
    out = []
    for g in part.groups:
        segs = []
        for rep, frames, _ in g.segments:
            if frames is not None and int(frames[-1]) - int(frames[0]) + 1 == len(frames):
                segs.append((rep, slice(int(frames[0]), int(frames[-1]) + 1)))
            else:
                segs.append((rep, None if frames is None else frames.to(device)))
        out.append((g, g.block_mask(s, device, part.aligned, part.key_block), tuple(segs)))
    return tuple(out)


def _compiled_here(device: torch.device, options: AttentionOptions) -> bool:
    """Whether flex runs compiled (with kernel options) here: ``options.flex_compiled``, else on CUDA."""
    return options.flex_compiled if options.flex_compiled is not None else device.type == "cuda"


def _kernel_options(device: torch.device, options: AttentionOptions) -> dict[str, Any] | None:
    """``{"USE_TMA": True}`` where tiles are loaded with the tensor memory accelerator (``options.use_tma``;
    None: on Hopper and later GPUs, unless it failed there), else None."""
    if options.use_tma is False or str(device) in _NO_TMA:
        return None
    if options.use_tma is None and (device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9):
        return None
    return {"USE_TMA": True}


def flex_function(device: torch.device, options: AttentionOptions) -> Any:
    """The ``flex_attention`` to call on ``device``: compiled on CUDA (``options.flex_compiled``), else eager."""
    from torch.nn.attention.flex_attention import flex_attention

    return _compiled_flex() if _compiled_here(device, options) and device.type == "cuda" else flex_attention


def check_eager_size(n: int, device: torch.device, options: AttentionOptions, instead: str) -> None:
    """Refuse ``n`` video tokens past ``options.max_dense_tokens`` on the CPU, where flex runs eagerly and
    materialises the scores; ``instead`` names the backend to use."""
    if device.type == "cpu" and n > options.max_dense_tokens:
        raise ValueError(f"flex on CPU runs eagerly and materialises the scores; it accepts N <= "
                         f"{options.max_dense_tokens} video tokens (AttentionOptions.max_dense_tokens), got N={n}; "
                         f"use backend={instead!r} on CPU")


def _run(fn: Any, q: Tensor, k: Tensor, v: Tensor, block_mask: Any, scale: float, key_block: int,
             options: AttentionOptions, score_mod: Any = None) -> tuple[Tensor, Tensor]:
    """One ``flex_attention`` call with its LSE (``score_mod`` where given), with the kernel options and the
    TMA fallback of a compiled call."""
    tma = _kernel_options(q.device, options) if _compiled_here(q.device, options) else None
    # the kernel's key tile must divide the block mask's key block; tuning options on top
    extra: dict[str, Any] = {}
    if _compiled_here(q.device, options):
        extra = {**({"BLOCK_N": key_block} if key_block < BLOCK_SIZE else {}), **options.kernel_options}
    plain: dict[str, Any] = {"kernel_options": extra} if extra else {}
    if score_mod is not None:
        plain["score_mod"] = score_mod
    # one compiled kernel per (query, key) length
    with warnings.catch_warnings(), recompile_limit_at_least(64):
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        warnings.filterwarnings("ignore", message=".*return_lse is deprecated.*")
        if tma is None:
            return fn(q, k, v, block_mask=block_mask, scale=scale, return_lse=True, **plain)
        try:
            return fn(q, k, v, block_mask=block_mask, scale=scale, return_lse=True,
                      **{**plain, "kernel_options": {**tma, **extra}})
        except Exception as err:  # this torch or device refuses TMA: the plain kernel, from now on
            _NO_TMA.add(str(q.device))
            warnings.warn(f"flex_attention with {tma} failed ({type(err).__name__}: {err}); "
                          f"using the kernel without TMA on {q.device}", stacklevel=3)
            return fn(q, k, v, block_mask=block_mask, scale=scale, return_lse=True, **plain)


def _frames_of(x: Tensor, frames: slice | Tensor | None, s: int) -> Tensor:
    """(B, H, F*s, D) -> (B, H, C, s, D): the given key frames (None: all; a slice: a view; a tensor: a gather)."""
    b, h, n, d = x.shape
    framed = x.view(b, h, n // s, s, d)
    if frames is None:
        return framed
    if isinstance(frames, slice):
        return framed[:, :, frames]
    return framed.index_select(2, frames)


def _pad_into(dst: Tensor, parts: list[Tensor], s: int, p: int, shift: int = 0) -> Tensor:
    """Write (B, H, C_i, s, D) parts one after the other into ``dst`` (B, H, sum C_i * p, D), each frame
    padded with zeros to ``p`` tokens (its tokens at ``[shift, shift + s)``)."""
    b, h, _, d = dst.shape
    framed = dst.view(b, h, -1, p, d)
    at = 0
    for part in parts:
        framed[:, :, at:at + part.shape[2], shift:shift + s].copy_(part)
        at += part.shape[2]
    if shift:
        framed[:, :, :, :shift].zero_()
    if p > s + shift:
        framed[:, :, :, shift + s:].zero_()
    return dst


def run_flex(
    part: FlexPart,
    qs: list[Float[Tensor, "batch heads n dim"]],
    ks: list[Float[Tensor, "batch heads n dim"]],
    q_ids: tuple[int, ...],
    v: Float[Tensor, "batch heads n dim"],
    scale: float,
    options: AttentionOptions,
) -> tuple[list[Tensor], list[Tensor]]:
    """Attention of every video query over the part's bands, as the flex calls' outputs (in v's dtype)
    and LSEs, not merged, each seen by frame: (B, H, F, S, D) and (B, H, F, S), in the frame-aligned
    layout views of the padded outputs.

    ``qs[b]``/``ks[b]``: the video queries/keys rotated at band ``b``'s positions; ``q_ids[b]``: which
    query rotation band ``b`` uses (bands with equal ids share one tensor, and one padded copy of it).
    """
    if not torch.is_grad_enabled():  # flex_attention refuses inputs that require grad on CPU, even under no_grad
        qs, ks, v = [x.detach() for x in qs], [x.detach() for x in ks], v.detach()
    check_eager_size(v.shape[2], v.device, options, "chunked")
    fn = flex_function(v.device, options)
    if part.fallback is None or not _compiled_here(v.device, options):
        return _attend_groups(fn, part, qs, ks, q_ids, v, scale, options)
    if str(v.device) in _NO_SMALL_KEY_BLOCKS:
        return _attend_groups(fn, part.fallback, qs, ks, q_ids, v, scale, options)
    try:
        return _attend_groups(fn, part, qs, ks, q_ids, v, scale, options)
    except torch.OutOfMemoryError:
        raise
    except Exception as err:  # this torch or GPU refuses key blocks of 64: blocks of 128, from now on
        _NO_SMALL_KEY_BLOCKS.add(str(v.device))
        warnings.warn(f"flex_attention with key blocks of {part.key_block} failed ({type(err).__name__}: {err}); "
                      f"using key blocks of {BLOCK_SIZE} on {v.device}", stacklevel=2)
        return _attend_groups(fn, part.fallback, qs, ks, q_ids, v, scale, options)


def _attend_groups(fn: Any, part: FlexPart, qs: list[Tensor], ks: list[Tensor], q_ids: tuple[int, ...], v: Tensor,
                   scale: float, options: AttentionOptions) -> tuple[list[Tensor], list[Tensor]]:
    b, h, n, d = v.shape
    s = part.tokens_per_frame
    f = n // s
    aligned = part.aligned
    p = padded_frame(s) if aligned else s
    outs: list[Tensor] = []
    lses: list[Tensor] = []
    padded_q: dict[int, Tensor] = {}  # per query rotation (TSA's local and striped calls share one)
    for group, bm, segments in _device_calls(part, str(v.device)):
        rep_q = group.bands[0]
        if aligned:
            q = padded_q.get(q_ids[rep_q])
            if q is None:
                q = _pad_into(v.new_empty(b, h, f * p, d), [_frames_of(qs[rep_q], None, s)], s, p)
                padded_q[q_ids[rep_q]] = q
            c = group.num_key_frames
            key_block, shift = group.tiling(s, part.key_block)
            k_cat = _pad_into(v.new_empty(b, h, c * p, d), [_frames_of(ks[rep], fr, s) for rep, fr in segments], s, p,
                              shift)
            v_cat = _pad_into(v.new_empty(b, h, c * p, d), [_frames_of(v, fr, s) for _, fr in segments], s, p, shift)
        else:
            key_block = BLOCK_SIZE
            q = qs[rep_q]
            pieces = [(ks[rep], v) if fr is None else (_frames_of(ks[rep], fr, s), _frames_of(v, fr, s))
                      for rep, fr in segments]
            whole = len(pieces) == 1 and segments[0][1] is None
            k_cat = pieces[0][0] if whole else torch.cat([x.reshape(b, h, -1, d) for x, _ in pieces], dim=2)
            v_cat = pieces[0][1] if whole else torch.cat([y.reshape(b, h, -1, d) for _, y in pieces], dim=2)
        out, lse = _run(fn, q, k_cat, v_cat, bm, scale, key_block, options)
        # by frame; in the padded layout, views of the real tokens: the merge reads them in place
        outs.append(out.view(b, h, f, p, d)[:, :, :, :s])
        lses.append(lse.view(b, h, f, p)[:, :, :, :s])
    return outs, lses
