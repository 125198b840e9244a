"""The shapes model: a small Wan video model for the synthetic bouncing-shape clips, and its shipped weights.

The model is diffusers' ``WanTransformer3DModel`` at a small configuration, so the real Wan code path
(and freeloc's Wan adapter) is what runs. It works in pixel space through a fixed patchifier: a
``32 x 32`` RGB frame minus the background colour, times ``SCALE``, becomes a
``(3 * 4 * 4) x 8 x 8`` latent frame (pixel unshuffle by 4), one latent frame per video frame (no VAE,
no temporal compression). With the model's ``(1, 2, 2)`` patch a token holds ``192`` numbers, so the
model's width (``num_heads * head_dim``) must be at least that: a narrower model cannot even pass the
noise through, and its loss stalls.

The model's "text" is the clip's condition (``model_condition``), as one token or one token per
shape slot (``ShapesConfig.slot_tokens``). It names the shapes, their colours and their velocities
but not where they start, so the model chooses the layout and must keep it moving consistently from
frame to frame (a relation between frames, which is what RoPE's relative positions carry).

Sampling (``sample``) integrates the flow with Euler steps from Gaussian noise at any length.
``load`` reads a training run of ``freeloc.shapes.train``; ``load_shipped`` the checkpoint
shipped in the package (``SHIPPED``), with its layer plan (``shipped_plan``), guidance
scale (``shipped_guidance``), sampler shift and sampler noise (its config's ``sample_shift`` and
``sample_noise``).

Building the model needs diffusers and loading the shipped weights safetensors (the ``shapes`` extra);
both are imported when first needed.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from jaxtyping import Float
from torch import Tensor

from .._extras import require
from .._progress import Progress, reporter
from ..loss_probe import check_min_z, probe_loss
from ..methods import _is_number
from ..plan import LayerPlan
from ..probing import BOUNDED_VRPR, SCORES, check_rule, probe
from .clips import BACKGROUND, CONDITION_DIM, MAX_SHAPES, SLOT_DIM, ClipSpec, condition, random_spec, render

__all__ = [
    "LOSS_CLIPS",
    "LOSS_RATIOS",
    "LOSS_SEED",
    "LOSS_TIMES",
    "LR_FLOOR",
    "PLAN_SCORES",
    "SCALE",
    "SHIPPED",
    "UNSHUFFLE",
    "ShapesConfig",
    "build_model",
    "check_plan_rule",
    "condition_tokens",
    "decode",
    "encode",
    "is_sample_noise",
    "is_shift",
    "load",
    "load_exported",
    "load_folder",
    "load_shipped",
    "loss_batches",
    "model_condition",
    "probe_plan",
    "sample",
    "shipped_guidance",
    "shipped_plan",
]

#: Folder of the checkpoint shipped with the package (weights, metadata, model card, loss curve).
SHIPPED = Path(__file__).parent / "data"

#: Pixel-unshuffle factor of the fixed patchifier.
UNSHUFFLE = 4
#: Latent scale: ``latent = (pixels - background) * SCALE`` (real clips then have an RMS near 0.55).
SCALE = 4.0
#: Where a learning-rate decay ends, as a fraction of ``lr`` (see ``ShapesConfig.lr_decay_start``).
LR_FLOOR = 0.05


@dataclass(frozen=True)
class ShapesConfig:
    """The model and training settings (saved beside the checkpoint)."""

    frame_size: int = 32
    trained_frames: int = 16
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 64
    ffn_dim: int = 512
    batch: int = 8
    lr: float = 5e-4
    warmup: int = 200
    ema: float = 0.999
    shift: float = 2.0
    seed: int = 0
    #: Fraction of training clips whose condition is replaced by zeros (the null condition that
    #: classifier-free guidance, ``sample(..., guidance=)``, compares against); 0 keeps every condition.
    cond_drop: float = 0.0
    #: First training step with condition dropout (earlier steps keep every condition). A run saved
    #: before this step is a valid start for this config: up to it, the two trainings are the same.
    cond_drop_start: int = 0
    #: How the condition reaches the model: ``False``, one token of all ``CONDITION_DIM`` numbers;
    #: ``True``, one token per shape slot (its numbers and the shape count), so that cross-attention
    #: can tell the shapes apart.
    slot_tokens: bool = False
    #: Learning-rate decay: ``lr`` until step ``lr_decay_start``, then linearly down to
    #: ``lr * LR_FLOOR`` at ``lr_decay_end`` and constant after. ``lr_decay_end <= lr_decay_start``
    #: keeps ``lr`` throughout. A run saved before the start is a valid start for this config.
    lr_decay_start: int = 0
    lr_decay_end: int = 0
    #: Timestep shift of the sampler (``sample``); None: ``shift``, the training one. A larger shift
    #: spends more of the Euler steps at high noise, where the layout (how many shapes, where) is decided.
    sample_shift: float | None = None
    #: Fresh noise in the sampler's steps (``sample``'s ``noise``): 0, deterministic Euler steps; up to 1,
    #: each step re-noises its clean estimate with that share of new Gaussian noise, which lets later steps
    #: undo early mistakes (a shape drawn twice or broken in two).
    sample_noise: float = 0.0

    @property
    def sampling_shift(self) -> float:
        """The sampler's timestep shift: ``sample_shift``, or the training ``shift`` when it is None."""
        return self.shift if self.sample_shift is None else float(self.sample_shift)

    def lr_at(self, step: int) -> float:
        """The learning rate of training step ``step`` (0-based): warm-up, then the decay if one is set."""
        lr = self.lr * min(1.0, (step + 1) / max(1, self.warmup))
        if self.lr_decay_end <= self.lr_decay_start or step < self.lr_decay_start:
            return lr
        done = min(1.0, (step - self.lr_decay_start) / (self.lr_decay_end - self.lr_decay_start))
        return lr * (1.0 - (1.0 - LR_FLOOR) * done)

    def cond_drop_at(self, step: int) -> float:
        """The condition dropout used at training step ``step`` (0-based)."""
        return self.cond_drop if step >= self.cond_drop_start else 0.0

    def same_training_until(self, other: ShapesConfig, step: int) -> bool:
        """Whether training with ``other`` for ``step`` steps is exactly training with this config."""
        scheduled = ("cond_drop", "cond_drop_start", "lr_decay_start", "lr_decay_end",
                     "sample_shift", "sample_noise")  # the last two are not training at all
        if {k: v for k, v in asdict(self).items() if k not in scheduled} != {
                k: v for k, v in asdict(other).items() if k not in scheduled}:
            return False
        changes = {0, self.cond_drop_start, other.cond_drop_start}
        if any(self.cond_drop_at(s) != other.cond_drop_at(s) for s in changes if s < step):
            return False
        # both schedules are piecewise linear in the step: equal at every step before ``step`` iff equal
        # at each of their breakpoints before it and at the last step before it
        knots = {0, step - 1, self.warmup, other.warmup, self.lr_decay_start, other.lr_decay_start,
                 self.lr_decay_end, other.lr_decay_end}
        knots |= {k - 1 for k in knots} | {k + 1 for k in knots}
        return all(self.lr_at(s) == other.lr_at(s) for s in knots if 0 <= s < step)

    @property
    def channels(self) -> int:
        return 3 * UNSHUFFLE * UNSHUFFLE


