"""Composed methods: an attention pattern's bounded context with re-encoded positions inside it.

Past a few times the trained length every layer meets both kinds of out-of-distribution input: more
keys than it was trained on (context dilution) and relative distances it never saw. An attention
pattern (``TSA``, ``SlidingWindow``) bounds the context but keeps the original positions, so its
striped tier and its first-frame sink still reach distances past the trained range; VRPR keeps every
distance in range but lets each query attend every key. A composed method does both:

* the **pairs** it attends are exactly the pattern's (frame pairs and stripes);
* the **positions** of every attended pair are the position method's (VRPR's tiers).

As bands: every band of the pattern is intersected with every band of the position method; the
intersection keeps the pattern band's stripe and the position band's query and key positions. The
bands of each method are disjoint, so the intersections are too, and ``attend`` merges them exactly by
their log-sum-exp as it merges any band set.

Registered methods:

* ``"tsa+vrpr"``: ``TSAVRPR``, Tiered Sparse Attention with VRPR's positions (the striped tier and the
  sink at re-encoded, trained distances);
* ``"window+vrpr"``: ``WindowVRPR``, the sliding window (with the first-frame sink) with VRPR's
  positions (the sink at a trained distance).

Examples:
    >>> m = TSAVRPR.for_length(81, 21)
    >>> m.to_dict()["pattern"]["d2"], m.to_dict()["positions"]["g2"]
    (24, 8)
    >>> bands = m.band_set(81, 4)
    >>> bool(bands.frame_pairs().equal(m.pattern.band_set(81, 4).frame_pairs()))
    True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from .bands import Band, BandSet
from .methods import Method, _check_frames, register
from .patterns import TSA, SlidingWindow
from .positions import VRPR
from .rotary import RotaryLayout

__all__ = ["ComposedMethod", "TSAVRPR", "WindowVRPR", "compose_bands"]


def compose_bands(pattern: BandSet, positions: BandSet, label: str) -> BandSet:
    """The pairs (and stripes) of ``pattern`` at the positions of ``positions``.

    Each non-empty intersection of a pattern band with a position band becomes one band named
    ``"<pattern band>/<position band>"``. The position set's frequency override (if any) is kept.
    """
    if pattern.num_frames != positions.num_frames:
        raise ValueError(f"compose_bands: the pattern has {pattern.num_frames} frames, the positions "
                         f"{positions.num_frames}")
    bands = []
    for p in pattern.bands:
        for q in positions.bands:
            pairs = p.pairs & q.pairs
            if bool(pairs.any()):
                if p.positive_logit_scale is not None or q.positive_logit_scale is not None:
                    raise ValueError("compose_bands composes positions and patterns, not logit scales (UltraViCo)")
                bands.append(Band(f"{p.name}/{q.name}", pairs, q.q_pos, q.k_pos, p.stripe))
    return BandSet(pattern.num_frames, tuple(bands), positions.t_freqs, label)


class ComposedMethod(Method):
    """Base of the composed methods: a ``pattern`` (which pairs) and ``positions`` (at which positions).

    Subclasses are frozen dataclasses with the two fields and the classes they accept; the fields may
    also be given as parameter dicts (as in a plan's JSON), which are built into those classes.
    """

    pattern_cls: ClassVar[type[Method]]
    positions_cls: ClassVar[type[Method]]
    pattern: Any
    positions: Any

    def __post_init__(self) -> None:
        for field_name, cls in (("pattern", self.pattern_cls), ("positions", self.positions_cls)):
            value = getattr(self, field_name)
            if isinstance(value, dict):
                try:
                    value = cls(**value)
                except TypeError as e:
                    raise ValueError(f"{type(self).__name__}.{field_name}: {e}; accepted parameters: "
                                     f"{[f.name for f in dataclasses.fields(cls)]}") from e  # type: ignore[arg-type]
                object.__setattr__(self, field_name, value)
            if not isinstance(value, cls):
                raise ValueError(f"{type(self).__name__}.{field_name} must be a {cls.__name__} (or a dict of its "
                                 f"parameters), got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, "pattern": dataclasses.asdict(self.pattern),
                "positions": dataclasses.asdict(self.positions)}

    def band_set(self, num_frames: int, tokens_per_frame: int, rotary: RotaryLayout | None = None) -> BandSet:
        pattern = self.pattern.band_set(num_frames, tokens_per_frame, rotary)
        positions = self.positions.band_set(num_frames, tokens_per_frame, rotary)
        return compose_bands(pattern, positions, f"{pattern.label} at {positions.label or self.positions.name}")

    @classmethod
    def for_length(cls, num_frames: int, trained_frames: int) -> ComposedMethod | None:
        """Both methods' settings for the length; ``None`` (plain attention) when not longer than trained."""
        _check_frames(num_frames, trained_frames)
        if num_frames <= trained_frames:
            return None
        return cls(cls.pattern_cls.for_length(num_frames, trained_frames),  # type: ignore[call-arg]
                   cls.positions_cls.for_length(num_frames, trained_frames))


@register
@dataclass(frozen=True)
class TSAVRPR(ComposedMethod):
    """Tiered Sparse Attention's pairs at VRPR's positions (``"tsa+vrpr"``).

    Args:
        pattern: the ``TSA`` (its sink's own grouped positions are replaced by VRPR's).
        positions: the ``VRPR`` setting.
    """

    name = "tsa+vrpr"
    pattern_cls = TSA
    positions_cls = VRPR
    pattern: TSA | dict[str, Any]
    positions: VRPR | dict[str, Any]


@register
@dataclass(frozen=True)
class WindowVRPR(ComposedMethod):
    """The sliding window's pairs at VRPR's positions (``"window+vrpr"``).

    Args:
        pattern: the ``SlidingWindow``.
        positions: the ``VRPR`` setting.
    """

    name = "window+vrpr"
    pattern_cls = SlidingWindow
    positions_cls = VRPR
    pattern: SlidingWindow | dict[str, Any]
    positions: VRPR | dict[str, Any]
