"""The ``flex`` backend: block-sparse ``flex_attention``, one kernel per group of bands, merged by LSE.

Bands whose queries share one rotation (after :meth:`~freeloc.bands.BandSet.aligned`) form a group
and run as **one** ``flex_attention`` call: the keys of the group are the concatenation of a few key
*segments* (the key frames a band uses, rotated at that band's key positions; bands with the same
key positions share a segment), and the mask of the call sends every query to the segment of the
band its pair belongs to. A group's work is its bands' work, in one kernel with one online softmax:
no per-band launch, epilogue or merge, and no load imbalance between a band of past and a band of
future keys. Groups are merged exactly by their LSE.

Each group's :class:`~torch.nn.attention.flex_attention.BlockMask` is built with
``BlockMask.from_kv_blocks`` from frame-level tables (never ``create_block_mask`` over N^2 tokens),
with a ``mask_mod`` that cuts partial blocks exactly: one lookup in a small table (query frame, key
column -> stripe width of the pair's band, 0 for none) against the raster distance of the two tokens.
Eager flex ignores the block table and evaluates ``mask_mod`` everywhere, so the two must agree, and
they do. The table is a captured tensor: calls with the same shapes reuse one compiled kernel. On
Hopper GPUs the kernel loads its tiles with TMA (``USE_TMA``), falling back to the plain kernel where
that fails.

On CUDA the compiled kernel is used (the default backend there). On CPU the eager implementation
runs, which materialises the score matrix: it is for checking semantics on small shapes and refuses
sequences longer than the reference backend's limit.
"""

from __future__ import annotations

import functools
import typing
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..bands import BandSet
from .merge import MergeAccumulator
from .reference import MAX_TOKENS

__all__ = ["flex_band_attention", "flex_groups", "FlexGroup", "BLOCK_SIZE"]

BLOCK_SIZE = 128


