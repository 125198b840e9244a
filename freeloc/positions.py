"""Temporal position methods: VRPR and the classic RoPE-extension baselines.

All of them change only the **temporal** part of a 3D RoPE; height and width stay as they are.

* ``VRPR`` (FreeLOC's Video-based Relative Position Re-encoding) re-encodes positions per
  band of frame distance so that every effective relative distance lies inside the trained range.
* ``PI`` (position interpolation): temporal positions divided by ``s = F / T``.
* ``NTK`` (NTK-aware scaling): temporal theta multiplied by ``s ** (d / (d - 2))``,
  ``d`` = number of temporal rotary channels.
* ``YaRN``: per-frequency ramp between interpolation (``w / s``) and extrapolation (``w``).
* ``RIFLEx``: the intrinsic temporal frequency ``k`` (1-based) lowered to ``0.9 * 2 pi / F``.

Examples:
    >>> v = VRPR.for_length(num_frames=81, trained_frames=21)
    >>> (v.w1, v.w2, v.g1, v.g2, v.cap)
    (10, 14, 2, 8, 20)
    >>> r = v.relative_distance(81)
    >>> int(r.abs().max()), int(r[40, 35]), int(r[80, 0])
    (20, 5, 20)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .bands import Band, BandSet, frame_index_grid
from .methods import Method, _check_frames, register
from .rotary import RotaryLayout

__all__ = ["VRPR", "PI", "NTK", "YaRN", "RIFLEx", "KeyShift", "PUBLISHED_VRPR"]

#: Published VRPR settings (Wan2.1-T2V-1.3B, T = 21): (num_frames, trained_frames) -> (w1, w2, g1, g2).
PUBLISHED_VRPR: dict[tuple[int, int], tuple[int, int, int, int]] = {
    (41, 21): (12, 20, 2, 8),
    (81, 21): (10, 14, 2, 8),
}


def _positive_int(owner: str, name: str, value: object, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an int >= {minimum}, got {value!r}")


@register
@dataclass(frozen=True)
class VRPR(Method):
    """Video-based Relative Position Re-encoding (docs/method.md §2).

    Tiers on frame distance ``d = i - j`` (query frame minus key frame), five attention passes:

    ====================  ==========================================  =========================================
    tier                  query position                              key position
    ====================  ==========================================  =========================================
    near, ``|d| < w1``    ``i``                                       ``j``
    mid-past              ``i // g1 + c1``                            ``j // g1``
    mid-future            ``i // g1``                                 ``j // g1 + c1``
    far-past              ``min(i // g2 + c2, cap)``                  ``j // g2``
    far-future            ``i // g2``                                 ``min(j // g2 + c2, cap)``
    ====================  ==========================================  =========================================

    with ``c1 = w1 - ceil(w1 / g1)`` and ``c2 = w2 - w2 // g2 - (w2 - w1) // g1`` (the reference
    code's constants). Mid tiers: ``w1 <= |d| < w2``; far tiers: ``|d| >= w2``.

    Args:
        w1: width of the exact near tier, in frames.
        w2: frame distance where the far tier starts (``w2 > w1``).
        g1: group size of the mid tier (``>= 1``).
        g2: group size of the far tier (``>= g1``).
        cap: largest trained relative distance, ``T - 1``.
    """

    name = "vrpr"
    w1: int
    w2: int
    g1: int
    g2: int
    cap: int

    def __post_init__(self) -> None:
        for field_name in ("w1", "w2", "g1", "g2", "cap"):
            _positive_int("VRPR", field_name, getattr(self, field_name))
        if self.w2 <= self.w1:
            raise ValueError(f"VRPR needs w1 < w2, got w1={self.w1}, w2={self.w2}")
        if self.g2 < self.g1:
            raise ValueError(f"VRPR needs g1 <= g2, got g1={self.g1}, g2={self.g2}")
        if self.w1 > self.cap + 1:
            raise ValueError(f"VRPR needs w1 <= cap + 1 (near distances must be trained), got w1={self.w1}, "
                             f"cap={self.cap}")

    # ------------------------------------------------------------------ constants
    @property
    def c1(self) -> int:
        return self.w1 - math.ceil(self.w1 / self.g1)

    @property
    def c2(self) -> int:
        return self.w2 - self.w2 // self.g2 - (self.w2 - self.w1) // self.g1

    # ------------------------------------------------------------------ settings
    @classmethod
    def identity(cls, trained_frames: int) -> VRPR:
        """A setting that re-encodes nothing at any length up to ``trained_frames``."""
        _check_frames(trained_frames, trained_frames)
        return cls(w1=trained_frames, w2=trained_frames + 1, g1=1, g2=1, cap=trained_frames - 1 or 1)

    @classmethod
    def for_length(cls, num_frames: int, trained_frames: int) -> VRPR:
        """The setting for ``num_frames`` temporal tokens of a model trained on ``trained_frames``.

        * ``num_frames <= trained_frames``: ``identity`` (nothing is out of range).
        * the published points (41, 21) and (81, 21): the published settings.
        * any other length: ``derive``.
        """
        _check_frames(num_frames, trained_frames)
        if num_frames <= trained_frames:
            return cls.identity(trained_frames)
        published = PUBLISHED_VRPR.get((num_frames, trained_frames))
        if published is not None:
            w1, w2, g1, g2 = published
            return cls(w1, w2, g1, g2, cap=trained_frames - 1)
        return cls.derive(num_frames, trained_frames)

    @classmethod
    def derive(cls, num_frames: int, trained_frames: int) -> VRPR:
        """Derive a setting for any length; the rule (also in the concepts page):

        With ``cap = T - 1`` and ``g1 = 2`` (as in both published settings), the far tier's group
        ``g2`` is the first of 8, 16, 32, ... (8 is the published one) that admits a setting where

        * every property of ``violations`` holds at this length,
        * the far tier ends exactly at the cap: ``(F - 1) // g2 + c2 == cap`` (the farthest pair
          lands on the cap, so the whole trained range is used and nothing is clipped), and
        * the exact near tier keeps at least half the trained range: ``w1 >= ceil(cap / 2)``
          (both published settings do: 12 and 10 of 20);

        among those, the widest near tier ``w1`` wins, then the widest mid tier ``w2``. Where no
        setting ends exactly at the cap (extensions of a few frames), the far tier may overshoot
        and be clipped at the cap (as the published 4x setting is), with the least overshoot.
        """
        _check_frames(num_frames, trained_frames)
        if num_frames <= trained_frames:
            return cls.identity(trained_frames)
        if trained_frames < 2:
            raise ValueError(f"VRPR needs trained_frames >= 2 to re-encode (the trained range is |r| <= T - 1), "
                             f"got trained_frames={trained_frames}")
        return _derive_vrpr(num_frames, trained_frames)

    # ------------------------------------------------------------------ positions
    def is_identity_for(self, num_frames: int) -> bool:
        """True when every pair at this length lies in the exact near tier."""
        return num_frames <= self.w1

    def tier_positions(self, num_frames: int) -> list[tuple[str, Tensor, Tensor, Tensor]]:
        """``(name, pairs [F, F], q_pos [F], k_pos [F])`` of the five tiers (exact integers, float64)."""
        f = num_frames
        i, j = frame_index_grid(f)
        d = i - j
        fr = torch.arange(f, dtype=torch.float64)
        ident = fr
        g1 = torch.div(fr, self.g1, rounding_mode="floor")
        g2 = torch.div(fr, self.g2, rounding_mode="floor")
        shifted2 = (g2 + self.c2).clamp(max=self.cap)
        return [
            ("near", d.abs() < self.w1, ident, ident),
            ("mid-past", (d >= self.w1) & (d < self.w2), g1 + self.c1, g1),
            ("mid-future", (-d >= self.w1) & (-d < self.w2), g1, g1 + self.c1),
            ("far-past", d >= self.w2, shifted2, g2),
            ("far-future", -d >= self.w2, g2, shifted2),
        ]

    def band_set(self, num_frames: int, tokens_per_frame: int = 1, rotary: RotaryLayout | None = None) -> BandSet:
        """Five bands (empty ones dropped); one plain band when the setting is the identity here."""
        if self.is_identity_for(num_frames):
            return BandSet.plain(num_frames, label="vrpr (identity)")
        bands = tuple(Band(n, p, q, k) for n, p, q, k in self.tier_positions(num_frames) if bool(p.any()))
        return BandSet(num_frames, bands, label=f"vrpr(w1={self.w1}, w2={self.w2}, g1={self.g1}, g2={self.g2})")

    def relative_distance(self, num_frames: int) -> Int[Tensor, "F F"]:
        """Effective temporal relative distance ``r[i, j] = q_pos - k_pos`` as a LongTensor [F, F]."""
        _check_frames(num_frames, 1)
        r = torch.zeros(num_frames, num_frames, dtype=torch.float64)
        for _, pairs, q, k in self.tier_positions(num_frames):
            r = torch.where(pairs, q[:, None] - k[None, :], r)
        return r.round().long()

    def violations(self, num_frames: int) -> list[str]:
        """Which of the properties of docs/method.md §2.6 fail at this length (empty list: all hold).

        Checked: ``r(i, i) = 0``; ``r = i - j`` for ``|i - j| < w1``; ``|r| <= cap``;
        ``r(i, j) = -r(j, i)``; for each query, ``r`` never decreases as the key moves away.
        """
        r = self.relative_distance(num_frames)
        i, j = frame_index_grid(num_frames)
        d = i - j
        out = []
        if bool((r.diagonal() != 0).any()):
            out.append("r(i, i) != 0")
        near = d.abs() < self.w1
        if not torch.equal(r[near], d[near]):
            out.append("r != i - j in the near tier")
        if int(r.abs().max()) > self.cap:
            out.append(f"|r| exceeds cap={self.cap} (max {int(r.abs().max())})")
        if not torch.equal(r, -r.T):
            out.append("r is not antisymmetric")
        # past keys: j decreasing (moving left from the diagonal) must not decrease r
        past_step = r[:, :-1] - r[:, 1:]  # r(i, j) - r(i, j + 1), j + 1 <= i for past keys
        past = (j[:, :-1] + 1) <= i[:, :-1]
        if bool((past_step[past] < 0).any()):
            out.append("r decreases as a past key moves farther away")
        future = j[:, 1:] - 1 >= i[:, 1:]
        fut_step = r[:, 1:] - r[:, :-1]  # r(i, j+1) - r(i, j) must be <= 0 for future keys
        if bool((fut_step[future] > 0).any()):
            out.append("r increases as a future key moves farther away")
        return out


def _properties_hold(w1: int, w2: int, g1: int, g2: int, cap: int, f: int) -> bool:
    """Fast integer check of ``VRPR.violations`` (same properties), used by the search."""
    c1 = w1 - -(-w1 // g1)
    c2 = w2 - w2 // g2 - (w2 - w1) // g1
    i = torch.arange(f)[:, None]
    j = torch.arange(f)[None, :]
    d = i - j
    r = torch.where(d.abs() < w1, d, 0)
    r = torch.where((d >= w1) & (d < w2), (i // g1 + c1) - j // g1, r)
    r = torch.where(d >= w2, torch.clamp(i // g2 + c2, max=cap) - j // g2, r)
    r = torch.where(d < 0, -r.T, r)  # future tiers mirror the past ones exactly
    if int(r.abs().max()) > cap:
        return False
    # For a fixed query, r must not decrease as a past key moves farther (j -> j - 1) and must not
    # increase as a future key moves farther (j -> j + 1): together, every row is non-increasing in j.
    # (Checking only the past half is not enough: a mirrored future row is a past *column*.)
    return bool((torch.diff(r, dim=1) <= 0).all())


@functools.lru_cache(maxsize=256)
def _derive_vrpr(f: int, trained_frames: int) -> VRPR:
    cap = trained_frames - 1
    g1 = 2
    for exact_reach in (True, False):
        g2 = 8
        while True:
            for w1 in range(min(cap, f - 2), 0, -1):
                best = None
                for w2 in range(f - 1, w1, -1):
                    reach = (f - 1) // g2 + w2 - w2 // g2 - (w2 - w1) // g1
                    ok_reach = reach == cap if exact_reach else reach >= cap
                    if ok_reach and _properties_hold(w1, w2, g1, g2, cap, f):
                        if best is None or reach < best[0]:
                            best = (reach, w2)
                        if exact_reach:
                            break
                if best is not None and (w1 >= -(-cap // 2) or not exact_reach):
                    return VRPR(w1, best[1], g1, g2, cap)
            if g2 >= f:
                break
            g2 *= 2
    raise RuntimeError(f"no VRPR setting satisfies the properties at F={f}, T={trained_frames}")  # pragma: no cover


# ---------------------------------------------------------------------------------------- baselines
def _scale(num_frames: int, trained_frames: int) -> float:
    _check_frames(num_frames, trained_frames)
    return num_frames / trained_frames


def _positive_float(owner: str, name: str, value: object, minimum: float = 0.0) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > minimum:
        raise ValueError(f"{owner}.{name} must be a number > {minimum}, got {value!r}")


@register
@dataclass(frozen=True)
class PI(Method):
    """Position interpolation: temporal positions ``t / scale`` (``scale = F / T`` from ``for_length``)."""

    name = "pi"
    scale: float | int

    def __post_init__(self) -> None:
        _positive_float("PI", "scale", self.scale)

    @classmethod
    def for_length(cls, num_frames: int, trained_frames: int) -> PI | None:
        s = _scale(num_frames, trained_frames)
        return cls(scale=s) if s > 1 else None

    def band_set(self, num_frames: int, tokens_per_frame: int = 1, rotary: RotaryLayout | None = None) -> BandSet:
        pos = torch.arange(num_frames, dtype=torch.float64) / self.scale
        pairs = torch.ones(num_frames, num_frames, dtype=torch.bool)
        return BandSet(num_frames, (Band("all", pairs, pos, pos),), label=f"pi(scale={self.scale:g})")


@register
@dataclass(frozen=True)
class KeyShift(Method):
    """Every key's temporal position moved by ``shift`` frames (queries unchanged): the probe's perturbation.

    ``r(i, j) = i - j - shift`` for every pair; used to measure how sensitive a layer is to relative
    positions. Not a method for generating videos.
    """

    name = "key-shift"
    shift: float | int

    def __post_init__(self) -> None:
        if not isinstance(self.shift, (int, float)) or isinstance(self.shift, bool):
            raise ValueError(f"KeyShift.shift must be a number of frames, got {self.shift!r}")

    @classmethod
    def for_length(cls, num_frames: int, trained_frames: int) -> KeyShift | None:
        raise ValueError("key-shift needs an explicit shift (it is the probe's perturbation, not a length method)")

    def band_set(self, num_frames: int, tokens_per_frame: int = 1, rotary: RotaryLayout | None = None) -> BandSet:
        pos = torch.arange(num_frames, dtype=torch.float64)
        pairs = torch.ones(num_frames, num_frames, dtype=torch.bool)
        return BandSet(num_frames, (Band("all", pairs, pos, pos + self.shift),), label=f"key-shift({self.shift:g})")


class _FrequencyMethod(Method):
    """A baseline that only changes the temporal RoPE frequencies (one band, all pairs)."""

    def temporal_freqs(self, rotary: RotaryLayout) -> Float[Tensor, " t_pairs"]:
        raise NotImplementedError

    def band_set(self, num_frames: int, tokens_per_frame: int = 1, rotary: RotaryLayout | None = None) -> BandSet:
        if rotary is None:
            raise ValueError(f"{type(self).__name__} changes RoPE frequencies: it needs the model's RotaryLayout")
        return BandSet.plain(num_frames, t_freqs=self.temporal_freqs(rotary), label=self.name)


@register
@dataclass(frozen=True)
class NTK(_FrequencyMethod):
    """NTK-aware scaling: temporal theta ``* scale ** (d / (d - 2))``, ``d`` = temporal rotary channels."""

    name = "ntk"
    scale: float | int

    def __post_init__(self) -> None:
        _positive_float("NTK", "scale", self.scale)

    @classmethod
    def for_length(cls, num_frames: int, trained_frames: int) -> NTK | None:
        s = _scale(num_frames, trained_frames)
        return cls(scale=s) if s > 1 else None

    def temporal_freqs(self, rotary: RotaryLayout) -> Float[Tensor, " t_pairs"]:
        d = rotary.t_dim
        if d <= 2:
            raise ValueError(f"NTK needs more than 2 temporal channels, the layout has t_dim={d}")
        return RotaryLayout.part_freqs(d, rotary.theta * self.scale ** (d / (d - 2)))


@register
@dataclass(frozen=True)
class YaRN(_FrequencyMethod):
    """YaRN's frequency ramp ("NTK-by-parts"), on the temporal axis.

    For temporal frequency ``w`` with wavelength ``L = 2 pi / w`` and ``rho = trained_frames / L``:
    ``gamma = clamp((rho - alpha) / (beta - alpha), 0, 1)`` and
    ``w' = (1 - gamma) * w / scale + gamma * w``: long wavelengths are interpolated, short ones kept.
    (YaRN's attention temperature is not applied: it would scale spatial logits too.)
    """

    name = "yarn"
    scale: float | int
    trained_frames: int
    alpha: float | int = 1.0
    beta: float | int = 32.0

    def __post_init__(self) -> None:
        _positive_float("YaRN", "scale", self.scale)
        _positive_int("YaRN", "trained_frames", self.trained_frames)
        if not (0 <= self.alpha < self.beta):
            raise ValueError(f"YaRN needs 0 <= alpha < beta, got alpha={self.alpha}, beta={self.beta}")

    @classmethod
    def for_length(cls, num_frames: int, trained_frames: int) -> YaRN | None:
        s = _scale(num_frames, trained_frames)
        return cls(scale=s, trained_frames=trained_frames) if s > 1 else None

    def temporal_freqs(self, rotary: RotaryLayout) -> Float[Tensor, " t_pairs"]:
        w = rotary.temporal_freqs()
        rho = self.trained_frames * w / (2 * math.pi)
        gamma = ((rho - self.alpha) / (self.beta - self.alpha)).clamp(0.0, 1.0)
        return (1 - gamma) * w / self.scale + gamma * w


@register
@dataclass(frozen=True)
class RIFLEx(_FrequencyMethod):
    """RIFLEx: intrinsic temporal frequency ``k`` (1-based, as published) set to ``0.9 * 2 pi / num_frames``.

    ``k`` is per model (published: HunyuanVideo 4, CogVideoX-5B 2); it must be given explicitly.
    """

    name = "riflex"
    k: int
    num_frames: int

    def __post_init__(self) -> None:
        _positive_int("RIFLEx", "k", self.k)
        _positive_int("RIFLEx", "num_frames", self.num_frames)

    @classmethod
    def for_length(cls, num_frames: int, trained_frames: int, k: int | None = None) -> RIFLEx | None:
        if k is None:
            raise ValueError("RIFLEx needs its intrinsic frequency index k (1-based) for the model: "
                             "published k = 4 for HunyuanVideo, 2 for CogVideoX-5B")
        return cls(k=k, num_frames=num_frames) if _scale(num_frames, trained_frames) > 1 else None

    def temporal_freqs(self, rotary: RotaryLayout) -> Float[Tensor, " t_pairs"]:
        w = rotary.temporal_freqs().clone()
        if self.k > len(w):
            raise ValueError(f"RIFLEx.k={self.k} but the layout has only {len(w)} temporal frequencies")
        w[self.k - 1] = 0.9 * 2 * math.pi / self.num_frames
        return w
