"""Progress of a long loop without any dependency: a status line on stderr, or the caller's callback.

A function that loops for a while takes ``progress: Progress``: ``True`` writes one short line to stderr,
rewritten in place after each step (``probing layers: 3/8, 12 s``) and ended when the loop is done;
``False`` writes nothing; a callable receives ``(done, total)`` after each step, and ``(0, total)``
before the first, so that an application can draw its own bar (the ``freeloc`` command passes a tqdm
one).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

__all__ = ["Progress", "reporter"]

#: What a function with progress accepts.
Progress = bool | Callable[[int, int], None]


def reporter(progress: Progress, label: str) -> Callable[[int, int], None]:
    """The ``(done, total)`` callback for ``progress``.

    Args:
        progress: ``True`` for the stderr status line, ``False`` for none, or the caller's callback.
        label: what the status line calls the loop, e.g. ``"probing layers"``.

    Returns:
        A callable to call with ``(0, total)`` before the loop and ``(done, total)`` after each step.

    Raises:
        TypeError: If ``progress`` is neither a bool nor a callable.
    """
    if callable(progress):
        return progress
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or a callable (done, total), got {progress!r}")
    if not progress:
        return lambda done, total: None
    start = time.perf_counter()

    def status(done: int, total: int) -> None:
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\r{label}: {done}/{total}, {time.perf_counter() - start:.0f} s{end}")
        sys.stderr.flush()

    return status
