"""The flex backend's calls: which bands share one ``flex_attention`` call, and the call's mask.

Bands whose queries share one rotation (after ``aligned``) form a group
and run as **one** ``flex_attention`` call: the keys of the group are the concatenation of a few key
*segments* (the key frames a band uses, rotated at that band's key positions; bands with the same
key positions share a segment), and the mask of the call sends every query to the segment of the
band its pair belongs to. A group's work is its bands' work, in one kernel with one online softmax:
no per-band launch, epilogue or merge, and no load imbalance between a band of past and a band of
future keys.

Each group's ``BlockMask`` is built with
``BlockMask.from_kv_blocks`` from frame-level tables (never ``create_block_mask`` over N^2 tokens).
Two token layouts (``AttentionOptions.layout``):

* **packed**: the frames' tokens back to back, as the model has them. Blocks of 128 tokens cut across
  frames (1560 tokens per frame at Wan 480p is not a multiple of 128), so the ``mask_mod`` cuts the
  partial blocks: per query frame a few intervals of key frames, each with a stripe width
  (``FlexGroup.intervals``), read once per query row; per token pair it is integer arithmetic,
  with no table load (a per-pair table lookup makes partial blocks cost several full ones).
* **frame-aligned** (the default on CUDA for band sets with a stripe, when padding adds at most 1/8
  to a frame): each frame is padded with zero tokens to a whole number of blocks, so that every block
  lies in one frame and the block table alone says which frame pairs are attended. Groups then also
  split by stripe width, and the compiled kernel's ``mask_mod`` is the stripe and the padding test
  alone: the TSA stripe's partial blocks, most of a striped tier, become cheap. The padding costs
  ``(padded / S)^2`` more work on full blocks (1.14 at S = 1560), which is why VRPR stays packed.

Striped frame-aligned calls may use key blocks of 64 (``AttentionOptions.stripe_key_block``): each key
frame is then shifted inside its padded slot (``stripe_tiling``) so that the stripe of a 128-query
block covers fewer key blocks and more of them whole: at 1560 tokens per frame and the TSA stripe (195),
9 blocks of 64 keys, 4 of them whole, instead of 5 of 128 with 1 whole.

Eager flex ignores the block table and evaluates ``mask_mod`` everywhere, so the eager ``mask_mod`` is
exact on every pair; the tests check that the compiled one agrees with it on every partial block.
"""

from __future__ import annotations

import functools
import typing
from dataclasses import dataclass, replace
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from ..bands import Band, BandSet, count_per_tile, gap_and_span, token_pieces
from .options import AttentionOptions

__all__ = ["BLOCK_SIZE", "FlexGroup", "flex_groups", "padded_frame", "split_striped", "stripe_key_block",
           "stripe_tiling", "use_aligned"]

#: The query block of every flex call, and its key block but for striped frame-aligned calls.
BLOCK_SIZE = 128


