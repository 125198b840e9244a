"""The real Open-Sora 2.0 ``MMDiTModel``, from the vendored copy of its model files beside the repository.

Open-Sora is not on the package index (installed from source it needs flash-attn, liger-kernel and
colossalai). A copy of ``opensora/models/mmdit`` (Apache-2.0; its ``VENDORED.md`` lists every change:
plain-PyTorch fallbacks for those kernels) lies in ``../shared/vendor/opensora_mmdit`` relative to the
repository root. The tests build the real class from there at tiny sizes, with inputs shaped as Open-Sora's
sampler builds them (``opensora/utils/sampling.py``: ``get_noise``, ``pack``, ``prepare``,
``I2VDenoiser.denoise``), and are skipped with :data:`MISSING` as the reason where the copy is absent.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

#: ``../shared/vendor`` from the repository root (this file is ``<root>/tests/opensora_vendored.py``).
VENDOR = (Path(__file__).resolve().parents[1] / ".." / "shared" / "vendor").resolve()
PACKAGE = VENDOR / "opensora_mmdit"
#: Why the real class cannot be built here (None: it can).
MISSING = (None if (PACKAGE / "model.py").is_file() else
           f"the vendored Open-Sora 2.0 model files are not at {PACKAGE} (the repository's ../shared/vendor); "
           f"the real MMDiTModel cannot be built")

LATENT_CHANNELS = 4  # Open-Sora 2.0 (HunyuanVideo VAE): 16
PATCH = 2
#: A tiny MMDiT (the released 256px config in brackets); axes_dim sums to the head dim, hidden_size / num_heads.
TINY: dict[str, Any] = dict(
    in_channels=LATENT_CHANNELS * PATCH * PATCH,  # [64 = 16 * 2 * 2]
    vec_in_dim=16,  # CLIP pooled [768]
    context_in_dim=32,  # T5 [4096]
    hidden_size=64,  # [3072]
    mlp_ratio=4.0,
    num_heads=2,  # [24]
    depth=2,  # [19]
    depth_single_blocks=2,  # [38]
    axes_dim=[8, 12, 12],  # [16, 56, 56]
    theta=10_000,
    qkv_bias=True,
)
#: The released inference config (configs/diffusion/inference/256px.py): separate q/k/v projections (in the
#: single-stream blocks q_proj / k_proj / v_mlp), Liger (rotate-half) RoPE, an image-conditioning input.
RELEASE: dict[str, Any] = dict(guidance_embed=False, fused_qkv=False, use_liger_rope=True, cond_embed=True)
#: The Flux defaults of the same class: fused qkv, EmbedND (interleaved) RoPE, a guidance embedding.
FLUX_DEFAULTS: dict[str, Any] = dict(guidance_embed=True, fused_qkv=True, use_liger_rope=False, cond_embed=False)
#: Latent height and width of every input: a (4, 3) token grid after the 2 x 2 patches.
LATENT_HW = (8, 6)


def load() -> ModuleType:
    """The vendored package ``opensora_mmdit`` (imported once)."""
    if MISSING is not None:
        raise FileNotFoundError(MISSING)
    if "opensora_mmdit" in sys.modules:
        return sys.modules["opensora_mmdit"]
    # Its timestep_embedding is decorated with torch.compile, which reads TORCHDYNAMO_DISABLE when the
    # decorator runs: with it set while the files are imported the function stays eager (compiling it on
    # a CPU takes 15-20 s). torch._dynamo is imported first so that its own configuration, which reads
    # the same variable once, keeps the process's setting.
    import torch._dynamo  # noqa: F401

    spec = importlib.util.spec_from_file_location("opensora_mmdit", PACKAGE / "__init__.py",
                                                  submodule_search_locations=[str(PACKAGE)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    before = os.environ.get("TORCHDYNAMO_DISABLE")
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    sys.modules["opensora_mmdit"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["opensora_mmdit"]
        raise
    finally:
        if before is None:
            del os.environ["TORCHDYNAMO_DISABLE"]
        else:
            os.environ["TORCHDYNAMO_DISABLE"] = before
    return module


def build(variant: dict[str, Any], seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """The real ``MMDiTModel`` at the tiny sizes in ``variant`` (:data:`RELEASE`, :data:`FLUX_DEFAULTS`), fp32, eval.

    The released config's conditioning projection ``cond_in`` is initialised to zero (a checkpoint fills
    it); here it gets small random weights, so that the conditioning input reaches the blocks.
    """
    load()
    flux = importlib.import_module("opensora_mmdit.model").Flux
    torch.manual_seed(seed)
    model = flux(device_map="cpu", torch_dtype=torch.float32, **(TINY | variant | overrides))
    if model.config.cond_embed:
        torch.nn.init.normal_(model.cond_in.weight, std=0.02)
    return model.eval()


def pack(x: torch.Tensor) -> torch.Tensor:
    """``sampling.pack``: (B, C, T, H, W) -> (B, T * H/2 * W/2, C * 2 * 2), frame-major tokens."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // PATCH, PATCH, w // PATCH, PATCH)
    return x.permute(0, 2, 3, 5, 1, 4, 6).reshape(b, t * (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def img_ids(batch: int, frames: int, height: int, width: int) -> torch.Tensor:
    """``sampling.prepare``'s ``img_ids``: (t, h, w) of every token, frame-major, float."""
    ids = torch.zeros(frames, height, width, 3)
    ids[..., 0] = ids[..., 0] + torch.arange(frames)[:, None, None]
    ids[..., 1] = ids[..., 1] + torch.arange(height)[None, :, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width)[None, None, :]
    return ids.reshape(1, -1, 3).repeat(batch, 1, 1)


def inputs(model: torch.nn.Module, frames: int, batch: int = 2, text: int = 7, seed: int = 1) -> dict[str, Any]:
    """The forward keyword arguments of one denoising step at ``frames`` latent frames, as the sampler builds
    them: packed noise, ``img_ids``, T5 text with zero ``txt_ids``, the CLIP vector, the timestep, the guidance
    scale, and for a conditioned model ``cond`` (the first frame as the reference image)."""
    g = torch.Generator().manual_seed(seed)
    h, w = LATENT_HW
    z = torch.randn(batch, LATENT_CHANNELS, frames, h, w, generator=g)
    kw: dict[str, Any] = dict(
        img=pack(z), img_ids=img_ids(batch, frames, h // PATCH, w // PATCH),
        txt=torch.randn(batch, text, model.config.context_in_dim, generator=g), txt_ids=torch.zeros(batch, text, 3),
        y_vec=torch.randn(batch, model.config.vec_in_dim, generator=g),
        timesteps=torch.full((batch,), 0.7), guidance=torch.full((batch,), 7.5))
    if model.config.cond_embed:
        masks = torch.zeros(batch, 1, frames, h, w)
        masks[:, :, 0] = 1
        reference = torch.randn(batch, LATENT_CHANNELS, frames, h, w, generator=g) * masks
        kw["cond"] = pack(torch.cat((masks, reference), dim=1))
    return kw
