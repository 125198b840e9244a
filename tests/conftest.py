"""Test configuration and the fixtures test modules share.

The helper modules of this folder (``support``, ``opensora_vendored``) are made importable.
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

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def is_png() -> Callable[[Path], bool]:
    """Whether a file is a PNG (starts with the PNG signature)."""
    return lambda path: Path(path).read_bytes()[:8] == PNG_SIGNATURE


@pytest.fixture
def is_mp4() -> Callable[[Path], bool]:
    """Whether a file is a non-trivial mp4 (an ISO media file: ``ftyp`` box first)."""
    return lambda path: path.stat().st_size > 1000 and path.read_bytes()[4:8] == b"ftyp"


@pytest.fixture
def tiny_shapes() -> Any:
    """A shapes model config small enough to train in a second (one layer, 2 x 96 wide, 4 frames)."""
    from freeloc.shapes.model import ShapesConfig

    return ShapesConfig(num_layers=1, num_heads=2, head_dim=96, ffn_dim=32, batch=2, trained_frames=4)


@pytest.fixture
def spec_with_shapes() -> Callable[[int], Any]:
    """The first ``random_spec(seed)`` (seeds 0, 1, ...) with at least the given number of shapes."""
    from freeloc.shapes.clips import random_spec

    def find(min_shapes: int) -> Any:
        for seed in range(100):
            spec = random_spec(seed)
            if spec.num_shapes >= min_shapes:
                return spec
        raise AssertionError(f"no spec with {min_shapes} shapes among seeds 0-99")

    return find


@pytest.fixture
def pipeline_loader(monkeypatch: pytest.MonkeyPatch) -> Callable[..., type]:
    """Stand in for ``diffusers.DiffusionPipeline`` (no hub here): ``pipeline_loader(build, encode=None)``.

    The returned loader's ``from_pretrained(model, torch_dtype=None)`` records ``(model, torch_dtype)`` in
    its ``calls`` and returns ``build()``, with ``encode`` as its ``encode_prompt`` when given.
    """
    diffusers = pytest.importorskip("diffusers", reason="the pipeline loader stands in for diffusers'")

    def install(build: Callable[[], Any], encode: Callable[..., Any] | None = None) -> type:
        class Loader:
            calls: list[tuple[str, Any]] = []

            @classmethod
            def from_pretrained(cls, model: str, torch_dtype: Any = None) -> Any:
                cls.calls.append((model, torch_dtype))
                pipe = build()
                if encode is not None:
                    pipe.encode_prompt = encode
                return pipe

        monkeypatch.setattr(diffusers, "DiffusionPipeline", Loader)
        return Loader

    return install


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