def padded_frame(tokens_per_frame: int) -> int:
    """Tokens per frame in the frame-aligned layout: ``tokens_per_frame`` rounded up to whole blocks
    (also: any token count rounded up to whole blocks)."""
    return -(-tokens_per_frame // BLOCK_SIZE) * BLOCK_SIZE


def stripe_key_block(options: AttentionOptions, dtype: torch.dtype, head_dim: int) -> int:
    """``options.stripe_key_block`` with ``"auto"`` resolved for q, k, v of this dtype and head dim: 64
    for 2-byte floats with a head dim of 128, where Inductor's own flex kernel already computes key
    tiles of 64 on every NVIDIA architecture (its default ``BLOCK_N``; a partial block of 128 is then two
    masked tiles), so that the blocks of 64 change nothing but the number of tiles (10 -> 9 per query
    block and striped key frame at the Wan shape) and how many are masked (8 -> 5); 128 otherwise."""
    kb = options.stripe_key_block
    if kb == "auto":
        return BLOCK_SIZE // 2 if dtype in (torch.bfloat16, torch.float16) and head_dim == BLOCK_SIZE else BLOCK_SIZE
    return int(kb)


def _key_pieces(tokens_per_frame: int, key_block: int, shift: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per key block of one padded frame (keys at ``[shift, shift + S)``): first and last raster index it
    holds (clipped to the frame), and whether it holds only real keys."""
    s, p = tokens_per_frame, padded_frame(tokens_per_frame)
    lo = torch.arange(p // key_block) * key_block - shift
    hi = lo + key_block - 1
    return lo.clamp(min=0), hi.clamp(max=s - 1), (lo >= 0) & (hi <= s - 1)


def _query_pieces(tokens_per_frame: int) -> tuple[Tensor, Tensor]:
    """Per 128-query block of one padded frame: first and last real raster index."""
    lo = torch.arange(padded_frame(tokens_per_frame) // BLOCK_SIZE) * BLOCK_SIZE
    return lo, (lo + BLOCK_SIZE - 1).clamp(max=tokens_per_frame - 1)


def stripe_tiling(tokens_per_frame: int, width: int, key_block: int = BLOCK_SIZE) -> tuple[int, int]:
    """``(key block, shift)`` of a frame-aligned call whose pairs have stripe ``width``: the key block is
    ``key_block`` (128 or 64) for a stripe narrower than the frame, else 128; for
    blocks under 128 the shift (keys at ``[shift, shift + S)`` of each padded frame, ``0 <= shift <= pad``)
    that makes the stripe touch the fewest key blocks per query block, then the most of them whole."""
    s = tokens_per_frame
    kb = key_block if width < s else BLOCK_SIZE
    if kb not in (BLOCK_SIZE, BLOCK_SIZE // 2):
        raise ValueError(f"a stripe key block must be 128 or 64, got {kb!r}")
    return (kb, 0) if kb == BLOCK_SIZE else (kb, _best_shift(s, width, kb))


@functools.lru_cache(maxsize=64)
def _best_shift(s: int, width: int, kb: int) -> int:
    qlo, qhi = _query_pieces(s)
    best: tuple[tuple[int, int], int] | None = None
    for shift in range(padded_frame(s) - s + 1):
        klo, khi, whole = _key_pieces(s, kb, shift)
        gap, span = gap_and_span(qlo, qhi, klo, khi)
        touched = int(((width > gap) & (klo <= khi)[None, :]).sum())
        full = int(((width > span) & whole[None, :]).sum())
        if best is None or (touched, -full) < best[0]:
            best = ((touched, -full), shift)
    assert best is not None
    return best[1]


@dataclass(frozen=True, eq=False)
class FlexGroup:
    """One ``flex_attention`` call: bands that share their query rotation.

    ``bands``: the band indices (the queries are those of ``bands[0]``); ``segments``: per key segment,
    the band whose rotated keys it takes, its key frames (None: every frame in order) and the bands
    whose pairs it holds;
    ``width``: [F + 1, C + 1] int32 per (query frame, key column), the stripe width of the pair's band
    (``tokens_per_frame`` for a band without stripe, 0 for no band; last row and column: padding).

    Two token layouts: *packed* (frames of ``S`` tokens back to back, blocks cut across frames) and
    *frame-aligned* (each frame padded to ``padded_frame`` tokens, so that every block lies in one
    frame and the frame pattern is carried by the block table alone; see ``block_mask``).
    """

    bands: tuple[int, ...]
    segments: tuple[tuple[int, Tensor | None, tuple[int, ...]], ...]
    width: Tensor

    @property
    def num_frames(self) -> int:
        return self.width.shape[0] - 1

    @property
    def num_key_frames(self) -> int:
        return self.width.shape[1] - 1

    def tiling(self, tokens_per_frame: int, key_block: int = BLOCK_SIZE) -> tuple[int, int]:
        """``(key block, key shift)`` of the call in the frame-aligned layout (``stripe_tiling``; key
        blocks of ``key_block`` if it has a stripe)."""
        return stripe_tiling(tokens_per_frame, self.stripe_width(tokens_per_frame), key_block)

    def block_table(self, tokens_per_frame: int, aligned: bool = False,
                    key_block: int = BLOCK_SIZE) -> tuple[Tensor, Tensor]:
        """(any, full) bool [Qb, Kb] tables of the call, from frame-level pieces (never N^2 tokens); in the
        frame-aligned layout the key blocks are those of ``tiling``."""
        if aligned:
            return self._aligned_block_table(tokens_per_frame, key_block)
        s = tokens_per_frame
        f, c = self.num_frames, self.num_key_frames
        qb, qu, qlo, qhi = token_pieces(f, s, BLOCK_SIZE, padded_frame(f * s))
        kb, ku, klo, khi = token_pieces(c, s, BLOCK_SIZE, padded_frame(c * s))
        w = self.width[qu[:, None], ku[None, :]]
        gap, span = gap_and_span(qlo, qhi, klo, khi)
        return (count_per_tile(qb, kb, w > gap) > 0,
                count_per_tile(qb, kb, w > span) == count_per_tile(qb, kb, torch.ones_like(w)))

    def stripe_width(self, tokens_per_frame: int) -> int:
        """The one stripe width of the call's pairs (``tokens_per_frame``: no stripe); frame-aligned calls
        hold bands of one width (``flex_groups`` with ``by_stripe``)."""
        widths = torch.unique(self.width[self.width > 0])
        if len(widths) != 1:
            raise ValueError(f"a frame-aligned flex call needs bands of one stripe width, got {widths.tolist()}")
        return min(int(widths[0]), tokens_per_frame)

    def _aligned_block_table(self, tokens_per_frame: int, key_block: int | None) -> tuple[Tensor, Tensor]:
        s = tokens_per_frame
        w = self.stripe_width(s)
        kb, shift = self.tiling(s, key_block)
        qlo, qhi = _query_pieces(s)  # real raster indices of each block of a frame
        klo, khi, whole = _key_pieces(s, kb, shift)
        gap, span = gap_and_span(qlo, qhi, klo, khi)
        tile_any = (w > gap) & (klo <= khi)[None, :]  # [q block, k block] inside one (query frame, key column)
        tile_full = (w > span) & whole[None, :]  # and no padding key in the block
        pair = self.width[:-1, :-1] > 0
        f, c = pair.shape

        def expand(tile: Tensor) -> Tensor:  # [frame pair] x [block pair inside it] -> [query block, key block]
            both = pair[:, None, :, None] & tile[None, :, None, :]
            return rearrange(both, "qf qb kf kb -> (qf qb) (kf kb)")

        return expand(tile_any), expand(tile_full)

    def mask_mod(self, tokens_per_frame: int, device: torch.device, aligned: bool = False,
                 frame_table: bool = True, key_block: int = BLOCK_SIZE) -> Any:
        """The call's ``mask_mod``, exact on every token pair; in the frame-aligned layout with
        ``frame_table=False``, exact on the partial blocks of ``block_table`` only (see ``block_mask``)."""
        s = tokens_per_frame
        f = self.num_frames
        if aligned:
            p, w = padded_frame(s), self.stripe_width(s)
            shift = self.tiling(s, key_block)[1]
            pair = (self.width[:-1, :-1] > 0).to(device)
            far = -(p + w)  # a raster index no query's stripe reaches: where the padding keys are moved
            padded = p > s

            # per token pair as few operations as possible (the compiled kernel runs them on every element of
            # a partial tile): what depends on one index alone is computed on that row or column of indices
            @typing.no_type_check  # traced by flex_attention: no runtime type-checking wrapper around it
            def aligned_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
                sk = kv_idx % p - shift if shift else kv_idx % p
                real = ((sk >= 0) & (sk < s) if shift else sk < s) if padded else None  # not a padding key
                if w < s:  # the stripe; padding keys moved out of every stripe, so it is their test too
                    keep = (q_idx % p - (torch.where(real, sk, far) if padded else sk)).abs() < w
                else:
                    keep = real if padded else sk >= 0  # no padding: every key (and no partial block)
                if frame_table:
                    keep = keep & pair[q_idx // p, kv_idx // p]
                return keep

            return aligned_mask
        table = self.intervals(s).to(device)
        r_max = table.shape[1]
        striped = bool((table[:, :, 2] < s).any())

        # per query frame a few (first column, end column, stripe width) intervals: loads per query row only,
        # integer arithmetic per token pair; padding rows / columns fall in no interval
        @typing.no_type_check  # traced by flex_attention: no runtime type-checking wrapper around it
        def packed_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            qf = torch.clamp(q_idx // s, max=f)
            kc = kv_idx // s
            dist = (q_idx % s - kv_idx % s).abs() if striped else None
            keep = None
            for r in range(r_max):
                inside = (table[qf, r, 0] <= kc) & (kc < table[qf, r, 1])
                if striped:
                    inside = inside & (dist < table[qf, r, 2])
                keep = inside if keep is None else keep | inside
            return keep

        return packed_mask

    def intervals(self, tokens_per_frame: int) -> Tensor:
        """[F + 1, R, 3] int32: per query frame, R intervals (first key column, end column, stripe width)
        whose union is the call's pattern: a pair is attended where its key column lies in an interval
        whose width exceeds the raster distance (the last row and unused intervals are empty).

        Widths are taken level by level (largest first); at each level the columns of at least that
        width are cut into contiguous runs, so ``width[i, c] > d`` holds exactly where some interval
        holds ``c`` with a width above ``d``.
        """
        s = tokens_per_frame
        width = self.width[:-1, :-1].clamp(max=s)
        rows: list[list[tuple[int, int, int]]] = []
        for row in width:
            found: list[tuple[int, int, int]] = []
            for w in sorted({int(x) for x in row.tolist() if x > 0}, reverse=True):
                cols = torch.nonzero(row >= w).flatten()
                cuts = torch.nonzero(cols[1:] != cols[:-1] + 1).flatten() + 1
                for run in torch.tensor_split(cols, cuts):
                    found.append((int(run[0]), int(run[-1]) + 1, w))
            rows.append(found)
        r_max = max(1, max(len(x) for x in rows))
        table = torch.zeros(len(rows) + 1, r_max, 3, dtype=torch.int32)
        for i, found in enumerate(rows):
            if found:
                table[i, :len(found)] = torch.tensor(found, dtype=torch.int32)
        return table

    def block_mask(self, tokens_per_frame: int, device: torch.device, aligned: bool = False,
                   key_block: int = BLOCK_SIZE) -> Any:
        """The call's ``BlockMask`` (on ``device``) in the packed or the frame-aligned layout.

        Packed: the ``mask_mod`` tests the key frame against the query frame's intervals
        (``intervals``) and the raster distance against their stripe widths. Frame-aligned: every
        block lies in one frame, the block table alone decides which frame pairs are attended, and on
        CUDA (where the compiled kernel evaluates ``mask_mod`` on partial blocks only) the ``mask_mod``
        is the stripe and the padding test alone: integer arithmetic on the token index, no table load
        per pair. Eager flex (CPU) evaluates ``mask_mod`` on every pair, so there it also looks up the
        frame pair.
        """
        from torch.nn.attention.flex_attention import BlockMask

        s = tokens_per_frame
        any_t, full_t = self.block_table(s, aligned, key_block)
        kv_num, kv_idx = _table_to_indices(any_t & ~full_t)
        full_num, full_idx = _table_to_indices(full_t)
        per_frame = padded_frame(s) if aligned else s
        kb = self.tiling(s, key_block)[0] if aligned else BLOCK_SIZE
        mask_mod = self.mask_mod(s, device, aligned, frame_table=device.type != "cuda", key_block=key_block)
        return BlockMask.from_kv_blocks(
            kv_num.to(device), kv_idx.to(device), full_num.to(device), full_idx.to(device),
            BLOCK_SIZE=(BLOCK_SIZE, kb), mask_mod=mask_mod,
            seq_lengths=(self.num_frames * per_frame, self.num_key_frames * per_frame),
        )


def _table_to_indices(table: Tensor) -> tuple[Tensor, Tensor]:
    """[Qb, Kb] bool -> (num_blocks [1, 1, Qb], indices [1, 1, Qb, Kb]) with the selected blocks first."""
    num = table.sum(-1).to(torch.int32)
    order = torch.argsort((~table).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num[None, None], order[None, None]


def flex_groups(band_set: BandSet, tokens_per_frame: int, *, by_stripe: bool = False) -> tuple[FlexGroup, ...]:
    """The ``flex_attention`` calls of a band set: bands with equal query positions share one call
    (with ``by_stripe``: equal query positions and equal stripe widths, for the frame-aligned layout)."""
    s = tokens_per_frame
    f = band_set.num_frames
    bands = band_set.bands

    def stripe(i: int) -> int:
        st = bands[i].stripe
        return s if st is None else min(st, s)

    members: list[list[int]] = []
    for i, b in enumerate(bands):
        if b.is_empty():
            continue
        group = next((g for g in members if torch.equal(bands[g[0]].q_pos, b.q_pos)
                      and (not by_stripe or stripe(g[0]) == stripe(i))), None)
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
                width[:f, off:off + len(fr)].masked_fill_(bands[i].pairs[:, fr], stripe(i))
            off += len(fr)
            segments.append((rep, None if len(fr) == f else fr, tuple(seg_bands)))  # None: every frame, in order
        groups.append(FlexGroup(tuple(g), tuple(segments), width))
    return tuple(groups)


#: Token layout of the flex calls: ``"auto"`` (frame-aligned on CUDA for band sets with a stripe, when it
#: pads frames by at most 1/8 of their tokens; packed otherwise), ``"aligned"`` or ``"packed"``.


def _striped(band: Band, tokens_per_frame: int) -> bool:
    return band.stripe is not None and band.stripe < tokens_per_frame and not band.is_empty()


def use_aligned(band_set: BandSet, tokens_per_frame: int, device: torch.device, layout: str = "auto") -> bool:
    """Whether the flex calls pad frames to whole blocks here (``AttentionOptions.layout``): ``"auto"``
    is frame-aligned on CUDA for band sets with a stripe whose padding adds at most 1/8 to a frame (TSA
    runs faster aligned, VRPR, whose only partial blocks are at frame boundaries, packed;
    ``benchmarks/HISTORY.md``)."""
    if layout != "auto":
        return layout == "aligned"
    s = tokens_per_frame
    striped = any(_striped(b, s) for b in band_set.bands)
    return device.type == "cuda" and striped and 8 * (padded_frame(s) - s) <= s


@functools.lru_cache(maxsize=64)
def split_striped(band_set: BandSet, tokens_per_frame: int) -> tuple[BandSet | None, BandSet | None]:
    """``(bands without a stripe, bands with one)``: each part is ``band_set`` with the other part's bands
    emptied, so that band ``i`` keeps its index (and its rotations); None for a part without pairs."""
    s = tokens_per_frame

    def keep(striped: bool) -> BandSet | None:
        bands = tuple(b if _striped(b, s) == striped else replace(b, pairs=torch.zeros_like(b.pairs))
                      for b in band_set.bands)
        if all(b.is_empty() for b in bands):
            return None
        part = "striped" if striped else "unstriped"
        return BandSet(band_set.num_frames, bands, band_set.t_freqs, f"{band_set.label} ({part} bands)")

    return keep(False), keep(True)
