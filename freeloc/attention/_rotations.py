"""Rotating q and k as a plan's ``Rotations`` say.

Each rotation is one pass over q or k (``rotate_split``): the height and
width pairs at their places, the temporal pairs at the original positions or at one band's, from cos/sin
tables as small as their angles allow (one row per frame for the temporal pairs, one row per place in
a frame for the spatial ones), cached per device. Where the small steps are compiled
(``AttentionOptions.compile_steps``) each rotation is one kernel that writes straight into its target,
a head-major buffer or a slot of a key buffer, with no temporary.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from typing import overload

import torch
from jaxtyping import Float
from torch import Tensor

from ..bands import BandSet
from ..rotary import RotaryLayout
from ._fused import compiles_on, on_device, write_into
from ._planning import AttentionPlan
from .options import AttentionOptions

__all__ = ["BandRotations", "HeadMajor", "KeyBuffers", "cos_sin", "rotate_bands", "rotate_original"]

# the rotation as written, for compiled calls: a run-time type-checking wrapper is not traceable
_ROTATE_SPLIT = inspect.unwrap(RotaryLayout.rotate_split)


@functools.lru_cache(maxsize=64)
def _spatial_positions(height: int, width: int) -> tuple[Tensor, Tensor]:
    """Per place in a frame (raster order): height position, width position (float64)."""
    h = torch.arange(height, dtype=torch.float64).repeat_interleave(width)
    w = torch.arange(width, dtype=torch.float64).repeat(height)
    return h, w


@functools.lru_cache(maxsize=32)
def cos_sin(bands: BandSet, band: int | None, side: str, grid: tuple[int, int, int], rotary: RotaryLayout,
            device: str) -> tuple[Tensor, Tensor]:
    """RoPE cos/sin tables of one part of the rotation, for ``RotaryLayout.rotate_split`` (which
    broadcasts them over the frame-major tokens).

    ``band=-1``: the height and width pairs, one row per place in a frame ``[1, S, s_pairs]``; otherwise
    the temporal pairs, one row per frame ``[F, 1, t_pairs]``: at the original positions (``band=None``,
    the frame index) or at band ``b``'s query (``side="q"``) or key positions.
    """
    f, hh, ww = grid
    if band == -1:
        h_pos, w_pos = _spatial_positions(hh, ww)
        cos, sin = rotary.spatial_cos_sin(h_pos, w_pos)
        return cos[None].to(device), sin[None].to(device)
    if band is None:
        pos = torch.arange(f, dtype=torch.float64)
    else:
        pos = (bands.bands[band].q_pos if side == "q" else bands.bands[band].k_pos).to(torch.float64)
    cos, sin = rotary.temporal_cos_sin(pos, bands.t_freqs)
    return cos[:, None].to(device), sin[:, None].to(device)


def _empty_head_major(x: Tensor) -> Tensor:
    """A new tensor shaped like ``x`` (B, N, H, D), laid out head-major (a transposed view)."""
    b, n, h, d = x.shape
    return x.new_empty(b, h, n, d).transpose(1, 2)


def _rotate(x: Tensor, temporal: tuple[Tensor, Tensor] | None, spatial: tuple[Tensor, Tensor],
            rotary: RotaryLayout, options: AttentionOptions, target: Tensor | None = None) -> Tensor:
    """The full rotation of ``x`` in one pass (``temporal`` None: the temporal pairs left as they are),
    written into ``target`` (else a new tensor)."""
    dev = x.device
    if torch.is_grad_enabled() and x.requires_grad:  # recorded for autograd: eager and out of place
        return rotary.rotate_split(x, temporal, spatial, out=target)
    if compiles_on(dev, options):  # one compiled kernel, written where asked
        if target is not None:
            return on_device(write_into, dev, options)(_ROTATE_SPLIT, target, rotary, x, temporal, spatial)
        return on_device(RotaryLayout.rotate_split, dev, options)(rotary, x, temporal, spatial)
    # eager: fewer passes with out= than without
    return rotary.rotate_split(x, temporal, spatial, out=target if target is not None else torch.empty_like(x))


def rotate_original(plan: AttentionPlan, x: Float[Tensor, "batch seq heads dim"], rotary: RotaryLayout | None,
                    options: AttentionOptions) -> Float[Tensor, "batch seq heads dim"]:
    """Every token of ``x`` at its original positions: the video tokens rotated, the text left as it is."""
    grid = plan.grid
    video = slice(plan.text_before, plan.text_before + grid[0] * grid[1] * grid[2])
    if rotary is None:
        return x
    dev = str(x.device)
    xv = _rotate(x[:, video], cos_sin(plan.bands, None, "q", grid, rotary, dev),
                 cos_sin(plan.bands, -1, "q", grid, rotary, dev), rotary, options)
    return xv if video.stop - video.start == x.shape[1] else torch.cat([x[:, :video.start], xv, x[:, video.stop:]],
                                                                        dim=1)


class BandRotations:
    """The video queries and keys rotated at each band's positions, each rotation computed when first
    asked for (so that a call holds only the rotations its passes have reached), written where ``plan``
    says.

    ``q(b)`` / ``k(b)``: (B, Nv, H, D), views of head-major buffers where the plan asks for them (bands
    that share a rotation share the tensor); ``buffer(group)``: for a group of the plan's
    ``key_buffers``, its bands' key rotations one after the other, (B, H, len * Nv, D) (asking for one
    band of a group writes the whole group). ``requires_grad``: whether the rotations are recorded for
    autograd.
    """

    def __init__(self, plan: AttentionPlan, q: Float[Tensor, "batch nv heads dim"],
                 k: Float[Tensor, "batch nv heads dim"], rotary: RotaryLayout | None, options: AttentionOptions):
        self.plan, self.rotary, self.options = plan, rotary, options
        self.x = {"q": q, "k": k}
        self.requires_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        self.done: dict[tuple[str, int], Tensor] = {}  # per (side, source band): its rotation
        self.slots: dict[int, Tensor] = {}  # per band of a key buffer: its slot
        self.buffers: dict[tuple[int, ...], Tensor] = {}

    def _source(self, side: str, i: int) -> int:
        rot = self.plan.rotations
        if self.rotary is None:  # no RoPE: positions are not part of the logits, every band reads x itself
            return 0
        return (rot.q_source if side == "q" else rot.k_source)[i]

    def _into(self, side: str, i: int, target: Tensor | None) -> Tensor:
        rot, x = self.plan.rotations, self.x[side]
        src = self._source(side, i)
        if (side, src) in self.done:
            done = self.done[(side, src)]
            return done if target is None else target.copy_(done)
        if target is None and rot.head_major:
            target = _empty_head_major(x)
        if self.rotary is None:
            result = x if target is None else target.copy_(x)
        else:
            dev = str(x.device)
            turns = rot.q_temporal if side == "q" else rot.k_temporal
            spatial = cos_sin(self.plan.bands, -1, "q", self.plan.grid, self.rotary, dev)
            temporal = cos_sin(self.plan.bands, src, side, self.plan.grid, self.rotary, dev) if turns[src] else None
            result = _rotate(x, temporal, spatial, self.rotary, self.options, target)
        self.done[(side, src)] = result
        return result

    def release(self, side: str, bands: tuple[int, ...]) -> None:
        """Drop the rotations of ``bands`` on ``side`` (a unit of ``release_schedule``: no later pass reads
        them); a band asked for again is rotated again."""
        for i in bands:
            self.done.pop((side, self._source(side, i)), None)
            if side == "k":
                self.slots.pop(i, None)
        if side == "k":
            for group in [g for g in self.buffers if set(g) <= set(bands)]:
                del self.buffers[group]

    def buffer(self, group: tuple[int, ...]) -> Tensor:
        """The key buffer of ``group`` (one of the plan's ``key_buffers``), written on first use."""
        if group not in self.buffers:
            x = self.x["k"]
            b, n, h, d = x.shape
            buf = x.new_empty(b, h, len(group) * n, d)
            for r, i in enumerate(group):
                self.slots.setdefault(i, self._into("k", i, buf[:, :, r * n:(r + 1) * n].transpose(1, 2)))
            self.buffers[group] = buf
        return self.buffers[group]

    def q(self, i: int) -> Tensor:
        return self._into("q", i, None)

    def k(self, i: int) -> Tensor:
        src = self._source("k", i)
        for group in self.plan.rotations.key_buffers:  # a buffer holds this band's keys, or its rotation's
            if any(j == i or self._source("k", j) == src for j in group):
                self.buffer(group)
                break
        return self.slots[i] if i in self.slots else self._into("k", i, None)


def rotate_bands(
    plan: AttentionPlan,
    q: Float[Tensor, "batch nv heads dim"],
    k: Float[Tensor, "batch nv heads dim"],
    rotary: RotaryLayout | None,
    options: AttentionOptions,
) -> tuple[list[Tensor], list[Tensor], dict[tuple[int, ...], Tensor]]:
    """Every rotation of ``BandRotations`` at once: ``(qs, ks, key_buffers)``, ``qs[b]`` / ``ks[b]``
    (B, Nv, H, D) and ``key_buffers`` by group."""
    rotations = BandRotations(plan, q, k, rotary, options)
    buffers = {group: rotations.buffer(group) for group in plan.rotations.key_buffers}
    count = len(plan.bands.bands)
    return [rotations.q(i) for i in range(count)], [rotations.k(i) for i in range(count)], buffers


class HeadMajor:
    """``rotations``' queries (``side="q"``) or keys, each (B, H, Nv, D), computed when first read.

    A sequence by its methods, not by type: a run-time type checker samples the items of a ``Sequence``,
    which would rotate them out of the plan's order."""

    def __init__(self, rotations: BandRotations, side: str):
        self.rotations, self.side = rotations, side
        self.requires_grad = rotations.requires_grad

    def __len__(self) -> int:
        return len(self.rotations.plan.bands.bands)

    @overload
    def __getitem__(self, i: int) -> Tensor: ...

    @overload
    def __getitem__(self, i: slice) -> list[Tensor]: ...

    def __getitem__(self, i: int | slice) -> Tensor | list[Tensor]:
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        if not 0 <= i < len(self):
            raise IndexError(f"band {i} of {len(self)}")
        x = self.rotations.q(i) if self.side == "q" else self.rotations.k(i)
        return x.transpose(1, 2)

    def release(self, bands: tuple[int, ...]) -> None:
        """``BandRotations.release`` on this side."""
        self.rotations.release(self.side, bands)


class KeyBuffers:
    """``rotations``' key buffers by group of the plan's ``key_buffers``, each written when first read (a
    mapping by its methods, not by type, as ``HeadMajor`` is a sequence)."""

    def __init__(self, rotations: BandRotations):
        self.rotations = rotations

    def __getitem__(self, group: tuple[int, ...]) -> Tensor:
        if group not in self.rotations.plan.rotations.key_buffers:
            raise KeyError(group)
        return self.rotations.buffer(group)

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        return iter(self.rotations.plan.rotations.key_buffers)

    def __len__(self) -> int:
        return len(self.rotations.plan.rotations.key_buffers)

    def items(self) -> Iterator[tuple[tuple[int, ...], Tensor]]:
        return ((group, self[group]) for group in self)
