"""``python -m freeloc``: the same as the ``freeloc`` command (see :mod:`freeloc.cli`)."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
