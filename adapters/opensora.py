"""Open-Sora 2.0 (``opensora.models.mmdit.model.MMDiTModel``), by its documented module interface.

The package is not on the package index and needs flash-attn, liger-kernel and colossalai, so this
adapter does not import it: it works with any model of that class name that has

* ``double_blocks[i]`` and ``single_blocks[i]`` with ``set_processor(p)`` / ``processor``; the
  processors are called ``processor(block, img, txt, vec, pe)`` (returns ``(img, txt)``) and
  ``processor(block, x, vec, pe)`` with ``x = [text, video]``;
* ``forward(img, img_ids, txt, txt_ids, timesteps, y_vec, ...)`` where ``img_ids[..., 0:3]`` are the
  (t, h, w) positions of the video tokens (frame-major) and ``txt_ids`` are zeros;
* ``config.axes_dim``, ``config.theta``, ``config.use_liger_rope`` (rotate-half RoPE when true,
  interleaved pairs otherwise).

What is hooked: a pre-hook reads the grid from ``img_ids``; every block's processor is replaced by one
that computes q/k/v exactly as Open-Sora's processors do, attends with
``freeloc.attention.attend`` (text first, never rotated: its ids are zeros), and applies the same
residual updates. The trained length (129 frames = 33 latent frames, HunyuanVideo VAE) is declared in
``OpenSoraAdapter.model_data``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..adapter import UNPUBLISHED, FreeLOCProcessor, LayerContext, ModelClass, ModelData, TransformerAdapter
from ..rotary import RotaryLayout

__all__ = ["OpenSoraAdapter"]


def _heads(x: Tensor, h: int) -> Tensor:
    """(B, L, H*D) -> (B, L, H, D)."""
    return x.unflatten(2, (h, -1))


def _qkv(attn: Any, x: Tensor, h: int) -> tuple[Tensor, Tensor, Tensor]:
    """Open-Sora's SelfAttention projections and QK norm; returns (B, L, H, D) each."""
    if attn.fused_qkv:
        q, k, v = attn.qkv(x).chunk(3, dim=-1)
    else:
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    q, k, v = _heads(q, h), _heads(k, h), _heads(v, h)
    q, k = attn.norm(q, k, v)
    return q, k, v


