"""HunyuanVideo (``HunyuanVideoTransformer3DModel``) and HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``).

What is hooked:

* a forward pre-hook on the transformer records the latent grid of each call
  (``(F / patch_size_t, H / patch_size, W / patch_size)``);
* HunyuanVideo: the processor of every ``transformer_blocks.{i}.attn`` (dual stream: video tokens
  through ``to_q/k/v``, text tokens through ``add_q/k/v_proj``) and then of every
  ``single_transformer_blocks.{i}.attn`` (single stream: the block hands video and text separately and
  the processor concatenates them) is replaced by ``FreeLOCHunyuanVideoAttnProcessor``; plan
  order is dual blocks first, then single blocks;
* HunyuanVideo 1.5: the processor of every ``transformer_blocks.{i}.attn`` is replaced by
  ``FreeLOCHunyuanVideo15AttnProcessor``, which never builds the dense ``[B, 1, N, N]`` mask
  of diffusers' processor (it passes the text padding as a per-key mask instead).

The processors compute q/k/v exactly as diffusers' processors do (projections, RMS norms, the
sequence ``[video, text]``), attend with ``freeloc.attention.attend`` (RoPE on the video tokens
only, text tokens dense and never rotated, padded text keys masked) and apply the original output
split and projections. A layer whose method resolves to nothing at this length, or a call this
adapter cannot express exactly (no rotary embedding, no text, a mask that also masks video keys or
differs per query), runs the original processor: bit-for-bit the unhooked model. The token refiner
(``context_embedder.token_refiner.*``, text only) is left alone.

The rotary layout is read from the model: ``config.rope_axes_dim`` (temporal channels first) and
``transformer.rope.theta``. The trained lengths are declared in the adapters' ``model_data``.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import torch

from ..adapter import (
    UNPUBLISHED,
    ConfigVariant,
    FreeLOCProcessor,
    GridState,
    LayerContext,
    ModelClass,
    ModelData,
    TransformerAdapter,
)
from ..parallel import ContextParallelProcessor, Ulysses
from ..rotary import RotaryLayout

__all__ = [
    "FreeLOCHunyuanVideo15AttnProcessor",
    "HunyuanVideo15ContextParallelProcessor",
    "HunyuanVideoContextParallelProcessor",
    "context_parallel_plan",
    "hunyuan15_qkv",
    "hunyuan_qkv",
    "FreeLOCHunyuanVideoAttnProcessor",
    "HunyuanVideo15Adapter",
    "HunyuanVideoAdapter",
    "key_text_mask",
    "rotary_layout",
]


def rotary_layout(transformer: torch.nn.Module) -> RotaryLayout:
    """The model's rotary layout: ``config.rope_axes_dim`` (t, h, w) and the rope module's theta."""
    rope = getattr(transformer, "rope", None)
    theta = getattr(rope, "theta", None)
    if theta is None:  # a rope module without the attribute: the config holds the same value
        theta = transformer.config.rope_theta
    axes = tuple(int(d) for d in transformer.config.rope_axes_dim)
    return RotaryLayout.hunyuan(axes, theta=float(theta))  # type: ignore[arg-type]


def key_text_mask(attention_mask: torch.Tensor | None, batch: int, video: int, text: int
                  ) -> tuple[bool, torch.Tensor | None]:
    """The text-key padding of a HunyuanVideo self-attention mask, as ``attend``'s ``text_mask``.

    HunyuanVideo builds a bool ``[B, 1, 1, S + L]`` key mask (video keys True, padded text keys
    False). Returns ``(ok, text_mask)``: ``text_mask`` is ``(B, L)`` bool or None (no mask); ``ok`` is
    False when the mask cannot be expressed as a text-key mask (not bool, masks video keys, differs
    per query or per head): the caller then runs the original processor.

    Inside a graph traced by ``torch.compile`` or ``torch.export`` the mask has no values to branch on:
    the mask HunyuanVideo builds (video keys True, one mask for every query) is then asserted when the
    graph runs.
    """
    if attention_mask is None:
        return True, None
    m = attention_mask
    n = video + text
    if m.dtype != torch.bool or m.shape[-1] != n or m.ndim not in (2, 4):
        return False, None
    if m.ndim == 4:
        if m.shape[1] != 1 or m.shape[2] not in (1, n):
            return False, None
        if m.shape[2] == n and not _holds((m == m[:, :, :1]).all(), "one key mask for every query"):
            return False, None
        m = m[:, 0, 0]
    if m.shape[0] not in (1, batch) or not _holds(m[:, :video].all(), "every video key attended"):
        return False, None
    return True, m[:, video:].expand(batch, text)


def _holds(condition: torch.Tensor, what: str) -> bool:
    """Whether a property of the mask holds: read in eager calls, asserted when a traced graph runs."""
    if torch.compiler.is_compiling():
        torch._assert_async(condition, f"freeloc's HunyuanVideo processor in a compiled graph needs the attention "
                                       f"mask HunyuanVideo builds ({what}); run this call without compiling")
        return True
    return bool(condition)


def _heads(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.unflatten(2, (attn.heads, -1))


def hunyuan_qkv(attn: torch.nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``(B, S + L, H, D)`` of ``[video, text]`` before RoPE, as ``HunyuanVideoAttnProcessor2_0``
    computes them: a single-stream block projects ``[video, text]`` at once, a dual-stream block the video
    through ``to_q/k/v`` and the text through ``add_q/k/v_proj``."""
    if attn.add_q_proj is None:  # single stream: one projection of [video, text]
        joint = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query, key, value = (_heads(attn, proj(joint)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        return query, key, value
    query = _heads(attn, attn.to_q(hidden_states))
    key = _heads(attn, attn.to_k(hidden_states))
    value = _heads(attn, attn.to_v(hidden_states))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return _with_text(attn, query, key, value, encoder_hidden_states)


def hunyuan15_qkv(attn: torch.nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``(B, S + L, H, D)`` of ``[video, text]`` before RoPE, as ``HunyuanVideo15AttnProcessor2_0``
    computes them."""
    query = attn.norm_q(_heads(attn, attn.to_q(hidden_states)))
    key = attn.norm_k(_heads(attn, attn.to_k(hidden_states)))
    value = _heads(attn, attn.to_v(hidden_states))
    return _with_text(attn, query, key, value, encoder_hidden_states)


def _with_text(attn: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Appends the text's q, k, v (``add_q/k/v_proj`` and their norms) to the video's."""
    e_query = _heads(attn, attn.add_q_proj(encoder_hidden_states))
    e_key = _heads(attn, attn.add_k_proj(encoder_hidden_states))
    e_value = _heads(attn, attn.add_v_proj(encoder_hidden_states))
    if attn.norm_added_q is not None:
        e_query = attn.norm_added_q(e_query)
    if attn.norm_added_k is not None:
        e_key = attn.norm_added_k(e_key)
    return torch.cat([query, e_query], dim=1), torch.cat([key, e_key], dim=1), torch.cat([value, e_value], dim=1)


def _outputs(attn: torch.nn.Module, out: torch.Tensor, text: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The original output split of ``[video, text]`` and projections (``to_out``, ``to_add_out``)."""
    hidden_states, encoder_hidden_states = out[:, :-text], out[:, -text:]
    if getattr(attn, "to_out", None) is not None:
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    if getattr(attn, "to_add_out", None) is not None:
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
    return hidden_states, encoder_hidden_states


class _Processor(FreeLOCProcessor):
    """What both processors share beyond the base: the full video token count under context parallelism."""

    def _video_tokens(self, hidden_states: torch.Tensor) -> int:
        """Video tokens of the whole sequence: this rank's ``hidden_states`` holds a shard of them under
        context parallelism, whose attention mask still covers every token."""
        grid = self.ctx.grid.value
        if self.ctx.parallel_config is not None and grid is not None and Ulysses.from_config(self.ctx.parallel_config):
            return grid[0] * grid[1] * grid[2]
        return hidden_states.shape[1]


class FreeLOCHunyuanVideoAttnProcessor(_Processor):
    """Self-attention of one HunyuanVideo block (dual or single stream) through ``freeloc.attention.attend``.

    Returns ``(video, text)`` outputs as diffusers' ``HunyuanVideoAttnProcessor2_0`` does: for a dual
    block after ``to_out`` / ``to_add_out``, for a single block (``pre_only``, no output projection)
    the attention output split at the text boundary.
    """

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        method = self.ctx.method()
        ok = method is not None and image_rotary_emb is not None and encoder_hidden_states is not None
        text_mask = None
        if ok:
            assert encoder_hidden_states is not None
            batch, text = hidden_states.shape[0], encoder_hidden_states.shape[1]
            video = self._video_tokens(hidden_states)
            ok, text_mask = key_text_mask(attention_mask, batch, video, text)
            ok = ok and text > 0
        if not ok:
            return self.ctx.passthrough(lambda: self.original(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb))
        assert encoder_hidden_states is not None and method is not None
        with self.ctx.timer():
            query, key, value = hunyuan_qkv(attn, hidden_states, encoder_hidden_states)
            out = self.ctx.attend(query, key, value, method, text_after=text, text_mask=text_mask)
            out = out.flatten(2, 3).to(query.dtype)
            return _outputs(attn, out, text)


class FreeLOCHunyuanVideo15AttnProcessor(_Processor):
    """Self-attention of one HunyuanVideo 1.5 block through ``freeloc.attention.attend``.

    diffusers' ``HunyuanVideo15AttnProcessor2_0`` receives the text padding mask ``(B, L)`` and
    builds ``m_i & m_j`` over all ``N = S + L`` tokens, a dense ``[B, 1, N, N]`` bool mask, in every
    layer. Here the padding masks keys only, and the rows of padded text queries (which attend
    nothing in the original, so their output is zero) are set to zero, which reproduces it without
    the ``N x N`` mask.
    """

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        method = self.ctx.method()
        ok = (method is not None and image_rotary_emb is not None and encoder_hidden_states is not None
              and attention_mask is not None)
        if ok:
            assert encoder_hidden_states is not None and attention_mask is not None
            batch, text = hidden_states.shape[0], encoder_hidden_states.shape[1]
            ok = text > 0 and attention_mask.ndim == 2 and tuple(attention_mask.shape) == (batch, text)
        if not ok:
            return self.ctx.passthrough(lambda: self.original(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb))
        assert encoder_hidden_states is not None and attention_mask is not None and method is not None
        with self.ctx.timer():
            query, key, value = hunyuan15_qkv(attn, hidden_states, encoder_hidden_states)
            text_mask = attention_mask.bool()
            out = self.ctx.attend(query, key, value, method, text_after=text, text_mask=text_mask)
            # padded text queries attend nothing in the original (m_i & m_j): their output is zero
            video = hidden_states.shape[1]
            keep = torch.cat([text_mask.new_ones(batch, video), text_mask], dim=1)
            out = out * keep[:, :, None, None].to(out.dtype)
            out = out.flatten(2, 3).to(query.dtype)
            return _outputs(attn, out, text)


def _rotate_video(x: torch.Tensor, video: int, image_rotary_emb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """RoPE on the first ``video`` tokens of ``x`` ``(B, S, H, D)``, as diffusers' processors apply it."""
    from diffusers.models.embeddings import apply_rotary_emb

    return torch.cat([apply_rotary_emb(x[:, :video], image_rotary_emb, sequence_dim=1), x[:, video:]], dim=1)


def context_parallel_plan(transformer: torch.nn.Module) -> dict[str, Any]:
    """HunyuanVideo's context-parallel plan: the video tokens are split over the ranks before the first block
    and gathered after ``proj_out``; the text tokens, the rotary tables and the attention mask stay whole on
    every rank (the processors apply them after Ulysses' exchange, over every video token)."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    if getattr(transformer.config, "image_condition_type", None) == "token_replace":
        raise ValueError(f"{type(transformer).__name__} with image_condition_type='token_replace' treats the first "
                         f"frame's tokens apart inside every block, which freeloc's context-parallel plan does not "
                         f"split; run this model on one process")
    first = "transformer_blocks.0" if len(transformer.transformer_blocks) else "single_transformer_blocks.0"
    return {first: {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3)},
            "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3)}


class _ContextParallel(ContextParallelProcessor):
    """What both HunyuanVideo context-parallel processors share: the attention between the exchanges."""

    def _attend(self, ulysses: Ulysses, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, video: int,
                text: int, mask: torch.Tensor | None,
                image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """``[video, text]`` attention for this rank's heads: RoPE on the video tokens, then
        ``dispatch_attention_fn`` with ``mask`` (over every key) and the layer's backend."""
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if image_rotary_emb is not None:
                q, k = _rotate_video(q, video, image_rotary_emb), _rotate_video(k, video, image_rotary_emb)
            return dispatch_attention_fn(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                         backend=self._attention_backend)

        return ulysses.attend(run, query, key, value, video, text_after=text)


class HunyuanVideoContextParallelProcessor(_ContextParallel):
    """HunyuanVideo's self-attention (dual or single stream) under Ulysses context parallelism.

    q, k, v of this rank's video tokens and of the whole text, Ulysses' exchange, then what
    ``HunyuanVideoAttnProcessor2_0`` does over every video token for this rank's heads (RoPE on the video
    tokens, ``dispatch_attention_fn`` with the model's mask and the layer's backend), the exchange back,
    and the original output projections. One process: the original processor.
    """

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ulysses = self.ulysses()
        if ulysses is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if encoder_hidden_states is None or encoder_hidden_states.shape[1] == 0:
            raise ValueError("freeloc's HunyuanVideo context-parallel processor needs the text tokens "
                             "(encoder_hidden_states), got none")
        video, text = self.video_tokens(), encoder_hidden_states.shape[1]
        query, key, value = hunyuan_qkv(attn, hidden_states, encoder_hidden_states)
        out = self._attend(ulysses, query, key, value, video, text, attention_mask, image_rotary_emb)
        return _outputs(attn, out.flatten(2, 3).to(query.dtype), text)


class HunyuanVideo15ContextParallelProcessor(_ContextParallel):
    """HunyuanVideo 1.5's self-attention under Ulysses context parallelism.

    As ``HunyuanVideoContextParallelProcessor``, with the text padding ``(B, L)`` masking keys and the
    rows of padded text queries set to zero, which is what the original's ``[B, 1, N, N]`` mask gives.
    """

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ulysses = self.ulysses()
        if ulysses is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if encoder_hidden_states is None or attention_mask is None or attention_mask.ndim != 2:
            raise ValueError("freeloc's HunyuanVideo 1.5 context-parallel processor needs the text tokens and their "
                             "(B, L) padding mask, as HunyuanVideo15Transformer3DModel passes them")
        batch, shard, text = hidden_states.shape[0], hidden_states.shape[1], encoder_hidden_states.shape[1]
        video = self.video_tokens()
        text_mask = attention_mask.bool()
        query, key, value = hunyuan15_qkv(attn, hidden_states, encoder_hidden_states)
        keys = torch.cat([text_mask.new_ones(batch, video), text_mask], dim=1)[:, None, None, :]
        out = self._attend(ulysses, query, key, value, video, text, keys, image_rotary_emb)
        keep = torch.cat([text_mask.new_ones(batch, shard), text_mask], dim=1)
        out = out * keep[:, :, None, None].to(out.dtype)
        return _outputs(attn, out.flatten(2, 3).to(query.dtype), text)


class HunyuanVideoAdapter(TransformerAdapter):
    """Installs FreeLOC on a ``HunyuanVideoTransformer3DModel`` (T2V, and the I2V variants)."""

    model_data = ModelData(
        classes=(ModelClass(
            "HunyuanVideoTransformer3DModel", trained_video_frames=129,
            variants=(ConfigVariant("SkyReels-V1-Hunyuan-I2V", {"in_channels": 32}, trained_video_frames=None),),
            note="HunyuanVideo T2V / I2V: 129 frames (33 latent). SkyReels-V1 fine-tunes (in_channels=32 for I2V; the "
                 "T2V one cannot be told apart by its config) generate 97 frames by default: pass trained_frames="),),
        temporal_factor=4,
    )
    #: UltraViCo's published harmonic band for HunyuanVideo (distances within 4 latent frames of 50, 100,
    #: 150 and 200; positive logits x 0.6).
    ultravico_band = MappingProxyType({"beta": 0.6, "period": 50})

    def attention_layers(self) -> list[torch.nn.Module]:
        """``transformer_blocks.{i}.attn``, then ``single_transformer_blocks.{i}.attn``."""
        tr = self.transformer
        return [b.attn for b in tr.transformer_blocks] + [b.attn for b in getattr(tr, "single_transformer_blocks", [])]

    def rotary_layout(self) -> RotaryLayout:
        return rotary_layout(self.transformer)

    def temporal_patch(self) -> int:
        return int(self.transformer.config.patch_size_t)

    def grid_from_call(self, args: tuple, kwargs: dict[str, Any]) -> tuple[int, int, int]:
        hs = args[0] if args else kwargs["hidden_states"]  # (B, C, F, H, W)
        _, _, f, h, w = hs.shape
        p, pt = int(self.transformer.config.patch_size), int(self.transformer.config.patch_size_t)
        return (f // pt, h // p, w // p)

    def make_processor(self, original: Any, ctx: LayerContext) -> Any:
        return FreeLOCHunyuanVideoAttnProcessor(original, ctx)

    def context_parallel_plan(self) -> dict[str, Any]:
        return context_parallel_plan(self.transformer)

    def context_parallel_processor(self, original: Any, tokens: GridState) -> Any:
        return HunyuanVideoContextParallelProcessor(original, tokens)

    #: Latent size (height, width) of the synthetic probe inputs: 544 x 960 video, VAE factor 8.
    PROBE_LATENT_SIZE = (68, 120)
    #: Text tokens of the synthetic probe inputs.
    PROBE_TEXT_TOKENS = 64

    def _probe_latents(self, frames: int, seed: int, latent_size: tuple[int, int] | None
                       ) -> tuple[torch.Generator, dict[str, Any]]:
        cfg = self.transformer.config
        g = torch.Generator().manual_seed(seed)
        param = next(self.transformer.parameters())
        h, w = latent_size or self.PROBE_LATENT_SIZE
        latents = torch.randn(1, cfg.in_channels, frames * cfg.patch_size_t, h, w, generator=g)
        text = torch.randn(1, self.PROBE_TEXT_TOKENS, cfg.text_embed_dim, generator=g)
        return g, dict(hidden_states=latents.to(param.device, param.dtype),
                       encoder_hidden_states=text.to(param.device, param.dtype),
                       encoder_attention_mask=torch.ones(1, self.PROBE_TEXT_TOKENS, dtype=torch.bool,
                                                         device=param.device),
                       return_dict=False)

    def synthetic_inputs(self, frames: int, seed: int = 0, latent_size: tuple[int, int] | None = None
                         ) -> dict[str, Any]:
        """Gaussian latents ``(1, C, frames * p_t, H, W)``, 64 Gaussian text tokens (all attended), a
        Gaussian pooled text projection, timestep 500, and the distilled guidance 6.0 where the model has it."""
        g, kwargs = self._probe_latents(frames, seed, latent_size)
        cfg = self.transformer.config
        param = next(self.transformer.parameters())
        pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g)
        kwargs.update(timestep=torch.tensor([500], device=param.device),
                      pooled_projections=pooled.to(param.device, param.dtype))
        if getattr(cfg, "guidance_embeds", False):
            kwargs["guidance"] = torch.tensor([6000.0], device=param.device, dtype=param.dtype)  # 6.0 x 1000
        return kwargs


class HunyuanVideo15Adapter(HunyuanVideoAdapter):
    """Installs FreeLOC on a ``HunyuanVideo15Transformer3DModel`` (dual-stream blocks only)."""

    model_data = ModelData(
        classes=(ModelClass(
            "HunyuanVideo15Transformer3DModel", trained_video_frames=None,
            note="the trained length of HunyuanVideo 1.5 is not published in a form freeloc can rely on (its pipeline "
                 "generates 121 frames by default): pass trained_frames="),),
        temporal_factor=4,
    )
    #: HunyuanVideo's published UltraViCo band was set for HunyuanVideo 1.0, not 1.5.
    ultravico_band = UNPUBLISHED

    def attention_layers(self) -> list[torch.nn.Module]:
        """``transformer_blocks.{i}.attn``."""
        return [b.attn for b in self.transformer.transformer_blocks]

    def make_processor(self, original: Any, ctx: LayerContext) -> Any:
        return FreeLOCHunyuanVideo15AttnProcessor(original, ctx)

    def context_parallel_processor(self, original: Any, tokens: GridState) -> Any:
        return HunyuanVideo15ContextParallelProcessor(original, tokens)

    #: Image tokens of a text-to-video call (zero embeddings, as HunyuanVideo 1.5's pipeline passes them).
    PROBE_IMAGE_TOKENS = 729
    #: ByT5 tokens of the synthetic probe inputs (the second text encoder's).
    PROBE_TEXT_2_TOKENS = 16

    def synthetic_inputs(self, frames: int, seed: int = 0, latent_size: tuple[int, int] | None = None
                         ) -> dict[str, Any]:
        """Gaussian latents, 64 Gaussian text tokens and 16 Gaussian ByT5 tokens (all attended), zero image
        embeddings (text to video), timestep 500."""
        g, kwargs = self._probe_latents(frames, seed, latent_size)
        cfg = self.transformer.config
        param = next(self.transformer.parameters())
        text_2 = torch.randn(1, self.PROBE_TEXT_2_TOKENS, cfg.text_embed_2_dim, generator=g)
        kwargs.update(timestep=torch.tensor([500.0], device=param.device),
                      encoder_hidden_states_2=text_2.to(param.device, param.dtype),
                      encoder_attention_mask_2=torch.ones(1, self.PROBE_TEXT_2_TOKENS, dtype=torch.bool,
                                                          device=param.device),
                      image_embeds=torch.zeros(1, self.PROBE_IMAGE_TOKENS, cfg.image_embed_dim, device=param.device,
                                               dtype=param.dtype))
        return kwargs
