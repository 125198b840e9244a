"""freeloc's adapter conformance cases (``cases_*.py``), run by ``test_conformance.py`` with :mod:`freeloc.testing`."""

from __future__ import annotations

import importlib.util

#: Why the diffusers-based cases cannot run here (None: they can).
DIFFUSERS_MISSING = (None if importlib.util.find_spec("diffusers") is not None
                     else "diffusers is not installed (the adapters' models come from the extra 'diffusers')")
