"""Methods that change attention logits rather than positions or pairs: UltraViCo.

UltraViCo (Zhao et al., ICLR 2026) traces long-video failures to attention dispersion: tokens beyond
the training window dilute the attention patterns learned on it. Its fix is one constant: the
**positive** logits of token pairs farther apart than half the trained length (``|i - j| > T / 2``
latent frames) are multiplied by ``alpha < 1``; negative logits, nearer pairs and text pairs are left
as they are, and so are the positions. For Wan the published ``alpha`` is 0.9 and nothing else.

Models whose RoPE has a temporal frequency with a period near the trained length (RIFLEx's intrinsic
frequency) repeat content at multiples of that period; for them UltraViCo also scales the positive
logits of the **harmonic band**, the pairs within ``halfwidth`` frames of ``m * period`` for
``m = 1 .. harmonics``, by ``beta`` (HunyuanVideo, published: ``beta = 0.6``, ``period = 50`` latent
frames, ``halfwidth = 4``, ``harmonics = 4``; its adapter fills them in). The reference code measures
those distances in tokens of a 544 x 960 frame; here they are frame distances, the same bands on
whole frames.

As bands: the pairs within ``T / 2`` frames, the pairs beyond (``Band.positive_logit_scale =
alpha``), and the harmonic band (``beta``) when there is one. The scale applies to each logit before
the softmax, which no fused dense kernel does; ``freeloc.attention._scaled`` computes it on ``flex``
(one ``flex_attention`` call with a ``score_mod``) and ``chunked`` (chunks of query rows), and the
dense ``reference`` is the definition. ``backend="auto"`` picks ``flex`` on CUDA, ``chunked`` elsewhere.

Examples:
    >>> m = UltraViCo.for_length(64, 16)
    >>> m
    UltraViCo(alpha=0.9, window=8, beta=None, period=None, halfwidth=4, harmonics=4)
    >>> [(b.name, b.positive_logit_scale) for b in m.band_set(64, 4).bands]
    [('within', None), ('beyond', 0.9)]
    >>> h = UltraViCo(window=16, beta=0.6, period=50)
    >>> [(b.name, b.positive_logit_scale, int(b.pairs.sum())) for b in h.band_set(132, 1).bands]
    [('within', None, 4084), ('beyond', 0.9, 11288), ('harmonic', 0.6, 2052)]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .bands import Band, BandSet, frame_index_grid
from .methods import Method, _check_frames, _is_int, _is_number, register
from .rotary import RotaryLayout

__all__ = ["UltraViCo"]


@register
@dataclass(frozen=True)
class UltraViCo(Method):
    """UltraViCo's logit decay.

    Args:
        alpha: the factor of positive logits beyond ``window`` frames, in (0, 1].
        window: the frame distance up to which nothing changes, half the trained length.
        beta: the factor of positive logits in the harmonic band, in (0, 1]; ``None``: no harmonic band.
        period: the harmonic period in latent frames (> 0); given with ``beta`` and only then.
        halfwidth: frames either side of each multiple of ``period`` in the band (int >= 0).
        harmonics: how many multiples of ``period`` (int >= 1).
    """

    name = "ultravico"
    changes_positions = False
    alpha: float = 0.9
    window: int = 10
    beta: float | int | None = None
    period: float | int | None = None
    halfwidth: int = 4
    harmonics: int = 4

    def __post_init__(self) -> None:
        if not (_is_number(self.alpha) and 0 < self.alpha <= 1):
            raise ValueError(f"UltraViCo.alpha must be in (0, 1], got {self.alpha!r}")
        if not _is_int(self.window) or self.window < 0:
            raise ValueError(f"UltraViCo.window must be an int >= 0 (frames), got {self.window!r}")
        if (self.beta is None) != (self.period is None):
            raise ValueError(f"UltraViCo.beta and UltraViCo.period go together (the harmonic band's factor and "
                             f"period), got beta={self.beta!r} and period={self.period!r}")
        if self.beta is not None and not (_is_number(self.beta) and 0 < self.beta <= 1):
            raise ValueError(f"UltraViCo.beta must be in (0, 1] or None, got {self.beta!r}")
        if self.period is not None and not (_is_number(self.period) and 0 < self.period < float("inf")):
            raise ValueError(f"UltraViCo.period must be a number of frames > 0 or None, got {self.period!r}")
        if not _is_int(self.halfwidth) or self.halfwidth < 0:
            raise ValueError(f"UltraViCo.halfwidth must be an int >= 0 (frames), got {self.halfwidth!r}")
        if not _is_int(self.harmonics) or self.harmonics < 1:
            raise ValueError(f"UltraViCo.harmonics must be an int >= 1, got {self.harmonics!r}")

    @classmethod
    def for_length(cls, num_frames: int, trained_frames: int) -> UltraViCo | None:
        """``window = trained_frames // 2`` and the published ``alpha = 0.9``; ``None`` when not longer."""
        _check_frames(num_frames, trained_frames)
        if num_frames <= trained_frames:
            return None
        return cls(window=trained_frames // 2)

    def band_set(self, num_frames: int, tokens_per_frame: int = 1, rotary: RotaryLayout | None = None) -> BandSet:
        i, j = frame_index_grid(num_frames)
        distance = (i - j).abs()
        harmonic = torch.zeros_like(distance, dtype=torch.bool)
        if self.beta is not None and self.period is not None:
            for m in range(1, self.harmonics + 1):
                harmonic |= (distance.double() - m * self.period).abs() <= self.halfwidth
        beyond = (distance > self.window) & ~harmonic
        pos = torch.arange(num_frames, dtype=torch.float64)
        bands = [Band("within", ~beyond & ~harmonic, pos, pos)]
        if bool(beyond.any()):
            bands.append(Band("beyond", beyond, pos, pos, positive_logit_scale=float(self.alpha)))
        if bool(harmonic.any()):
            bands.append(Band("harmonic", harmonic, pos, pos, positive_logit_scale=float(self.beta)))  # type: ignore[arg-type]
        label = f"ultravico(alpha={self.alpha:g}, window={self.window}"
        if self.beta is not None:
            label += f", beta={self.beta:g}, period={self.period:g}±{self.halfwidth}x{self.harmonics}"
        return BandSet(num_frames, tuple(bands), label=label + ")")

