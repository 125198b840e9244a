"""The README's Python examples run as written (the one that needs no model download)."""

from __future__ import annotations

import re
import time
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_core_example_runs_on_a_cpu() -> None:
    """'Using the core': sized for a CPU, it runs in moments; its output has q's shape."""
    text = README.read_text()
    section = text[text.index("## Using the core"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]
    scope: dict[str, object] = {}
    t0 = time.perf_counter()
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102
    print(f"the example ran in {time.perf_counter() - t0:.2f} s")
    out, q = scope["out"], scope["q"]
    assert out.shape == q.shape  # type: ignore[attr-defined]
    assert int(scope["r"].abs().max()) <= 20  # type: ignore[attr-defined]
