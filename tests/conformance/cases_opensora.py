"""Conformance cases for the Open-Sora 2.0 adapter, on the stand-in model of ``tests/opensora_standin.py``
(the real ``opensora`` package cannot be installed here; see that module)."""

from __future__ import annotations

import importlib.util

import opensora_standin as standin  # tests/ is on sys.path (tests/conftest.py)
import torch

from freeloc.testing import ConformanceCase

TEXT = 5


def _model(liger: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    return standin.MMDiTModel(standin.MMDiTConfig(use_liger_rope=liger)).eval()


def _run(model: torch.nn.Module, frames: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    h, w = 3, 4
    img = torch.randn(2, frames * h * w, model.config.in_channels, generator=g)
    txt = torch.randn(2, TEXT, model.config.context_in_dim, generator=g)
    y = torch.randn(2, model.config.vec_in_dim, generator=g)
    with torch.no_grad():
        return model(img, standin.make_ids(2, frames, h, w), txt, torch.zeros(2, TEXT, 3), torch.tensor([0.3, 0.7]), y)


CASES = [
    ConformanceCase("opensora-standin-embednd", lambda: _model(False), _run, trained_video_frames=21,
                    trained_latent=6, text_tokens=TEXT),
    ConformanceCase("opensora-standin-liger", lambda: _model(True), _run, trained_video_frames=21,
                    trained_latent=6, text_tokens=TEXT),
]


def _real_model() -> torch.nn.Module:
    """The real Open-Sora 2.0 class at the stand-in's sizes (only where ``opensora`` is installed)."""
    from opensora.models.mmdit.model import MMDiTConfig, MMDiTModel  # type: ignore[import-not-found]

    torch.manual_seed(0)
    c = standin.MMDiTConfig()
    config = MMDiTConfig(from_pretrained="", cache_dir="", in_channels=c.in_channels, vec_in_dim=c.vec_in_dim,
                         context_in_dim=c.context_in_dim, hidden_size=c.hidden_size, mlp_ratio=c.mlp_ratio,
                         num_heads=c.num_heads, depth=c.depth, depth_single_blocks=c.depth_single_blocks,
                         axes_dim=c.axes_dim, theta=c.theta, qkv_bias=True, guidance_embed=False)
    return MMDiTModel(config).eval()


if importlib.util.find_spec("opensora") is not None:  # the same checks on the real class
    CASES.append(ConformanceCase("opensora-real", _real_model, _run, trained_video_frames=21, trained_latent=6,
                                 text_tokens=TEXT))
