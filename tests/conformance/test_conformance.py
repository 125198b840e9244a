"""Every adapter of freeloc passes the conformance suite of :mod:`freeloc.testing`, on the cases of ``cases_*.py``.

To add a model: write ``cases_<model>.py`` with a ``CASES`` list of :class:`freeloc.testing.ConformanceCase`.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from freeloc.testing import ConformanceCase, conformance_tests


def _cases() -> list[ConformanceCase]:
    cases: list[ConformanceCase] = []
    here = Path(__file__).parent
    for info in sorted(pkgutil.iter_modules([str(here)]), key=lambda m: m.name):
        if info.name.startswith("cases_"):
            cases.extend(importlib.import_module(f"{__package__}.{info.name}").CASES)
    return cases


CASES = _cases()
test_conformance = conformance_tests(CASES)
