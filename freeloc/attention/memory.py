"""How much memory one ``attend`` call holds at its peak, above its inputs, and how many heads it
processes at once to keep that small.

Every band of a band-split call is per head: the rotations of q and k, the value copies, the running
output and LSE, and the buffers of each pass exist per head. ``attend`` therefore runs the heads in
groups (``AttentionOptions.head_group``), one group's working set alive at a time, each group's output
written into one preallocated output tensor. ``head_group_size`` chooses the group from the shape:
the most heads whose estimated peak (the output and the group's working set, ``working_set``, from the
call's plan) stays within ``PEAK_RATIO`` (1.5) times dense attention's. The same functions give
``estimate_peak``, the memory model of a whole call, which ``freeloc explain --memory`` prints for a
model shape.

What is counted, per head of a group, pass by pass through the chunked backend's plan (its peak is
the largest sum; flex parts count their outputs):

* the rotations of the video queries and keys held: each is computed when a pass first needs it
  (``BandRotations``), one per distinct band position (``Rotations``), and dropped after the last pass
  that reads it (``release_schedule``, where one chunked part reads them alone);
* the values, repeated in one buffer while stacks read the keys of two bands (else read in place);
* the running output in float32, unless it is the output tensor itself (float32 inputs, one video
  part, no text), and the running LSE;
* the pass's own buffers: the rows, keys and values it gathers (strided windows are copied), its
  output and LSE, for the heads one call of it takes (``heads_per_call``: a pass whose buffers exceed
  one rotation of the group runs over a share of the heads at a time);
* with text or several parts: the parts' outputs held until the merge, the merge's float32 result,
  and the text's rotations at the original positions.
* for a method that scales logits (UltraViCo) on the chunked backend: one chunk of query rows' float32
  logits and its scaled temporary (at most ``AttentionOptions.float_logits`` each for the call's samples
  and heads), the float32 output and LSE it writes, and float32 copies of k and v for 2-byte inputs.

Plus the output tensor (the size of ``q``) for the whole call. Dense attention (``method=None``) holds
q and k rotated once and the output: three times ``q``. Kernel workspaces (per thread, a few tiles)
and the masks a plan keeps between calls are not counted.

Examples:
    >>> import torch, freeloc
    >>> from freeloc.attention.memory import estimate_peak
    >>> peaks = estimate_peak(heads=12, head_dim=128, dtype=torch.bfloat16, height=30, width=52, frames=81,
    ...                       trained_frames=21)
    >>> sorted(peaks)
    ['dense', 'tsa', 'vrpr']
    >>> peaks["tsa"].bytes < 1.5 * peaks["dense"].bytes
    True
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..bands import BandSet
from ..methods import Method
from ..rotary import RotaryLayout
from ._passes import Stack, heads_per_call, pass_bytes, release_schedule
from ._planning import AttentionPlan, ChunkedPart, DensePart, FlexPart, ReferencePart, ScaledPart, plan_attention
from ._scaled import chunk_rows
from .options import DEFAULT_OPTIONS, AttentionOptions

__all__ = ["METHODS", "Peak", "estimate_peak", "head_group_size", "working_set"]

#: The methods ``estimate_peak`` models.
METHODS = ("dense", "tsa", "vrpr")
_WIDE = 4  # bytes of the float32 running output, LSEs and merges


def _stack_bytes(p: Stack, plan: AttentionPlan, head_dim: int, size: int) -> int:
    """Bytes per (sample, head) that one stack call allocates while it runs: its output and LSE, the
    float32 copy a merge reads of 2-byte outputs, the merge weights."""
    rows = p.num_frames * plan.tokens_per_frame
    merge = rows * head_dim * _WIDE if size < _WIDE else 0
    return rows * head_dim * size + merge + 2 * rows * _WIDE


class _Rotations:
    """Counts the rotations ``BandRotations`` holds, as passes ask for them and ``release_schedule``
    drops them (same sharing rules)."""

    def __init__(self, plan: AttentionPlan, rotary: bool):
        self.rot, self.rotary = plan.rotations, rotary
        self.done: dict[tuple[str, int], int] = {}  # per rotation: tensors it counts
        self.buffers: dict[tuple[int, ...], int] = {}
        self.count = 0  # tensors of video tokens x head dim

    def _source(self, side: str, i: int) -> int:
        return 0 if not self.rotary else (self.rot.q_source if side == "q" else self.rot.k_source)[i]

    def _into(self, side: str, i: int, slot: bool) -> None:
        key = (side, self._source(side, i))
        if key not in self.done:
            self.done[key] = 0 if slot or (not self.rotary and not self.rot.head_major) else 1
            self.count += self.done[key]

    def buffer(self, group: tuple[int, ...]) -> None:
        if group not in self.buffers:
            self.buffers[group] = len(group)
            self.count += len(group)
            for i in group:
                self._into("k", i, True)

    def q(self, i: int) -> None:
        self._into("q", i, False)

    def k(self, i: int) -> None:
        src = self._source("k", i)
        group = next((g for g in self.rot.key_buffers if any(j == i or self._source("k", j) == src for j in g)), None)
        if group is not None:
            self.buffer(group)
        else:
            self._into("k", i, False)

    def release(self, side: str, bands: tuple[int, ...]) -> None:
        for i in bands:
            self.count -= self.done.pop((side, self._source(side, i)), 0)
        if side == "k":
            for group in [g for g in self.buffers if set(g) <= set(bands)]:
                self.count -= self.buffers.pop(group)


@functools.lru_cache(maxsize=256)
def working_set(plan: AttentionPlan, heads: int, head_dim: int, dtype: torch.dtype, rotary: bool = True, *,
                batch: int = 1, float_logits: int = DEFAULT_OPTIONS.float_logits) -> int:
    """Bytes one sample of a band-split call over a group of ``heads`` heads holds at its peak (module
    docstring), for a plan of ``plan_attention``; the output tensor of the whole call is not included.
    The chunked backend is followed pass by pass: the rotations held (written when first read, dropped
    after the last read), the repeated values until their last stack, the pass's own buffers (for the
    share of the heads one call of it takes, ``heads_per_call``). A method that scales logits
    (``ScaledPart``) on the chunked backend holds one chunk of query rows' logits and its scaled
    temporary, at most ``float_logits`` each for the call's ``batch`` samples and heads together."""
    size = torch.empty((), dtype=dtype).element_size()
    f, s = plan.grid[0], plan.tokens_per_frame
    nv = f * s
    n = plan.text_before + nv + plan.text_after
    row = nv * head_dim * size  # one rotation, or one copy of the values
    text = plan.text_before + plan.text_after > 0
    video_parts = [p for p in plan.parts if isinstance(p, (ChunkedPart, FlexPart, ScaledPart))]
    chunked = [part.passes for part in video_parts if isinstance(part, ChunkedPart)]
    flex_outputs = sum(len(part.groups) if isinstance(part, FlexPart) else 1 for part in video_parts
                       if isinstance(part, (FlexPart, ScaledPart)))
    held = len(chunked) + flex_outputs  # outputs held until the merge
    in_place = held == 1 and bool(chunked) and not text and size == _WIDE
    fixed = 0  # held from the start of the video parts to the merge
    if text:  # q and k at the original positions (the video rows over the text keys run after the parts)
        fixed += 2 * n * head_dim * size
    rotations = _Rotations(plan, rotary)
    releases: dict[int, list[tuple[str, tuple[int, ...]]]] = {}
    if len(video_parts) == 1 and chunked:  # as attend: a single chunked part drops what it has read
        rot, count = plan.rotations, len(plan.bands.bands)
        sources = (rot.q_source, rot.k_source) if rotary else ((0,) * count, (0,) * count)
        releases = release_schedule(chunked[0], *sources, rot.key_buffers)
    peak = 0
    done_outputs = 0  # outputs of finished parts, held for the merge
    for passes in chunked:
        acc = (0 if in_place else nv * head_dim * _WIDE) + nv * _WIDE
        joined = [i for i, p in enumerate(passes) if isinstance(p, Stack) and len(p.key_bands) > 1]
        reps = max((len(passes[i].key_bands) for i in joined), default=0)
        for i, p in enumerate(passes):
            if isinstance(p, Stack):
                rotations.q(p.band)
                if len(p.key_bands) > 1:
                    rotations.buffer(p.key_bands)
                else:
                    rotations.k(p.key_bands[0])
                own = heads * _stack_bytes(p, plan, head_dim, size)
            else:
                rotations.q(p.band)
                rotations.k(p.band)
                per_head = pass_bytes(p, s, head_dim, size)
                own = heads_per_call(per_head, row, heads) * per_head
            values = reps * row if joined and i <= joined[-1] else 0
            peak = max(peak, heads * (fixed + done_outputs + acc + rotations.count * row + values) + own)
            for side, bands in releases.get(i, ()):
                rotations.release(side, bands)
        done_outputs += acc
    if flex_outputs:  # the flex parts read every rotation
        for b in range(len(plan.bands.bands)):
            rotations.q(b)
            rotations.k(b)
        if plan.backend == "chunked" and any(isinstance(p, ScaledPart) for p in video_parts):
            rows = chunk_rows(nv, batch * heads, float_logits)
            logits = 2 * heads * rows * nv * max(size, _WIDE)  # per sample: the chunk and its scaled temporary
            running = nv * (head_dim * max(size, _WIDE) + _WIDE)  # the float output and LSE being written
            if size < _WIDE:  # the float32 copies of k and v
                running += 2 * nv * head_dim * _WIDE
            peak = max(peak, heads * (fixed + done_outputs + rotations.count * row + running) + logits)
        done_outputs += flex_outputs * nv * (head_dim * size + _WIDE)
    merged = fixed + done_outputs + rotations.count * row
    if held > 1 or text:  # the merge's float32 result and a temporary of its size
        merged += 2 * nv * head_dim * _WIDE
    if text:  # the video rows over the text keys
        merged += nv * (head_dim * size + _WIDE)
    if not in_place and size != _WIDE and held == 1 and not text:  # the float32 output in q's dtype
        merged += row
    return max(peak, heads * merged)


