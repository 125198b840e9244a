"""Wan 2.1 / 2.2 (``WanTransformer3DModel``).

What is hooked:

* a forward pre-hook on the transformer records the latent grid of each call
  (``(F / p_t, H / p_h, W / p_w)``);
* the processor of every self-attention ``blocks.{i}.attn1`` is replaced by
  :class:`FreeLOCWanAttnProcessor`, which computes q/k/v exactly as diffusers' ``WanAttnProcessor``
  (projections, fused or not, RMS norms) and attends with :func:`freeloc.attention.attend` using the
  layer's method; a layer whose method resolves to nothing at this length calls the original
  processor, so it is bit-for-bit the unhooked model. Cross-attention ``attn2`` is not touched.

The rotary layout is read from the model's own ``rope`` module: its channel split and, from its
frequency buffers, its theta. The trained length and the shipped plans come from
``freeloc/data/models/wan.json``.

``SkyReelsV2Transformer3DModel`` reuses Wan's blocks, rope and processor signature unchanged and is
handled by the same adapter (its trained length must be given: ``trained_frames=``). Layers called
with an attention mask (SkyReels-V2 diffusion forcing with causal blocks) run the original processor.
"""

from __future__ import annotations

import inspect
import json
import math
from importlib import resources
from typing import Any

import torch

from ..attention import attend, band_set_for
from ..methods import Method
from ..plan import LayerPlan
from ..rotary import RotaryLayout
from ..session import LayerStats, Session, Timer, plan_for

__all__ = ["WanAdapter", "FreeLOCWanAttnProcessor"]

_MARK = "_freeloc_session"


def model_data() -> dict[str, Any]:
    """The Wan entry of the model data (trained lengths, VAE factor, shipped plans)."""
    return json.loads(resources.files("freeloc").joinpath("data/models/wan.json").read_text())


def _matches(config: Any, match: dict[str, Any]) -> bool:
    return all(getattr(config, k, None) == v or (isinstance(v, list) and list(getattr(config, k, ())) == v)
               for k, v in match.items())


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


class _Grid:
    """The latent grid of the current forward, set by the transformer's pre-hook."""

    def __init__(self, expected_frames: int | None) -> None:
        self.value: tuple[int, int, int] | None = None
        self.expected_frames = expected_frames


class FreeLOCWanAttnProcessor:
    """Self-attention of one Wan block through :func:`freeloc.attention.attend`."""

    def __init__(self, original: Any, grid: _Grid, rotary: RotaryLayout, plan: LayerPlan, layer: int,
                 trained_frames: int, stats: LayerStats, backend: str) -> None:
        self.original = original
        self.grid = grid
        self.rotary = rotary
        self.plan = plan
        self.layer = layer
        self.trained_frames = trained_frames
        self.stats = stats
        self.backend = backend
        self.last_method: Method | None = None

    def method(self, num_frames: int) -> Method | None:
        return self.plan.resolve(self.layer, num_frames, self.trained_frames)

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        grid = self.grid.value
        method = None if grid is None or encoder_hidden_states is not None else self.method(grid[0])
        self.last_method = method
        if method is None or attention_mask is not None or rotary_emb is None:
            with Timer(self.stats):
                out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
            if grid is not None:
                self.stats.max_abs_distance = max(self.stats.max_abs_distance, float(grid[0] - 1))
            return out
        with Timer(self.stats):
            if attn.fused_projections:
                query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            else:
                query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
            query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
            key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
            value = value.unflatten(2, (attn.heads, -1))
            out = attend(query, key, value, grid=grid, method=method, rotary=self.rotary, backend=self.backend)
            out = out.flatten(2, 3).type_as(query)
            out = attn.to_out[1](attn.to_out[0](out))
        self._record(method, grid)
        return out

    def _record(self, method: Method, grid: tuple[int, int, int]) -> None:
        f, h, w = grid
        bands = band_set_for(method, f, h * w, self.rotary)
        r = max(float((b.relative_distance()[b.pairs]).abs().max()) for b in bands.bands if bool(b.pairs.any()))
        self.stats.max_abs_distance = max(self.stats.max_abs_distance, r)
        self.stats.density = bands.token_density(h * w)


