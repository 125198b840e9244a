"""The ``chunked`` backend: exact band attention that computes only what each band needs.

Queries are processed in chunks of whole frames, chosen per band. For each chunk and band, only the
key frames that the band pairs with the chunk's frames are read; a striped band additionally splits
the chunk's queries into spatial sub-blocks and reads, per key frame, only the raster range within
the stripe. A pass's rows and keys are a slice of whole frames or a :class:`Window` (runs of
consecutive frames x one raster range), read as strided views: no gather of token indices.
Each pass is one fused attention call with its LSE; passes are merged online, exactly, in float32.
Memory is bounded by one pass (chunk queries x gathered keys); no [N, N] tensor is ever built, and
the work is proportional to the band's density (up to the frame/sub-block rounding at the edges).
The plan of passes depends only on the band set and the grid, and is cached, and so are the masks
its passes build (per device and dtype, up to :data:`MASK_CACHE_BYTES` per plan).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from ..bands import Band, BandSet
from .kernels import attention_with_lse, prepare_mask, uses_fused_cpu_kernel
from .merge import EMPTY_LSE, merge_into_

__all__ = ["PassPlan", "chunked_band_attention", "plan_cost", "plan_passes"]

#: The planner's cost model, in units of one (query, key, channel) multiply-add (measured on CPU): the
#: fixed overhead of one pass (launch, slicing, merge), the extra cost per masked (query, key) pair.
CALL_COST = 1_000_000
MASK_COST = 4
#: Cost of gathering one token's channel into a pass (a memory copy), per channel.
GATHER_COST = 12
#: Prepared masks a plan keeps between calls (bytes, per plan); past it they are rebuilt on each call.
MASK_CACHE_BYTES = 64 * 2**20


#: A pass's bool mask and its prepared form for the fused CPU kernel (``prepare_mask``), or None.
MaskEntry = tuple[Tensor, tuple[Tensor, Tensor | None] | None]


class PassPlan(tuple):
    """The passes of one band set and grid (a tuple of :class:`Pass`), with the masks they built.

    ``masks`` maps (mask pattern, device, dtype) to ``(bool mask, prepared bias or None)``.
    """

    masks: dict[tuple, MaskEntry]
    mask_bytes: int

    def __new__(cls, passes: list[Pass]) -> PassPlan:
        plan = super().__new__(cls, passes)
        plan.masks, plan.mask_bytes = {}, 0
        return plan

    def mask_for(self, p: Pass, q: Tensor, local: dict[tuple, MaskEntry]) -> MaskEntry:
        """The mask of pass ``p`` for queries like ``q`` (device, dtype) and its prepared form, from the
        plan's cache or ``local`` (this call's)."""
        key = (p.pattern, str(q.device), q.dtype)
        hit = self.masks.get(key) or local.get(key)
        if hit is not None:
            return hit
        m = p.mask(q.device)
        prepared = prepare_mask(m, q.dtype) if uses_fused_cpu_kernel(q) else None
        entry = (m, prepared)
        size = m.numel() * (1 + (0 if prepared is None else prepared[0].element_size()))
        if self.mask_bytes + size <= MASK_CACHE_BYTES:
            self.masks[key] = entry
            self.mask_bytes += size
        else:
            local[key] = entry
        return entry


@dataclass(frozen=True, eq=False)
class Pass:
    """One attention call over video tokens.

    The [rows, keys] mask is kept factored and built only when the pass runs: ``frame_ok``
    [query frames, key frames] (None: all pairs) and ``near`` [raster rows, raster keys] (the stripe
    pattern of one frame pair, shared by every frame pair of the pass; None: no stripe).
    """

    band: int
    rows: slice | Window
    keys: slice | Window
    frame_ok: Tensor | None
    near: Tensor | None
    row_len: int
    key_len: int
    pattern: tuple = ()  # identifies the mask: passes with equal patterns share one mask
    first: bool = False  # no earlier pass touched these rows: write instead of merging

    def __post_init__(self) -> None:
        if self.frame_ok is not None or self.near is not None:
            ok = b"" if self.frame_ok is None else self.frame_ok.numpy().tobytes()
            shape = () if self.frame_ok is None else tuple(self.frame_ok.shape)
            object.__setattr__(self, "pattern", (id(self.near), ok, shape, _length(self.rows), _length(self.keys)))

    def mask(self, device: torch.device) -> Tensor | None:
        m = None
        if self.frame_ok is not None:
            m = self.frame_ok.to(device).repeat_interleave(self.row_len, 0).repeat_interleave(self.key_len, 1)
        if self.near is not None:
            g = (self.frame_ok.shape[0] if self.frame_ok is not None else
                 _length(self.rows) // self.row_len)
            nk = _length(self.keys) // self.key_len
            stripe = self.near.to(device).repeat(g, nk)
            m = stripe if m is None else m & stripe
        return m


@dataclass(frozen=True)
class Window:
    """Tokens of a pass: the same raster range ``[r0, r1)`` in each frame of a few runs of consecutive
    frames, in frame-major order. Read as strided views (a copy with long contiguous runs), never as a
    gather of token indices."""

    runs: tuple[tuple[int, int], ...]  # [first, end) frames
    raster: tuple[int, int]  # [first, end) raster index inside a frame

    def __len__(self) -> int:
        return sum(b - a for a, b in self.runs) * (self.raster[1] - self.raster[0])

    def tokens(self, s: int) -> Tensor:
        frames = torch.cat([torch.arange(a, b) for a, b in self.runs])
        return (frames[:, None] * s + torch.arange(*self.raster)[None, :]).flatten()

    def framed(self, x: Tensor, s: int) -> Tensor:
        """(B, H, F*s, *rest) -> view (B, H, frames, raster, *rest) of the single run (for writing rows)."""
        (a, b), (r0, r1) = self.runs[0], self.raster
        return x.unflatten(2, (-1, s))[:, :, a:b, r0:r1]

    def take(self, x: Tensor, s: int) -> Tensor:
        """(B, H, F*s, D) -> (B, H, len, D): the window's tokens (one copy)."""
        framed = x.unflatten(2, (-1, s))
        parts = [framed[:, :, a:b, self.raster[0]:self.raster[1]] for a, b in self.runs]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        return t.reshape(x.shape[0], x.shape[1], -1, x.shape[-1])


