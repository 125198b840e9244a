"""Band-split self-attention, merged exactly by log-sum-exp.

:func:`attend` is the one entry point: give it q, k, v **before** RoPE, the video token grid, a
method (:class:`~freeloc.VRPR`, :class:`~freeloc.TSA`, :class:`~freeloc.SlidingWindow`, a
baseline, or ``None`` for plain RoPE attention) and the model's :class:`~freeloc.RotaryLayout`.
Three backends compute the same numbers:

* ``reference``: dense masked softmax over [N, N] (tests; N <= 8192);
* ``chunked``: exact, computes only the key frames each band needs, memory bounded by a chunk
  (default on CPU; it runs on CUDA too, but there its masked calls for TSA's stripe are slow: 0.38 s
  for the striped tier at the Wan 1.3B shape on an H100, against 0.037 s on ``flex``);
* ``flex``: ``flex_attention`` with block masks from frame-level tables (default on CUDA; there the
  sliding windows of the bands without a stripe run on the fused dense kernel instead,
  :data:`freeloc.attention.flex.UNSTRIPED`).

Example:
    >>> import torch, freeloc
    >>> q, k, v = (torch.randn(1, 30 * 6, 2, 24) for _ in range(3))
    >>> out = freeloc.attention.attend(q, k, v, grid=(30, 2, 3), method=freeloc.VRPR.for_length(30, 13),
    ...                                rotary=freeloc.RotaryLayout.wan(24))
    >>> out.shape
    torch.Size([1, 180, 2, 24])
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.nn.functional as F  # noqa: N812
from jaxtyping import Bool, Float
from torch import Tensor

from ..bands import BandSet
from ..methods import Method
from ..rotary import RotaryLayout
from .chunked import chunked_band_attention, key_groups, plan_stacks
from .flex import flex_band_parts, split_striped, unstriped_mode
from .fused import compiles_on, on_device, write_into
from .merge import merge_lse, merge_outputs
from .options import BACKENDS, AttentionOptions
from .reference import MAX_TOKENS, reference_attention

__all__ = ["attend", "AttentionOptions", "BACKENDS", "MAX_TOKENS", "band_set_for", "merge_lse"]




@functools.lru_cache(maxsize=128)
def band_set_for(method: Method | None, num_frames: int, tokens_per_frame: int,
                 rotary: RotaryLayout | None) -> BandSet:
    """The (cached) band set of ``method`` at this grid; ``None`` gives plain attention."""
    if method is None:
        return BandSet.plain(num_frames)
    if not isinstance(method, Method):
        raise TypeError(f"method must be a freeloc method (VRPR, TSA, SlidingWindow, PI, NTK, YaRN, RIFLEx) "
                        f"or None, got {type(method).__name__}")
    return method.band_set(num_frames, tokens_per_frame, rotary)


@functools.lru_cache(maxsize=128)
def _aligned(bands: BandSet) -> BandSet:
    return bands.aligned()


def _check_grid(grid: object) -> tuple[int, int, int]:
    ok = (isinstance(grid, (tuple, list)) and len(grid) == 3
          and all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid))
    if not ok:
        raise ValueError(f"grid must be (frames, height, width) of positive ints (video tokens), got {grid!r}")
    f, h, w = grid  # type: ignore[misc]
    return int(f), int(h), int(w)


@functools.lru_cache(maxsize=64)
def _spatial_positions(num_frames: int, height: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per video token (frame-major): frame index, height position, width position (float64)."""
    f = torch.arange(num_frames, dtype=torch.float64).repeat_interleave(height * width)
    h = torch.arange(height, dtype=torch.float64).repeat_interleave(width).repeat(num_frames)
    w = torch.arange(width, dtype=torch.float64).repeat(num_frames * height)
    return f, h, w


