"""Conformance cases for the HunyuanVideo adapters (HunyuanVideo 1.0 and 1.5)."""

from __future__ import annotations

import torch

from freeloc.testing import ConformanceCase

from . import DIFFUSERS_MISSING

TEXT = 6  # text tokens in every self-attention sequence (after the video tokens)
TEXT_2 = 3  # HunyuanVideo 1.5: ByT5 tokens
IMAGE = 2  # HunyuanVideo 1.5: image tokens (zero image embeds: text-to-video, all masked)


def _hunyuan() -> torch.nn.Module:
    import diffusers

    torch.manual_seed(0)
    return diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    ).eval()


def _text_mask() -> torch.Tensor:
    mask = torch.ones(2, TEXT, dtype=torch.bool)
    mask[1, -3:] = False  # the second sample's prompt is 3 tokens shorter (padding)
    return mask


def _run(model: torch.nn.Module, frames: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, frames, 4, 4, generator=g)
    enc = torch.randn(2, TEXT, 16, generator=g)
    pooled = torch.randn(2, 8, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([500, 300]), enc, _text_mask(), pooled, guidance=torch.tensor([6000.0, 6000.0]),
                     return_dict=False)[0]


def _hunyuan15() -> torch.nn.Module:
    import diffusers

    torch.manual_seed(0)
    return diffusers.HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
        image_embed_dim=12, rope_axes_dim=(2, 4, 4),
    ).eval()


def _run15(model: torch.nn.Module, frames: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, frames, 4, 4, generator=g)
    enc = torch.randn(2, TEXT, 16, generator=g)
    enc_2 = torch.randn(2, TEXT_2, 8, generator=g)
    mask_2 = torch.ones(2, TEXT_2, dtype=torch.bool)
    mask_2[0, -1:] = False
    with torch.no_grad():
        return model(x, torch.tensor([500.0, 300.0]), enc, _text_mask(), encoder_hidden_states_2=enc_2,
                     encoder_attention_mask_2=mask_2, image_embeds=torch.zeros(2, IMAGE, 12), return_dict=False)[0]


CASES = [
    ConformanceCase("hunyuan-video", _hunyuan, _run, trained_video_frames=9, trained_latent=3, text_tokens=TEXT,
                    skip_reason=DIFFUSERS_MISSING),
    ConformanceCase("hunyuan-video-1.5", _hunyuan15, _run15, trained_video_frames=9, trained_latent=3,
                    text_tokens=TEXT + TEXT_2 + IMAGE, skip_reason=DIFFUSERS_MISSING),
]
