"""Writing output files whole or not at all, and checking where they go before any work.

A file is written under a temporary name in its own folder and renamed into place when complete
(``os.replace`` is atomic on one file system), so an interrupted run (Ctrl-C, an error) never leaves a
partial file where a result is expected.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "check_writable"]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on leaving the block it is renamed to ``path``, or
    deleted if the block raised.

    Examples:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "plan.json"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("{}")
        >>> target.read_text()
        '{}'
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_writable(path: str | Path, what: str, folder: bool = False) -> Path:
    """``path`` if a file (``folder``: a folder) can be written there, else a ``ValueError`` naming ``what``,
    the path and the reason: its parent folder is missing or is not a folder, is not writable, or the
    path is a folder where a file is wanted (or a file where a folder is wanted)."""
    path = Path(path)
    if folder and path.exists():
        if not path.is_dir():
            raise ValueError(f"{what}: {str(path)!r} exists and is not a folder")
        _try_writing_in(path, what)
        return path
    if not folder and path.is_dir():
        raise ValueError(f"{what}: {str(path)!r} is a folder; give a file name")
    parent = path.parent
    if not parent.exists():
        raise ValueError(f"{what}: folder {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise ValueError(f"{what}: {str(parent)!r} is not a folder")
    _try_writing_in(parent, what)
    return path


def _try_writing_in(folder: Path, what: str) -> None:
    """Create and delete a file in ``folder``: the one test that holds for every file system and user."""
    probe = folder / f".freeloc-write-check-{os.getpid()}"
    try:
        probe.open("x").close()
        probe.unlink()
    except OSError as err:
        raise ValueError(f"{what}: cannot write in folder {str(folder)!r} ({err.strerror or err})") from None
