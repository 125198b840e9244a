"""The ``freeloc`` command's progress bars: tqdm bars behind the ``(done, total)`` callbacks that the core's
long loops take (``freeloc._progress``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._extras import require

__all__ = ["tqdm_progress"]


def tqdm_progress(desc: str, unit: str) -> Callable[[int, int], None]:
    """A ``(done, total)`` progress callback, as ``freeloc.probe`` takes, that draws a tqdm bar.

    The bar opens at the first call, with its total, and closes when ``done`` reaches it.
    """
    tqdm = require("tqdm.auto", "app", "the freeloc command's progress bar").tqdm
    bars: list[Any] = []

    def update(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc=desc, unit=unit))
        bars[0].update(done - bars[0].n)
        if done >= total:
            bars[0].close()

    return update