def build_model(cfg: ShapesConfig) -> torch.nn.Module:
    """The small ``WanTransformer3DModel`` (seeded by ``cfg.seed``)."""
    diffusers = require("diffusers", "shapes", "the shapes model (a diffusers WanTransformer3DModel)")
    torch.manual_seed(cfg.seed)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.channels, out_channels=cfg.channels,
        text_dim=SLOT_DIM + 1 if cfg.slot_tokens else CONDITION_DIM, freq_dim=64, ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers, rope_max_seq_len=1024,
    )


def _background() -> Tensor:
    return torch.tensor(BACKGROUND).view(3, 1, 1)


def encode(video: Float[Tensor, "batch frames 3 height width"]) -> Float[Tensor, "batch channels frames h w"]:
    """(B, T, 3, H, W) in [0, 1] -> latent (B, 48, T, H/4, W/4); the background maps to 0."""
    b, t = video.shape[:2]
    x = F.pixel_unshuffle((video - _background()).flatten(0, 1) * SCALE, UNSHUFFLE)  # (B*T, 48, H/4, W/4)
    return x.unflatten(0, (b, t)).transpose(1, 2)


def decode(latent: Float[Tensor, "batch channels frames h w"]) -> Float[Tensor, "batch frames 3 height width"]:
    """Latent (B, 48, T, h, w) -> (B, T, 3, 4h, 4w) in [0, 1]."""
    b, _, t = latent.shape[:3]
    x = F.pixel_shuffle((latent / SCALE).transpose(1, 2).flatten(0, 1), UNSHUFFLE)
    return (x + _background()).clamp(0, 1).unflatten(0, (b, t))


