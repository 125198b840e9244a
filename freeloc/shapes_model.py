"""A small Wan video model for the synthetic bouncing-shape clips: training and sampling.

The model is diffusers' ``WanTransformer3DModel`` at a small configuration, so the real Wan code path
(and freeloc's Wan adapter) is what runs. It works in pixel space through a fixed patchifier: a
``32 x 32`` RGB frame minus the background colour, times :data:`SCALE`, becomes a
``(3 * 4 * 4) x 8 x 8`` latent frame (pixel unshuffle by 4), one latent frame per video frame (no VAE,
no temporal compression). With the model's ``(1, 2, 2)`` patch a token holds ``192`` numbers, so the
model's width (``num_heads * head_dim``) must be at least that: a narrower model cannot even pass the
noise through, and its loss stalls.

The model's "text" is one token: the clip's condition (:func:`model_condition`), which names the
shapes, their colours and their velocities but not where they start, so the model chooses the
layout and must keep it moving consistently from frame to frame (a relation between frames, which
is what RoPE's relative positions carry).

Training uses the flow-matching objective Wan uses: ``x_t = (1 - t) x_0 + t e`` with ``t`` drawn
uniformly (after the same shift as the sampler), and the model predicts ``e - x_0``; the learning
rate warms up linearly, and an exponential moving average of the weights is kept and is what
:func:`load` returns. Training is seeded and resumable (``checkpoint.pt`` holds the model, its
average, the optimizer, the step and the RNG states) and prints its progress;
``python -m freeloc.shapes_model --steps N --out DIR`` runs it.

Sampling (:func:`sample`) integrates the flow with Euler steps from Gaussian noise at any length.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from .synthetic import BACKGROUND, CONDITION_DIM, MAX_SHAPES, SLOT_DIM, ClipSpec, condition, random_spec, render

__all__ = [
    "SHIPPED",
    "ShapesConfig",
    "build_model",
    "condition_tokens",
    "decode",
    "encode",
    "export",
    "load",
    "load_shipped",
    "model_condition",
    "probe_plan",
    "shipped_guidance",
    "shipped_plan",
    "sample",
    "train",
]

#: Folder of the checkpoint shipped with the package (weights, metadata, model card, loss curve).
SHIPPED = Path(__file__).parent / "data" / "shapes"

#: Pixel-unshuffle factor of the fixed patchifier.
UNSHUFFLE = 4
#: Latent scale: ``latent = (pixels - background) * SCALE`` (real clips then have an RMS near 0.55).
SCALE = 4.0
#: Where a learning-rate decay ends, as a fraction of ``lr`` (see :attr:`ShapesConfig.lr_decay_start`).
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
    #: How the condition reaches the model: ``False``, one token of all :data:`CONDITION_DIM` numbers;
    #: ``True``, one token per shape slot (its numbers and the shape count), so that cross-attention
    #: can tell the shapes apart.
    slot_tokens: bool = False
    #: Learning-rate decay: ``lr`` until step ``lr_decay_start``, then linearly down to
    #: ``lr * LR_FLOOR`` at ``lr_decay_end`` and constant after. ``lr_decay_end <= lr_decay_start``
    #: keeps ``lr`` throughout. A run saved before the start is a valid start for this config.
    lr_decay_start: int = 0
    lr_decay_end: int = 0

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
        scheduled = ("cond_drop", "cond_drop_start", "lr_decay_start", "lr_decay_end")
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
    from diffusers import WanTransformer3DModel

    torch.manual_seed(cfg.seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.channels, out_channels=cfg.channels,
        text_dim=SLOT_DIM + 1 if cfg.slot_tokens else CONDITION_DIM, freq_dim=64, ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers, rope_max_seq_len=1024,
    )


def _background() -> Tensor:
    return torch.tensor(BACKGROUND).view(3, 1, 1)


def encode(video: Tensor) -> Tensor:
    """(B, T, 3, H, W) in [0, 1] -> latent (B, 48, T, H/4, W/4); the background maps to 0."""
    b, t = video.shape[:2]
    x = F.pixel_unshuffle((video - _background()).flatten(0, 1) * SCALE, UNSHUFFLE)  # (B*T, 48, H/4, W/4)
    return x.unflatten(0, (b, t)).transpose(1, 2)


def decode(latent: Tensor) -> Tensor:
    """Latent (B, 48, T, h, w) -> (B, T, 3, 4h, 4w) in [0, 1]."""
    b, _, t = latent.shape[:3]
    x = F.pixel_shuffle((latent / SCALE).transpose(1, 2).flatten(0, 1), UNSHUFFLE)
    return (x + _background()).clamp(0, 1).unflatten(0, (b, t))


def model_condition(spec: ClipSpec) -> Tensor:
    """The model's condition: :func:`freeloc.synthetic.condition` with the start positions zeroed.

    The shapes, colours and velocities are asked for; where the shapes start is left to the model.
    """
    out = condition(spec).clone()
    for i in range(spec.num_shapes):
        out[i * SLOT_DIM + 10 : i * SLOT_DIM + 12] = 0.0
    return out


def condition_tokens(cfg: ShapesConfig, cond: Tensor) -> Tensor:
    """Conditions (B, CONDITION_DIM) as the model's "text" tokens: (B, 1, 37), or (B, 3, 13) with ``slot_tokens``."""
    if not cfg.slot_tokens:
        return cond[:, None, :]
    slots = cond[:, : MAX_SHAPES * SLOT_DIM].unflatten(1, (MAX_SHAPES, SLOT_DIM))
    return torch.cat([slots, cond[:, None, -1:].expand(-1, MAX_SHAPES, 1)], dim=2)