@functools.lru_cache(maxsize=32)
def _cos_sin(bands: BandSet, band: int | None, side: str, grid: tuple[int, int, int], rotary: RotaryLayout,
             device: str) -> tuple[Tensor, Tensor]:
    """RoPE cos/sin tables of one part of the rotation, as small as its angles allow (for
    :meth:`RotaryLayout.rotate_split`, which broadcasts them over the frame-major tokens).

    ``band=-1``: the height and width pairs, one row per place in a frame ``[1, S, s_pairs]``; otherwise
    the temporal pairs, one row per frame ``[F, 1, t_pairs]``: at the original positions (``band=None``,
    the frame index) or at band ``b``'s query (``side="q"``) or key positions.
    """
    f, hh, ww = grid
    if band == -1:
        _, h_pos, w_pos = _spatial_positions(1, hh, ww)
        cos, sin = rotary.spatial_cos_sin(h_pos, w_pos)
        return cos[None].to(device), sin[None].to(device)
    if band is None:
        pos = torch.arange(f, dtype=torch.float64)
    else:
        pos = (bands.bands[band].q_pos if side == "q" else bands.bands[band].k_pos).to(torch.float64)
    cos, sin = rotary.temporal_cos_sin(pos, bands.t_freqs)
    return cos[:, None].to(device), sin[:, None].to(device)


# the rotation as written, for compiled calls: a run-time type-checking wrapper is not traceable
_ROTATE_SPLIT = inspect.unwrap(RotaryLayout.rotate_split)