def _window(frames: Tensor, raster: tuple[int, int], s: int) -> slice | Window:
    """Tokens of the given frames (ascending) at this raster range: a slice for whole consecutive frames."""
    cuts = (torch.nonzero(frames[1:] != frames[:-1] + 1).flatten() + 1).tolist()
    bounds = [0, *cuts, len(frames)]
    runs = tuple((int(frames[a]), int(frames[b - 1]) + 1) for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    if len(runs) == 1 and raster == (0, s):
        return slice(runs[0][0] * s, runs[0][1] * s)
    return Window(runs, raster)


def _length(index: slice | Window) -> int:
    return index.stop - index.start if isinstance(index, slice) else len(index)


def _plan_band(band_id: int, band: Band, g: int, s: int, sub_block: int) -> list[Pass]:
    """Passes of one band with query chunks of ``g`` frames (and spatial sub-blocks for a stripe)."""
    passes = []
    stripe_blocks = []
    if band.stripe is not None:
        ds = band.stripe
        for s0 in range(0, s, sub_block):
            s1 = min(s, s0 + sub_block)
            q_raster = torch.arange(s0, s1)
            k_raster = torch.arange(max(0, s0 - ds + 1), min(s, s1 + ds - 1))
            near = (q_raster[:, None] - k_raster[None, :]).abs() < ds
            stripe_blocks.append((q_raster, k_raster, None if bool(near.all()) else near))
    for f0 in range(0, band.num_frames, g):
        f1 = min(band.num_frames, f0 + g)
        rows_pairs = band.pairs[f0:f1]
        key_frames = rows_pairs.any(0).nonzero().flatten()
        if len(key_frames) == 0:
            continue
        sub = rows_pairs[:, key_frames]  # [g, kf]
        frame_ok = None if bool(sub.all()) else sub
        if band.stripe is None:
            passes.append(Pass(band_id, slice(f0 * s, f1 * s), _window(key_frames, (0, s), s), frame_ok, None, s, s))
            continue
        for q_raster, k_raster, near in stripe_blocks:
            rows = _window(torch.arange(f0, f1), (int(q_raster[0]), int(q_raster[-1]) + 1), s)
            keys = _window(key_frames, (int(k_raster[0]), int(k_raster[-1]) + 1), s)
            passes.append(Pass(band_id, rows, keys, frame_ok, near, len(q_raster), len(k_raster)))
    return passes


def _estimate(band: Band, g: int, s: int, sub_block: int, head_dim: int) -> int:
    """Planner cost of :func:`_plan_band` with these choices, without building its masks."""
    f = band.num_frames
    starts = torch.arange(0, f, g)
    # key frames per chunk: union of the chunk rows
    padded = torch.zeros(len(starts) * g, f, dtype=torch.bool)
    padded[:f] = band.pairs
    key_frames = padded.view(len(starts), g, f).any(1).sum(1)
    rows = torch.clamp(f - starts, max=g)
    live = key_frames > 0
    chunk_pairs = padded.view(len(starts), g, f).sum((1, 2))
    gathered = 0
    if band.stripe is None:
        pairs = int((rows * s * key_frames * s)[live].sum())
        calls = int(live.sum())
        masked = int(((rows * key_frames != chunk_pairs) * rows * s * key_frames * s)[live].sum())
    else:
        s0 = torch.arange(0, s, sub_block)
        s1 = torch.clamp(s0 + sub_block, max=s)
        k_len = torch.clamp(s1 + band.stripe - 1, max=s) - torch.clamp(s0 - band.stripe + 1, min=0)
        per_chunk = (s1 - s0) * k_len
        pairs = int(((rows * key_frames)[live, None] * per_chunk[None, :]).sum())
        calls = int(live.sum()) * len(s0)
        masked = pairs
        if sub_block < s:  # strided windows: keys (and values) are gathered, and so are rows when g > 1
            gathered = 2 * int((key_frames[live, None] * k_len[None, :]).sum())
            if g > 1:
                gathered += int(rows[live].sum()) * s
    return (pairs + GATHER_COST * gathered) * head_dim + MASK_COST * masked + CALL_COST * calls


@functools.lru_cache(maxsize=64)
def plan_passes(band_set: BandSet, tokens_per_frame: int, head_dim: int = 128) -> PassPlan:
    """The passes the chunked backend runs for this band set (cached per band-set object).

    Each band gets its own query chunking: the number of frames per chunk (and, for a striped band,
    the spatial sub-block) that minimises computed pairs x head_dim + :data:`CALL_COST` per call.
    """
    s = tokens_per_frame
    f = band_set.num_frames
    out: list[Pass] = []
    for b_id, band in enumerate(band_set.bands):
        frame_options = sorted({g for g in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64) if g <= f} | {1})
        frame_options = [g for g in frame_options if g * s <= max(s, 4096)]
        if band.stripe is None:
            sub_options = [s]
        else:
            sub_options = sorted({max(1, min(s, x)) for x in (band.stripe // 2, band.stripe, 2 * band.stripe,
                                                              4 * band.stripe, s)})
        _, g, sb = min((_estimate(band, g, s, sb, head_dim), g, sb) for g in frame_options for sb in sub_options)
        out.extend(_plan_band(b_id, band, g, s, sb))
    touched = torch.zeros(band_set.num_frames * s, dtype=torch.bool)
    for p in out:
        rows = p.rows if isinstance(p.rows, slice) else p.rows.tokens(s)
        if not bool(touched[rows].any()):
            object.__setattr__(p, "first", True)
        touched[rows] = True
    return PassPlan(out)


