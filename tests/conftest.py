"""Test configuration and the fixtures test modules share.

The helper modules of this folder (``support``, ``opensora_standin``) are made importable.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import TOL  # noqa: E402

from freeloc.attention import attend  # noqa: E402


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Callable[[object, str], list[tuple[tuple, dict]]]:
    """``spy(owner, name)``: calls of ``owner.name`` are recorded as ``(args, kwargs)`` in the returned
    list and passed on to the original; undone after the test."""
    def install(owner: object, name: str) -> list[tuple[tuple, dict]]:
        calls: list[tuple[tuple, dict]] = []
        original = getattr(owner, name)

        def recording(*args: Any, **kwargs: Any) -> Any:
            calls.append((args, kwargs))
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, recording)
        return calls

    return install


@pytest.fixture
def matches_reference() -> Callable[..., torch.Tensor]:
    """``matches_reference(q, k, v, backend=..., **attend_kwargs)``: the backend's output, after checking it
    against the ``reference`` backend's within the dtype's tolerance (and that the reference is a real
    signal, not a degenerate output)."""
    def check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str, atol: float | None = None,
              **kwargs: Any) -> torch.Tensor:
        ref = attend(q, k, v, backend="reference", **kwargs)
        out = attend(q, k, v, backend=backend, **kwargs)
        assert out.dtype == q.dtype and out.shape == q.shape
        err = (out.float() - ref.float()).abs().max().item()
        assert err <= (TOL[q.dtype] if atol is None else atol), f"{backend} vs reference: max error {err}"
        assert ref.float().abs().max() > 0.1
        return out

    return check