class WanAdapter:
    """Installs FreeLOC on a ``WanTransformer3DModel``."""

    model_classes = ("WanTransformer3DModel", "SkyReelsV2Transformer3DModel")

    def __init__(self, transformer: torch.nn.Module, name: str = "transformer") -> None:
        self.transformer = transformer
        self.name = name

    def attention_layers(self) -> list[torch.nn.Module]:
        """The self-attention modules, in order (``blocks.{i}.attn1``)."""
        return [block.attn1 for block in self.transformer.blocks]

    def trained_video_frames(self) -> int:
        """The trained length in video frames, from the model data (by class, then config variant)."""
        cls = type(self.transformer).__name__
        data = model_data()["classes"][cls]
        frames = data["trained_video_frames"]
        for variant in data.get("variants", []):
            if _matches(self.transformer.config, variant["match"]):
                frames = variant["trained_video_frames"]
        if frames is None:
            raise ValueError(f"the trained length of {cls} is not known to freeloc ({data.get('note', '')}); pass "
                             f"trained_frames= (video frames) to freeloc.enable")
        return frames

    def shipped_plan(self) -> str | None:
        """The name of the shipped plan whose model matches this transformer's class and config, if any."""
        for entry in model_data().get("shipped_plans", []):
            if entry["class"] == type(self.transformer).__name__ and _matches(self.transformer.config, entry["match"]):
                return entry["plan"]
        return None

    def install(self, session: Session, *, method: str, plan: LayerPlan | str | None, num_frames: int | None,
                trained_frames: int | None, backend: str, pipeline: Any = None,
                method_params: dict[str, Any] | None = None) -> None:
        tr = self.transformer
        if getattr(tr, _MARK, None) is not None:
            raise RuntimeError(f"freeloc is already applied to this {type(tr).__name__} ({self.name}); remove "
                               f"that session first (leave its with-block or call .remove())")
        factor = int(getattr(pipeline, "vae_scale_factor_temporal", 0) or model_data()["temporal_factor"])
        p_t = tr.config.patch_size[0]
        for label, value in (("num_frames", num_frames), ("trained_frames", trained_frames)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{label} must be a positive int (video frames), got {value!r}")
        video_t = trained_frames if trained_frames is not None else self.trained_video_frames()
        t_latent = ((video_t - 1) // factor + 1) // p_t
        expected = None if num_frames is None else ((num_frames - 1) // factor + 1) // p_t
        layers = self.attention_layers()
        layer_plan = plan_for(method, plan, len(layers), self.shipped_plan(),
                              f"{type(tr).__name__}({self.name})", method_params)
        rotary = rotary_layout(tr)
        grid = _Grid(expected)

        def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            hs = args[0] if args else kwargs["hidden_states"]
            _, _, f, h, w = hs.shape
            pt, ph, pw = module.config.patch_size
            value = (f // pt, h // ph, w // pw)
            if grid.expected_frames is not None and value[0] != grid.expected_frames:
                raise ValueError(f"freeloc was enabled for num_frames giving {grid.expected_frames} latent frames, "
                                 f"but the transformer got {value[0]}; pass the same num_frames to the pipeline")
            grid.value = value

        handle = tr.register_forward_pre_hook(pre_hook, with_kwargs=True)
        session.on_remove(handle.remove)
        setattr(tr, _MARK, session)
        session.on_remove(lambda: delattr(tr, _MARK))
        session.plan = layer_plan
        for i, attn in enumerate(layers):
            stats = LayerStats(self.name, i, layer_plan.methods[i])
            session.layers.append(stats)
            original = attn.processor
            attn.set_processor(FreeLOCWanAttnProcessor(original, grid, rotary, layer_plan, i, t_latent, stats,
                                                       backend))
            session.on_remove(lambda attn=attn, original=original: attn.set_processor(original))