def _batch(cfg: ShapesConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    specs = [random_spec(generator, frame_size=cfg.frame_size) for _ in range(cfg.batch)]
    video = torch.stack([render(s, cfg.trained_frames) for s in specs])
    cond = condition_tokens(cfg, torch.stack([model_condition(s) for s in specs]))
    return encode(video), cond


def _shifted(t: Tensor, shift: float) -> Tensor:
    return shift * t / (1 + (shift - 1) * t)


def train(cfg: ShapesConfig, steps: int, out: Path, *, save_every: int = 200, progress: bool = True,
          device: str | torch.device = "cpu") -> dict[str, Any]:
    """Train (or resume) for ``steps`` total steps; checkpoints and a loss log go to ``out``.

    ``device``: where the model trains (``"cuda"`` on a GPU). The clips, noise and timesteps are drawn
    on the CPU from the same seeded streams whatever the device, so a run can move between devices.
    """
    out.mkdir(parents=True, exist_ok=True)
    if not 0.0 <= cfg.cond_drop < 1.0:
        raise ValueError(f"cond_drop must be in [0, 1), got {cfg.cond_drop}")
    if cfg.lr_decay_start < 0 or cfg.lr_decay_end < 0:
        raise ValueError(f"lr_decay_start and lr_decay_end must be steps >= 0, got {cfg.lr_decay_start} and "
                         f"{cfg.lr_decay_end}")
    if cfg.cond_drop_start < 0:
        raise ValueError(f"cond_drop_start must be a step >= 0, got {cfg.cond_drop_start}")
    if cfg.num_heads * cfg.head_dim < 3 * (UNSHUFFLE * 2) ** 2:
        raise ValueError(f"num_heads * head_dim = {cfg.num_heads * cfg.head_dim} is narrower than a token "
                         f"({3 * (UNSHUFFLE * 2) ** 2} numbers): the model could not pass the noise through")
    device = torch.device(device)
    model = build_model(cfg).train().to(device)
    ema = build_model(cfg).eval().requires_grad_(False).to(device)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    data_gen = torch.Generator().manual_seed(cfg.seed + 1)
    noise_gen = torch.Generator().manual_seed(cfg.seed + 2)
    step, losses = 0, []
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if not ShapesConfig(**state["config"]).same_training_until(cfg, state["step"]):
            raise ValueError(f"{ckpt} was trained with {state['config']} for {state['step']} steps, which is not "
                             f"the same training as {asdict(cfg)}: use another --out")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        data_gen.set_state(state["data_rng"])
        noise_gen.set_state(state["noise_rng"])
        step, losses = state["step"], state["losses"]
        if progress:
            print(f"resumed at step {step}")
    t0 = time.perf_counter()

    def save() -> None:
        torch.save(dict(model=model.state_dict(), ema=ema.state_dict(), optimizer=opt.state_dict(), step=step,
                        losses=losses, config=asdict(cfg), data_rng=data_gen.get_state(),
                        noise_rng=noise_gen.get_state()), ckpt)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))

    while step < steps:
        x0, cond = _batch(cfg, data_gen)
        if cfg.cond_drop_at(step) > 0:  # drawn only then: runs without dropout keep their random streams
            keep = torch.rand(cond.shape[0], generator=noise_gen) >= cfg.cond_drop_at(step)
            cond = cond * keep[:, None, None]
        noise = torch.randn(x0.shape, generator=noise_gen).to(device)
        t = _shifted(torch.rand(x0.shape[0], generator=noise_gen), cfg.shift).to(device)
        x0, cond = x0.to(device), cond.to(device)
        xt = (1 - t)[:, None, None, None, None] * x0 + t[:, None, None, None, None] * noise
        pred = model(xt, t * 1000, cond, return_dict=False)[0]
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        step += 1
        losses.append(loss.item())
        if progress and (step % 20 == 0 or step == steps):
            recent = sum(losses[-20:]) / len(losses[-20:])
            print(f"step {step}/{steps}  loss {recent:.4f}  {time.perf_counter() - t0:.0f} s", flush=True)
        if step % save_every == 0 or step == steps:
            save()
    return dict(step=step, loss=sum(losses[-20:]) / max(1, len(losses[-20:])), checkpoint=str(ckpt))