def model_condition(spec: ClipSpec) -> Float[Tensor, " cond"]:
    """The model's condition: ``freeloc.shapes.clips.condition`` with the start positions zeroed.

    The shapes, colours and velocities are asked for; where the shapes start is left to the model.
    """
    out = condition(spec).clone()
    for i in range(spec.num_shapes):
        out[i * SLOT_DIM + 10 : i * SLOT_DIM + 12] = 0.0
    return out


def condition_tokens(cfg: ShapesConfig, cond: Float[Tensor, "batch cond"]) -> Float[Tensor, "batch tokens width"]:
    """Conditions (B, CONDITION_DIM) as the model's "text" tokens: (B, 1, 37), or (B, 3, 13) with ``slot_tokens``."""
    if not cfg.slot_tokens:
        return cond[:, None, :]
    slots = cond[:, : MAX_SHAPES * SLOT_DIM].unflatten(1, (MAX_SHAPES, SLOT_DIM))
    return torch.cat([slots, cond[:, None, -1:].expand(-1, MAX_SHAPES, 1)], dim=2)


def is_shift(value: object) -> bool:
    """Whether ``value`` is a valid timestep shift: a finite number > 0 (1: no shift)."""
    return _is_number(value) and math.isfinite(value) and value > 0  # type: ignore[arg-type,operator]


def is_sample_noise(value: object) -> bool:
    """Whether ``value`` is a valid share of fresh noise for the sampler: a number in [0, 1]."""
    return _is_number(value) and 0.0 <= value <= 1.0  # type: ignore[operator]


def _shifted(t: Float[Tensor, "*shape"], shift: float) -> Float[Tensor, "*shape"]:
    return shift * t / (1 + (shift - 1) * t)


def load(out: Path, *, average: bool = True) -> tuple[torch.nn.Module, ShapesConfig]:
    """The trained model (eval mode; the weight average unless ``average=False``) and its config."""
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    cfg = ShapesConfig(**state["config"])
    model = build_model(cfg)
    model.load_state_dict(state["ema" if average else "model"])
    return model.eval(), cfg


#: The scores ``probe_plan`` can choose a plan by: ``freeloc.probe``'s pairs, and ``"loss"`` (``probe_loss``).
PLAN_SCORES = (*sorted(SCORES), "loss")


def check_plan_rule(score: str, bound_from: float | int | None = None, position_from: float | int | None = None,
                    bounded_vrpr: str = "tsa+vrpr", tsa_count: int | None = None, min_z: float = 0.0) -> None:
    """Raise ``ValueError`` unless ``probe_plan`` accepts these settings, before any probing."""
    if score != "loss":
        check_rule(score, bound_from, position_from, bounded_vrpr)
        if min_z != 0.0:
            raise ValueError(f"probe_plan: min_z is the loss rule's (score='loss'), got {min_z!r} with score {score!r}")
        return
    check_min_z(min_z)
    if bounded_vrpr not in BOUNDED_VRPR:
        raise ValueError(f"probe: bounded_vrpr must be one of {list(BOUNDED_VRPR)}, got {bounded_vrpr!r}")
    if bound_from is not None or position_from is not None or tsa_count is not None:
        raise ValueError("probe_plan: score='loss' chooses every length range itself; bound_from, position_from "
                         f"and tsa_count do not apply, got {bound_from!r}, {position_from!r}, {tsa_count!r}")