@functools.lru_cache(maxsize=1)
def _compiled_flex() -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _table_to_indices(table: Tensor) -> tuple[Tensor, Tensor]:
    """[Qb, Kb] bool -> (num_blocks [1, 1, Qb], indices [1, 1, Qb, Kb]) with the selected blocks first."""
    num = table.sum(-1).to(torch.int32)
    order = torch.argsort((~table).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num[None, None], order[None, None]


def _pieces(units: int, s: int, padded: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cut a token axis of ``units`` x ``s`` tokens, padded to ``padded``, at unit and block boundaries.

    Returns per piece: block, unit (``units`` for padding), first and last raster index in the unit.
    """
    total = units * s
    cuts = torch.unique(torch.cat([torch.arange(0, total, s), torch.arange(0, padded, BLOCK_SIZE),
                                   torch.tensor([total, padded])]))
    start, end = cuts[:-1], cuts[1:] - 1
    unit = torch.where(start < total, start // s, units)
    return start // BLOCK_SIZE, unit, start - unit * s, end - unit * s


@dataclass(frozen=True, eq=False)
class FlexGroup:
    """One ``flex_attention`` call: bands that share their query rotation.

    ``bands``: the band indices (the queries are those of ``bands[0]``); ``segments``: per key segment,
    the band whose rotated keys it takes, the key token indices (None: every video token in order) and
    the bands whose pairs it holds;
    ``width``: [F + 1, C + 1] int32 per (query frame, key column), the stripe width of the pair's band
    (``tokens_per_frame`` for a band without stripe, 0 for no band; last row and column: padding).
    """

    bands: tuple[int, ...]
    segments: tuple[tuple[int, Tensor | None, tuple[int, ...]], ...]
    width: Tensor

    def block_table(self, tokens_per_frame: int) -> tuple[Tensor, Tensor]:
        """(any, full) bool [Qb, Kb] tables of the call, from frame-level pieces (never N^2 tokens)."""
        s = tokens_per_frame
        f, c = self.width.shape[0] - 1, self.width.shape[1] - 1
        qb, qu, qlo, qhi = _pieces(f, s, -(-f * s // BLOCK_SIZE) * BLOCK_SIZE)
        kb, ku, klo, khi = _pieces(c, s, -(-c * s // BLOCK_SIZE) * BLOCK_SIZE)
        w = self.width[qu[:, None], ku[None, :]]
        gap = torch.maximum(klo[None, :] - qhi[:, None], qlo[:, None] - khi[None, :]).clamp(min=0)
        span = torch.maximum(qhi[:, None] - klo[None, :], khi[None, :] - qlo[:, None])
        nqb, nkb = int(qb[-1]) + 1, int(kb[-1]) + 1
        idx = (qb[:, None] * nkb + kb[None, :]).flatten()

        def per_tile(x: Tensor) -> Tensor:
            return torch.zeros(nqb * nkb, dtype=torch.long).index_add_(0, idx, x.flatten().long()).view(nqb, nkb)

        return per_tile(w > gap) > 0, per_tile(w > span) == per_tile(torch.ones_like(w))

    def block_mask(self, tokens_per_frame: int, device: torch.device) -> Any:
        from torch.nn.attention.flex_attention import BlockMask

        s = tokens_per_frame
        f, c = self.width.shape[0] - 1, self.width.shape[1] - 1
        any_t, full_t = self.block_table(s)

        width = self.width.to(device)

        # frame, key column and raster index by integer arithmetic on the token index (s is a constant
        # of the compiled kernel, like the shape); padding tokens map to the zero last row / column
        @typing.no_type_check  # traced by flex_attention: no runtime type-checking wrapper around it
        def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            qf = torch.clamp(q_idx // s, max=f)
            kc = torch.clamp(kv_idx // s, max=c)
            return width[qf, kc] > (q_idx % s - kv_idx % s).abs()

        kv_num, kv_idx = _table_to_indices(any_t & ~full_t)
        full_num, full_idx = _table_to_indices(full_t)
        return BlockMask.from_kv_blocks(
            kv_num.to(device), kv_idx.to(device), full_num.to(device), full_idx.to(device),
            BLOCK_SIZE=BLOCK_SIZE, mask_mod=mask_mod, seq_lengths=(f * s, c * s),
        )


def flex_groups(band_set: BandSet, tokens_per_frame: int) -> tuple[FlexGroup, ...]:
    """The ``flex_attention`` calls of a band set: bands with equal query positions share one call."""
    s = tokens_per_frame
    f = band_set.num_frames
    bands = band_set.bands
    members: list[list[int]] = []
    for i, b in enumerate(bands):
        if b.is_empty():
            continue
        group = next((g for g in members if torch.equal(bands[g[0]].q_pos, b.q_pos)), None)
        if group is None:
            members.append([i])
        else:
            group.append(i)
    groups = []
    for g in members:
        segs: list[tuple[int, list[int], Tensor]] = []  # (band of the rotated keys, bands, key frames used)
        for i in g:
            used = bands[i].pairs.any(0)
            for j, (rep, seg_bands, seg_used) in enumerate(segs):
                both = used | seg_used
                if torch.equal(bands[rep].k_pos[both], bands[i].k_pos[both]):
                    segs[j] = (rep, seg_bands + [i], both)
                    break
            else:
                segs.append((i, [i], used))
        frames = [torch.nonzero(u).flatten() for _, _, u in segs]
        width = torch.zeros(f + 1, sum(len(fr) for fr in frames) + 1, dtype=torch.int32)
        segments = []
        off = 0
        for (rep, seg_bands, _), fr in zip(segs, frames, strict=True):
            for i in seg_bands:
                b = bands[i]
                block = width[:f, off:off + len(fr)]
                block.masked_fill_(b.pairs[:, fr], s if b.stripe is None else min(b.stripe, s))
            off += len(fr)
            every = len(fr) == f  # every key frame, in order
            tokens = None if every else (fr[:, None] * s + torch.arange(s)).flatten()
            segments.append((rep, tokens, tuple(seg_bands)))
        groups.append(FlexGroup(tuple(g), tuple(segments), width))
    return tuple(groups)


@functools.lru_cache(maxsize=64)
def _plan(band_set: BandSet, s: int, device_str: str) -> tuple[tuple[FlexGroup, Any, tuple], ...]:
    """Per call: the group, its block mask and its segments as (band of the keys, key tokens on the device)."""
    device = torch.device(device_str)
    return tuple((g, g.block_mask(s, device), tuple((rep, None if tok is None else tok.to(device))
                                                   for rep, tok, _ in g.segments))
                 for g in flex_groups(band_set, s))


_NO_TMA: set[str] = set()  # devices where the kernel with TMA loads failed once


def _kernel_options(device: torch.device) -> dict[str, Any] | None:
    """Hopper and later: load tiles with the tensor memory accelerator (measured 13-24% faster on H200)."""
    if device.type != "cuda" or str(device) in _NO_TMA or torch.cuda.get_device_capability(device)[0] < 9:
        return None
    return {"USE_TMA": True}


def recompile_limit_at_least(n: int) -> Any:
    """Context in which Dynamo compiles a function for up to ``n`` shapes (or its own larger limit)
    before it falls back to running it eagerly (for flex: a kernel that materialises the scores)."""
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    return dynamo_config.patch(**{name: max(n, getattr(dynamo_config, name))})


def _run(fn: Any, q: Tensor, k: Tensor, v: Tensor, block_mask: Any, scale: float) -> tuple[Tensor, Tensor]:
    options = _kernel_options(q.device)
    # one compiled kernel per (query, key) length
    with warnings.catch_warnings(), recompile_limit_at_least(64):
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        warnings.filterwarnings("ignore", message=".*return_lse is deprecated.*")
        if options is None:
            return fn(q, k, v, block_mask=block_mask, scale=scale, return_lse=True)
        try:
            return fn(q, k, v, block_mask=block_mask, scale=scale, return_lse=True, kernel_options=options)
        except Exception as err:  # this torch or device refuses TMA: the plain kernel, from now on
            _NO_TMA.add(str(q.device))
            warnings.warn(f"flex_attention with {options} failed ({type(err).__name__}: {err}); "
                          f"using the kernel without TMA on {q.device}", stacklevel=3)
            return fn(q, k, v, block_mask=block_mask, scale=scale, return_lse=True)


def flex_band_attention(
    qs: list[Float[Tensor, "batch heads n dim"]],
    ks: list[Float[Tensor, "batch heads n dim"]],
    v: Float[Tensor, "batch heads n dim"],
    band_set: BandSet,
    tokens_per_frame: int,
    scale: float,
) -> tuple[Float[Tensor, "batch heads n dim"], Float[Tensor, "batch heads n"]]:
    """Merged attention of every video query over the bands' video keys (float32 output, LSE)."""
    from torch.nn.attention.flex_attention import flex_attention

    n = v.shape[2]
    if v.device.type == "cpu" and n > MAX_TOKENS:
        raise ValueError(f"flex on CPU runs eagerly and materialises the scores; it accepts N <= {MAX_TOKENS} "
                         f"video tokens, got N={n}; use backend='chunked' on CPU")
    fn = _compiled_flex() if v.device.type == "cuda" else flex_attention
    acc = MergeAccumulator()
    for group, bm, segments in _plan(band_set, tokens_per_frame, str(v.device)):
        parts = [(ks[rep], v) if tokens is None else (ks[rep].index_select(2, tokens), v.index_select(2, tokens))
                 for rep, tokens in segments]
        k_cat = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts], dim=2)
        v_cat = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts], dim=2)
        out, lse = _run(fn, qs[group.bands[0]], k_cat, v_cat, bm, scale)
        acc.add(out, lse)
    return acc.result()
