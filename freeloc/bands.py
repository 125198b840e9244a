"""Bands: the common currency between position/attention methods and attention backends.

A **band** is a set of (query frame, key frame) pairs, optionally filtered per token pair by a
spatial *stripe*, together with the temporal positions that queries and keys use inside it.
A ``BandSet`` is what a method hands to ``freeloc.attention.attend``: disjoint bands that
together cover every pair the method attends, plus an optional replacement of the temporal RoPE
frequencies (NTK, YaRN, RIFLEx). Backends compute each band's attention (``chunked``: in passes per
band; ``flex``: one kernel per group of bands sharing their query rotation) and merge the results
exactly by their log-sum-exp.

Positions are per frame: inside band ``b`` a query token of frame ``i`` is rotated with temporal
position ``b.q_pos[i]`` and a key token of frame ``j`` with ``b.k_pos[j]``; the effective temporal
relative distance of the pair is ``b.q_pos[i] - b.k_pos[j]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float
from torch import Tensor

__all__ = ["Band", "BandSet", "frame_index_grid"]


def frame_index_grid(num_frames: int) -> tuple[Tensor, Tensor]:
    """``(i, j)`` LongTensors of shape [F, F]: query frame and key frame of every frame pair."""
    ar = torch.arange(num_frames)
    return ar[:, None].expand(num_frames, num_frames), ar[None, :].expand(num_frames, num_frames)


@dataclass(frozen=True, eq=False)
class Band:
    """One attention pass.

    Args:
        name: short label used in reports (``"near"``, ``"far-past"``, ``"sink"``...).
        pairs: [F, F] bool, ``pairs[i, j]`` = query frame ``i`` attends key frame ``j`` in this band.
        q_pos: [F] temporal position of query frame ``i`` in this band.
        k_pos: [F] temporal position of key frame ``j`` in this band.
        stripe: if set, only token pairs with ``|s_q - s_k| < stripe`` are attended, where ``s`` is
            the token's raster index inside its frame (``h * W' + w``).
        positive_logit_scale: if set, the positive attention logits of this band's pairs are multiplied
            by it (UltraViCo's decay); negative logits are left as they are. Only the ``reference``
            backend computes such bands.
    """

    name: str
    pairs: Bool[Tensor, "F F"]
    q_pos: Float[Tensor, " F"]
    k_pos: Float[Tensor, " F"]
    stripe: int | None = None
    positive_logit_scale: float | None = None

    def __post_init__(self) -> None:
        f = self.pairs.shape[0]
        if self.pairs.shape != (f, f) or self.pairs.dtype != torch.bool:
            raise ValueError(f"Band {self.name!r}: pairs must be a square bool tensor, got "
                             f"{tuple(self.pairs.shape)} {self.pairs.dtype}")
        if self.q_pos.shape != (f,) or self.k_pos.shape != (f,):
            raise ValueError(f"Band {self.name!r}: q_pos/k_pos must have shape ({f},), got "
                             f"{tuple(self.q_pos.shape)} / {tuple(self.k_pos.shape)}")
        if self.stripe is not None and self.stripe < 1:
            raise ValueError(f"Band {self.name!r}: stripe must be >= 1 token, got {self.stripe}")
        scale = self.positive_logit_scale
        if scale is not None and not (isinstance(scale, (int, float)) and 0 < scale <= 1):
            raise ValueError(f"Band {self.name!r}: positive_logit_scale must be in (0, 1], got {scale!r}")

    @property
    def num_frames(self) -> int:
        return self.pairs.shape[0]

    def is_empty(self) -> bool:
        return not bool(self.pairs.any())

    def relative_distance(self) -> Float[Tensor, "F F"]:
        """``q_pos[i] - k_pos[j]`` for every frame pair (meaningful where ``pairs`` is True)."""
        return self.q_pos[:, None] - self.k_pos[None, :]

    def token_pairs(self, tokens_per_frame: int) -> Bool[Tensor, "N N"]:
        """Token-level mask [F*S, F*S] of this band (materialises N^2: tests and pictures only)."""
        return self.token_pairs_rows(tokens_per_frame, 0, self.num_frames * tokens_per_frame)

    def token_pairs_rows(self, tokens_per_frame: int, start: int, stop: int) -> Bool[Tensor, "rows N"]:
        """Rows ``start:stop`` of ``token_pairs`` (query tokens), without building the other rows."""
        s = tokens_per_frame
        rows, cols = torch.arange(start, stop), torch.arange(self.num_frames * s)
        m = self.pairs[rows // s][:, cols // s]
        if self.stripe is not None:
            m = m & ((rows[:, None] % s - cols[None, :] % s).abs() < self.stripe)
        return m

    def block_counts(self, tokens_per_frame: int, block_size: int) -> tuple[Tensor, Tensor, Tensor]:
        """Per tile [Qb, Kb]: segment pairs with any attended pair, entirely attended, and in all.

        The token axis is cut at frame and block boundaries into segments; each segment pair is
        judged by its frame pair and, for a striped band, by the spatial distance of the segments.
        """
        blk, frm, lo, hi = token_pieces(self.num_frames, tokens_per_frame, block_size)
        allowed = self.pairs[frm[:, None], frm[None, :]]
        if self.stripe is None:
            seg_any = seg_full = allowed
        else:
            gap, span = gap_and_span(lo, hi, lo, hi)
            seg_any = allowed & (gap < self.stripe)
            seg_full = allowed & (span < self.stripe)
        return (count_per_tile(blk, blk, seg_any), count_per_tile(blk, blk, seg_full),
                count_per_tile(blk, blk, torch.ones_like(allowed)))

    def block_table(self, tokens_per_frame: int, block_size: int = 128) -> tuple[Tensor, Tensor]:
        """(any, full) bool tables [Qb, Kb] of this band alone, for a block-sparse kernel."""
        a, f, n = self.block_counts(tokens_per_frame, block_size)
        return a > 0, f == n

    def token_count(self, tokens_per_frame: int) -> int:
        """Number of attended token pairs, computed without materialising N^2."""
        s = tokens_per_frame
        per_frame_pair = s * s
        if self.stripe is not None:
            d = torch.arange(-(s - 1), s)
            per_frame_pair = int(((s - d.abs()) * (d.abs() < self.stripe)).sum())
        return int(self.pairs.sum()) * per_frame_pair


@dataclass(frozen=True, eq=False)
class BandSet:
    """The disjoint bands of one method at one length, and an optional temporal-frequency override."""

    num_frames: int
    bands: tuple[Band, ...]
    t_freqs: Float[Tensor, " t_pairs"] | None = None
    label: str = field(default="")

    def __post_init__(self) -> None:
        seen = torch.zeros(self.num_frames, self.num_frames, dtype=torch.bool)
        for b in self.bands:
            if b.num_frames != self.num_frames:
                raise ValueError(f"Band {b.name!r} has {b.num_frames} frames, the set has {self.num_frames}")
            if bool((seen & b.pairs).any()):
                raise ValueError(f"Band {b.name!r} overlaps an earlier band: bands of one call must be disjoint")
            seen |= b.pairs

    @classmethod
    def plain(cls, num_frames: int, t_freqs: Tensor | None = None, label: str = "plain") -> BandSet:
        """One band over every pair with the original positions (plain RoPE attention)."""
        pos = torch.arange(num_frames, dtype=torch.float64)
        pairs = torch.ones(num_frames, num_frames, dtype=torch.bool)
        return cls(num_frames, (Band("all", pairs, pos, pos),), t_freqs, label)

    def scales_logits(self) -> bool:
        """Whether a band scales its positive logits (``Band.positive_logit_scale``)."""
        return any(b.positive_logit_scale is not None for b in self.bands)

    def is_plain(self) -> bool:
        """True when the set is one band over every pair with the original positions."""
        if len(self.bands) != 1 or self.scales_logits():
            return False
        b = self.bands[0]
        pos = torch.arange(self.num_frames, dtype=b.q_pos.dtype)
        return (b.stripe is None and bool(b.pairs.all()) and torch.equal(b.q_pos, pos)
                and torch.equal(b.k_pos, pos))

    def aligned(self) -> BandSet:
        """The same attention with query positions shared between bands wherever a shift allows.

        A band's positions may be shifted by one constant on both sides (``q_pos + c``, ``k_pos + c``)
        without changing a single relative distance. Each band whose query positions differ from an
        earlier band's by a constant, on the query frames it holds, is shifted to take that band's
        query positions. Backends then rotate the queries once per such group, and the ``flex``
        backend runs one kernel per group (VRPR: near, mid and far; TSA: the local and striped tiers
        together, and the sink).
        """
        out: list[Band] = []
        for b in self.bands:
            rows = b.pairs.any(1)
            new = b
            for a in out:
                d = (a.q_pos - b.q_pos)[rows]
                if d.numel() and bool(((d - d[0]).abs() <= 1e-9).all()):
                    new = Band(b.name, b.pairs, a.q_pos, b.k_pos + d[0], b.stripe, b.positive_logit_scale)
                    break
            out.append(new)
        return BandSet(self.num_frames, tuple(out), self.t_freqs, self.label)

    def frame_pairs(self) -> Bool[Tensor, "F F"]:
        """Frame pairs attended by any band (ignoring stripes)."""
        out = torch.zeros(self.num_frames, self.num_frames, dtype=torch.bool)
        for b in self.bands:
            out |= b.pairs
        return out

    def token_mask(self, tokens_per_frame: int) -> Bool[Tensor, "N N"]:
        """Token-level mask of every attended pair (materialises N^2: tests and pictures only)."""
        n = self.num_frames * tokens_per_frame
        out = torch.zeros(n, n, dtype=torch.bool)
        for b in self.bands:
            out |= b.token_pairs(tokens_per_frame)
        return out

    def token_density(self, tokens_per_frame: int) -> float:
        """Fraction of the N^2 video token pairs that are attended."""
        n = self.num_frames * tokens_per_frame
        return sum(b.token_count(tokens_per_frame) for b in self.bands) / float(n * n)

    def block_table(self, tokens_per_frame: int, block_size: int = 128) -> tuple[Tensor, Tensor]:
        """Which (query block, key block) tiles hold any attended pair, and which are entirely attended.

        Returns two bool tensors [Qb, Kb] (``any``, ``full``), computed from the frame-level tables
        (never from N^2 token pairs); see ``Band.block_table``.
        """
        if not self.bands:
            nb = -(-self.num_frames * tokens_per_frame // block_size)
            none = torch.zeros(nb, nb, dtype=torch.bool)
            return none, none.clone()
        tables = [b.block_counts(tokens_per_frame, block_size) for b in self.bands]
        any_n = sum(t[0] for t in tables)
        full_n = sum(t[1] for t in tables)
        return any_n > 0, full_n == tables[0][2]

    def block_density(self, tokens_per_frame: int, block_size: int = 128) -> float:
        """Fraction of ``block_size`` x ``block_size`` tiles a block-sparse kernel must compute."""
        any_t, _ = self.block_table(tokens_per_frame, block_size)
        return float(any_t.float().mean())


def token_pieces(units: int, tokens_per_unit: int, block_size: int,
                 padded_to: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cut a token axis of ``units`` x ``tokens_per_unit`` tokens (frames or key columns), optionally
    padded to ``padded_to`` tokens, at unit and block boundaries.

    Returns per piece: block index, unit index (``units`` for padding), first and last raster index
    inside the unit (inclusive).
    """
    s = tokens_per_unit
    total = units * s
    end_at = total if padded_to is None else padded_to
    cuts = torch.unique(torch.cat([torch.arange(0, total, s), torch.arange(0, end_at, block_size),
                                   torch.tensor([total, end_at])]))
    start, end = cuts[:-1], cuts[1:] - 1
    unit = torch.where(start < total, start // s, units)
    return start // block_size, unit, start - unit * s, end - unit * s


def gap_and_span(q_lo: Tensor, q_hi: Tensor, k_lo: Tensor, k_hi: Tensor) -> tuple[Tensor, Tensor]:
    """[Q, K] smallest and largest raster distance between query pieces ``[q_lo, q_hi]`` and key pieces
    ``[k_lo, k_hi]``: a stripe of width ``w`` attends some pair where ``w > gap``, every pair where
    ``w > span``."""
    gap = torch.maximum(k_lo[None, :] - q_hi[:, None], q_lo[:, None] - k_hi[None, :]).clamp(min=0)
    span = torch.maximum(q_hi[:, None] - k_lo[None, :], k_hi[None, :] - q_lo[:, None])
    return gap, span


def count_per_tile(q_block: Tensor, k_block: Tensor, x: Tensor) -> Tensor:
    """Sum a [Q pieces, K pieces] table into [Qb, Kb] tiles (pieces from ``token_pieces``)."""
    nqb, nkb = int(q_block[-1]) + 1, int(k_block[-1]) + 1
    idx = (q_block[:, None] * nkb + k_block[None, :]).flatten()
    return torch.zeros(nqb * nkb, dtype=torch.long).index_add_(0, idx, x.flatten().long()).view(nqb, nkb)