def probe_plan(model: torch.nn.Module, cfg: ShapesConfig, multiple: int = 4, *, num_frames: int | None = None,
               seed: int = 0, tsa_count: int | None = None, progress: Progress = True,
               score: str = "attention", bound_from: float | int | None = None,
               position_from: float | int | None = None, bounded_vrpr: str = "tsa+vrpr",
               min_z: float = 0.0) -> LayerPlan:
    """The layer plan ``freeloc.probe`` writes for this model at ``multiple`` x its trained length.

    The probe's input is a rendered clip (seed 99) noised halfway (timestep 500) with its condition.
    ``num_frames`` (video frames, here latent frames too) replaces ``multiple``; ``seed`` (the probe's
    query sample), ``tsa_count``, ``progress``, ``score``, ``bound_from``, ``position_from`` and ``bounded_vrpr``
    are passed to ``freeloc.probe``.

    ``score="loss"`` runs ``freeloc.probe_loss`` instead, on ``loss_batches(cfg)``: from each of
    ``LOSS_RATIOS`` on, a layer takes ``bounded_vrpr`` where that lowers the model's loss against TSA on every
    layer (by more than ``min_z`` standard errors), TSA otherwise; ``direct`` below the first ratio
    (``multiple``, ``num_frames`` and ``seed`` unused).
    """
    check_plan_rule(score, bound_from, position_from, bounded_vrpr, tsa_count, min_z)
    if score == "loss":
        plan = probe_loss(model, loss_batches(cfg), base="tsa", candidate=bounded_vrpr, below="direct",
                          min_z=min_z, trained_frames=cfg.trained_frames, temporal_factor=1, progress=progress)
        plan.meta["rule"].update(score="loss", bound_from=None, position_from=None, bounded_vrpr=bounded_vrpr)
        plan.meta["probe"]["inputs"] = (f"freeloc.shapes.model.loss_batches: {LOSS_CLIPS} rendered clips (seeds "
                                        f"{LOSS_SEED}-{LOSS_SEED + LOSS_CLIPS - 1}) at times {list(LOSS_TIMES)}")
        return plan
    frames = multiple * cfg.trained_frames if num_frames is None else num_frames
    spec = random_spec(99, frame_size=cfg.frame_size)
    x0 = encode(render(spec, frames)[None])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(99))
    inputs = dict(hidden_states=0.5 * x0 + 0.5 * noise, timestep=torch.tensor([500.0]),
                  encoder_hidden_states=condition_tokens(cfg, model_condition(spec)[None]), return_dict=False)
    plan = probe(model, frames, inputs=inputs, trained_frames=cfg.trained_frames, temporal_factor=1, seed=seed,
                 tsa_count=tsa_count, progress=progress, score=score, bound_from=bound_from,
                 position_from=position_from, bounded_vrpr=bounded_vrpr)
    plan.meta["probe"]["inputs"] = "freeloc.shapes.model.probe_plan: a rendered clip (seed 99) at timestep 500"
    return plan


#: The loss probe's length ratios, clips (seeds from ``LOSS_SEED``) and flow-matching times for the shapes
#: model (``loss_batches``): the plan gets one length range per ratio; the last one holds beyond it.
LOSS_RATIOS = (2, 4, 8)
LOSS_CLIPS = 8
LOSS_SEED = 900
LOSS_TIMES = (0.25, 0.5, 0.75)


