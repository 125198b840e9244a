"""Test configuration: make helper modules in this folder (e.g. ``opensora_vendored``) importable."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
