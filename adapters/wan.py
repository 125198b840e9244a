"""Wan 2.1 / 2.2 (``WanTransformer3DModel``) and SkyReels-V2 (``SkyReelsV2Transformer3DModel``).

What is hooked:

* a forward pre-hook on the transformer records the latent grid of each call
  (``(F / p_t, H / p_h, W / p_w)``);
* the processor of every self-attention ``blocks.{i}.attn1`` is replaced by
  ``FreeLOCWanAttnProcessor``, which computes q/k/v exactly as diffusers' ``WanAttnProcessor``
  (projections, fused or not, RMS norms) and attends with ``freeloc.attention.attend`` using the
  layer's method; a layer whose method resolves to nothing at this length calls the original
  processor, so it is bit-for-bit the unhooked model. Cross-attention ``attn2`` is not touched.

The rotary layout is read from the model's own ``rope`` module: its channel split and, from its
frequency buffers, its theta. The trained lengths and the shipped plan are declared in
``WanAdapter.model_data``.

``SkyReelsV2Transformer3DModel`` reuses Wan's blocks, rope and processor signature unchanged and is
handled by the same adapter (its trained length must be given: ``trained_frames=``). Layers called
with an attention mask (SkyReels-V2 diffusion forcing with causal blocks) run the original processor.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch

from ..adapter import (
    ConfigVariant,
    FreeLOCProcessor,
    LayerContext,
    ModelClass,
    ModelData,
    ShippedPlan,
    TransformerAdapter,
)
from ..rotary import RotaryLayout

__all__ = ["WanAdapter", "FreeLOCWanAttnProcessor", "rotary_layout"]


def rotary_layout(transformer: torch.nn.Module) -> RotaryLayout:
    """The model's rotary layout: channel split from ``rope``, theta from its frequency buffers."""
    rope = transformer.rope
    t = rope.t_dim
    if rope.freqs_cos.is_meta or t <= 2:
        # no values to read (a model on the meta device, or a single temporal pair): the rope class's theta
        theta = float(inspect.signature(type(rope).__init__).parameters["theta"].default)
    else:
        # pair 1 of the temporal part rotates by theta ** (-2 / t) per position: read it at position 1
        omega = math.atan2(float(rope.freqs_sin[1, 3]), float(rope.freqs_cos[1, 2]))
        theta = (1.0 / omega) ** (t / 2.0)
    return RotaryLayout(t, rope.h_dim, rope.w_dim, theta=float(round(theta, 3)), interleaved=True)


class FreeLOCWanAttnProcessor(FreeLOCProcessor):
    """Self-attention of one Wan block through ``freeloc.attention.attend``."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        method = self.ctx.method()
        if method is None or encoder_hidden_states is not None or attention_mask is not None or rotary_emb is None:
            return self.ctx.passthrough(
                lambda: self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb))
        with self.ctx.timer():
            if attn.fused_projections:
                query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            else:
                query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
            query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
            key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
            value = value.unflatten(2, (attn.heads, -1))
            out = self.ctx.attend(query, key, value, method).flatten(2, 3).type_as(query)
            return attn.to_out[1](attn.to_out[0](out))


class WanAdapter(TransformerAdapter):
    """Installs FreeLOC on a ``WanTransformer3DModel`` (or ``SkyReelsV2Transformer3DModel``)."""

    model_data = ModelData(
        classes=(
            ModelClass("WanTransformer3DModel", trained_video_frames=81,  # 21 latent frames (Wan2.1, Wan2.2 A14B)
                       variants=(ConfigVariant("Wan2.2-TI2V-5B", {"in_channels": 48}, trained_video_frames=121),)),
            ModelClass("SkyReelsV2Transformer3DModel", trained_video_frames=None,
                       note="SkyReels-V2 checkpoints differ in trained length: pass trained_frames="),
        ),
        temporal_factor=4,
        plans=(ShippedPlan("wan2.1-t2v-1.3b", "WanTransformer3DModel",
                           {"num_layers": 30, "num_attention_heads": 12, "attention_head_dim": 128},
                           package=__package__),),
    )

    def attention_layers(self) -> list[torch.nn.Module]:
        """The self-attention modules, in order (``blocks.{i}.attn1``)."""
        return [block.attn1 for block in self.transformer.blocks]

    def rotary_layout(self) -> RotaryLayout:
        return rotary_layout(self.transformer)

    def temporal_patch(self) -> int:
        return int(self.transformer.config.patch_size[0])

    def video_to_latent(self, frames: int, factor: int) -> int:
        """Temporal tokens of ``frames`` video frames, counted as Wan's pipelines count them: a length not of
        the form ``factor * n + 1`` is first rounded as they round it (320 -> 321, 24 -> 25), then
        ``(frames - 1) // factor + 1`` latent frames, ``// temporal_patch`` tokens."""
        if factor > 1 and frames % factor != 1:  # factor 1: no temporal compression, nothing to round
            frames = frames // factor * factor + 1
        return super().video_to_latent(max(frames, 1), factor)

    def grid_from_call(self, args: tuple, kwargs: dict[str, Any]) -> tuple[int, int, int]:
        hs = args[0] if args else kwargs["hidden_states"]  # (B, C, F, H, W)
        _, _, f, h, w = hs.shape
        pt, ph, pw = self.transformer.config.patch_size
        return (f // pt, h // ph, w // pw)

    #: Latent size (height, width) of the synthetic probe inputs: 480 x 832 video, VAE factor 8.
    PROBE_LATENT_SIZE = (60, 104)
    #: Text tokens of the synthetic probe inputs.
    PROBE_TEXT_TOKENS = 64

    def synthetic_inputs(self, frames: int, seed: int = 0, latent_size: tuple[int, int] | None = None
                         ) -> dict[str, Any]:
        """Gaussian latents ``(1, C, frames * p_t, H, W)``, 64 Gaussian text tokens, timestep 500."""
        cfg = self.transformer.config
        g = torch.Generator().manual_seed(seed)
        dtype = next(self.transformer.parameters()).dtype
        device = next(self.transformer.parameters()).device
        h, w = latent_size or self.PROBE_LATENT_SIZE
        latents = torch.randn(1, cfg.in_channels, frames * cfg.patch_size[0], h, w, generator=g)
        text = torch.randn(1, self.PROBE_TEXT_TOKENS, cfg.text_dim, generator=g)
        return dict(hidden_states=latents.to(device, dtype), timestep=torch.tensor([500], device=device),
                    encoder_hidden_states=text.to(device, dtype), return_dict=False)

    def make_processor(self, original: Any, ctx: LayerContext) -> FreeLOCWanAttnProcessor:
        return FreeLOCWanAttnProcessor(original, ctx)