def load(out: Path, *, average: bool = True) -> tuple[torch.nn.Module, ShapesConfig]:
    """The trained model (eval mode; the weight average unless ``average=False``) and its config."""
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    cfg = ShapesConfig(**state["config"])
    model = build_model(cfg)
    model.load_state_dict(state["ema" if average else "model"])
    return model.eval(), cfg


#: The scores in the model card's table at the trained length: (key, column title, format).
CARD_SCORES = (("shape_presence", "shapes drawn / asked", "{:.2f}"),
               ("shape_count_consistency", "right count", "{:.2f}"),
               ("color_consistency", "right colours", "{:.2f}"),
               ("motion_error", "speed error (px/frame)", "{:.2f}"),
               ("dynamic_degree", "speed / asked speed", "{:.2f}"))


@torch.no_grad()
def trained_length_scores(model: torch.nn.Module, cfg: ShapesConfig, guidances: list[float], *, clips: int = 8,
                          steps: int = 20, progress: bool = True) -> dict[float, dict[str, float]]:
    """Pixel scores (:func:`freeloc.synthetic.evaluate_generated`, mean of ``clips`` conditions, seeds
    20000 + i) of the model at its trained length, with each classifier-free guidance scale."""
    from .synthetic import evaluate_generated

    if not 1 <= clips <= 64:
        raise ValueError(f"clips must be between 1 and 64, got {clips}")
    bad = [g for g in guidances if not (math.isfinite(g) and g >= 0)]
    if not guidances or bad:
        raise ValueError(f"guidances must be finite numbers >= 0 (1 = no guidance), got {guidances}")
    specs = [random_spec(20_000 + i, frame_size=cfg.frame_size) for i in range(clips)]
    cond = torch.stack([model_condition(sp) for sp in specs])
    out = {}
    for g in guidances:
        if progress:
            print(f"scoring {clips} clips of {cfg.trained_frames} frames with guidance {g:g} ...", flush=True)
        out[float(g)] = evaluate_generated(sample(model, cfg, cond, cfg.trained_frames, steps=steps, guidance=g), specs)
    return out


def _scores_table(scores: dict[float, dict[str, float]], shipped: float, clips: int) -> str:
    head = "| guidance | " + " | ".join(title for _, title, _ in CARD_SCORES) + " |"
    rows = [head, "|" + "---|" * (len(CARD_SCORES) + 1)]
    for g, sc in scores.items():
        label = f"{g:g}" + (" (none)" if g == 1.0 else "") + (" (shipped default)" if g == shipped != 1.0 else "")
        rows.append(f"| {label} | " + " | ".join(fmt.format(sc[key]) for key, _, fmt in CARD_SCORES) + " |")
    return (f"\nAt its trained length, measured by `export` on the exported weights ({clips} conditions, "
            f"seeds 20000-{20_000 + clips - 1}, 20 Euler steps; `freeloc.synthetic` pixel scores, 1 is a "
            f"perfect clip, speed error 0):\n\n" + "\n".join(rows) + "\n")


