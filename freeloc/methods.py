"""The method interface shared by temporal-position methods and attention-pattern methods.

Every method is a small frozen dataclass: serializable (``Method.to_dict`` /
``method_from_dict``), validated on construction, and able to describe itself at a given length
as a ``BandSet`` (``Method.band_set``). Methods register under a short name
(``"vrpr"``, ``"tsa"``, ``"pi"``...) used in layer plans and on the command line.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from .bands import BandSet
from .rotary import RotaryLayout

__all__ = ["Method", "METHODS", "method_from_dict", "register"]

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method constructible by its ``name`` (plans, CLI)."""
    METHODS[cls.name] = cls
    return cls


class Method:
    """Base class of every method. Subclasses are frozen dataclasses with a class-level ``name``."""

    name: ClassVar[str] = ""
    #: Whether the method changes temporal positions or RoPE frequencies (needs a model with RoPE), as
    #: opposed to an attention pattern (which key tokens each query attends).
    changes_positions: ClassVar[bool] = True

    def band_set(self, num_frames: int, tokens_per_frame: int, rotary: RotaryLayout) -> BandSet:
        """The bands this method attends with at ``num_frames`` temporal tokens."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """``{"method": name, **parameters}``; ``method_from_dict`` inverts it."""
        return {"method": self.name, **dataclasses.asdict(self)}  # type: ignore[call-overload]

    @classmethod
    def for_length(cls, num_frames: int, trained_frames: int) -> Method | None:
        """A setting for ``num_frames`` temporal tokens of a model trained on ``trained_frames``.

        ``None`` means the method has nothing to do at that length (plain attention).
        """
        raise NotImplementedError


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_frames(num_frames: int, trained_frames: int) -> None:
    for label, value in (("num_frames", num_frames), ("trained_frames", trained_frames)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{label} must be a positive int (temporal tokens), got {value!r}")


def method_from_dict(data: dict[str, Any]) -> Method:
    """Build a method from ``{"method": name, **parameters}`` with a clear error on bad input."""
    if not isinstance(data, dict) or "method" not in data:
        raise ValueError(f"a method must be a dict with a 'method' key, got {data!r}")
    name = data["method"]
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {sorted(METHODS)}")
    cls = METHODS[name]
    params = {k: v for k, v in data.items() if k != "method"}
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(f"method {name!r} got unknown parameter(s) {unknown}; accepted: {sorted(fields)}")
    try:
        return cls(**params)
    except TypeError as e:
        raise ValueError(f"method {name!r}: {e}") from e