def loss_batches(cfg: ShapesConfig, ratios: tuple[int, ...] = LOSS_RATIOS, *, clips: int = LOSS_CLIPS,
                 times: tuple[float, ...] = LOSS_TIMES, seed: int = LOSS_SEED
                 ) -> dict[int, list[tuple[dict[str, Any], Tensor]]]:
    """The loss probe's examples (``freeloc.probe_loss``): for each ratio, rendered clips ``ratio`` times the
    trained length (seeds ``seed`` on, disjoint from the validation and test seeds) noised to each of
    ``times`` with one shared noise draw, and the flow-matching target ``noise - x0``."""
    out: dict[int, list[tuple[dict[str, Any], Tensor]]] = {}
    specs = [random_spec(seed + i, frame_size=cfg.frame_size) for i in range(clips)]
    cond = condition_tokens(cfg, torch.stack([model_condition(s) for s in specs]))
    for ratio in ratios:
        x0 = encode(torch.stack([render(s, ratio * cfg.trained_frames) for s in specs]))
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + ratio))
        out[ratio] = [(dict(hidden_states=(1 - t) * x0 + t * noise, timestep=torch.full((clips,), 1000.0 * t),
                            encoder_hidden_states=cond, return_dict=False), noise - x0) for t in times]
    return out


def shipped_plan() -> LayerPlan:
    """The probe's layer plan for the shipped model (``plan.json`` beside it; see ``probe_plan``)."""
    path = SHIPPED / "plan.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall freeloc with its package data")
    return LayerPlan.load(path)


def shipped_guidance() -> float:
    """The classifier-free guidance scale the shipped model is meant to be sampled with (1.0: none)."""
    path = SHIPPED / "model.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall freeloc with its package data")
    return _guidance(SHIPPED)


def _guidance(folder: Path) -> float:
    return float(json.loads((folder / "model.json").read_text()).get("guidance", 1.0))


def load_exported(folder: Path, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, ShapesConfig]:
    """A checkpoint written by ``freeloc.shapes.train.export`` (``model.safetensors`` and ``model.json`` in
    ``folder``) and its config; eval mode.

    Raises:
        FileNotFoundError: If either file is missing from ``folder``.
    """
    load_file = require("safetensors.torch", "shapes", "loading an exported shapes model").load_file
    weights, meta_path = folder / "model.safetensors", folder / "model.json"
    if not weights.exists() or not meta_path.exists():
        raise FileNotFoundError(f"{folder} is not an exported shapes model: it needs model.safetensors and "
                                f"model.json (written by python -m freeloc.shapes.train --export), or a "
                                f"training run's checkpoint.pt for load_folder")
    cfg = ShapesConfig(**json.loads(meta_path.read_text())["config"])
    model = build_model(cfg)
    model.load_state_dict({k: v.to(dtype) for k, v in load_file(str(weights)).items()})
    return (model if dtype == torch.float32 else model.to(dtype)).eval(), cfg


def load_folder(folder: Path) -> tuple[torch.nn.Module, ShapesConfig, float, LayerPlan | None]:
    """A model from ``folder``, whichever kind it is: the model (eval mode), its config, the guidance scale
    it is meant to be sampled with and its layer plan.

    A training run (``checkpoint.pt``, ``load``): its weight average, guidance 1.0 (none recorded), no
    plan. An export (``model.safetensors`` and ``model.json``, ``load_exported``): its weights, the
    ``guidance`` in ``model.json`` and ``plan.json`` where it is there.

    Raises:
        FileNotFoundError: If ``folder`` is neither.
    """
    if (folder / "checkpoint.pt").exists():
        model, cfg = load(folder)
        return model, cfg, 1.0, None
    model, cfg = load_exported(folder)
    plan = LayerPlan.load(folder / "plan.json") if (folder / "plan.json").exists() else None
    return model, cfg, _guidance(folder), plan


