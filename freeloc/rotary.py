"""Rotary layouts: which head channels carry the temporal, height and width rotations.

A 3D RoPE splits each attention head's channels into three parts, one per axis, and rotates
channel pairs of each part by ``position * frequency``. Models differ in the sizes of the parts,
in theta, and in how channels are paired:

* **interleaved** pairs ``(2j, 2j + 1)`` (Wan, HunyuanVideo, CogVideoX, Open-Sora's ``EmbedND``);
  the parts are consecutive blocks of channels in the order t, h, w;
* **rotate-half** pairs ``(j, j + D/2)`` (Open-Sora 2.0 with the Liger RoPE kernel); the D/2 pair
  frequencies are laid out in the order t, h, w along the first half.

Frequencies of pair ``m`` of a part of size ``d`` follow the usual 1D RoPE,
``theta ** (-2m / d)``.

Examples:
    >>> import torch
    >>> layout = RotaryLayout.wan(head_dim=128)
    >>> (layout.t_dim, layout.h_dim, layout.w_dim)
    (44, 42, 42)
    >>> x = torch.randn(1, 6, 2, 128)                     # (batch, tokens, heads, head_dim)
    >>> t = torch.tensor([0., 0., 0., 1., 1., 1.])       # temporal position per token
    >>> h = torch.zeros(6); w = torch.arange(6.) % 3
    >>> layout.rotate(x, t, h, w).shape
    torch.Size([1, 6, 2, 128])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Complex, Float, Real
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ["RotaryLayout"]


@dataclass(frozen=True)
class RotaryLayout:
    """Channel layout of a 3D rotary position embedding.

    Args:
        t_dim: number of temporal channels (even).
        h_dim: number of height channels (even).
        w_dim: number of width channels (even).
        theta: RoPE base, shared by the three parts.
        interleaved: ``True`` for pairs ``(2j, 2j+1)``, ``False`` for rotate-half pairs ``(j, j+D/2)``.
    """

    t_dim: int
    h_dim: int
    w_dim: int
    theta: float | int = 10000.0
    interleaved: bool = True

    def __post_init__(self) -> None:
        for name in ("t_dim", "h_dim", "w_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0 or value % 2:
                raise ValueError(f"RotaryLayout.{name} must be a non-negative even int, got {value!r}")
        if self.t_dim == 0:
            raise ValueError("RotaryLayout.t_dim must be > 0: a layout without temporal channels has nothing "
                             "for a temporal position method to change")
        if not (isinstance(self.theta, (int, float)) and self.theta > 1.0):
            raise ValueError(f"RotaryLayout.theta must be a number > 1, got {self.theta!r}")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def wan(cls, head_dim: int, theta: float | int = 10000.0) -> RotaryLayout:
        """Wan 2.1 / 2.2: ``h = w = 2 * (head_dim // 6)``, ``t = head_dim - h - w``, interleaved."""
        hw = 2 * (head_dim // 6)
        return cls(head_dim - 2 * hw, hw, hw, theta=theta, interleaved=True)

    @classmethod
    def hunyuan(cls, rope_axes_dim: tuple[int, int, int] = (16, 56, 56), theta: float | int = 256.0) -> RotaryLayout:
        """HunyuanVideo (and 1.5): ``rope_axes_dim = (t, h, w)``, theta 256, interleaved."""
        t, h, w = rope_axes_dim
        return cls(t, h, w, theta=theta, interleaved=True)

    @classmethod
    def cogvideox(cls, head_dim: int, theta: float | int = 10000.0) -> RotaryLayout:
        """CogVideoX 1.0 / 1.5: temporal ``head_dim // 4``, height and width ``3 * head_dim // 8`` each."""
        t = head_dim // 4
        hw = (head_dim - t) // 2
        return cls(t, hw, head_dim - t - hw, theta=theta, interleaved=True)

    @classmethod
    def opensora(
        cls, axes_dim: tuple[int, int, int] = (16, 56, 56), theta: float | int = 10000.0, liger: bool = True
    ) -> RotaryLayout:
        """Open-Sora 2.0 MMDiT: ``axes_dim = (t, h, w)``; rotate-half with the Liger kernel, else interleaved."""
        t, h, w = axes_dim
        return cls(t, h, w, theta=theta, interleaved=not liger)

    # ------------------------------------------------------------------ frequencies
    @property
    def head_dim(self) -> int:
        return self.t_dim + self.h_dim + self.w_dim

    @staticmethod
    def part_freqs(dim: int, theta: float | int) -> Float[Tensor, " pairs"]:
        """Frequencies ``theta ** (-2m / dim)`` of one part, in float64."""
        return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))

    def temporal_freqs(self) -> Float[Tensor, " t_pairs"]:
        """The temporal part's frequencies (float64), the ones temporal position methods may change."""
        return self.part_freqs(self.t_dim, self.theta)

    def angles(
        self,
        t_pos: Real[Tensor, " tokens"],
        h_pos: Real[Tensor, " tokens"],
        w_pos: Real[Tensor, " tokens"],
        t_freqs: Float[Tensor, " t_pairs"] | None = None,
    ) -> Float[Tensor, "tokens pairs"]:
        """Rotation angle of every channel pair, in float64, pairs ordered t, h, w.

        ``t_freqs`` replaces the temporal frequencies (NTK, YaRN, RIFLEx change them).
        """
        tf = self.temporal_freqs() if t_freqs is None else t_freqs.to(torch.float64)
        if tf.shape != (self.t_dim // 2,):
            raise ValueError(f"t_freqs must have shape ({self.t_dim // 2},), got {tuple(tf.shape)}")
        device = t_pos.device
        parts = [
            torch.outer(t_pos.to(torch.float64), tf.to(device)),
            torch.outer(h_pos.to(torch.float64), self.part_freqs(self.h_dim, self.theta).to(device)),
            torch.outer(w_pos.to(torch.float64), self.part_freqs(self.w_dim, self.theta).to(device)),
        ]
        return torch.cat(parts, dim=1)

    def cos_sin(
        self,
        t_pos: Real[Tensor, " tokens"],
        h_pos: Real[Tensor, " tokens"],
        w_pos: Real[Tensor, " tokens"],
        t_freqs: Float[Tensor, " t_pairs"] | None = None,
    ) -> tuple[Float[Tensor, "tokens pairs"], Float[Tensor, "tokens pairs"]]:
        """``cos`` and ``sin`` (float32) of ``angles``, one value per channel pair."""
        a = self.angles(t_pos, h_pos, w_pos, t_freqs)
        return a.cos().float(), a.sin().float()

    def rotate(
        self,
        x: Float[Tensor, "batch tokens heads dim"],
        t_pos: Real[Tensor, " tokens"],
        h_pos: Real[Tensor, " tokens"],
        w_pos: Real[Tensor, " tokens"],
        t_freqs: Float[Tensor, " t_pairs"] | None = None,
    ) -> Float[Tensor, "batch tokens heads dim"]:
        """Rotate ``x`` (queries or keys, before RoPE) by the given positions.

        Computed in float32 and returned in ``x.dtype`` (as the supported models do).
        """
        if x.shape[-1] != self.head_dim:
            raise ValueError(
                f"head_dim of x is {x.shape[-1]}, the layout has t+h+w = {self.t_dim}+{self.h_dim}+{self.w_dim}"
                f" = {self.head_dim} channels"
            )
        cos, sin = self.cos_sin(t_pos, h_pos, w_pos, t_freqs)
        return self.apply(x, cos.to(x.device), sin.to(x.device))

    def apply(
        self,
        x: Float[Tensor, "batch tokens heads dim"],
        cos: Float[Tensor, "*table pairs"],
        sin: Float[Tensor, "*table pairs"],
        out: Float[Tensor, "batch tokens heads dim"] | None = None,
    ) -> Float[Tensor, "batch tokens heads dim"]:
        """Rotate ``x`` by precomputed per-pair ``cos``/``sin`` (from ``cos_sin``).

        The tables are ``[tokens, pairs]``, or ``[frames, tokens_per_frame, pairs]`` with either of the first
        two sizes 1: one row per frame, or per place in a frame, broadcast over the frame-major tokens
        (the same rotation from a table F or S times smaller, where the angles depend on one alone).
        ``out``: a tensor shaped like ``x`` (any strides, e.g. a transposed view of a head-major buffer)
        to write the result into and return; the numbers are the same.
        """
        grad = _needs_grad(x)  # the in-place and complex routes write with out=, which autograd refuses
        if self.interleaved and x.device.type == "cpu" and not torch.compiler.is_compiling() and not grad:
            return _rotate_complex_into(x, out if out is not None else torch.empty_like(x), cos, sin)
        xv, c, s = _against(x, cos, sin)
        if out is not None and not grad:
            ov = _by_frame(out, cos) if cos.ndim == 3 else out
            if self.interleaved:
                pairs = (xv[..., 0::2], xv[..., 1::2]), (ov[..., 0::2], ov[..., 1::2])
            else:
                half = self.head_dim // 2
                pairs = (xv[..., :half], xv[..., half:]), (ov[..., :half], ov[..., half:])
            _rotate_pairs_into(*pairs, c, s)
            return out
        xf = xv.to(_working_dtype(x))
        if self.interleaved:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
            rotated = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
        else:
            half = self.head_dim // 2
            x1, x2 = xf[..., :half], xf[..., half:]
            rotated = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
        rotated = rotated.to(x.dtype).reshape(x.shape)
        return rotated if out is None else out.copy_(rotated)

    def temporal_cos_sin(
        self, t_pos: Real[Tensor, " tokens"], t_freqs: Float[Tensor, " t_pairs"] | None = None
    ) -> tuple[Float[Tensor, "tokens t_pairs"], Float[Tensor, "tokens t_pairs"]]:
        """``cos``/``sin`` (float32) of the temporal pairs only, for ``rotate_temporal`` (given one
        position per frame: one row per frame, to be viewed as ``[frames, 1, t_pairs]``)."""
        tf = self.temporal_freqs() if t_freqs is None else t_freqs.to(torch.float64)
        a = torch.outer(t_pos.to(torch.float64), tf.to(t_pos.device))
        return a.cos().float(), a.sin().float()

    def rotate_temporal(
        self,
        x: Float[Tensor, "batch tokens heads dim"],
        cos: Float[Tensor, "*table t_pairs"],
        sin: Float[Tensor, "*table t_pairs"],
        out: Float[Tensor, "batch tokens heads dim"] | None = None,
    ) -> Float[Tensor, "batch tokens heads dim"]:
        """Rotate only the temporal channel pairs of ``x``; the other channels are returned as they are.

        Rotations add their angles, so rotating a tensor that carries its spatial rotation only
        (temporal position 0) by temporal angles gives exactly the full rotation at those positions.
        Tables and ``out``: as in ``apply`` (temporal angles depend on the frame alone, so a table of
        ``[frames, 1, t_pairs]`` is enough).
        """
        return self.rotate_split(x, (cos, sin), None, out)

    def spatial_cos_sin(
        self, h_pos: Real[Tensor, " tokens"], w_pos: Real[Tensor, " tokens"]
    ) -> tuple[Float[Tensor, "tokens s_pairs"], Float[Tensor, "tokens s_pairs"]]:
        """``cos``/``sin`` (float32) of the height and width pairs only, for ``rotate_split`` (given the
        places of one frame: one row per place, to be viewed as ``[1, tokens_per_frame, s_pairs]``)."""
        cos, sin = self.cos_sin(torch.zeros_like(h_pos, dtype=torch.float64), h_pos, w_pos)
        return cos[:, self.t_dim // 2:], sin[:, self.t_dim // 2:]

    def rotate_split(
        self,
        x: Float[Tensor, "batch tokens heads dim"],
        temporal: tuple[Tensor, Tensor] | None,
        spatial: tuple[Tensor, Tensor] | None,
        out: Float[Tensor, "batch tokens heads dim"] | None = None,
    ) -> Float[Tensor, "batch tokens heads dim"]:
        """Rotate the temporal pairs by ``temporal`` and the height and width pairs by ``spatial`` (each a
        ``(cos, sin)`` pair from ``temporal_cos_sin`` / ``spatial_cos_sin``, shaped as the tables of
        ``apply``: per token, or by frame / by place in a frame), in one pass over ``x``; a part given
        None keeps its channels as they are. With both given it is ``apply`` at those positions, from
        tables F and S times smaller than a table per token. ``out``: as in ``apply``.
        """
        pairs = (self._pairs_of("t"), self._pairs_of("s"))
        tabs = (temporal, spatial if self.h_dim + self.w_dim else None)  # no spatial channels: nothing to rotate
        grad = _needs_grad(x)  # the in-place and complex routes write with out=, which autograd refuses
        if self.interleaved and x.device.type == "cpu" and not torch.compiler.is_compiling() and not grad:
            target = out if out is not None else torch.empty_like(x)
            for (a, b), tab in zip(pairs, tabs, strict=True):
                part = slice(a.start, b.stop)  # interleaved: a part's channels are one range
                if tab is None:
                    target[..., part] = x[..., part]
                else:
                    _rotate_complex_into(x[..., part], target[..., part], *tab)
            return target
        shape = x.shape
        framed = next((tab[0] for tab in tabs if tab is not None and tab[0].ndim == 3), None)
        xv, ov = x, out
        if framed is not None:  # everything by frame, a table per token too
            xv = _by_frame(x, framed)
            ov = None if out is None else _by_frame(out, framed)
            f, s = xv.shape[1], xv.shape[2]
            tabs = tuple(None if tab is None else tuple(c if c.ndim == 3 else c.unflatten(0, (f, s)) for c in tab)
                         for tab in tabs)
        tables = [None if tab is None else tuple(map(_broadcast, tab)) for tab in tabs]
        if ov is not None and not grad:
            for (a, b), tab in zip(pairs, tables, strict=True):
                if tab is None:
                    ov[..., a], ov[..., b] = xv[..., a], xv[..., b]
                else:
                    _rotate_pairs_into((xv[..., a], xv[..., b]), (ov[..., a], ov[..., b]), *tab)
            return out
        rotated: list[tuple[Tensor, Tensor]] = []
        for (a, b), tab in zip(pairs, tables, strict=True):
            x1, x2 = xv[..., a], xv[..., b]
            if tab is not None:
                c, s_ = tab
                x1, x2 = x1.to(_working_dtype(x)), x2.to(_working_dtype(x))
                x1, x2 = (x1 * c - x2 * s_).to(x.dtype), (x1 * s_ + x2 * c).to(x.dtype)
            rotated.append((x1, x2))
        (t1, t2), (s1, s2) = rotated
        if self.interleaved:
            pieces = [torch.stack((t1, t2), dim=-1).flatten(-2), torch.stack((s1, s2), dim=-1).flatten(-2)]
        else:
            pieces = [t1, s1, t2, s2]
        result = torch.cat(pieces, dim=-1).reshape(shape)
        return result if out is None else out.copy_(result)

    def _pairs_of(self, part: str) -> tuple[slice, slice]:
        """Channel slices of the first and second members of the temporal (``"t"``) or spatial pairs."""
        t, d = self.t_dim, self.head_dim
        if self.interleaved:
            return (slice(0, t, 2), slice(1, t, 2)) if part == "t" else (slice(t, d, 2), slice(t + 1, d, 2))
        tp, half = t // 2, d // 2
        return (slice(0, tp), slice(half, half + tp)) if part == "t" else (slice(tp, half), slice(half + tp, d))

    def temporal_channels(self) -> list[int]:
        """Indices of the head channels that the temporal rotation touches."""
        pairs = range(self.t_dim // 2)
        if self.interleaved:
            return [c for m in pairs for c in (2 * m, 2 * m + 1)]
        half = self.head_dim // 2
        return [m for m in pairs] + [m + half for m in pairs]

    def describe(self) -> str:
        pairing = "interleaved" if self.interleaved else "rotate-half"
        return (f"RotaryLayout(t={self.t_dim}, h={self.h_dim}, w={self.w_dim}, theta={self.theta:g}, "
                f"{pairing}; temporal wavelength {2 * math.pi:.2f}..{2 * math.pi * self.theta:.3g} frames)")


def _needs_grad(x: Tensor) -> bool:
    """Whether a rotation of ``x`` is recorded for autograd (then it is computed out of place)."""
    return torch.is_grad_enabled() and x.requires_grad


def _working_dtype(x: Tensor) -> torch.dtype:
    """The dtype a rotation of ``x`` is computed in: float32, or float64 for float64 inputs recorded for
    autograd (so that gradients can be checked against finite differences)."""
    return torch.float64 if x.dtype == torch.float64 and _needs_grad(x) else torch.float32


def _by_frame(x: Tensor, table: Tensor) -> Tensor:
    """``x`` (batch, tokens, heads, dim) seen as (batch, frames, tokens per frame, heads, dim) for a table
    ``[frames or 1, tokens per frame or 1, pairs]``: a view, whatever ``x``'s strides. (Plain annotations:
    called inside compiled rotations, where a run-time shape check cannot run.)"""
    n = x.shape[1]
    f, s = table.shape[0], table.shape[1]
    per = s if s > 1 else n // max(f, 1)
    if table.ndim != 3 or per < 1 or n % per or f not in (1, n // per):
        raise ValueError(f"a rotation table by frame must be [frames or 1, tokens per frame or 1, pairs] for "
                         f"{n} tokens, got {tuple(table.shape)}")
    return x.unflatten(1, (n // per, per))


def _against(x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``x`` (by frame for a 3-D table) and ``cos``/``sin`` shaped to broadcast against its channel pairs."""
    return (x if cos.ndim == 2 else _by_frame(x, cos)), _broadcast(cos), _broadcast(sin)


def _broadcast(table: Tensor) -> Tensor:
    """A table ``[tokens, pairs]`` or ``[frames, tokens per frame, pairs]`` shaped to broadcast against
    (batch, tokens, heads, pairs) or (batch, frames, tokens per frame, heads, pairs)."""
    return table[None, :, None, :] if table.ndim == 2 else table[None, :, :, None, :]


def _rotate_pairs_into(xs: tuple[Tensor, Tensor], outs: tuple[Tensor, Tensor], c: Tensor, s: Tensor) -> None:
    """``outs = (x1 c - x2 s, x1 s + x2 c)``, computed in float32 and written into the given views."""
    (x1, x2), (o1, o2) = xs, outs
    if x1.dtype == torch.float32 and o1.dtype == torch.float32:
        torch.sub(x1 * c, x2 * s, out=o1)
        torch.add(x1 * s, x2 * c, out=o2)
        return
    x1, x2 = x1.float(), x2.float()
    o1.copy_(x1 * c - x2 * s)
    o2.copy_(x1 * s + x2 * c)


#: Complex ``cos + i sin`` tables, per cos tensor (callers cache their cos/sin tables and reuse them; a
#: table must not be changed in place after its first use).
_CIS: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def _pairs_as_complex(x: Float[Tensor, "*shape dim"]) -> Complex[Tensor, "*shape pairs"] | None:
    """``x``'s interleaved channel pairs seen as complex numbers (a view), or None when its layout or
    dtype does not allow one."""
    if x.dtype != torch.float32 or x.stride(-1) != 1 or x.storage_offset() % 2 or any(st % 2 for st in x.stride()[:-1]):
        return None
    return torch.view_as_complex(x.unflatten(-1, (-1, 2)))


def _rotate_complex_into(
    x: Float[Tensor, "batch tokens heads dim"], out: Float[Tensor, "batch tokens heads dim"],
    cos: Float[Tensor, "*table pairs"], sin: Float[Tensor, "*table pairs"],
) -> Float[Tensor, "batch tokens heads dim"]:
    """Interleaved pairs: ``out = x * (cos + i sin)`` pair by pair, computed in float32 (CPU); tables as in
    ``RotaryLayout.apply``."""
    hit = _CIS.get(cos)
    if hit is None or hit[0] is not sin:
        cis = torch.complex(cos.float(), sin.float())
        hit = (sin, _broadcast(cis))
        _CIS[cos] = hit
    cis = hit[1]
    xv, ov = (x, out) if cos.ndim == 2 else (_by_frame(x, cos), _by_frame(out, cos))
    xc = _pairs_as_complex(xv)
    if xc is None:
        xc = _pairs_as_complex(xv.float().contiguous())
    oc = _pairs_as_complex(ov)
    if oc is not None:
        torch.mul(xc, cis, out=oc)
    else:  # another dtype (or layout): one rounding into it
        ov.copy_(torch.view_as_real(xc * cis).flatten(-2))
    return out
