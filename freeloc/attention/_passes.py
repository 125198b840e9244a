"""The chunked backend's planner: which calls compute a band set's pairs, chosen by a cost model.

Queries are processed in chunks of whole frames, chosen per band. For each chunk and band, only the
key frames that the band pairs with the chunk's frames are read; a striped band additionally splits
the chunk's queries into spatial sub-blocks and reads, per key frame, only the raster range within
the stripe; the sub-blocks away from the frame edges (same shape, same stripe pattern) run as the
batch of one call. A pass's rows and keys are a slice of whole frames or a ``Window`` (runs of
consecutive frames x one raster range), read as strided views: no gather of token indices.
Where a band's (or two bands') key frames form a window that slides one frame per query frame (VRPR's
and TSA's near tiers, VRPR's far tiers read from one buffer of their two key rotations), the frames
run as one ``Stack``: one fused call whose batch entries are the query frames, each reading its
window as an overlapping strided view. The rest of the band is planned in passes as above.

The plan depends only on the band set, the grid, the head dim and the options' cost model
(``AttentionOptions``: ``call_cost``, ``mask_cost``, ``gather_cost``,
``batch_keys``, ``stacking``), and is cached. Running it is ``freeloc.attention._chunked``'s job.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
from jaxtyping import Bool
from torch import Tensor

from ..bands import Band, BandSet
from .options import DEFAULT_OPTIONS, AttentionOptions

__all__ = ["Pass", "PassPlan", "Stack", "Window", "heads_per_call", "key_groups", "pass_bytes", "pass_tokens",
           "plan_cost", "plan_passes", "plan_stacks", "release_schedule"]

#: A pass's bool mask and its prepared form for a fused kernel, or None.
MaskEntry = tuple[Tensor, tuple[Tensor, Tensor | None] | None]


class PassPlan(tuple):
    """The stacks and passes of one band set and grid (a tuple of ``Stack`` and ``Pass``).

    ``masks`` holds the masks the chunked backend built for its passes, by (mask pattern, device,
    dtype): ``(bool mask, prepared bias or None)``, up to ``mask_bytes``; the plan is cached, so they
    are built once per plan.
    """

    masks: dict[tuple, MaskEntry]
    mask_bytes: int

    def __new__(cls, passes: list[Pass | Stack]) -> PassPlan:
        plan = super().__new__(cls, passes)
        plan.masks, plan.mask_bytes = {}, 0
        return plan


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
            ok = () if self.frame_ok is None else tuple(self.frame_ok.flatten().tolist())
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
    gather of token indices.

    ``blocks > 1``: that many such windows, each ``step`` raster positions after the previous one, read
    together as the batch of one kernel call (a striped band's spatial sub-blocks away from the frame
    edges, which all have the same shape and stripe pattern).
    """

    runs: tuple[tuple[int, int], ...]  # [first, end) frames
    raster: tuple[int, int]  # [first, end) raster index inside a frame (of the first block)
    blocks: int = 1
    step: int = 0

    def __len__(self) -> int:
        """Tokens of one block."""
        return sum(b - a for a, b in self.runs) * (self.raster[1] - self.raster[0])

    def tokens(self, s: int) -> Tensor:
        frames = torch.cat([torch.arange(a, b) for a, b in self.runs])
        raster = (torch.arange(*self.raster)[None, :] + self.step * torch.arange(self.blocks)[:, None]).flatten()
        return (frames[:, None] * s + raster[None, :]).flatten()

    def _view(self, x: Tensor, s: int, run: tuple[int, int]) -> Tensor:
        """(B, H, F*s, *rest) -> view (blocks, B, H, frames of the run, raster, *rest)."""
        (a, b), (r0, r1) = run, self.raster
        sb, sh, st, *rest = x.stride()
        return x.as_strided((self.blocks, x.shape[0], x.shape[1], b - a, r1 - r0, *x.shape[3:]),
                            (self.step * st, sb, sh, s * st, st, *rest), x.storage_offset() + (a * s + r0) * st)

    def framed(self, x: Tensor, s: int) -> Tensor:
        """(B, H, F*s, *rest) -> view (B, H, frames, raster, *rest) of the single run (for writing rows);
        with blocks, (blocks, B, H, frames, raster, *rest)."""
        view = self._view(x, s, self.runs[0])
        return view[0] if self.blocks == 1 else view

    def take(self, x: Tensor, s: int) -> Tensor:
        """(B, H, F*s, D) -> (B, H, len, D): the window's tokens (one copy); with blocks,
        (blocks, B*H, len, D)."""
        parts = [self._view(x, s, run) for run in self.runs]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=3)
        if self.blocks == 1:
            return t[0].reshape(x.shape[0], x.shape[1], -1, x.shape[-1])
        return t.reshape(self.blocks, x.shape[0] * x.shape[1], -1, x.shape[-1])