def plan_cost(passes: tuple[Pass, ...]) -> int:
    """Number of (query, key) token pairs the passes compute (including masked-out ones)."""
    return sum(_length(p.rows) * _length(p.keys) for p in passes)


def chunked_band_attention(
    qs: list[Float[Tensor, "batch n heads dim"]],
    ks: list[Float[Tensor, "batch n heads dim"]],
    v: Float[Tensor, "batch n heads dim"],
    band_set: BandSet,
    tokens_per_frame: int,
    scale: float,
) -> tuple[Float[Tensor, "batch heads n dim"], Float[Tensor, "batch heads n"]]:
    """Merged attention of every video query over the bands' video keys.

    ``qs[b]``/``ks[b]`` are the queries/keys rotated with band ``b``'s positions, (batch, tokens, heads,
    dim). The passes read each distinct tensor in the head-major layout (batch, heads, tokens, dim), so
    that a pass's rows and keys are views or strided copies there (in A/B runs 0-18% faster than
    slicing token-major tensors per pass; ``benchmarks/RESULTS.md``). :func:`~freeloc.attention.attend`
    writes the band rotations head-major already (seen through a transposed view); other tensors are
    copied once.
    Returns the output (float32) and its LSE, as (batch, heads, tokens, dim) and (batch, heads, tokens).
    """
    b, n, h, d = v.shape
    passes = plan_passes(band_set, tokens_per_frame, d)
    head_major: dict[int, Tensor] = {}  # bands that share a rotation share the tensor, and its copy

    def bhnd(x: Tensor) -> Tensor:
        if id(x) not in head_major:
            head_major[id(x)] = x.transpose(1, 2).contiguous()
        return head_major[id(x)]

    qh, kh, vh = [bhnd(x) for x in qs], [bhnd(x) for x in ks], bhnd(v)
    out = torch.zeros(b, h, n, d, dtype=torch.float32, device=v.device)
    lse = torch.full((b, h, n), EMPTY_LSE, dtype=torch.float32, device=v.device)
    masks: dict[tuple, MaskEntry] = {}  # this call's, past the cache
    s = tokens_per_frame

    def take(x: Tensor, index: slice | Window) -> Tensor:
        return x[:, :, index] if isinstance(index, slice) else index.take(x, s)

    for p in passes:
        q = take(qh[p.band], p.rows)
        mask, prepared = None, None
        if p.pattern:
            mask, prepared = passes.mask_for(p, q, masks)
        o, l_ = attention_with_lse(q, take(kh[p.band], p.keys), take(vh, p.keys), mask, scale, prepared)
        if isinstance(p.rows, slice):
            acc_o, acc_l = out[:, :, p.rows], lse[:, :, p.rows]
        else:  # views of the window's rows, shaped (batch, heads, frames, raster[, dim])
            acc_o, acc_l = p.rows.framed(out, s), p.rows.framed(lse, s)
            o, l_ = o.reshape(acc_o.shape), l_.reshape(acc_l.shape)
        if p.first:
            acc_o.copy_(o)
            acc_l.copy_(l_.clamp_min(EMPTY_LSE))
        else:
            merge_into_(acc_o, acc_l, o.float(), l_)
    lse = lse.masked_fill_(lse <= EMPTY_LSE / 2, float("-inf"))
    return out, lse