class _DoubleProcessor(FreeLOCProcessor):
    def __call__(self, attn: Any, img: Tensor, txt: Tensor, vec: Tensor, pe: Any) -> tuple[Tensor, Tensor]:
        method = self.ctx.method()
        if method is None:
            return self.ctx.passthrough(lambda: self.original(attn, img, txt, vec, pe))
        with self.ctx.timer():
            img_mod1, img_mod2 = attn.img_mod(vec)
            txt_mod1, txt_mod2 = attn.txt_mod(vec)
            img_q, img_k, img_v = _qkv(attn.img_attn, (1 + img_mod1.scale) * attn.img_norm1(img) + img_mod1.shift,
                                       attn.num_heads)
            txt_q, txt_k, txt_v = _qkv(attn.txt_attn, (1 + txt_mod1.scale) * attn.txt_norm1(txt) + txt_mod1.shift,
                                       attn.num_heads)
            q, k, v = (torch.cat(pair, dim=1) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
            out = self.ctx.attend(q, k, v, method, text_before=txt.shape[1]).flatten(2)
            txt_attn, img_attn = out[:, : txt.shape[1]], out[:, txt.shape[1]:]
            img = img + img_mod1.gate * attn.img_attn.proj(img_attn)
            img = img + img_mod2.gate * attn.img_mlp((1 + img_mod2.scale) * attn.img_norm2(img) + img_mod2.shift)
            txt = txt + txt_mod1.gate * attn.txt_attn.proj(txt_attn)
            txt = txt + txt_mod2.gate * attn.txt_mlp((1 + txt_mod2.scale) * attn.txt_norm2(txt) + txt_mod2.shift)
            return img, txt


class _SingleProcessor(FreeLOCProcessor):
    def __call__(self, attn: Any, x: Tensor, vec: Tensor, pe: Any) -> Tensor:
        method = self.ctx.method()
        if method is None:
            return self.ctx.passthrough(lambda: self.original(attn, x, vec, pe))
        with self.ctx.timer():
            f, h, w = self.ctx.grid.value or (0, 0, 0)
            text = x.shape[1] - f * h * w
            mod, _ = attn.modulation(vec)
            x_mod = (1 + mod.scale) * attn.pre_norm(x) + mod.shift
            if attn.fused_qkv:
                qkv, mlp = torch.split(attn.linear1(x_mod), [3 * attn.hidden_size, attn.mlp_hidden_dim], dim=-1)
                q, k, v = (_heads(t, attn.num_heads) for t in qkv.chunk(3, dim=-1))
            else:
                q, k = _heads(attn.q_proj(x_mod), attn.num_heads), _heads(attn.k_proj(x_mod), attn.num_heads)
                v, mlp = torch.split(attn.v_mlp(x_mod), [attn.hidden_size, attn.mlp_hidden_dim], dim=-1)
                v = _heads(v, attn.num_heads)
            q, k = attn.norm(q, k, v)
            out = self.ctx.attend(q, k, v, method, text_before=text).flatten(2)
            return x + mod.gate * attn.linear2(torch.cat((out, attn.mlp_act(mlp)), 2))


class OpenSoraAdapter(TransformerAdapter):
    """Installs FreeLOC on Open-Sora 2.0's ``MMDiTModel`` (duck-typed; see the module docstring)."""

    model_data = ModelData(
        classes=(ModelClass("MMDiTModel", trained_video_frames=129,
                            note="Open-Sora 2.0, HunyuanVideo VAE: 129 frames = 33 latent frames"),),
        temporal_factor=4,
    )
    ultravico_band = UNPUBLISHED

    def attention_layers(self) -> list[torch.nn.Module]:
        """Double-stream blocks, then single-stream blocks (each block holds its processor)."""
        return [*self.transformer.double_blocks, *self.transformer.single_blocks]

    def rotary_layout(self) -> RotaryLayout:
        cfg = self.transformer.config
        t, h, w = (int(a) for a in cfg.axes_dim)
        return RotaryLayout.opensora((t, h, w), theta=float(cfg.theta), liger=bool(getattr(cfg, "use_liger_rope",
                                                                                          False)))

    def grid_from_call(self, args: tuple, kwargs: dict[str, Any]) -> tuple[int, int, int]:
        ids = args[1] if len(args) > 1 else kwargs["img_ids"]
        if torch.compiler.is_compiling():
            # the grid is read from the example img_ids while tracing; when the graph runs, its img_ids
            # must be the same grid's (a graph is reused for every input of the same shapes)
            try:
                grid = _traced_grid(ids)
            except Exception as e:  # tracing without values (torch.export's default, non-strict mode)
                raise RuntimeError(
                    "freeloc reads Open-Sora's latent grid from the values of img_ids, which this tracer does "
                    "not have: export with torch.export.export(..., strict=True), or compile with torch.compile"
                ) from e
            torch._assert_async((ids[0].round().long() == _grid_ids(grid, ids.device)).all(),
                                f"freeloc: this compiled graph was traced for the Open-Sora latent grid {grid}, "
                                f"but img_ids hold another grid of as many tokens")
            return grid
        return _grid(ids)

    def make_processor(self, original: Any, ctx: LayerContext) -> Any:
        is_double = any(block is ctx.module for block in self.transformer.double_blocks)
        return (_DoubleProcessor if is_double else _SingleProcessor)(original, ctx)


def _grid_ids(grid: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """The ``(t, h, w)`` ids of the video tokens of ``grid``, frame-major, as Open-Sora lays them out."""
    f, hh, ww = grid
    return torch.stack([
        torch.arange(f, device=device).repeat_interleave(hh * ww),
        torch.arange(hh, device=device).repeat_interleave(ww).repeat(f),
        torch.arange(ww, device=device).repeat(f * hh)], dim=-1)


def _grid(ids: torch.Tensor) -> tuple[int, int, int]:
    """The latent grid of Open-Sora's ``img_ids`` (B, L, 3), with a clear error if they are not one."""
    pos = ids[0].round().long()  # (L, 3): t, h, w of each video token
    grid = tuple(int(pos[:, i].max()) + 1 for i in range(3))
    expected = _grid_ids(grid, pos.device)  # type: ignore[arg-type]
    if pos.shape != expected.shape or not torch.equal(pos, expected):
        raise ValueError("freeloc expects Open-Sora img_ids in frame-major order starting at 0 "
                         f"((t, h, w) = (0, 0, 0), (0, 0, 1), ...), got {ids.shape[1]} tokens that are not")
    return grid  # type: ignore[return-value]


@torch.compiler.assume_constant_result
def _traced_grid(ids: torch.Tensor) -> tuple[int, int, int]:
    """``_grid`` on the example values while tracing: a constant of the traced graph."""
    return _grid(ids)