def export(run: Path, dest: Path = SHIPPED, *, commit: str | None = None, note: str = "",
           guidance: float = 1.0, evaluate: list[float] | None = None, evaluate_clips: int = 8) -> Path:
    """Write a training run's weight average as a shippable checkpoint in ``dest``.

    ``dest`` receives ``model.safetensors`` (float16 weights), ``model.json`` (the config, the steps,
    the final loss, the data generator settings and ``commit``, the commit of the training code),
    ``plan.json`` (:func:`probe_plan` on the exported weights), ``loss.png`` and ``MODEL_CARD.md``.
    ``guidance`` is the classifier-free guidance scale to sample it with (``shipped_guidance()``).
    ``evaluate``: guidance scales at which the card gets a table of :func:`trained_length_scores`
    (``evaluate_clips`` conditions each; also stored in ``model.json``); None: no table.
    """
    from safetensors.torch import save_file

    from . import synthetic

    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    cfg = ShapesConfig(**state["config"])
    if guidance != 1.0 and cfg.cond_drop == 0:
        raise ValueError(f"guidance={guidance} needs a model trained with cond_drop > 0; {run} has cond_drop 0")
    losses: list[float] = state["losses"]
    dest.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float16).contiguous() for k, v in state["ema"].items()}, str(dest / "model.safetensors"))
    (dest / "model.safetensors").chmod(0o644)  # safetensors writes 0600; the package data must be readable
    window = min(200, len(losses))
    meta = dict(
        config=asdict(cfg), steps=state["step"], final_loss=round(sum(losses[-window:]) / window, 4),
        loss_window=window, commit=commit, guidance=guidance,
        parameters=sum(v.numel() for v in state["ema"].values()),
        weights="exponential moving average of the weights, stored as float16",
        data=dict(generator="freeloc.synthetic.random_spec", frame_size=cfg.frame_size, shape_size=3,
                  max_shapes=synthetic.MAX_SHAPES, palette=list(synthetic.PALETTE),
                  background=list(synthetic.BACKGROUND), speeds="integer components in {-2, -1, 1, 2} px/frame",
                  condition="freeloc.shapes_model.model_condition (start positions left to the model)",
                  trained_frames=cfg.trained_frames),
    )
    model = build_model(cfg)
    model.load_state_dict({k: v.to(torch.float16).float() for k, v in state["ema"].items()})
    model.eval()
    if evaluate:
        scores = trained_length_scores(model, cfg, evaluate, clips=evaluate_clips)
        meta["trained_length_scores"] = dict(clips=evaluate_clips, steps=20,
                                             by_guidance={f"{g:g}": sc for g, sc in scores.items()})
        note = _scores_table(scores, guidance, evaluate_clips) + note
    (dest / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    probe_plan(model, cfg).save(dest / "plan.json")
    _loss_png(losses, dest / "loss.png")
    (dest / "MODEL_CARD.md").write_text(_card(meta, note))
    return dest


def _loss_png(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(range(1, len(losses) + 1), losses, color="tab:gray", alpha=0.35, linewidth=0.6, label="per step")
    w = 100
    if len(losses) >= w:
        smooth = torch.tensor(losses).unfold(0, w, 1).mean(dim=1)
        ax.plot(range(w, len(losses) + 1), smooth.tolist(), color="tab:blue", label=f"mean of {w}")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("flow-matching loss")
    ax.set_title("shapes model: training loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _condition_text(cfg: dict[str, Any]) -> str:
    if cfg.get("slot_tokens", False):
        return f"one token per shape slot ({MAX_SHAPES} tokens of {SLOT_DIM + 1} numbers, the last the shape count)"
    return f"one token of {CONDITION_DIM} numbers"


def _dropout_text(cfg: dict[str, Any]) -> str:
    drop, start = cfg.get("cond_drop", 0.0), cfg.get("cond_drop_start", 0)
    if not drop:
        return "every clip with its condition"
    where = "on every step" if not start else f"from step {start} on (every condition before)"
    return f"{drop:.0%} of the conditions replaced by zeros (the null condition) {where}"


def _lr_text(cfg: dict[str, Any]) -> str:
    start, end = cfg.get("lr_decay_start", 0), cfg.get("lr_decay_end", 0)
    text = f"AdamW lr {cfg['lr']} with {cfg['warmup']} warm-up steps"
    if end <= start:
        return text
    return f"{text}, decayed linearly from step {start} to {LR_FLOOR:g} x lr at step {end}"


def _guidance_text(guidance: float) -> str:
    if guidance == 1.0:
        return "Euler flow sampling, no guidance."
    return (f"Euler flow sampling with classifier-free guidance {guidance:g} against the null condition "
            f"(`sample(..., guidance={guidance:g})`; `shipped_guidance()`).")


def _card(meta: dict[str, Any], note: str) -> str:
    cfg = meta["config"]
    return f"""# Shapes model (freeloc's built-in video model)

A `diffusers.WanTransformer3DModel` trained from scratch by `python -m freeloc.shapes_model` on
synthetic clips of one to three coloured squares or discs bouncing in a 32 x 32 frame
(`freeloc.synthetic`). It exists so that long-video methods can be compared on a real model offline.

- Architecture: {cfg["num_layers"]} layers, {cfg["num_heads"]} heads x {cfg["head_dim"]}, FFN {cfg["ffn_dim"]},
  patch (1, 2, 2) on a pixel-unshuffled latent (48 x 8 x 8 per frame, 16 tokens per frame, one latent
  frame per video frame); {meta["parameters"]:,} parameters; {meta["weights"]}.
- Condition (the "text"): {_condition_text(cfg)}: per shape present, colour, square or disc and
  velocity; the start positions are zeroed, so the model chooses the layout.
- Trained length: **{cfg["trained_frames"]} frames**. Training: flow matching as in Wan (predict
  noise - x0, timestep shift {cfg["shift"]}), {_lr_text(cfg)}, batch
  {cfg["batch"]}, EMA {cfg["ema"]}, seed {cfg["seed"]}, {meta["steps"]} steps, on CPU; {_dropout_text(cfg)}.
- Sampling: {_guidance_text(meta.get("guidance", 1.0))}
- Final loss (mean of the last {meta["loss_window"]} steps): {meta["final_loss"]}. Curve: `loss.png`.
- Training code: `freeloc/shapes_model.py` at commit `{meta["commit"]}`.
- Data generator settings: see `model.json` (`data`).
{note}
Load it offline with `freeloc.shapes_model.load_shipped()`; sample with `freeloc.shapes_model.sample`.
"""


def probe_plan(model: torch.nn.Module, cfg: ShapesConfig, multiple: int = 4, *, progress: bool = True) -> Any:
    """The layer plan :func:`freeloc.probe` writes for this model at ``multiple`` x its trained length.

    The probe's input is a rendered clip (seed 99) noised halfway (timestep 500) with its condition.
    """
    from .probing import probe

    frames = multiple * cfg.trained_frames
    spec = random_spec(99, frame_size=cfg.frame_size)
    x0 = encode(render(spec, frames)[None])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(99))
    inputs = dict(hidden_states=0.5 * x0 + 0.5 * noise, timestep=torch.tensor([500.0]),
                  encoder_hidden_states=condition_tokens(cfg, model_condition(spec)[None]), return_dict=False)
    plan = probe(model, frames, inputs=inputs, trained_frames=cfg.trained_frames, temporal_factor=1,
                 progress=progress)
    plan.meta["probe"]["inputs"] = "freeloc.shapes_model.probe_plan: a rendered clip (seed 99) at timestep 500"
    return plan


def shipped_plan() -> Any:
    """The probe's layer plan for the shipped model (``plan.json`` beside it; see :func:`probe_plan`)."""
    from .plan import LayerPlan

    path = SHIPPED / "plan.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall freeloc with its package data")
    return LayerPlan.load(path)


def shipped_guidance() -> float:
    """The classifier-free guidance scale the shipped model is meant to be sampled with (1.0: none)."""
    path = SHIPPED / "model.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall freeloc with its package data")
    return float(json.loads(path.read_text()).get("guidance", 1.0))


