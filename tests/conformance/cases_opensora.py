"""Conformance cases for the Open-Sora 2.0 adapter, on the real ``MMDiTModel`` (``tests/opensora_vendored.py``).

Two configs of the class: the released one (separate q/k/v projections, in the single-stream blocks
``q_proj`` / ``k_proj`` / ``v_mlp``; qkv bias; Liger rotate-half RoPE; the image-conditioning input) and the
Flux defaults (fused qkv, ``EmbedND`` interleaved RoPE, a guidance embedding). Skipped, with the reason, where
the vendored copy is not beside the repository.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import opensora_vendored as vendored  # tests/ is on sys.path (tests/conftest.py)
import torch

from freeloc.testing import ConformanceCase

TEXT = 7  # T5 tokens before the video tokens


def _make(variant: dict[str, Any]) -> Callable[[], torch.nn.Module]:
    return lambda: vendored.build(variant)


def _run(model: torch.nn.Module, frames: int) -> torch.Tensor:
    with torch.no_grad():
        return model(**vendored.inputs(model, frames, text=TEXT))


CASES = [
    ConformanceCase("opensora-release", _make(vendored.RELEASE), _run, trained_video_frames=21, trained_latent=6,
                    text_tokens=TEXT, skip_reason=vendored.MISSING),
    ConformanceCase("opensora-flux-defaults", _make(vendored.FLUX_DEFAULTS), _run, trained_video_frames=21,
                    trained_latent=6, text_tokens=TEXT, skip_reason=vendored.MISSING),
]
