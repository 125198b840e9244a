"""Attention-pattern methods: which key tokens each query attends (TSA, sliding window).

* ``TSA`` (FreeLOC's Tiered Sparse Attention, docs/method.md §3): dense near frames, a
  spatial stripe at middle distances, and the first frame as an attention sink seen through grouped
  positions from far away. At 4x length it attends about a third of the token pairs.
* ``SlidingWindow``: every query attends the frames within ``window`` of its own (and, with
  ``sink=True``, the first frame), with the original positions.

Examples:
    >>> tsa = TSA()
    >>> round(tsa.block_density(81, 1560), 2)
    0.34
    >>> tsa.token_mask(num_frames=30, tokens_per_frame=4).shape
    torch.Size([120, 120])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool
from torch import Tensor

from .bands import Band, BandSet, frame_index_grid
from .methods import Method, _check_frames, register
from .rotary import RotaryLayout

__all__ = ["TSA", "SlidingWindow"]


@register
@dataclass(frozen=True)
class TSA(Method):
    """Tiered Sparse Attention.

    Tiers on frame distance ``|d| = |i - j|``:

    * **local** (``|d| <= d1``): every token pair, original positions;
    * **striped** (``d1 < |d| <= d2``, key frame not 0): token pairs with ``|s_q - s_k| < floor(stripe * S)``
      (``s`` = raster index inside the frame, ``S`` = tokens per frame), original positions;
    * **sink**: every query attends every token of frame 0. Queries with ``i <= d2`` see it with the
      original positions (it belongs to the local band); queries with ``i > d2`` see it through grouped
      positions ``q_pos = min(i // sink_group + sink_window - ceil(sink_window / sink_group), cap)``,
      ``k_pos = 0``;
    * every other pair is not attended.

    Args:
        d1: last frame distance attended densely.
        d2: last frame distance attended through the stripe.
        stripe: stripe half-width as a fraction of the tokens per frame.
        sink_group: group size of the sink's query positions.
        sink_window: window constant of the sink's query positions.
        cap: largest trained relative distance, ``T - 1``.
    """

    name = "tsa"
    changes_positions = False  # its sink band's grouped positions only matter where RoPE exists
    d1: int = 8
    d2: int = 24
    stripe: float | int = 1 / 8
    sink_group: int = 8
    sink_window: int = 12
    cap: int = 20

    def __post_init__(self) -> None:
        for field_name in ("d1", "d2", "sink_group", "sink_window", "cap"):
            value = getattr(self, field_name)
            minimum = 0 if field_name == "d1" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"TSA.{field_name} must be an int >= {minimum}, got {value!r}")
        if self.d2 < self.d1:
            raise ValueError(f"TSA needs d1 <= d2, got d1={self.d1}, d2={self.d2}")
        if not (isinstance(self.stripe, (int, float)) and 0 < self.stripe <= 1):
            raise ValueError(f"TSA.stripe must be a fraction in (0, 1], got {self.stripe!r}")

    @classmethod
    def for_length(cls, num_frames: int, trained_frames: int) -> TSA | None:
        """Default tiers with ``cap = trained_frames - 1``; ``None`` (plain attention) when not longer.

        The tiers stay the reference's (``d1 = 8``, ``d2 = 24``) whatever the trained length, although they
        were set for ``T = 21``: scaling them with the cap (``d1 = round(0.4 cap)``, ``d2 = round(1.2 cap)``,
        so 6 and 18 for the shipped shapes model's ``T = 16``) measured slightly worse there at 2x, 4x and
        8x (``benchmarks/HISTORY.md``). Pass ``TSA(d1=..., d2=...)`` to choose other tiers.
        """
        _check_frames(num_frames, trained_frames)
        if num_frames <= trained_frames:
            return None
        return cls(cap=trained_frames - 1)

    def stripe_tokens(self, tokens_per_frame: int) -> int:
        """``Ds = floor(stripe * S)``, at least 1 (reference: 195 at S = 1560)."""
        return max(1, int(self.stripe * tokens_per_frame))

    def band_set(self, num_frames: int, tokens_per_frame: int, rotary: RotaryLayout | None = None) -> BandSet:
        f = num_frames
        i, j = frame_index_grid(f)
        d = (i - j).abs()
        pos = torch.arange(f, dtype=torch.float64)
        sink_near = (j == 0) & (i <= self.d2)
        local = (d <= self.d1) | sink_near
        striped = (d > self.d1) & (d <= self.d2) & (j != 0)
        sink_far = (j == 0) & (i > self.d2)
        shift = self.sink_window - -(-self.sink_window // self.sink_group)
        q_sink = (torch.div(pos, self.sink_group, rounding_mode="floor") + shift).clamp(max=self.cap)
        bands = [Band("local", local, pos, pos)]
        if bool(striped.any()):
            bands.append(Band("striped", striped, pos, pos, stripe=self.stripe_tokens(tokens_per_frame)))
        if bool(sink_far.any()):
            bands.append(Band("sink", sink_far, q_sink, torch.zeros(f, dtype=torch.float64)))
        return BandSet(f, tuple(bands), label=f"tsa(d1={self.d1}, d2={self.d2}, stripe={self.stripe:g})")

    def token_mask(self, num_frames: int, tokens_per_frame: int) -> Bool[Tensor, "N N"]:
        """Token-level mask [N, N] of attended pairs, N = F * S (tests and pictures only)."""
        return self.band_set(num_frames, tokens_per_frame).token_mask(tokens_per_frame)

    def block_density(self, num_frames: int, tokens_per_frame: int, block_size: int = 128) -> float:
        """Fraction of ``block_size`` tiles a block-sparse kernel computes (no N^2 tensor is built)."""
        return self.band_set(num_frames, tokens_per_frame).block_density(tokens_per_frame, block_size)

    def token_density(self, num_frames: int, tokens_per_frame: int) -> float:
        """Fraction of token pairs attended."""
        return self.band_set(num_frames, tokens_per_frame).token_density(tokens_per_frame)


@register
@dataclass(frozen=True)
class SlidingWindow(Method):
    """Every query attends the frames within ``window`` of its own, plus frame 0 when ``sink``.

    Positions are the original ones (distances up to ``window``, and up to ``F - 1`` to the sink).
    """

    name = "sliding-window"
    changes_positions = False
    window: int
    sink: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 0:
            raise ValueError(f"SlidingWindow.window must be an int >= 0 (frames), got {self.window!r}")
        if not isinstance(self.sink, bool):
            raise ValueError(f"SlidingWindow.sink must be a bool, got {self.sink!r}")

    @classmethod
    def for_length(cls, num_frames: int, trained_frames: int) -> SlidingWindow | None:
        """A window spanning the trained length (``window = (T - 1) // 2``); ``None`` when not longer."""
        _check_frames(num_frames, trained_frames)
        if num_frames <= trained_frames:
            return None
        return cls(window=(trained_frames - 1) // 2)

    def band_set(self, num_frames: int, tokens_per_frame: int = 1, rotary: RotaryLayout | None = None) -> BandSet:
        i, j = frame_index_grid(num_frames)
        pairs = (i - j).abs() <= self.window
        if self.sink:
            pairs = pairs | (j == 0)
        pos = torch.arange(num_frames, dtype=torch.float64)
        return BandSet(num_frames, (Band("window", pairs, pos, pos),), label=f"sliding-window({self.window})")
