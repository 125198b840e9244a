"""``python -m freeloc``: the same as the ``freeloc`` command (see ``freeloc.app.cli``)."""

from __future__ import annotations

from .app.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