def attend(
    q: Float[Tensor, "batch seq heads dim"],
    k: Float[Tensor, "batch seq heads dim"],
    v: Float[Tensor, "batch seq heads dim"],
    *,
    grid: tuple[int, ...],
    method: Method | None,
    rotary: RotaryLayout | None,
    backend: str = "auto",
    text_before: int = 0,
    text_after: int = 0,
    text_mask: Bool[Tensor, "batch text"] | None = None,
    scale: float | None = None,
    options: AttentionOptions | None = None,
) -> Float[Tensor, "batch seq heads dim"]:
    """Self-attention with a temporal-position or attention-pattern method, merged exactly by LSE.

    Args:
        q: (batch, seq, heads, head_dim) **before** RoPE; seq = text_before + F*H'*W' + text_after.
        k: keys, shaped like ``q``, before RoPE.
        v: values, shaped like ``q``.
        grid: ``(F, H', W')`` of the video tokens (frame-major order ``f*H'*W' + h*W' + w``).
        method: a method object, or ``None`` for plain RoPE attention over all pairs.
        rotary: the model's rotary layout (which channels are temporal, pairing, theta); ``None`` for a
            model without RoPE: nothing is rotated and only attention-pattern methods apply (TSA,
            sliding window; their band positions have no effect).
        backend: ``"auto"`` (``flex`` on CUDA, ``chunked`` elsewhere), ``"reference"``, ``"chunked"``, ``"flex"``.
        text_before: number of non-video tokens before the video tokens. They are not rotated (their
            own positions are left as they are), attend every token and are attended by every token,
            densely, with the original positions of the video tokens.
        text_after: number of non-video tokens after the video tokens, treated like ``text_before``'s.
        text_mask: (batch, text_before + text_after) bool, False for text tokens that no query may
            attend (prompt padding), in sequence order; None: every text token is attended.
        scale: softmax scale, default ``1 / sqrt(head_dim)``.
        options: tuning settings (:class:`AttentionOptions`); None: the defaults.

    Returns:
        (batch, seq, heads, head_dim) in ``q``'s dtype.
    """
    if options is not None and not isinstance(options, AttentionOptions):
        raise TypeError(f"options must be a freeloc.AttentionOptions or None, got {type(options).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if rotary is not None and not isinstance(rotary, RotaryLayout):
        raise TypeError(f"rotary must be a freeloc.RotaryLayout or None (no RoPE), got {type(rotary).__name__}")
    f, hh, ww = _check_grid(grid)
    s = hh * ww
    nv = f * s
    for label, value in (("text_before", text_before), ("text_after", text_after)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{label} must be an int >= 0, got {value!r}")
    n = text_before + nv + text_after
    if q.ndim != 4 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"q, k, v must have the same shape (batch, seq, heads, dim), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] != n:
        raise ValueError(f"seq length of q is {q.shape[1]}, but text_before + F*H'*W' + text_after = "
                         f"{text_before} + {f}*{hh}*{ww} + {text_after} = {n}")
    if text_mask is not None and (text_mask.dtype != torch.bool
                                  or tuple(text_mask.shape) != (q.shape[0], text_before + text_after)):
        raise ValueError(f"text_mask must be a bool tensor of shape (batch, text tokens) = "
                         f"({q.shape[0]}, {text_before + text_after}), got {tuple(text_mask.shape)} {text_mask.dtype}")
    if rotary is not None and q.shape[-1] != rotary.head_dim:
        raise ValueError(f"head_dim of q is {q.shape[-1]}, the rotary layout has {rotary.head_dim} channels")
    if backend == "auto":
        backend = "flex" if q.device.type == "cuda" else "chunked"
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale

    if rotary is None and isinstance(method, Method) and method.changes_positions:
        raise ValueError(f"{type(method).__name__} changes temporal positions, but rotary=None (a model without "
                         f"RoPE): only attention-pattern methods apply (TSA, SlidingWindow) or method=None")
    bands = band_set_for(method, f, s, rotary)
    if backend != "reference":  # the reference keeps each band's own positions (the tests' check of this)
        bands = _aligned(bands)
    video = slice(text_before, text_before + nv)
    dev = q.device

    # the part the chunked backend's fused calls run beside flex (flex.UNSTRIPED), before the rotations
    mode = unstriped_mode(q) if backend == "flex" else None
    # the layout the chunked passes read: rotations are written in it
    head_major = backend == "chunked" or mode in ("stacks", "chunked")
    fused = compiles_on(dev)  # rotations compiled into one kernel each

    def rot(x: Tensor, band: int | None, side: str = "q", layout_for_passes: bool = False,
            target: Tensor | None = None) -> Tensor:
        """The full rotation in one pass over ``x``: the spatial pairs at their places, the temporal pairs at
        the original positions (``band=None``), at temporal position 0 (``-1``: left as they are) or at band
        ``band``'s positions on this ``side``; written into ``target``, else head-major where the chunked
        passes read it (``layout_for_passes``), else into a new tensor."""
        if rotary is None:  # no RoPE: positions are not part of the logits
            return x
        grid = (f, hh, ww)
        spatial = _cos_sin(bands, -1, "q", grid, rotary, str(dev))
        temporal = None if band == -1 else _cos_sin(bands, band, side, grid, rotary, str(dev))
        if target is None and layout_for_passes:
            target = empty_head_major(x)
        if fused:  # one compiled kernel, written where asked
            if target is not None:
                return on_device(write_into, dev)(_ROTATE_SPLIT, target, rotary, x, temporal, spatial)
            return on_device(RotaryLayout.rotate_split, dev)(rotary, x, temporal, spatial)
        # eager: fewer passes with out= than without
        return rotary.rotate_split(x, temporal, spatial, out=target if target is not None else torch.empty_like(x))

    def empty_head_major(x: Tensor) -> Tensor:
        b_, n_, h_, d_ = x.shape
        return x.new_empty(b_, h_, n_, d_).transpose(1, 2)

    def rot_bands(x: Tensor, side: str) -> list[Tensor]:
        if rotary is None:
            return [x] * len(bands.bands)
        # each band's full rotation straight from x; bands with the same positions on this side (TSA's
        # local and striped tiers) share one, and temporal position 0 everywhere (TSA's sink keys) is the
        # spatial rotation alone
        slots: dict[int, Tensor] = {}  # keys the chunked backend reads as one buffer: written into one
        if head_major and side == "k":
            b_, n_, h_, d_ = x.shape
            for group in key_groups(bands, s, d_):
                if not slots.keys() & set(group):
                    buf = x.new_empty(b_, h_, len(group) * n_, d_)
                    slots.update({i: buf[:, :, r * n_:(r + 1) * n_].transpose(1, 2) for r, i in enumerate(group)})
        out: list[Tensor] = []
        for i, band in enumerate(bands.bands):
            pos = band.q_pos if side == "q" else band.k_pos
            same = next((j for j, other in enumerate(bands.bands[:i])
                         if torch.equal(pos, other.q_pos if side == "q" else other.k_pos)), None)
            if same is not None:
                out.append(out[same])
            else:
                out.append(rot(x, i if bool(pos.any()) else -1, side, head_major, slots.get(i)))
        return out

    def orig_all(x: Tensor) -> Tensor:
        xv = rot(x[:, video], None)
        return torch.cat([x[:, :text_before], xv, x[:, video.stop:]], dim=1) if n != nv else xv

    def bhsd(x: Tensor) -> Tensor:
        return x.transpose(1, 2)

    key_mask = None  # [batch, 1, 1, seq] for the text tokens' padding, when given
    if text_mask is not None:
        key_mask = torch.cat([text_mask[:, :text_before], torch.ones(q.shape[0], nv, dtype=torch.bool,
                              device=dev), text_mask[:, text_before:]], dim=1).to(dev)[:, None, None, :]

    if bands.is_plain() and backend != "reference":
        qo, ko = orig_all(q), orig_all(k)
        out = F.scaled_dot_product_attention(bhsd(qo), bhsd(ko), bhsd(v), attn_mask=key_mask, scale=scale)
        return out.transpose(1, 2)

    qs = rot_bands(q[:, video], "q")
    ks = rot_bands(k[:, video], "k")
    v_all = bhsd(v)

    if backend == "reference":
        out = reference_attention(bhsd(orig_all(q)), bhsd(orig_all(k)), v_all, [bhsd(x) for x in qs],
                                  [bhsd(x) for x in ks], bands, s, video, scale, key_mask)
        return out.transpose(1, 2)
    if backend == "chunked":
        out_v, lse_v = chunked_band_attention(qs, ks, v[:, video], bands, s, scale)
    else:
        # flex, with a part left to the chunked backend's fused dense calls (flex.UNSTRIPED)
        dense_plan = None
        if mode == "chunked":
            dense_part, flex_part = split_striped(bands, s)
        elif mode == "stacks":
            dense_plan, flex_part = plan_stacks(bands, s)
            dense_part = bands if dense_plan else None
        else:
            dense_part, flex_part = None, bands
        # every part's outputs by frame (B, H, F, S, D), merged once, in one kernel on CUDA
        outs: list[Tensor] = []
        lses: list[Tensor] = []
        if dense_part is not None:
            out_c, lse_c = chunked_band_attention(qs, ks, v[:, video], dense_part, s, scale, dense_plan)
            outs.append(out_c.unflatten(2, (f, s)))
            lses.append(lse_c.unflatten(2, (f, s)))
        if flex_part is not None:
            out_f, lse_f = flex_band_parts([bhsd(x) for x in qs], [bhsd(x) for x in ks], v_all[:, :, video],
                                           flex_part, s, scale)
            outs += out_f
            lses += lse_f
        if n == nv:  # no text to merge next: the merged output straight in q's dtype
            out = outs[0].to(q.dtype) if len(outs) == 1 else on_device(merge_outputs, dev)(outs, lses, q.dtype)
            return out.flatten(2, 3).transpose(1, 2)
        out_v, lse_v = (outs[0], lses[0]) if len(outs) == 1 else on_device(merge_lse, dev)(outs, lses)
        out_v, lse_v = out_v.flatten(2, 3), lse_v.flatten(2, 3)
    if n == nv:
        return out_v.to(q.dtype).transpose(1, 2)

    # text tokens: dense, original positions
    qo, ko = bhsd(orig_all(q)), bhsd(orig_all(k))
    text_keys = torch.cat([ko[:, :, :text_before], ko[:, :, video.stop:]], dim=2)
    text_vals = torch.cat([v_all[:, :, :text_before], v_all[:, :, video.stop:]], dim=2)
    from .kernels import attention_with_lse

    text_key_mask = None if text_mask is None else text_mask.to(dev)[:, None, None, :].expand(-1, 1, nv, -1)
    out_t, lse_t = attention_with_lse(qo[:, :, video], text_keys, text_vals, text_key_mask, scale)
    out_v, _ = merge_lse([out_v, out_t], [lse_v, lse_t])
    pieces = [out_v.to(q.dtype)]
    if text_before:
        pieces.insert(0, F.scaled_dot_product_attention(qo[:, :, :text_before], ko, v_all, attn_mask=key_mask,
                                                        scale=scale))
    if text_after:
        pieces.append(F.scaled_dot_product_attention(qo[:, :, video.stop:], ko, v_all, attn_mask=key_mask,
                                                     scale=scale))
    return torch.cat(pieces, dim=2).transpose(1, 2)
