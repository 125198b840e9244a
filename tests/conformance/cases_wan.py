"""Conformance cases for the Wan adapter."""

from __future__ import annotations

import torch

from freeloc.testing import ConformanceCase

from . import DIFFUSERS_MISSING


def _wan(cls_name: str) -> torch.nn.Module:
    import diffusers

    torch.manual_seed(0)
    return getattr(diffusers, cls_name)(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=128,
    ).eval()


def _run(model: torch.nn.Module, frames: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, frames, 8, 6, generator=g)
    enc = torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([500, 300]), enc, return_dict=False)[0]


CASES = [
    ConformanceCase("wan", lambda: _wan("WanTransformer3DModel"), _run, trained_video_frames=21, trained_latent=6,
                    skip_reason=DIFFUSERS_MISSING),
    ConformanceCase("skyreels-v2", lambda: _wan("SkyReelsV2Transformer3DModel"), _run, trained_video_frames=21,
                    trained_latent=6, skip_reason=DIFFUSERS_MISSING),
]