#: ``head_group="auto"`` takes the most heads whose estimated peak (the output and one group's working
#: set) stays within this many times dense attention's (q and k rotated, the output, the LSE).
PEAK_RATIO = 1.5


def _dense_bytes(n: int, heads: int, head_dim: int, size: int) -> int:
    """Estimated peak of plain attention over ``n`` tokens, per sample: q and k rotated once, the output,
    the float32 LSE."""
    return 3 * n * heads * head_dim * size + heads * n * _WIDE


def head_group_size(plan: AttentionPlan, batch: int, heads: int, head_dim: int, dtype: torch.dtype,
                    options: AttentionOptions, rotary: bool = True) -> int:
    """Heads per group of a call with this plan: all of them for plain attention and the reference
    backend; ``options.head_group`` where it is an int; for ``"auto"``, the most heads whose estimated
    peak (the output and the group's ``working_set``) stays within ``PEAK_RATIO`` times dense
    attention's, at least one.

    Examples:
        >>> import torch, freeloc
        >>> from freeloc.attention import band_set_for
        >>> from freeloc.attention._planning import plan_attention
        >>> q = torch.empty(1, 81 * 156, 12, 64, device="meta")
        >>> bands = band_set_for(freeloc.TSA(cap=20), 81, 156, freeloc.RotaryLayout.wan(64))
        >>> plan = plan_attention(q, bands, (81, 12, 13), 0, 0, "chunked", freeloc.AttentionOptions())
        >>> head_group_size(plan, 1, 12, 64, torch.float32, freeloc.AttentionOptions())
        12
    """
    if isinstance(plan.parts[0], (DensePart, ReferencePart)):
        return heads
    if options.head_group != "auto":
        return min(heads, int(options.head_group))
    size = torch.empty((), dtype=dtype).element_size()
    n = plan.text_before + plan.grid[0] * plan.tokens_per_frame + plan.text_after
    budget = PEAK_RATIO * _dense_bytes(n, heads, head_dim, size) - n * heads * head_dim * size  # less the output
    fits = [g for g in range(1, heads + 1)
            if working_set(plan, g, head_dim, dtype, rotary, batch=batch, float_logits=options.float_logits) <= budget]
    return max(fits, default=1)


