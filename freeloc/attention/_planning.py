"""The attention planner: a method's bands at one shape -> the parts of the call, each bound to one backend.

An ``AttentionPlan`` says everything ``attend`` does after validation:
which rotations of q and k it computes and where it writes them (``Rotations``: per band, shared
between bands with equal positions, head-major where the chunked backend reads them, key rotations of
bands that one stack reads written one after the other into one buffer), and the parts that compute
the attention:

* ``DensePart``: plain attention (a method that changes nothing at this length), one fused call;
* ``ReferencePart``: the dense masked softmax the other backends are tested against;
* ``ChunkedPart``: stacks and passes of fused attention calls (``freeloc.attention._passes``);
* ``FlexPart``: block-sparse ``flex_attention`` calls (``freeloc.attention._flex_groups``);
* ``ScaledPart``: every video pair with its positive logits scaled per frame pair (UltraViCo), in one
  ``flex_attention`` call or in chunks of query rows (``freeloc.attention._scaled``);
* ``TextPart``: the text tokens, dense, at their original positions (models with text in the
  sequence).

The video parts' outputs are merged once, exactly, by their log-sum-exp (docs/method.md §7). A plan is
pure data, cached by (band set, shape, backend, device type, dtype, head dim, options).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from ..bands import BandSet
from ._flex_groups import BLOCK_SIZE, FlexGroup, flex_groups, split_striped, stripe_key_block, use_aligned
from ._kernels import fused_kernel_for
from ._passes import PassPlan, key_groups, plan_passes, plan_stacks
from ._scaled import scaled_refusal
from .options import AttentionOptions

__all__ = ["AttentionPlan", "ChunkedPart", "DensePart", "FlexPart", "Part", "ReferencePart", "Rotations",
           "ScaledPart", "TextPart", "plan_attention"]


@dataclass(frozen=True, eq=False)
class DensePart:
    """Plain attention over every token at the original positions: one fused call (the whole output)."""


@dataclass(frozen=True, eq=False)
class ReferencePart:
    """Dense masked softmax over [N, N] logits, each pair at its band's positions (the whole output)."""

    bands: BandSet


@dataclass(frozen=True, eq=False)
class ChunkedPart:
    """The video queries over the pairs of ``passes`` (its stacks and passes), on fused attention calls."""

    passes: PassPlan


@dataclass(frozen=True, eq=False)
class FlexPart:
    """The video queries over ``bands`` in ``flex_attention`` calls, one per group (``FlexGroup``).

    ``aligned``: frames padded to whole blocks; ``key_block``: the key block of striped frame-aligned
    calls; ``fallback``: the same calls with key blocks of 128, for a device that refuses 64.
    """

    bands: BandSet
    tokens_per_frame: int
    groups: tuple[FlexGroup, ...]
    aligned: bool
    key_block: int
    fallback: FlexPart | None = None


@dataclass(frozen=True, eq=False)
class ScaledPart:
    """The video queries over every video key, the positive logits of each band's pairs multiplied by its
    ``positive_logit_scale`` (the bands share positions): one flex call, or chunks of query rows."""

    bands: BandSet
    tokens_per_frame: int


@dataclass(frozen=True, eq=False)
class TextPart:
    """The text tokens: video queries over the text keys (merged with the video parts), and text queries
    over every key (their rows of the output), densely, at the original positions."""


Part = DensePart | ReferencePart | ChunkedPart | FlexPart | ScaledPart | TextPart


@dataclass(frozen=True)
class Rotations:
    """Which rotations of the video queries and keys a call computes, and where it writes them.

    ``q_source[b]`` / ``k_source[b]``: the first band with band ``b``'s query / key positions (bands with
    equal positions share one rotation); ``q_temporal[b]`` / ``k_temporal[b]``: whether that rotation turns
    the temporal pairs (False: every position is 0, the spatial rotation alone); ``head_major``: written as
    (batch, heads, tokens, dim), as the chunked backend reads them; ``key_buffers``: groups of bands whose
    key rotations are written one after the other into one head-major buffer (a stack reads them as one
    key tensor); ``original``: whether every token at its original positions is needed (plain attention,
    text, the reference).
    """

    q_source: tuple[int, ...] = ()
    k_source: tuple[int, ...] = ()
    q_temporal: tuple[bool, ...] = ()
    k_temporal: tuple[bool, ...] = ()
    head_major: bool = False
    key_buffers: tuple[tuple[int, ...], ...] = ()
    original: bool = False


@dataclass(frozen=True, eq=False)
class AttentionPlan:
    """What one ``attend`` call computes: rotations, then parts, then one merge."""

    backend: str
    bands: BandSet
    grid: tuple[int, int, int]
    text_before: int
    text_after: int
    rotations: Rotations
    parts: tuple[Part, ...]

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[1] * self.grid[2]


def _resolve_unstriped(q: Tensor, options: AttentionOptions) -> str:
    """``options.unstriped`` with ``"auto"`` resolved for queries like ``q``: ``"stacks"`` where a fused
    dense kernel passes its check for sliding key windows (CUDA), else ``"flex"``."""
    if options.unstriped != "auto":
        return options.unstriped
    return "stacks" if fused_kernel_for(q, masked=False, overlapping=True, options=options) is not None else "flex"