def load_shipped(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, ShapesConfig]:
    """The checkpoint shipped in the package (``SHIPPED``), offline; eval mode.

    Raises:
        FileNotFoundError: If the package was installed without its data files.
    """
    if not (SHIPPED / "model.safetensors").exists() or not (SHIPPED / "model.json").exists():
        raise FileNotFoundError(f"the shipped shapes model is missing from {SHIPPED} (model.safetensors and "
                                f"model.json): reinstall freeloc with its package data")
    return load_exported(SHIPPED, dtype)


@torch.no_grad()
def sample(model: torch.nn.Module, cfg: ShapesConfig, cond: Float[Tensor, "batch cond"], num_frames: int, *,
           steps: int = 20, seed: int = 0, guidance: float = 1.0, shift: float | int | None = None,
           noise: float | int | None = None,
           progress: Progress = False) -> Float[Tensor, "batch frames 3 height width"]:
    """Videos (B, T, 3, H, W) in [0, 1] for conditions ``cond`` (B, CONDITION_DIM), Euler flow sampling.

    ``guidance`` != 1 applies classifier-free guidance against the zero condition,
    ``v = v(0) + guidance * (v(cond) - v(0))``: meaningful for a model trained with ``cond_drop > 0``.
    ``shift``: the timestep shift of the steps (``t -> shift t / (1 + (shift - 1) t)``); None takes
    ``cfg.sampling_shift``.
    ``noise``: the share ``eta`` of fresh noise per step, in [0, 1]; None takes ``cfg.sample_noise``. With
    ``x_t = (1 - t) x_0 + t e`` and the velocity ``v = e - x_0``, a step estimates ``x_0 = x_t - t v`` and
    ``e = x_t + (1 - t) v`` and moves to ``(1 - t') x_0 + t' (sqrt(1 - eta^2) e + eta z)`` with fresh
    Gaussian ``z`` (drawn from the same seeded generator as the initial noise); ``eta = 0`` is the Euler step.
    ``progress``: ``True`` writes a status line over the steps to stderr, a callable receives
    ``(done, total)`` steps (``freeloc._progress``); ``False`` (default) is silent.
    """
    shift = cfg.sampling_shift if shift is None else shift
    if not is_shift(shift):
        raise ValueError(f"shift must be a finite number > 0 (1: no shift), got {shift!r}")
    noise = cfg.sample_noise if noise is None else noise
    if not is_sample_noise(noise):
        raise ValueError(f"noise must be a number in [0, 1] (0: deterministic Euler steps), got {noise!r}")
    g = torch.Generator().manual_seed(seed)
    h = cfg.frame_size // UNSHUFFLE
    dev = next(model.parameters()).device  # noise drawn on the CPU: the same videos on any device
    x = torch.randn(cond.shape[0], cfg.channels, num_frames, h, h, generator=g).to(dev)
    ts = _shifted(torch.linspace(1, 0, steps + 1), float(shift))
    tokens = condition_tokens(cfg, cond.to(dev))
    both_conds = torch.cat([torch.zeros_like(tokens), tokens])
    report = reporter(progress, "sampling steps")
    report(0, steps)
    for step, (t, t_next) in enumerate(zip(ts[:-1], ts[1:], strict=True), start=1):
        if guidance == 1.0:
            v = model(x, torch.full((x.shape[0],), float(t) * 1000, device=dev), tokens, return_dict=False)[0]
        else:  # conditioned and null-conditioned velocities in one batch
            both = model(torch.cat([x, x]), torch.full((2 * x.shape[0],), float(t) * 1000, device=dev), both_conds,
                         return_dict=False)[0]
            v0, v1 = both.chunk(2)
            v = v0 + guidance * (v1 - v0)
        if noise == 0 or t_next == 0:
            x = x + (t_next - t) * v
        else:
            fresh = torch.randn(x.shape, generator=g).to(dev)
            clean, eps = x - t * v, x + (1 - t) * v
            x = (1 - t_next) * clean + t_next * (math.sqrt(1 - noise**2) * eps + noise * fresh)
        report(step, steps)
    return decode(x.float().cpu())
