"""What every adapter shares: installing a layer plan on a transformer and taking it off exactly.

An architecture's adapter subclasses :class:`TransformerAdapter` and says only what is true of its
model: which modules are self-attention (:meth:`~TransformerAdapter.attention_layers`), its rotary
layout, how to read the latent grid from a forward call, its temporal patch, and a processor that
computes the layer's q/k/v and hands them to :meth:`LayerContext.attend`. Everything else (plans,
trained lengths from data, the double-apply check, the grid hook, the undo log) is here.

Model data lives in ``freeloc/data/models/<data_name>.json``::

    {"temporal_factor": 4,
     "classes": {"ClassName": {"trained_video_frames": 81, "variants": [{"match": {...}, ...}]}},
     "shipped_plans": [{"plan": "name", "class": "ClassName", "match": {config key: value}}]}
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib import resources
from typing import Any, TypeVar

import torch

from ..attention import attend, band_set_for
from ..methods import Method
from ..plan import LayerPlan
from ..rotary import RotaryLayout
from ..session import LayerStats, Session, Timer, plan_for

__all__ = ["FreeLOCProcessor", "GridState", "LayerContext", "TransformerAdapter", "model_data"]

_MARK = "_freeloc_session"
T = TypeVar("T")


def model_data(name: str) -> dict[str, Any]:
    """The model data file ``freeloc/data/models/<name>.json``."""
    return json.loads(resources.files("freeloc").joinpath(f"data/models/{name}.json").read_text())


def config_matches(config: Any, match: dict[str, Any]) -> bool:
    """Whether every ``key: value`` of ``match`` equals the config's (lists compare as lists)."""
    def same(value: Any, want: Any) -> bool:
        return list(value) == want if isinstance(want, list) and value is not None else value == want

    return all(same(getattr(config, k, None), v) for k, v in match.items())


class GridState:
    """The latent grid ``(F, H', W')`` of the current forward, set by the adapter's pre-hook."""

    def __init__(self, expected_frames: int | None) -> None:
        self.value: tuple[int, int, int] | None = None
        self.expected_frames = expected_frames

    def set(self, value: tuple[int, int, int]) -> None:
        if self.expected_frames is not None and value[0] != self.expected_frames:
            raise ValueError(f"freeloc was enabled for num_frames giving {self.expected_frames} latent frames, "
                             f"but the transformer got {value[0]}; pass the same num_frames to the pipeline")
        self.value = value


class LayerContext:
    """One hooked self-attention layer: its plan entry, the grid, statistics, and the attention call."""

    def __init__(self, grid: GridState, rotary: RotaryLayout | None, plan: LayerPlan, layer: int, trained_frames: int,
                 stats: LayerStats, backend: str) -> None:
        self.grid = grid
        self.rotary = rotary
        self.plan = plan
        self.layer = layer
        self.trained_frames = trained_frames
        self.stats = stats
        self.backend = backend
        self.last_method: Method | None = None
        self.module: torch.nn.Module | None = None  # the hooked layer, set by the adapter's install
        self.observer: Callable[..., None] | None = None  # sees each attend call's inputs (the probe)

    def method(self) -> Method | None:
        """The layer's method at the current grid; None: run the model's own processor."""
        grid = self.grid.value
        method = None if grid is None else self.plan.resolve(self.layer, grid[0], self.trained_frames)
        self.last_method = method
        return method

    def timer(self) -> Timer:
        """Times a block into the layer's statistics and counts it as one call."""
        return Timer(self.stats)

    def passthrough(self, call: Callable[[], T]) -> T:
        """Run the original processor (timed); its temporal distances reach F - 1."""
        with Timer(self.stats):
            out = call()
        if self.grid.value is not None:
            self.stats.max_abs_distance = max(self.stats.max_abs_distance, float(self.grid.value[0] - 1))
        return out

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, method: Method, *, text_before: int = 0,
               text_after: int = 0, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """:func:`freeloc.attention.attend` on the layer's q/k/v (before RoPE), recording statistics."""
        grid = self.grid.value
        assert grid is not None
        if self.observer is not None:
            self.observer(self, q, k, v, method, dict(text_before=text_before, text_after=text_after,
                                                      text_mask=text_mask))
        out = attend(q, k, v, grid=grid, method=method, rotary=self.rotary, backend=self.backend,
                     text_before=text_before, text_after=text_after, text_mask=text_mask)
        f, h, w = grid
        bands = band_set_for(method, f, h * w, self.rotary)
        r = max(float(b.relative_distance()[b.pairs].abs().max()) for b in bands.bands if bool(b.pairs.any()))
        self.stats.max_abs_distance = max(self.stats.max_abs_distance, r)
        self.stats.density = bands.token_density(h * w)
        return out


class FreeLOCProcessor:
    """Base of the adapters' processors: the original processor, the layer context, introspection."""

    def __init__(self, original: Any, ctx: LayerContext) -> None:
        self.original = original
        self.ctx = ctx

    @property
    def trained_frames(self) -> int:
        return self.ctx.trained_frames

    @property
    def rotary(self) -> RotaryLayout | None:
        return self.ctx.rotary

    @property
    def last_method(self) -> Method | None:
        return self.ctx.last_method


