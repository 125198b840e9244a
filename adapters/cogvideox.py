"""CogVideoX 1.0 / 1.5 (``CogVideoXTransformer3DModel``).

What is hooked:

* a forward pre-hook on the transformer records the latent grid of each call; CogVideoX's input is
  laid out ``(B, F, C, H, W)``, so the grid is ``(F / p_t, H / p, W / p)`` (``p_t =
  config.patch_size_t or 1``);
* the processor of every self-attention ``transformer_blocks.{i}.attn1`` is replaced by
  ``FreeLOCCogVideoXAttnProcessor``. It computes q/k/v exactly as diffusers'
  ``CogVideoXAttnProcessor2_0`` (or ``FusedCogVideoXAttnProcessor2_0``) does: the sequence is
  ``[text, video]`` (the text length is read from ``encoder_hidden_states``), projections, then the
  LayerNorm q/k norms; it then attends with ``freeloc.attention.attend`` (``text_before`` = the
  text length; text tokens are never rotated), projects and splits the output as the original. A
  layer whose method resolves to nothing at this length, or one called with an attention mask, calls
  the original processor, so it is bit-for-bit the unhooked model.

Positions. CogVideoX has no RoPE module: the pipeline builds ``image_rotary_emb`` (cos, sin tables of
shape ``(F*H'*W', head_dim)``; temporal = the first ``head_dim // 4`` channels, height and width
``3 * head_dim // 8`` each, theta 10000, interleaved pairs) and passes it to ``forward``. The adapter
does not use those tables: it rotates with ``freeloc.RotaryLayout.cogvideox``, which reproduces
them for integer positions ``0..F-1``, ``0..H'-1``, ``0..W'-1``. Before the first hooked layer of a
forward the tables are compared with that layout (once per table object): CogVideoX 1.5 pipelines
(``grid_type="slice"``) and CogVideoX 1.0 pipelines at the trained resolution (the latent grid equal
to ``config.sample_height/width // patch_size``) give exactly those positions; a CogVideoX 1.0
pipeline at another resolution crops and rescales the spatial positions (non-integer), which
``attend`` cannot represent: that raises a clear error instead of generating with wrong positions.

Models without RoPE (CogVideoX-2b, ``config.use_rotary_positional_embeddings=False``, additive sin-cos
positions): temporal position methods do not apply and are refused
(``CogVideoXAdapter.check_supported``); attention-pattern methods (``tsa``, ``sliding-window``)
work: the adapter gives ``attend`` no rotary layout (``rotary=None``), so nothing is rotated. A call of
a RoPE model without ``image_rotary_emb`` runs the original processor. The trained lengths are
declared in ``CogVideoXAdapter.model_data``.
"""

from __future__ import annotations

import functools
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
from ..parallel import ContextParallelProcessor
from ..plan import DIRECT, LayerPlan
from ..rotary import RotaryLayout

__all__ = ["CogVideoXAdapter", "CogVideoXContextParallelProcessor", "FreeLOCCogVideoXAttnProcessor",
           "cogvideox_qkv", "context_parallel_plan", "PositionCheck", "rotary_layout",
           "ATTENTION_ONLY_METHODS"]

#: Methods that never change the positions (which pairs attend, or their logits): the ones a model without RoPE
#: accepts.
ATTENTION_ONLY_METHODS = ("tsa", "sliding-window", "ultravico", DIRECT)

#: Largest |difference| between the pipeline's float32 cos/sin tables and the layout's at integer positions
#: that still counts as the same positions (diffusers computes its angles in float32; a different position
#: differs by far more).
_TABLE_ATOL = 1e-3


def rotary_layout(transformer: torch.nn.Module) -> RotaryLayout:
    """The layout of ``image_rotary_emb``: temporal ``head_dim // 4``, height and width ``head_dim // 8 * 3``."""
    head_dim = int(transformer.config.attention_head_dim)
    # diffusers' get_3d_rotary_pos_embed splits head_dim as (D // 4, D // 8 * 3, D // 8 * 3), in channel pairs:
    # a layout of whole pairs that fills the head only when D is a multiple of 16
    split = (head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3)
    if head_dim % 16:
        raise ValueError(f"CogVideoX attention_head_dim={head_dim}: diffusers splits its rotary channels as "
                         f"{split}, which is not a layout of whole channel pairs over {head_dim} channels, so freeloc "
                         f"cannot rotate its queries and keys; its methods need head_dim to be a multiple of 16 "
                         f"(only method='direct', or a plan of 'direct' layers, applies to this model)")
    return RotaryLayout.cogvideox(head_dim)