@dataclass(frozen=True, eq=False)
class Stack:
    """Consecutive query frames ``frames = [f0, f1)`` in one call, one batch entry per frame: frame ``i``
    attends the ``length`` key frames that start at frame ``i + offset`` of the concatenation of the key
    rotations of ``key_bands`` (frame ``x`` of it is frame ``x % F`` of band ``key_bands[x // F]``).

    The entries are overlapping strided views of the query and key tensors (no copy), and the call has
    no mask: every pair of every window belongs to the stack's bands. (On the CPU flash kernel an entry
    may take several query frames over their joined window, masked per row: ``_chunked.frames_per_entry``.)
    """

    band: int  # the query rotation
    key_bands: tuple[int, ...]
    frames: tuple[int, int]
    offset: int
    length: int
    rows: slice  # the query tokens, frames[0] * S .. frames[1] * S
    first: bool = False

    @property
    def num_frames(self) -> int:
        return self.frames[1] - self.frames[0]


def key_groups(plan: PassPlan) -> list[tuple[int, ...]]:
    """Bands whose rotated keys a stack of ``plan`` reads as one buffer, in that order (their rotations
    are written one after the other into one head-major buffer)."""
    return sorted({p.key_bands for p in plan if isinstance(p, Stack) and len(p.key_bands) > 1})


@functools.lru_cache(maxsize=64)
def release_schedule(plan: tuple[Pass | Stack, ...], q_source: tuple[int, ...], k_source: tuple[int, ...],
                     key_buffers: tuple[tuple[int, ...], ...]) -> dict[int, list[tuple[str, tuple[int, ...]]]]:
    """When each rotation is read for the last time: after pass (or stack) ``i`` of ``plan``, the
    ``(side, bands)`` whose rotations no later pass reads. ``bands`` is a unit of storage: on the query
    side the bands that share one rotation (``q_source``), on the key side those that share one rotation
    (``k_source``) or one key buffer (``key_buffers``), so that a unit is freed whole. Cached per plan
    (every call of a plan runs the same schedule); callers only read the result."""
    n = len(q_source)
    out: dict[int, list[tuple[str, tuple[int, ...]]]] = {}
    for side, source in (("q", q_source), ("k", k_source)):
        unit = list(range(n))  # union-find over bands

        def find(i: int, unit: list[int] = unit) -> int:
            while unit[i] != i:
                i = unit[i]
            return i

        links = [(i, j) for i in range(n) for j in range(n) if source[i] == source[j]]
        if side == "k":
            links += [(g[0], j) for g in key_buffers for j in g]
        for i, j in links:
            unit[find(i)] = find(j)
        last: dict[int, int] = {}
        for index, p in enumerate(plan):
            read = (p.band,) if side == "q" or isinstance(p, Pass) else p.key_bands
            for b in read:
                last[find(b)] = index
        for root, index in last.items():
            out.setdefault(index, []).append((side, tuple(b for b in range(n) if find(b) == root)))
    return out


def pass_tokens(p: Pass, tokens_per_frame: int) -> tuple[int, int]:
    """(rows, gathered tokens) of one pass per (sample, head): the query rows it computes and the tokens
    it copies (strided windows: its rows, and its keys and values)."""
    blocks = p.rows.blocks if isinstance(p.rows, Window) else 1
    rows = _length(p.rows) * blocks
    keys = _length(p.keys) * blocks
    gathered = (rows if isinstance(p.rows, Window) else 0) + (2 * keys if isinstance(p.keys, Window) else 0)
    return rows, gathered


def pass_bytes(p: Pass, tokens_per_frame: int, head_dim: int, size: int) -> int:
    """Bytes per (sample, head) that one pass allocates while it runs (``size``: bytes per element of
    q): what it gathers, its output and LSE, the float32 copy a merge reads of 2-byte outputs, the merge
    weights."""
    rows, gathered = pass_tokens(p, tokens_per_frame)
    wide = 4  # float32 LSEs and merges
    merge = rows * head_dim * wide if size < wide else 0
    return (gathered + rows) * head_dim * size + merge + 2 * rows * wide