class TransformerAdapter:
    """Base class of the adapters: subclasses fill in the model-specific parts."""

    #: Class names of the transformers this adapter handles.
    model_classes: tuple[str, ...] = ()
    #: Name of the model data file (``freeloc/data/models/<data_name>.json``).
    data_name: str = ""

    def __init__(self, transformer: torch.nn.Module, name: str = "transformer") -> None:
        self.transformer = transformer
        self.name = name

    # ------------------------------------------------------------------ model-specific
    def attention_layers(self) -> list[torch.nn.Module]:
        """The self-attention modules, in plan order."""
        raise NotImplementedError

    def rotary_layout(self) -> RotaryLayout | None:
        """The model's rotary layout; ``None`` for a model without RoPE (attention-pattern methods only)."""
        raise NotImplementedError

    def grid_from_call(self, args: tuple, kwargs: dict[str, Any]) -> tuple[int, int, int]:
        """``(F, H', W')`` in tokens, from the transformer's forward arguments."""
        raise NotImplementedError

    def temporal_patch(self) -> int:
        """Latent frames per temporal token (1 unless the model patches time)."""
        return 1

    def make_processor(self, original: Any, ctx: LayerContext) -> Any:
        """The replacement processor of the layer ``ctx.module`` (whose processor is ``original``)."""
        raise NotImplementedError

    def synthetic_inputs(self, frames: int, seed: int = 0, latent_size: tuple[int, int] | None = None
                         ) -> dict[str, Any]:
        """Forward keyword arguments for probing at ``frames`` temporal tokens (Gaussian latents of the
        target shape, Gaussian text embeddings of the model's width, timestep 500 of 1000)."""
        raise NotImplementedError(f"{type(self).__name__} has no synthetic probe inputs: pass inputs= to "
                                  f"freeloc.probe (the transformer's forward keyword arguments)")

    def check_supported(self, method: str, plan: LayerPlan) -> None:
        """Raise a clear error if the plan needs something this model lacks (e.g. RoPE)."""

    # ------------------------------------------------------------------ data
    def trained_video_frames(self) -> int:
        """The trained length in video frames, from the model data (by class, then config variant)."""
        cls = type(self.transformer).__name__
        data = model_data(self.data_name)["classes"][cls]
        frames = data["trained_video_frames"]
        for variant in data.get("variants", []):
            if config_matches(self.transformer.config, variant["match"]):
                frames = variant["trained_video_frames"]
        if frames is None:
            raise ValueError(f"the trained length of {cls} is not known to freeloc ({data.get('note', '')}); pass "
                             f"trained_frames= (video frames) to freeloc.enable")
        return frames

    def shipped_plan(self) -> str | None:
        """The name of the shipped plan whose model matches this transformer's class and config, if any."""
        for entry in model_data(self.data_name).get("shipped_plans", []):
            if entry["class"] == type(self.transformer).__name__ and config_matches(self.transformer.config,
                                                                                    entry["match"]):
                return entry["plan"]
        return None

    def video_to_latent(self, frames: int, factor: int) -> int:
        """Temporal tokens of ``frames`` video frames: ``((frames - 1) // factor + 1) // temporal_patch``."""
        return ((frames - 1) // factor + 1) // self.temporal_patch()

    # ------------------------------------------------------------------ install
    def install(self, session: Session, *, method: str, plan: LayerPlan | str | None, num_frames: int | None,
                trained_frames: int | None, backend: str, pipeline: Any = None,
                method_params: dict[str, Any] | None = None, temporal_factor: int | None = None) -> None:
        """Validate everything, then install the grid hook and the processors, registering each undo."""
        tr = self.transformer
        if getattr(tr, _MARK, None) is not None:
            raise RuntimeError(f"freeloc is already applied to this {type(tr).__name__} ({self.name}); remove "
                               f"that session first (leave its with-block or call .remove())")
        for label, value, unit in (("num_frames", num_frames, "video frames"),
                                   ("trained_frames", trained_frames, "video frames"),
                                   ("temporal_factor", temporal_factor, "video frames per latent frame")):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{label} must be a positive int ({unit}), got {value!r}")
        factor = temporal_factor or int(getattr(pipeline, "vae_scale_factor_temporal", 0)
                                        or model_data(self.data_name)["temporal_factor"])
        video_t = trained_frames if trained_frames is not None else self.trained_video_frames()
        t_latent = self.video_to_latent(video_t, factor)
        expected = None if num_frames is None else self.video_to_latent(num_frames, factor)
        layers = self.attention_layers()
        rotary = self.rotary_layout()
        layer_plan = plan_for(method, plan, len(layers), self.shipped_plan(), f"{type(tr).__name__}({self.name})",
                              method_params, uniform="vrpr" if rotary is not None else "tsa")
        self.check_supported(method, layer_plan)
        grid = GridState(expected)

        def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            grid.set(self.grid_from_call(args, kwargs))

        handle = tr.register_forward_pre_hook(pre_hook, with_kwargs=True)
        session.on_remove(handle.remove)
        setattr(tr, _MARK, session)
        session.on_remove(lambda: delattr(tr, _MARK))
        session.plan = layer_plan
        for i, attn in enumerate(layers):
            stats = LayerStats(self.name, i, layer_plan.methods[i])
            session.layers.append(stats)
            original = attn.processor
            ctx = LayerContext(grid, rotary, layer_plan, i, t_latent, stats, backend)
            ctx.module = attn
            ctx.observer = session.observer
            attn.set_processor(self.make_processor(original, ctx))
            session.on_remove(lambda attn=attn, original=original: attn.set_processor(original))
