"""Methods that change attention logits rather than positions or pairs: UltraViCo.

UltraViCo (Zhao et al., ICLR 2026) traces long-video failures to attention dispersion: tokens beyond
the training window dilute the attention patterns learned on it. Its fix is one constant: the
**positive** logits of token pairs farther apart than half the trained length (``|i - j| > T / 2``
latent frames) are multiplied by ``alpha < 1``; negative logits, nearer pairs and text pairs are left
as they are, and so are the positions. For Wan the published ``alpha`` is 0.9 (models whose RoPE has a
harmonic temporal frequency also get that frequency's band treated; Wan needs none, and that part is
not implemented here).

As bands: the pairs within ``T / 2`` frames, and the pairs beyond, with ``Band.positive_logit_scale =
alpha``. The scale applies to each logit before the softmax, which only the dense ``reference``
backend computes (``backend="auto"`` picks it; the others refuse the method clearly).

Examples:
    >>> m = UltraViCo.for_length(64, 16)
    >>> m
    UltraViCo(alpha=0.9, window=8)
    >>> [(b.name, b.positive_logit_scale) for b in m.band_set(64, 4).bands]
    [('within', None), ('beyond', 0.9)]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .bands import Band, BandSet, frame_index_grid
from .methods import Method, _check_frames, register
from .rotary import RotaryLayout

__all__ = ["UltraViCo"]


@register
@dataclass(frozen=True)
class UltraViCo(Method):
    """UltraViCo's logit decay.

    Args:
        alpha: the factor of positive logits beyond ``window`` frames, in (0, 1].
        window: the frame distance up to which nothing changes, half the trained length.
    """

    name = "ultravico"
    changes_positions = False
    alpha: float = 0.9
    window: int = 10

    def __post_init__(self) -> None:
        if not (isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and 0 < self.alpha <= 1):
            raise ValueError(f"UltraViCo.alpha must be in (0, 1], got {self.alpha!r}")
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 0:
            raise ValueError(f"UltraViCo.window must be an int >= 0 (frames), got {self.window!r}")

    @classmethod
    def for_length(cls, num_frames: int, trained_frames: int) -> UltraViCo | None:
        """``window = trained_frames // 2`` and the published ``alpha = 0.9``; ``None`` when not longer."""
        _check_frames(num_frames, trained_frames)
        if num_frames <= trained_frames:
            return None
        return cls(window=trained_frames // 2)

    def band_set(self, num_frames: int, tokens_per_frame: int = 1, rotary: RotaryLayout | None = None) -> BandSet:
        i, j = frame_index_grid(num_frames)
        beyond = (i - j).abs() > self.window
        pos = torch.arange(num_frames, dtype=torch.float64)
        bands = [Band("within", ~beyond, pos, pos)]
        if bool(beyond.any()):
            bands.append(Band("beyond", beyond, pos, pos, positive_logit_scale=float(self.alpha)))
        return BandSet(num_frames, tuple(bands), label=f"ultravico(alpha={self.alpha:g}, window={self.window})")
