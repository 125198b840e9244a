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

import torch
from jaxtyping import Float
from torch import Tensor

from ..bands import BandSet
from ..rotary import RotaryLayout
from ._fused import compiles_on, on_device, write_into
from ._planning import AttentionPlan
from .options import AttentionOptions

__all__ = ["cos_sin", "rotate_bands", "rotate_original"]

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


def rotate_bands(
    plan: AttentionPlan,
    q: Float[Tensor, "batch nv heads dim"],
    k: Float[Tensor, "batch nv heads dim"],
    rotary: RotaryLayout | None,
    options: AttentionOptions,
) -> tuple[list[Tensor], list[Tensor], dict[tuple[int, ...], Tensor]]:
    """The video queries ``q`` and keys ``k`` rotated at each band's positions, written where ``plan``
    says: ``(qs, ks, key_buffers)``.

    ``qs[b]`` / ``ks[b]``: (B, Nv, H, D), views of head-major buffers where the plan asks for them (bands
    that share a rotation share the tensor); ``key_buffers``: per group of the plan's ``key_buffers``, its
    bands' key rotations one after the other, (B, H, len * Nv, D).
    """
    rot = plan.rotations
    bands = plan.bands
    dev = str(q.device)

    def per_band(x: Tensor, side: str) -> tuple[list[Tensor], dict[tuple[int, ...], Tensor]]:
        source = rot.q_source if side == "q" else rot.k_source
        turns = rot.q_temporal if side == "q" else rot.k_temporal
        if rotary is None:  # no RoPE: positions are not part of the logits, every band reads x itself
            source = (0,) * len(source)
        done: dict[int, Tensor] = {}  # per source band: its rotation

        def into(i: int, target: Tensor | None) -> Tensor:
            src = source[i]
            if src in done:
                return done[src] if target is None else target.copy_(done[src])
            if target is None and rot.head_major:
                target = _empty_head_major(x)
            if rotary is None:
                done[src] = x if target is None else target.copy_(x)
            else:
                spatial = cos_sin(bands, -1, "q", plan.grid, rotary, dev)
                temporal = cos_sin(bands, src, side, plan.grid, rotary, dev) if turns[src] else None
                done[src] = _rotate(x, temporal, spatial, rotary, options, target)
            return done[src]

        buffers: dict[tuple[int, ...], Tensor] = {}
        slots: dict[int, Tensor] = {}
        if side == "k":  # keys a stack reads as one buffer: written into it, slot by slot
            b, n, h, d = x.shape
            for group in rot.key_buffers:
                buf = x.new_empty(b, h, len(group) * n, d)
                for r, i in enumerate(group):
                    slots.setdefault(i, into(i, buf[:, :, r * n:(r + 1) * n].transpose(1, 2)))
                buffers[group] = buf
        return [slots[i] if i in slots else into(i, None) for i in range(len(bands.bands))], buffers

    qs, _ = per_band(q, "q")
    ks, buffers = per_band(k, "k")
    return qs, ks, buffers