@functools.lru_cache(maxsize=4)
def _grid_cos_sin(grid: tuple[int, int, int], rotary: RotaryLayout, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per video token (frame-major) cos/sin, one value per channel pair, at the integer grid positions."""
    f, h, w = grid
    t_pos = torch.arange(f, dtype=torch.float64).repeat_interleave(h * w)
    h_pos = torch.arange(h, dtype=torch.float64).repeat_interleave(w).repeat(f)
    w_pos = torch.arange(w, dtype=torch.float64).repeat(f * h)
    cos, sin = rotary.cos_sin(t_pos, h_pos, w_pos)
    return cos.to(device), sin.to(device)


class PositionCheck:
    """Verifies (once per table object) that ``image_rotary_emb`` holds the integer grid positions.

    Inside a graph traced by ``torch.compile`` or ``torch.export`` the tables are computed by the graph
    and have no values yet: only their shape is checked there.
    """

    def __init__(self, rotary: RotaryLayout, model: str) -> None:
        self.rotary = rotary
        self.model = model
        self._last: tuple[Any, Any, tuple[int, int, int], str | None] | None = None

    def verify(self, image_rotary_emb: tuple[torch.Tensor, torch.Tensor], grid: tuple[int, int, int]) -> None:
        cos, sin = image_rotary_emb
        if torch.compiler.is_compiling():
            problem = self._shape_problem(cos, sin, grid)
            if problem is not None:
                raise ValueError(problem)
            return
        last = self._last
        if last is None or last[0] is not cos or last[1] is not sin or last[2] != grid:
            # keep the tables referenced, so an identity match is never a recycled object
            self._last = (cos, sin, grid, self._problem(cos, sin, grid))
        problem = self._last[3]
        if problem is not None:
            raise ValueError(problem)

    def _shape_problem(self, cos: torch.Tensor, sin: torch.Tensor, grid: tuple[int, int, int]) -> str | None:
        f, h, w = grid
        want = (f * h * w, self.rotary.head_dim)
        if tuple(cos.shape) != want or tuple(sin.shape) != want:
            return (f"{self.model}: image_rotary_emb has shape {tuple(cos.shape)}, expected (F*H'*W', head_dim) = "
                    f"{want} for the latent grid {grid}")
        return None

    def _problem(self, cos: torch.Tensor, sin: torch.Tensor, grid: tuple[int, int, int]) -> str | None:
        shape = self._shape_problem(cos, sin, grid)
        if shape is not None:
            return shape
        f, h, w = grid
        c, s = _grid_cos_sin(grid, self.rotary, str(cos.device))
        err = max(float((cos.float() - c.repeat_interleave(2, dim=1)).abs().max()),
                  float((sin.float() - s.repeat_interleave(2, dim=1)).abs().max()))
        if err > max(_TABLE_ATOL, 2 * torch.finfo(cos.dtype).eps):  # tables cast to half precision still match
            return (f"{self.model}: the image_rotary_emb passed to the transformer does not hold the integer "
                    f"positions 0..{f - 1} (time), 0..{h - 1} (height), 0..{w - 1} (width) that freeloc rotates "
                    f"with (largest cos/sin difference {err:.3g}). CogVideoX 1.0 pipelines crop and rescale the "
                    f"spatial positions when the latent grid ({h}x{w} tokens) differs from config.sample_height"
                    f"/sample_width // patch_size: generate at the model's trained resolution (480x720 for "
                    f"CogVideoX-5b and 5b-I2V), or use method='direct'")
        return None


def cogvideox_qkv(attn: torch.nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                  fused: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``(B, L + S, H, D)`` of ``[text, video]`` before RoPE, as ``CogVideoXAttnProcessor2_0``
    (``fused``: ``FusedCogVideoXAttnProcessor2_0``) computes them."""
    x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    batch = x.shape[0]
    if fused:
        query, key, value = torch.split(attn.to_qkv(x), attn.to_qkv.out_features // 3, dim=-1)
    else:
        query, key, value = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    head_dim = key.shape[-1] // attn.heads
    # the original's layout (B, H, S, D) for the norms, then (B, S, H, D)
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch, -1, attn.heads, head_dim)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query.transpose(1, 2), key.transpose(1, 2), value


def _outputs(attn: torch.nn.Module, out: torch.Tensor, text: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The original output projection and split of ``[text, video]``: ``(video, text)``."""
    out = attn.to_out[1](attn.to_out[0](out))
    encoder_out, video_out = out.split([text, out.size(1) - text], dim=1)
    return video_out, encoder_out


def context_parallel_plan() -> dict[str, Any]:
    """CogVideoX's context-parallel plan: the video tokens are split over the ranks before the first block and
    gathered after ``proj_out``; the text tokens and the rotary tables stay whole on every rank (the
    processors rotate after Ulysses' exchange, over every video token)."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    return {"transformer_blocks.0": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3)},
            "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3)}


class CogVideoXContextParallelProcessor(ContextParallelProcessor):
    """CogVideoX's self-attention under Ulysses context parallelism.

    q, k, v of the whole text and this rank's video tokens, Ulysses' exchange, then what
    ``CogVideoXAttnProcessor2_0`` does over every video token for this rank's heads (RoPE on the video
    tokens, SDPA), the exchange back, and the original output projection. One process: the original.
    """

    def __init__(self, original: Any, tokens: Any, fused: bool) -> None:
        super().__init__(original, tokens)
        self.fused = fused

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ulysses = self.ulysses()
        if ulysses is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if attention_mask is not None:
            raise ValueError("freeloc's CogVideoX context-parallel processor takes no attention_mask (CogVideoX "
                             "passes none); run a masked call on one process")
        from diffusers.models.embeddings import apply_rotary_emb

        text, batch = encoder_hidden_states.size(1), hidden_states.shape[0]
        query, key, value = cogvideox_qkv(attn, hidden_states, encoder_hidden_states, self.fused)

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, h, L + S, D)
            if image_rotary_emb is not None:
                q = torch.cat([q[:, :, :text], apply_rotary_emb(q[:, :, text:], image_rotary_emb)], dim=2)
                if not attn.is_cross_attention:
                    k = torch.cat([k[:, :, :text], apply_rotary_emb(k[:, :, text:], image_rotary_emb)], dim=2)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
            return out.transpose(1, 2)

        out = ulysses.attend(run, query, key, value, self.video_tokens(), text_before=text)
        return _outputs(attn, out.reshape(batch, -1, out.shape[2] * out.shape[3]), text)


class FreeLOCCogVideoXAttnProcessor(FreeLOCProcessor):
    """Self-attention of one CogVideoX block through ``freeloc.attention.attend``."""

    def __init__(self, original: Any, ctx: LayerContext, positions: PositionCheck | None, fused: bool) -> None:
        super().__init__(original, ctx)
        self.positions = positions
        self.fused = fused

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        method = self.ctx.method()
        has_rope = self.ctx.rotary is not None
        if method is None or attention_mask is not None or (has_rope and image_rotary_emb is None):
            return self.ctx.passthrough(lambda: self.original(attn, hidden_states, encoder_hidden_states,
                                                              attention_mask, image_rotary_emb))
        grid = self.ctx.grid.value
        assert grid is not None
        if self.positions is not None and image_rotary_emb is not None:
            self.positions.verify(image_rotary_emb, grid)
        with self.ctx.timer():
            text = encoder_hidden_states.size(1)
            batch = hidden_states.shape[0]
            query, key, value = cogvideox_qkv(attn, hidden_states, encoder_hidden_states, self.fused)
            out = self.ctx.attend(query, key, value, method, text_before=text)
            return _outputs(attn, out.reshape(batch, -1, out.shape[2] * out.shape[3]), text)


class CogVideoXAdapter(TransformerAdapter):
    """Installs FreeLOC on a ``CogVideoXTransformer3DModel`` (CogVideoX 1.0 and 1.5; 2b: attention methods only)."""

    model_data = ModelData(
        classes=(ModelClass(
            "CogVideoXTransformer3DModel", trained_video_frames=49,
            variants=(ConfigVariant("CogVideoX1.5-5B", {"patch_size_t": 2}, trained_video_frames=81),),
            note="CogVideoX 1.0 (2b, 5b, 5b-I2V): 49 frames = 13 latent frames; CogVideoX 1.5 (patch_size_t=2): 81 "
                 "frames = 21 latent frames, padded to 22 = 11 temporal tokens"),),
        temporal_factor=4,
    )
    ultravico_band = UNPUBLISHED
    #: Shared by the layers of one installation: checks the pipeline's rotary tables once per forward.
    _positions: PositionCheck | None = None

    def has_rope(self) -> bool:
        return bool(self.transformer.config.use_rotary_positional_embeddings)

    def attention_layers(self) -> list[torch.nn.Module]:
        """The self-attention modules, in order (``transformer_blocks.{i}.attn1``)."""
        return [block.attn1 for block in self.transformer.transformer_blocks]

    def rotary_layout(self) -> RotaryLayout | None:
        """The CogVideoX layout; ``None`` for a model without RoPE (nothing is rotated)."""
        return rotary_layout(self.transformer) if self.has_rope() else None

    def temporal_patch(self) -> int:
        return int(self.transformer.config.patch_size_t or 1)

    def video_to_latent(self, frames: int, factor: int) -> int:
        """Temporal tokens of ``frames`` video frames.

        CogVideoX 1.5 pipelines pad the latent frames up to a multiple of ``patch_size_t`` (81 video
        frames: 21 latent frames, padded to 22, = 11 temporal tokens), so this rounds up.
        """
        latent = (frames - 1) // factor + 1
        return -(-latent // self.temporal_patch())

    def grid_from_call(self, args: tuple, kwargs: dict[str, Any]) -> tuple[int, int, int]:
        hs = args[0] if args else kwargs["hidden_states"]  # (B, F, C, H, W)
        _, f, _, h, w = hs.shape
        p = int(self.transformer.config.patch_size)
        return (f // self.temporal_patch(), h // p, w // p)

    def check_supported(self, method: str, plan: LayerPlan) -> None:
        if self.has_rope():
            return
        refused = sorted(m for m in plan.all_methods() if m not in ATTENTION_ONLY_METHODS)
        if refused:
            what = f"method={method!r}" if method != "freeloc" else f"the layer plan (uses {refused})"
            raise ValueError(
                f"{type(self.transformer).__name__} ({self.name}) has no rotary position embedding "
                f"(config.use_rotary_positional_embeddings=False, as CogVideoX-2b: its positions are additive "
                f"sin-cos embeddings), so temporal position methods ({', '.join(refused)}) do not apply to it; "
                f"{what} is refused. Accepted: the attention-only methods method='tsa', method='sliding-window', "
                f"method='ultravico', method='direct', or a plan using only {list(ATTENTION_ONLY_METHODS)}")

    def synthetic_inputs(self, frames: int, seed: int = 0, latent_size: tuple[int, int] | None = None
                         ) -> dict[str, Any]:
        """Gaussian latents ``(1, frames * p_t, C, H, W)`` (default: the model's sample size), Gaussian text
        tokens as many as the pipelines pad the prompt to (``config.max_text_seq_length``, 226), timestep
        500, the rotary tables of the integer grid positions (models with RoPE, as the pipelines compute them
        at the trained resolution) and ``ofs`` 2.0 where the model embeds it."""
        cfg = self.transformer.config
        g = torch.Generator().manual_seed(seed)
        param = next(self.transformer.parameters())
        h, w = latent_size or (int(cfg.sample_height), int(cfg.sample_width))
        latents = torch.randn(1, frames * self.temporal_patch(), cfg.in_channels, h, w, generator=g)
        text = torch.randn(1, int(getattr(cfg, "max_text_seq_length", 226)), cfg.text_embed_dim, generator=g)
        kwargs: dict[str, Any] = dict(hidden_states=latents.to(param.device, param.dtype),
                                      encoder_hidden_states=text.to(param.device, param.dtype),
                                      timestep=torch.tensor([500], device=param.device), return_dict=False)
        rotary = self.rotary_layout()
        if rotary is not None:
            p = int(cfg.patch_size)
            cos, sin = _grid_cos_sin((frames, h // p, w // p), rotary, str(param.device))
            kwargs["image_rotary_emb"] = (cos.repeat_interleave(2, dim=1), sin.repeat_interleave(2, dim=1))
        if getattr(cfg, "ofs_embed_dim", None):
            kwargs["ofs"] = torch.tensor([2.0], device=param.device)
        return kwargs

    def make_processor(self, original: Any, ctx: LayerContext) -> FreeLOCCogVideoXAttnProcessor:
        from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0

        if isinstance(original, CogVideoXContextParallelProcessor):  # under freeloc's context parallelism
            fused = original.fused
        elif isinstance(original, (CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0)):
            fused = isinstance(original, FusedCogVideoXAttnProcessor2_0)
        else:
            raise ValueError(f"{type(self.transformer).__name__} ({self.name}) layer {ctx.layer} has the attention "
                             f"processor {type(original).__name__}; freeloc reproduces CogVideoXAttnProcessor2_0 and "
                             f"FusedCogVideoXAttnProcessor2_0 only")
        if self._positions is None and ctx.rotary is not None:
            self._positions = PositionCheck(ctx.rotary, f"{type(self.transformer).__name__}({self.name})")
        return FreeLOCCogVideoXAttnProcessor(original, ctx, self._positions, fused=fused)

    def context_parallel_plan(self) -> dict[str, Any]:
        return context_parallel_plan()

    def context_parallel_processor(self, original: Any, tokens: GridState) -> CogVideoXContextParallelProcessor:
        from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0

        if not isinstance(original, (CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0)):
            raise ValueError(f"{type(self.transformer).__name__} ({self.name}) has the attention processor "
                             f"{type(original).__name__}; freeloc's context parallelism reproduces "
                             f"CogVideoXAttnProcessor2_0 and FusedCogVideoXAttnProcessor2_0 only")
        return CogVideoXContextParallelProcessor(original, tokens,
                                                 fused=isinstance(original, FusedCogVideoXAttnProcessor2_0))