def load_shipped(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, ShapesConfig]:
    """The checkpoint shipped in the package (:data:`SHIPPED`), offline; eval mode.

    Raises:
        FileNotFoundError: If the package was installed without its data files.
    """
    from safetensors.torch import load_file

    weights, meta_path = SHIPPED / "model.safetensors", SHIPPED / "model.json"
    if not weights.exists() or not meta_path.exists():
        raise FileNotFoundError(f"the shipped shapes model is missing from {SHIPPED} (model.safetensors and "
                                f"model.json): reinstall freeloc with its package data")
    cfg = ShapesConfig(**json.loads(meta_path.read_text())["config"])
    model = build_model(cfg)
    model.load_state_dict({k: v.to(dtype) for k, v in load_file(str(weights)).items()})
    return (model if dtype == torch.float32 else model.to(dtype)).eval(), cfg


@torch.no_grad()
def sample(model: torch.nn.Module, cfg: ShapesConfig, cond: Tensor, num_frames: int, *, steps: int = 20,
           seed: int = 0, guidance: float = 1.0) -> Tensor:
    """Videos (B, T, 3, H, W) in [0, 1] for conditions ``cond`` (B, CONDITION_DIM), Euler flow sampling.

    ``guidance`` != 1 applies classifier-free guidance against the zero condition,
    ``v = v(0) + guidance * (v(cond) - v(0))``: meaningful for a model trained with ``cond_drop > 0``.
    """
    g = torch.Generator().manual_seed(seed)
    h = cfg.frame_size // UNSHUFFLE
    dev = next(model.parameters()).device  # noise drawn on the CPU: the same videos on any device
    x = torch.randn(cond.shape[0], cfg.channels, num_frames, h, h, generator=g).to(dev)
    ts = _shifted(torch.linspace(1, 0, steps + 1), cfg.shift)
    tokens = condition_tokens(cfg, cond.to(dev))
    both_conds = torch.cat([torch.zeros_like(tokens), tokens])
    for t, t_next in zip(ts[:-1], ts[1:], strict=True):
        if guidance == 1.0:
            v = model(x, torch.full((x.shape[0],), float(t) * 1000, device=dev), tokens, return_dict=False)[0]
        else:  # conditioned and null-conditioned velocities in one batch
            both = model(torch.cat([x, x]), torch.full((2 * x.shape[0],), float(t) * 1000, device=dev), both_conds,
                         return_dict=False)[0]
            v0, v1 = both.chunk(2)
            v = v0 + guidance * (v1 - v0)
        x = x + (t_next - t) * v
    return decode(x.float().cpu())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train the small Wan model on synthetic bouncing-shape clips.")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--out", type=Path, default=Path("shapes-model"))
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cond-drop", type=float, default=0.0,
                    help="fraction of conditions replaced by zeros in training, for classifier-free guidance")
    ap.add_argument("--slot-tokens", action="store_true",
                    help="give the model one condition token per shape slot instead of one token in all")
    ap.add_argument("--cond-drop-start", type=int, default=0,
                    help="first step with --cond-drop (a run saved before it in --out is continued)")
    ap.add_argument("--lr-decay", type=int, nargs=2, default=(0, 0), metavar=("START", "END"),
                    help="decay the learning rate linearly from step START to 5%% of it at step END "
                         "(a run saved before START in --out is continued)")
    ap.add_argument("--device", default="cpu", help="train on this device, e.g. cuda (default cpu)")
    ap.add_argument("--export", type=Path, default=None, metavar="DIR",
                    help="do not train: write the run in --out as a shippable checkpoint in DIR")
    ap.add_argument("--commit", default=None, help="with --export: the commit of the training code")
    ap.add_argument("--guidance", type=float, default=1.0,
                    help="with --export: the classifier-free guidance scale to sample the model with")
    ap.add_argument("--evaluate", default=None, metavar="G1,G2,...",
                    help="with --export: guidance scales for the model card's table at the trained length "
                         "(default: 1 and --guidance; 'none' for no table)")
    ap.add_argument("--evaluate-clips", type=int, default=8, help="with --export: conditions per table row")
    args = ap.parse_args(argv)
    if args.export is not None:
        if args.evaluate == "none":
            evaluate = None
        elif args.evaluate is None:
            evaluate = sorted({1.0, args.guidance})
        else:
            try:
                evaluate = [float(x) for x in args.evaluate.split(",")]
            except ValueError:
                ap.error(f"--evaluate: expected guidance scales like 1,3,5 or 'none', got {args.evaluate!r}")
        dest = export(args.out, args.export, commit=args.commit, guidance=args.guidance, evaluate=evaluate,
                      evaluate_clips=args.evaluate_clips)
        print(f"wrote {dest}")
        return 0
    cfg = ShapesConfig(seed=args.seed, cond_drop=args.cond_drop, cond_drop_start=args.cond_drop_start,
                       slot_tokens=args.slot_tokens, lr_decay_start=args.lr_decay[0],
                       lr_decay_end=args.lr_decay[1])
    print(json.dumps(train(cfg, args.steps, args.out, save_every=args.save_every, device=args.device)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
