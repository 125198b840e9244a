"""Conformance cases for the CogVideoX adapter: 1.0 (RoPE), 1.5 (RoPE, temporal patch 2), 2b-style (no RoPE).

``image_rotary_emb`` is built by the pipeline's own helper
(``CogVideoXPipeline._prepare_rotary_positional_embeddings``), so the unhooked model is exactly what
a pipeline would run.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch

from freeloc.testing import ConformanceCase

from . import DIFFUSERS_MISSING

#: Latent height and width of every run: the tiny configs' sample_height / sample_width (base grid 4 x 4).
LATENT_HW = 8
VAE_SPATIAL = 8


def tiny_cogvideox(**config: object) -> torch.nn.Module:
    import diffusers

    base = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
                text_embed_dim=16, num_layers=2, sample_width=LATENT_HW, sample_height=LATENT_HW, sample_frames=49,
                patch_size=2, max_text_seq_length=12, use_rotary_positional_embeddings=True)
    torch.manual_seed(0)
    return diffusers.CogVideoXTransformer3DModel(**(base | config)).eval()


def pipeline_rotary_emb(model: torch.nn.Module, latent_frames: int, latent_h: int = LATENT_HW,
                        latent_w: int = LATENT_HW) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``image_rotary_emb`` exactly as ``CogVideoXPipeline`` computes it (None for a model without RoPE)."""
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline

    if not model.config.use_rotary_positional_embeddings:
        return None
    pipe = types.SimpleNamespace(vae_scale_factor_spatial=VAE_SPATIAL, transformer=model)
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(
        pipe, latent_h * VAE_SPATIAL, latent_w * VAE_SPATIAL, latent_frames, torch.device("cpu"))


def make_run(text_tokens: int) -> Callable[[torch.nn.Module, int], torch.Tensor]:
    def run(model: torch.nn.Module, frames: int) -> torch.Tensor:
        latent = frames * (model.config.patch_size_t or 1)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, latent, model.config.in_channels, LATENT_HW, LATENT_HW, generator=g)
        enc = torch.randn(2, text_tokens, model.config.text_embed_dim, generator=g)
        with torch.no_grad():
            return model(x, enc, torch.tensor([500, 300]), image_rotary_emb=pipeline_rotary_emb(model, latent),
                         return_dict=False)[0]

    return run


CASES = [
    # CogVideoX 1.0: 21 video frames = 6 latent frames; a text length other than max_text_seq_length
    ConformanceCase("cogvideox-1.0", tiny_cogvideox, make_run(7), trained_video_frames=21, trained_latent=6,
                    text_tokens=7, skip_reason=DIFFUSERS_MISSING),
    # CogVideoX 1.5: temporal patch 2, 21 video frames = 6 latent frames = 3 temporal tokens
    ConformanceCase("cogvideox-1.5", lambda: tiny_cogvideox(patch_size_t=2, patch_bias=False), make_run(7),
                    trained_video_frames=21, trained_latent=3, text_tokens=7, skip_reason=DIFFUSERS_MISSING),
    # CogVideoX-2b style: no RoPE (additive sin-cos positions, which need text = max_text_seq_length)
    ConformanceCase("cogvideox-2b-norope", lambda: tiny_cogvideox(use_rotary_positional_embeddings=False),
                    make_run(12), trained_video_frames=21, trained_latent=6, text_tokens=12, position_methods=False,
                    skip_reason=DIFFUSERS_MISSING),
]