@dataclass(frozen=True)
class Peak:
    """``estimate_peak``'s figure for one method: ``bytes`` above the inputs at the call's peak,
    ``head_group`` heads at a time (all of them for dense attention), ``groups`` groups."""

    method: str
    bytes: int
    head_group: int
    groups: int

    @property
    def mib(self) -> float:
        return self.bytes / 2**20


def _method(name: str, frames: int, trained_frames: int) -> Method | None:
    from ..patterns import TSA
    from ..positions import VRPR

    if name == "dense":
        return None
    if name == "tsa":
        return TSA(cap=trained_frames - 1)
    if name == "vrpr":
        return VRPR.for_length(frames, trained_frames)
    raise ValueError(f"method must be one of {METHODS}, got {name!r}")


def estimate_peak(*, heads: int, head_dim: int, dtype: torch.dtype, height: int, width: int, frames: int,
                  trained_frames: int, text_tokens: int = 0, batch: int = 1, methods: tuple[str, ...] = METHODS,
                  options: AttentionOptions = DEFAULT_OPTIONS) -> dict[str, Peak]:
    """Estimated peak memory of one ``attend`` call above its inputs (q, k, v), on the ``chunked``
    backend, for each of ``methods`` (``"dense"``: ``method=None``; ``"tsa"``: ``TSA(cap=trained - 1)``;
    ``"vrpr"``: ``VRPR.for_length(frames, trained_frames)``), with a Wan-style rotary layout.

    Args:
        heads: attention heads; head_dim: channels per head; dtype: of q, k, v.
        height: tokens per frame along the height after patching; width: along the width (Wan 2.1 480p:
            30 x 52).
        frames: latent frames of the video tokens; trained_frames: the model's trained length (latent).
        text_tokens: non-video tokens in the same sequence (before the video).
        batch: samples per call.
        methods: which of ``METHODS`` to model.
        options: the options of the call (``head_group`` among them).

    Returns:
        ``{method: Peak}``: bytes, heads per group, groups.

    Examples:
        >>> import torch
        >>> p = estimate_peak(heads=2, head_dim=64, dtype=torch.float32, height=6, width=10, frames=81,
        ...                   trained_frames=21, methods=("dense", "vrpr"))
        >>> p["vrpr"].head_group, round(p["vrpr"].bytes / p["dense"].bytes, 1)
        (1, 1.8)
    """
    for label, value in (("heads", heads), ("head_dim", head_dim), ("height", height), ("width", width),
                         ("frames", frames), ("trained_frames", trained_frames), ("batch", batch)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{label} must be an int >= 1, got {value!r}")
    if not isinstance(text_tokens, int) or isinstance(text_tokens, bool) or text_tokens < 0:
        raise ValueError(f"text_tokens must be an int >= 0, got {text_tokens!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    from . import band_set_for

    size = torch.empty((), dtype=dtype).element_size()
    grid = (frames, height, width)
    n = text_tokens + frames * height * width
    q_bytes = batch * n * heads * head_dim * size
    rotary = RotaryLayout.wan(head_dim)
    q = torch.empty(batch, n, heads, head_dim, dtype=dtype, device="meta")
    out: dict[str, Peak] = {}
    for name in methods:
        bands: BandSet = band_set_for(_method(name, frames, trained_frames), frames, height * width, rotary)
        plan = plan_attention(q, bands, grid, text_tokens, 0, "chunked", options)
        if isinstance(plan.parts[0], DensePart):  # q and k rotated once, the output
            out[name] = Peak(name, batch * _dense_bytes(n, heads, head_dim, size), heads, 1)
            continue
        g = head_group_size(plan, batch, heads, head_dim, dtype, options)
        work = working_set(plan, g, head_dim, dtype, batch=batch, float_logits=options.float_logits)
        out[name] = Peak(name, q_bytes + batch * work, g, -(-heads // g))
    return out