def plan_attention(q: Tensor, bands: BandSet, grid: tuple[int, int, int], text_before: int, text_after: int,
                   backend: str, options: AttentionOptions) -> AttentionPlan:
    """The plan for queries like ``q`` (device, dtype, head dim): the automatic choices resolved here
    (backend, what the flex backend leaves to the dense kernel, the striped calls' key block), the rest
    from the cached ``_plan``. ``bands`` is the method's band set at this grid."""
    if bands.scales_logits():  # UltraViCo's decay of positive logits: no fused dense kernel computes it
        why = scaled_refusal(bands)
        if backend == "auto":
            backend = "reference" if why is not None else "flex" if q.device.type == "cuda" else "chunked"
        if backend != "reference" and why is not None:
            raise ValueError(f"backend={backend!r} computes a method that scales logits with one factor per frame "
                             f"pair, which {bands.label or 'this method'} does not fit ({why}); use "
                             f"backend='reference'")
    if backend == "auto":
        backend = "flex" if q.device.type == "cuda" else "chunked"
    mode, key_block = "", BLOCK_SIZE
    if backend == "flex":
        mode = _resolve_unstriped(q, options)
        key_block = stripe_key_block(options, q.dtype, q.shape[-1])
    n = text_before + grid[0] * grid[1] * grid[2] + text_after
    if backend == "reference" and n > options.max_dense_tokens and not bands.scales_logits():
        raise ValueError(f"the reference backend materialises [N, N] logits and accepts N <= "
                         f"{options.max_dense_tokens} tokens (AttentionOptions.max_dense_tokens), got N={n}; use "
                         f"backend='chunked' (CPU) or 'flex' (CUDA)")
    return _plan(bands, grid, text_before, text_after, backend, q.device.type, mode, key_block, q.shape[-1], options)


@functools.lru_cache(maxsize=128)
def _aligned(bands: BandSet) -> BandSet:
    return bands.aligned()


@functools.lru_cache(maxsize=128)
def _plan(bands: BandSet, grid: tuple[int, int, int], text_before: int, text_after: int, backend: str,
          device_type: str, mode: str, key_block: int, head_dim: int, options: AttentionOptions) -> AttentionPlan:
    f, hh, ww = grid
    s = hh * ww
    text = (TextPart(),) if text_before + text_after else ()
    if backend == "reference":  # each band keeps its own positions (the tests' check of the alignment)
        return AttentionPlan(backend, bands, grid, text_before, text_after, _rotations(bands, (), False, True),
                             (ReferencePart(bands),))
    if bands.scales_logits():  # flex or chunked; every band at the same positions
        return AttentionPlan(backend, bands, grid, text_before, text_after, _rotations(bands, (), False, bool(text)),
                             (ScaledPart(bands, s), *text))
    bands = _aligned(bands)
    if bands.is_plain():
        return AttentionPlan(backend, bands, grid, text_before, text_after, Rotations(original=True), (DensePart(),))
    parts: list[Part] = []
    if backend == "chunked":
        parts.append(ChunkedPart(plan_passes(bands, s, head_dim, options)))
    else:
        on_flex: BandSet | None = bands
        if mode == "chunked":
            dense, on_flex = split_striped(bands, s)
            if dense is not None:
                parts.append(ChunkedPart(plan_passes(dense, s, head_dim, options)))
        elif mode == "stacks":
            stacks, on_flex = plan_stacks(bands, s, options.stack_min_frames, options.small_blocks)
            if stacks:
                parts.append(ChunkedPart(stacks))
        if on_flex is not None:
            parts.append(_flex_part(on_flex, s, torch.device(device_type), options, key_block))
    chunked = [p.passes for p in parts if isinstance(p, ChunkedPart)]
    buffers = tuple(sorted({g for plan in chunked for g in key_groups(plan)}))
    rotations = _rotations(bands, buffers, bool(chunked), bool(text))
    return AttentionPlan(backend, bands, grid, text_before, text_after, rotations, (*parts, *text))


def _flex_part(bands: BandSet, s: int, device: torch.device, options: AttentionOptions, key_block: int) -> FlexPart:
    aligned = use_aligned(bands, s, device, options.layout)
    groups = flex_groups(bands, s, by_stripe=aligned)
    striped = aligned and key_block < BLOCK_SIZE and any(g.stripe_width(s) < s for g in groups)
    fallback = FlexPart(bands, s, groups, aligned, BLOCK_SIZE) if striped else None
    return FlexPart(bands, s, groups, aligned, key_block if striped else BLOCK_SIZE, fallback)


def _rotations(bands: BandSet, key_buffers: tuple[tuple[int, ...], ...], head_major: bool,
               original: bool) -> Rotations:
    def sources(side: str) -> tuple[tuple[int, ...], tuple[bool, ...]]:
        pos = [b.q_pos if side == "q" else b.k_pos for b in bands.bands]
        first = tuple(next(j for j in range(i + 1) if torch.equal(pos[i], pos[j])) for i in range(len(pos)))
        return first, tuple(bool(p.any()) for p in pos)

    (qs, qt), (ks, kt) = sources("q"), sources("k")
    return Rotations(qs, ks, qt, kt, head_major, key_buffers, original)