def heads_per_call(pass_bytes: int, rotation_bytes: int, heads: int) -> int:
    """Heads one call of a pass takes: all ``heads`` where the pass's own buffers (``pass_bytes`` per
    head) fit in one rotation of them (``rotation_bytes`` per head), else as many as fit, at least one."""
    return max(1, min(heads, heads * rotation_bytes // max(1, pass_bytes)))


def _window(frames: Tensor, raster: tuple[int, int], s: int, blocks: int = 1, step: int = 0) -> slice | Window:
    """Tokens of the given frames (ascending) at this raster range: a slice for whole consecutive frames."""
    cuts = (torch.nonzero(frames[1:] != frames[:-1] + 1).flatten() + 1).tolist()
    bounds = [0, *cuts, len(frames)]
    runs = tuple((int(frames[a]), int(frames[b - 1]) + 1) for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    if len(runs) == 1 and raster == (0, s) and blocks == 1:
        return slice(runs[0][0] * s, runs[0][1] * s)
    return Window(runs, raster, blocks, step)


def _length(index: slice | Window) -> int:
    return index.stop - index.start if isinstance(index, slice) else len(index)


def _chunked_pairs(band: Band, g: int) -> Bool[Tensor, "chunks g frames"]:
    """The band's frame pairs by query chunk of ``g`` frames (the last chunk padded with no pairs)."""
    f = band.num_frames
    chunks = -(-f // g)
    padded = torch.zeros(chunks * g, f, dtype=torch.bool)
    padded[:f] = band.pairs
    return padded.view(chunks, g, f)


def _blocks_per_call(key_frames: int, key_len: int, batch_keys: int) -> int:
    """How many of a striped band's interior sub-blocks one call takes (``AttentionOptions.batch_keys``)."""
    return max(1, batch_keys // max(1, key_frames * key_len))


def _plan_band(band_id: int, band: Band, g: int, s: int, sub_block: int, batch_keys: int) -> list[Pass]:
    """Passes of one band with query chunks of ``g`` frames (and spatial sub-blocks for a stripe)."""
    passes = []
    stripe_blocks = []  # (first query raster, query length, first key raster, key length, blocks, near)
    if band.stripe is not None:
        ds = band.stripe
        batch = _blocks_per_call(int(_chunked_pairs(band, g).any(1).sum(1).max()), sub_block + 2 * ds - 2, batch_keys)
        for s0 in range(0, s, sub_block):
            s1 = min(s, s0 + sub_block)
            k0, k1 = max(0, s0 - ds + 1), min(s, s1 + ds - 1)
            prev = stripe_blocks[-1] if stripe_blocks else None
            if (prev is not None and prev[4] < batch and (s1 - s0, k1 - k0) == (prev[1], prev[3])
                    and k0 - prev[2] == s0 - prev[0] == prev[4] * sub_block):
                stripe_blocks[-1] = (*prev[:4], prev[4] + 1, prev[5])  # same shape and stripe, shifted: one call
                continue
            near = (torch.arange(s0, s1)[:, None] - torch.arange(k0, k1)[None, :]).abs() < ds
            stripe_blocks.append((s0, s1 - s0, k0, k1 - k0, 1, None if bool(near.all()) else near))
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
        for q0, q_len, k0, k_len, blocks, near in stripe_blocks:
            rows = _window(torch.arange(f0, f1), (q0, q0 + q_len), s, blocks, sub_block)
            keys = _window(key_frames, (k0, k0 + k_len), s, blocks, sub_block)
            passes.append(Pass(band_id, rows, keys, frame_ok, near, q_len, k_len))
    return passes


def _estimate(band: Band, g: int, s: int, sub_block: int, head_dim: int, options: AttentionOptions) -> int:
    """Planner cost of ``_plan_band`` with these choices, without building its masks."""
    f = band.num_frames
    starts = torch.arange(0, f, g)
    chunked = _chunked_pairs(band, g)
    key_frames = chunked.any(1).sum(1)  # key frames per chunk: union of the chunk rows
    rows = torch.clamp(f - starts, max=g)
    live = key_frames > 0
    chunk_pairs = chunked.sum((1, 2))
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
        # interior sub-blocks (whole, window inside the frame) run in batches of one call each
        full = sub_block + 2 * band.stripe - 2
        interior = int(((s1 - s0 == sub_block) & (k_len == full) & (s0 >= band.stripe - 1)).sum())
        batch = _blocks_per_call(int(key_frames.max()), full, options.batch_keys)
        calls = int(live.sum()) * (len(s0) - interior + -(-interior // batch))
        masked = pairs
        if sub_block < s:  # strided windows: keys (and values) are gathered, and so are rows when g > 1
            gathered = 2 * int((key_frames[live, None] * k_len[None, :]).sum())
            if g > 1:
                gathered += int(rows[live].sum()) * s
    return ((pairs + options.gather_cost * gathered) * head_dim + options.mask_cost * masked
            + options.call_cost * calls)


def _band_cost(band: Band, s: int, head_dim: int, options: AttentionOptions) -> tuple[int, int, int]:
    """(planner cost, frames per chunk, sub-block) of the cheapest passes for ``band`` (0 for no pairs)."""
    f = band.num_frames
    if band.is_empty():
        return 0, 1, s
    frame_options = sorted({g for g in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64) if g <= f} | {1})
    frame_options = [g for g in frame_options if g * s <= max(s, 4096)]
    if band.stripe is None:
        sub_options = [s]
    else:
        sub_options = sorted({max(1, min(s, x)) for x in (band.stripe // 2, band.stripe, 2 * band.stripe,
                                                          4 * band.stripe, s)})
    return min((_estimate(band, g, s, sb, head_dim, options), g, sb) for g in frame_options for sb in sub_options)


def _largest_window(keys: Bool[Tensor, "frames keys"]) -> tuple[int, int, int, int, int]:
    """The stack that covers the most pairs of ``keys`` [F, M] (query frame x key frame still to do):
    ``(frame pairs, f0, f1, offset, length)`` with ``keys[i, i + offset : i + offset + length]`` all
    True for every ``i`` in ``[f0, f1)``: a largest rectangle under the histograms of window lengths
    (one per offset), found by window width."""
    f, m = keys.shape
    run = torch.zeros(f, m + 1, dtype=torch.int32)  # consecutive True from each column on
    for x in range(m - 1, -1, -1):
        run[:, x] = (run[:, x + 1] + 1) * keys[:, x]
    i = torch.arange(f)
    c = torch.arange(-(f - 1), m)
    x = i[None, :] + c[:, None]  # [C, F]
    r = torch.where((x >= 0) & (x < m), run[i[None, :].expand_as(x), x.clamp(0, m)], 0)
    best = (0, 0, 0, 0, 0)
    low = r  # low[:, i0] = min of r over query frames [i0, i0 + w)
    for w in range(1, f + 1):
        if w > 1:
            low = torch.minimum(low[:, :-1], r[:, w - 1:])
        top = int(low.max())
        if top * w > best[0]:
            flat = int(low.argmax())
            ci, i0 = flat // low.shape[1], flat % low.shape[1]
            best = (top * w, i0, i0 + w, int(c[ci]), top)
        elif top * f <= best[0]:  # no wider window can beat it
            break
    return best


def _stack_combos(bands: list[Band]) -> tuple[list[int], list[tuple[int, ...]]]:
    """The unstriped bands with pairs, and the stack candidates among them: each alone, and each ordered
    pair with the same query positions (their keys read from one buffer of both rotations)."""
    plain = [b for b, band in enumerate(bands) if band.stripe is None and not band.is_empty()]
    return plain, [(b,) for b in plain] + [(a, b) for a in plain for b in plain
                                            if a != b and torch.equal(bands[a].q_pos, bands[b].q_pos)]


def _window_pairs(f: int, keys: int, f0: int, f1: int, offset: int, length: int) -> Bool[Tensor, "f keys"]:
    """[query frame, key column] pairs of the stack over frames [f0, f1) with this window."""
    i = torch.arange(f)[:, None]
    x = torch.arange(keys)[None, :]
    return (i >= f0) & (i < f1) & (x >= i + offset) & (x < i + offset + length)


def _stack_candidate(combo: tuple[int, ...], bands: list[Band], cost: dict[int, int], s: int,
                     head_dim: int, options: AttentionOptions) -> tuple | None:
    """The largest stack of these bands' remaining pairs, if it lowers the planner's cost:
    ``(gain, combo, remaining bands, their costs, (f0, f1, offset, length))``."""
    f = bands[combo[0]].num_frames
    keys = torch.cat([bands[b].pairs for b in combo], dim=1)
    area, f0, f1, off, length = _largest_window(keys)
    if area == 0:
        return None
    covered = _window_pairs(f, keys.shape[1], f0, f1, off, length)
    left = {b: Band(bands[b].name, bands[b].pairs & ~covered[:, n * f:(n + 1) * f], bands[b].q_pos,
                    bands[b].k_pos) for n, b in enumerate(combo)}
    left_cost = {b: _band_cost(band, s, head_dim, options)[0] for b, band in left.items()}
    copy = options.gather_cost * 2 * len(combo) * f * s * head_dim if len(combo) > 1 else 0  # its key/value buffer
    gain = sum(cost[b] - left_cost[b] for b in combo) - (area * s * s * head_dim + options.call_cost + copy)
    return (gain, combo, left, left_cost, (f0, f1, off, length)) if gain > 0 else None


def _stacks(band_set: BandSet, s: int, head_dim: int, options: AttentionOptions) -> tuple[list[Stack], list[Band]]:
    """The stacks worth running (greedy, while the planner's cost goes down), and each band's pairs that
    remain for passes. Candidates: each unstriped band alone, and each ordered pair of unstriped bands
    with the same query positions (their keys read from one buffer of both rotations)."""
    bands = list(band_set.bands)
    if not options.stacking:
        return [], bands
    plain, combos = _stack_combos(bands)
    cost = {b: _band_cost(bands[b], s, head_dim, options)[0] for b in plain}
    stacks: list[Stack] = []
    found: dict[tuple[int, ...], tuple | None] = {}  # per combo (gain, ...), until one of its bands changes
    while True:
        for combo in combos:
            if combo not in found:
                found[combo] = _stack_candidate(combo, bands, cost, s, head_dim, options)
        live = [(v[0], n, v) for n, v in enumerate(found[c] for c in combos) if v is not None]
        if not live:
            break
        _, _, (_, combo, left, left_cost, (f0, f1, off, length)) = max(live)
        stacks.append(Stack(combo[0], combo, (f0, f1), off, length, slice(f0 * s, f1 * s)))
        for b in combo:
            bands[b], cost[b] = left[b], left_cost[b]
        found = {k: v for k, v in found.items() if not set(k) & set(combo)}
    return stacks, bands


@functools.lru_cache(maxsize=64)
def plan_passes(band_set: BandSet, tokens_per_frame: int, head_dim: int = 128,
                options: AttentionOptions = DEFAULT_OPTIONS) -> PassPlan:
    """The stacks and passes the chunked backend runs for this band set (cached per band-set object).

    First the stacks (``_stacks``); then each band's remaining pairs get their own query chunking:
    the number of frames per chunk (and, for a striped band, the spatial sub-block) that minimises
    computed pairs x head_dim + ``options.call_cost`` per call (the cost model of ``AttentionOptions``).
    """
    s = tokens_per_frame
    stacks, bands = _stacks(band_set, s, head_dim, options)
    out: list[Pass | Stack] = list(stacks)
    for b_id, band in enumerate(bands):
        if band.is_empty():
            continue
        _, g, sb = _band_cost(band, s, head_dim, options)
        out.extend(_plan_band(b_id, band, g, s, sb, options.batch_keys))
    _mark_first(out, band_set.num_frames, s)
    return PassPlan(out)


def _mark_first(out: list[Pass | Stack], num_frames: int, s: int) -> None:
    """Flag each pass or stack that is the first to touch its rows (it writes instead of merging)."""
    touched = torch.zeros(num_frames * s, dtype=torch.bool)
    for p in out:
        rows = p.rows if isinstance(p.rows, slice) else p.rows.tokens(s)
        if not bool(touched[rows].any()):
            object.__setattr__(p, "first", True)
        touched[rows] = True


def _largest_rectangle(pairs: Bool[Tensor, "frames keys"], min_rows: int) -> tuple[int, int, int, int, int]:
    """The largest all-True block of ``pairs`` (consecutive query frames x consecutive key frames) with at
    least ``min_rows`` rows: ``(frame pairs, f0, f1, k0, k1)``, area 0 if none (largest rectangle under
    the per-row histograms of consecutive True columns going up)."""
    rows = pairs.tolist()
    m = len(rows[0]) if rows else 0
    height = [0] * m
    best = (0, 0, 0, 0, 0)
    for r, row in enumerate(rows):
        height = [h + 1 if ok else 0 for h, ok in zip(height, row, strict=True)]
        stack: list[tuple[int, int]] = []  # (first column, height), heights increasing
        for c, h in enumerate([*height, 0]):
            start = c
            while stack and stack[-1][1] >= h:
                start, top = stack.pop()
                if top >= min_rows and top * (c - start) > best[0]:
                    best = (top * (c - start), r + 1 - top, r + 1, start, c)
            stack.append((start, h))
    return best


@functools.lru_cache(maxsize=64)
def plan_stacks(band_set: BandSet, tokens_per_frame: int, min_frames: int = 8,
                small_blocks: int = 64) -> tuple[PassPlan, BandSet | None]:
    """The band set's sliding key windows as stacks, and what they leave (None: nothing).

    Largest first (in frame pairs), over each unstriped band alone and each pair of unstriped bands with
    the same query positions (keys read from one buffer of both rotations, as ``plan_passes`` does),
    while the largest spans at least ``min_frames`` query frames; then, per unstriped band, the largest
    blocks of consecutive query frames x consecutive key frames (TSA's sink: every frame past ``D2`` x
    frame 0) of at least ``min_frames`` query frames, as unmasked passes; then, if at most
    ``small_blocks`` smaller blocks cover every pair the unstriped bands
    have left (TSA: the staircases of its dense tier at the first and last frames, 14 blocks; VRPR at 81
    frames: 44), those too, so that the rest holds only the striped bands. No cost model: for a caller
    that runs them on a fused dense kernel and the rest elsewhere (``AttentionOptions.unstriped``).
    The rest is ``band_set`` with those pairs removed, band indices unchanged.
    """
    s = tokens_per_frame
    f = band_set.num_frames
    bands = list(band_set.bands)
    plain, combos = _stack_combos(bands)
    stacks: list[Pass | Stack] = []
    while combos:
        best = max((_largest_window(torch.cat([bands[b].pairs for b in c], dim=1)), c) for c in combos)
        (area, f0, f1, off, length), combo = best
        if area == 0 or f1 - f0 < min_frames:
            break
        covered = _window_pairs(f, len(combo) * f, f0, f1, off, length)
        for n, b in enumerate(combo):
            bands[b] = replace(bands[b], pairs=bands[b].pairs & ~covered[:, n * f:(n + 1) * f])
        stacks.append(Stack(combo[0], combo, (f0, f1), off, length, slice(f0 * s, f1 * s)))
    for b in plain:
        while True:
            area, f0, f1, k0, k1 = _largest_rectangle(bands[b].pairs, min_frames)
            if area == 0:
                break
            pairs = bands[b].pairs.clone()
            pairs[f0:f1, k0:k1] = False
            bands[b] = replace(bands[b], pairs=pairs)
            stacks.append(Pass(b, slice(f0 * s, f1 * s), slice(k0 * s, k1 * s), None, None, s, s))
    limit = small_blocks
    small: list[Pass | Stack] = []
    left = {b: bands[b].pairs.clone() for b in plain}
    for b in plain:
        while len(small) <= limit:
            area, f0, f1, k0, k1 = _largest_rectangle(left[b], 1)
            if area == 0:
                break
            left[b][f0:f1, k0:k1] = False
            small.append(Pass(b, slice(f0 * s, f1 * s), slice(k0 * s, k1 * s), None, None, s, s))
    if len(small) <= limit:
        stacks += small
        for b in plain:
            bands[b] = replace(bands[b], pairs=left[b])
    _mark_first(stacks, f, s)
    rest = None if all(b.is_empty() for b in bands) else BandSet(f, tuple(bands), band_set.t_freqs,
                                                                    f"{band_set.label} (after stacks)")
    return PassPlan(stacks), rest


def plan_cost(passes: tuple[Pass | Stack, ...], tokens_per_frame: int) -> int:
    """Number of (query, key) token pairs the passes compute (including masked-out ones)."""
    s = tokens_per_frame
    return sum(p.num_frames * s * p.length * s if isinstance(p, Stack) else
               _length(p.rows) * _length(p.keys) * (p.rows.blocks if isinstance(p.rows, Window) else 1)
               for p in passes)
