"""Training the shapes model (``freeloc.shapes.model``), exporting a run as the shipped checkpoint.

Training uses the flow-matching objective Wan uses: ``x_t = (1 - t) x_0 + t e`` with ``t`` drawn
uniformly (after the same shift as the sampler), and the model predicts ``e - x_0``; the learning
rate warms up linearly, and an exponential moving average of the weights is kept and is what
``freeloc.shapes.model.load`` returns. Training is seeded and resumable (``checkpoint.pt`` holds the
model, its average, the optimizer, the step and the RNG states) and prints its progress;
``python -m freeloc.shapes.train --steps N --out DIR`` runs it, and
``python -m freeloc.shapes.train --out DIR --export DEST`` writes the run as a shippable checkpoint
(``export``: weights, metadata, layer plan, loss curve and model card).

The training data are ``freeloc.shapes.clips.random_spec`` clips drawn from seeded generators, so a
run is the same on every machine and device.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from .._extras import require
from ..probing import BOUNDED_VRPR
from .clips import BACKGROUND, CONDITION_DIM, MAX_SHAPES, PALETTE, SLOT_DIM, random_spec, render
from .metrics import evaluate_generated
from .model import (
    LOSS_RATIOS,
    LR_FLOOR,
    PLAN_SCORES,
    SHIPPED,
    UNSHUFFLE,
    ShapesConfig,
    _shifted,
    build_model,
    check_plan_rule,
    condition_tokens,
    encode,
    is_sample_noise,
    is_shift,
    load_exported,
    model_condition,
    probe_plan,
    sample,
)

__all__ = ["ARCHITECTURE", "CARD_SCORES", "export", "main", "train", "trained_length_scores", "trained_steps",
           "widen_ffn"]


def _batch(cfg: ShapesConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    specs = [random_spec(generator, frame_size=cfg.frame_size) for _ in range(cfg.batch)]
    video = torch.stack([render(s, cfg.trained_frames) for s in specs])
    cond = condition_tokens(cfg, torch.stack([model_condition(s) for s in specs]))
    return encode(video), cond


#: The config fields that make two shapes models the same network (what ``init`` must share; ``ffn_dim``
#: may grow).
ARCHITECTURE = ("frame_size", "trained_frames", "num_layers", "num_heads", "head_dim", "ffn_dim", "slot_tokens")


def _init_source(init: Path, cfg: ShapesConfig) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The weights of the exported model in ``init`` and what the run records of it.

    The run's network must be the init's, except that its feed-forward layers may be wider
    (``ffn_dim``): the init's weights are then widened by ``widen_ffn`` and the record says from what.
    """
    model, init_cfg = load_exported(init)
    pairs = {k: (getattr(init_cfg, k), getattr(cfg, k)) for k in ARCHITECTURE}
    differ = {k: (a, b) for k, (a, b) in pairs.items() if a != b and not (k == "ffn_dim" and a < b)}
    if differ:
        raise ValueError(f"{init} is another network than this run's config (only a wider ffn_dim may differ); "
                         "differing (its, this run's): "
                         + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in differ.items()))
    meta = json.loads((init / "model.json").read_text())
    digest = hashlib.sha256((init / "model.safetensors").read_bytes()).hexdigest()
    info = dict(source=str(init), steps=trained_steps(meta), commit=meta.get("commit"), sha256=digest)
    if init_cfg.ffn_dim != cfg.ffn_dim:
        info["ffn_dim"] = init_cfg.ffn_dim
    return model.state_dict(), info


def widen_ffn(weights: dict[str, Tensor], fresh: dict[str, Tensor]) -> dict[str, Tensor]:
    """``weights`` of a shapes model carried into a network with wider feed-forward layers, keeping its function.

    ``fresh`` is the wider network's own (randomly initialised) state dict. Each block's first
    feed-forward projection keeps the old units' rows and takes the fresh rows for the new units; the
    second projection keeps the old units' columns and gets zeros for the new ones, so the new units add
    nothing until training moves those zeros (their gradients are not zero). Every other weight is
    copied unchanged.

    Raises:
        ValueError: If a weight other than the feed-forward ones differs in shape, or the new
            network's feed-forward layers are narrower.
    """
    out = {}
    for name, new in fresh.items():
        old = weights[name]
        if old.shape == new.shape:
            out[name] = old.clone()
        elif name.endswith("ffn.net.0.proj.weight") or name.endswith("ffn.net.0.proj.bias"):
            if old.shape[0] > new.shape[0] or old.shape[1:] != new.shape[1:]:
                raise ValueError(f"{name}: cannot widen {tuple(old.shape)} into {tuple(new.shape)}")
            out[name] = torch.cat([old, new[old.shape[0]:]])
        elif name.endswith("ffn.net.2.weight"):
            if old.shape[1] > new.shape[1] or old.shape[0] != new.shape[0]:
                raise ValueError(f"{name}: cannot widen {tuple(old.shape)} into {tuple(new.shape)}")
            out[name] = torch.cat([old, old.new_zeros(old.shape[0], new.shape[1] - old.shape[1])], dim=1)
        else:
            raise ValueError(f"{name} is {tuple(old.shape)} in the init and {tuple(new.shape)} in the run: "
                             "only the feed-forward layers may be widened")
    return out


def _same_init(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two recorded inits are the same weights: by their file's digest where both have one (so the
    folder may be named by another path), else by steps, commit and resolved folder."""
    if a is None or b is None:
        return a is b
    if a.get("sha256") and b.get("sha256"):
        return a["sha256"] == b["sha256"]
    return ((a["steps"], a.get("commit"), Path(a["source"]).resolve())
            == (b["steps"], b.get("commit"), Path(b["source"]).resolve()))


def trained_steps(meta: dict[str, Any]) -> int:
    """All training steps behind an exported model (``model.json``): its own and those of its ``init``."""
    return int(meta["steps"]) + int((meta.get("init") or {}).get("steps", 0))


def train(cfg: ShapesConfig, steps: int, out: Path, *, save_every: int = 200, progress: bool = True,
          device: str | torch.device = "cpu", init: Path | None = None) -> dict[str, Any]:
    """Train (or resume) for ``steps`` total steps; checkpoints and a loss log go to ``out``.

    ``init``: a folder written by ``export`` (the shipped model's ``SHIPPED`` among them) whose weights
    the run starts from instead of a random initialisation, with a fresh optimizer and this config's
    schedule; it must be the same network (``ARCHITECTURE``), except that the run's ``ffn_dim`` may be
    larger (``widen_ffn``: the init's function is kept). The run records it, and ``export`` adds its
    steps to the run's. Resuming a run started from an ``init`` needs no ``init`` (or the same one).

    ``device``: where the model trains (``"cuda"`` on a GPU). The clips, noise and timesteps are drawn
    on the CPU from the same seeded streams whatever the device, so a run can move between devices.
    """
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
    init_weights, init_info = (None, None) if init is None else _init_source(init, cfg)  # before anything is written
    device = torch.device(device)
    model = build_model(cfg).train().to(device)
    ema = build_model(cfg).eval().requires_grad_(False).to(device)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    data_gen = torch.Generator().manual_seed(cfg.seed + 1)
    noise_gen = torch.Generator().manual_seed(cfg.seed + 2)
    out.mkdir(parents=True, exist_ok=True)
    step, losses = 0, []
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if not ShapesConfig(**state["config"]).same_training_until(cfg, state["step"]):
            raise ValueError(f"{ckpt} was trained with {state['config']} for {state['step']} steps, which is not "
                             f"the same training as {asdict(cfg)}: use another --out")
        if init_info is not None and not _same_init(state.get("init"), init_info):
            raise ValueError(f"{ckpt} started from {state.get('init') or 'a random initialisation'}, not from "
                             f"{init_info}: use another --out")
        init_info = state.get("init")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        data_gen.set_state(state["data_rng"])
        noise_gen.set_state(state["noise_rng"])
        step, losses = state["step"], state["losses"]
        if progress:
            print(f"resumed at step {step}")
    elif init_weights is not None:
        init_weights = widen_ffn(init_weights, model.state_dict())
        model.load_state_dict(init_weights)
        ema.load_state_dict(init_weights)
        if progress:
            wider = f", feed-forward widened from {init_info['ffn_dim']}" if "ffn_dim" in init_info else ""
            print(f"starting from the weights in {init} ({init_info['steps']} steps{wider})")
    t0 = time.perf_counter()

    def save() -> None:
        torch.save(dict(model=model.state_dict(), ema=ema.state_dict(), optimizer=opt.state_dict(), step=step,
                        losses=losses, config=asdict(cfg), data_rng=data_gen.get_state(),
                        noise_rng=noise_gen.get_state(), init=init_info), ckpt)
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


#: The scores in the model card's table at the trained length: (key, column title, format).
CARD_SCORES = (("shape_presence", "shapes drawn / asked", "{:.2f}"),
               ("shape_count_consistency", "right count", "{:.2f}"),
               ("color_consistency", "right colours", "{:.2f}"),
               ("motion_error", "speed error (px/frame)", "{:.2f}"),
               ("dynamic_degree", "speed / asked speed", "{:.2f}"))


@torch.no_grad()
def trained_length_scores(model: torch.nn.Module, cfg: ShapesConfig, guidances: list[float], *, clips: int = 8,
                          steps: int = 20, progress: bool = True) -> dict[float, dict[str, float]]:
    """Pixel scores (``freeloc.shapes.metrics.evaluate_generated``, mean of ``clips`` conditions, seeds
    20000 + i) of the model at its trained length, with each classifier-free guidance scale."""
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
            f"seeds 20000-{20_000 + clips - 1}, 20 Euler steps; `freeloc.shapes.metrics` pixel scores, 1 is a "
            f"perfect clip, speed error 0):\n\n" + "\n".join(rows) + "\n")


def export(run: Path, dest: Path = SHIPPED, *, commit: str | None = None, note: str = "",
           guidance: float = 1.0, evaluate: list[float] | None = None, evaluate_clips: int = 8,
           score: str = "attention", bound_from: float | int | None = None,
           position_from: float | int | None = None, bounded_vrpr: str = "tsa+vrpr",
           sample_shift: float | int | None = None, sample_noise: float | int = 0.0, min_z: float = 0.0) -> Path:
    """Write a training run's weight average as a shippable checkpoint in ``dest``.

    ``dest`` receives ``model.safetensors`` (float16 weights), ``model.json`` (the config, the steps,
    the final loss, the data generator settings and ``commit``, the commit of the training code),
    ``plan.json`` (``probe_plan`` on the exported weights, with the probe's ``score``, ``bound_from``,
    ``position_from``, ``bounded_vrpr`` and ``min_z``),
    ``loss.png`` and ``MODEL_CARD.md``.
    ``guidance`` is the classifier-free guidance scale to sample it with (``shipped_guidance()``).
    ``sample_shift``: the sampler's timestep shift, stored in the config (``ShapesConfig.sample_shift``);
    None samples with the training shift.
    ``sample_noise``: the sampler's share of fresh noise per step, stored in the config
    (``ShapesConfig.sample_noise``); 0 samples with deterministic Euler steps.
    ``evaluate``: guidance scales at which the card gets a table of ``trained_length_scores``
    (``evaluate_clips`` conditions each; also stored in ``model.json``); None: no table.
    """
    check_plan_rule(score, bound_from, position_from, bounded_vrpr, min_z=min_z)  # before anything is written
    if sample_shift is not None and not is_shift(sample_shift):
        raise ValueError(f"sample_shift must be a finite number > 0 or None (the training shift), got {sample_shift!r}")
    if not is_sample_noise(sample_noise):
        raise ValueError(f"sample_noise must be a number in [0, 1] (0: deterministic Euler steps), "
                         f"got {sample_noise!r}")
    save_file = require("safetensors.torch", "shapes", "exporting the shapes model").save_file
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    cfg = replace(ShapesConfig(**state["config"]), sample_shift=None if sample_shift is None else float(sample_shift),
                  sample_noise=float(sample_noise))
    if guidance != 1.0 and cfg.cond_drop == 0:
        raise ValueError(f"guidance={guidance} needs a model trained with cond_drop > 0; {run} has cond_drop 0")
    losses: list[float] = state["losses"]
    dest.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float16).contiguous() for k, v in state["ema"].items()}, str(dest / "model.safetensors"))
    (dest / "model.safetensors").chmod(0o644)  # safetensors writes 0600; the package data must be readable
    window = min(200, len(losses))
    meta = dict(
        config=asdict(cfg), steps=state["step"], init=state.get("init"),
        final_loss=round(sum(losses[-window:]) / window, 4), loss_window=window, commit=commit, guidance=guidance,
        parameters=sum(v.numel() for v in state["ema"].values()),
        plan=dict(probe_at=list(LOSS_RATIOS) if score == "loss" else 4, score=score, bound_from=bound_from,
                  position_from=position_from, bounded_vrpr=bounded_vrpr,
                  **({"min_z": min_z} if score == "loss" else {})),
        weights="exponential moving average of the weights, stored as float16",
        data=dict(generator="freeloc.shapes.clips.random_spec", frame_size=cfg.frame_size, shape_size=3,
                  max_shapes=MAX_SHAPES, palette=list(PALETTE),
                  background=list(BACKGROUND), speeds="integer components in {-2, -1, 1, 2} px/frame",
                  condition="freeloc.shapes.model.model_condition (start positions left to the model)",
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
    probe_plan(model, cfg, score=score, bound_from=bound_from, position_from=position_from,
               bounded_vrpr=bounded_vrpr, min_z=min_z).save(dest / "plan.json")
    _loss_png(losses, dest / "loss.png")
    (dest / "MODEL_CARD.md").write_text(_card(meta, note))
    return dest


def _loss_png(losses: list[float], path: Path) -> None:
    matplotlib = require("matplotlib", "shapes", "the shapes model's loss curve (loss.png)")
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


def _steps_text(meta: dict[str, Any]) -> str:
    init = meta.get("init")
    if not init:
        return f"{meta['steps']} steps"
    commit = f" with the training code at commit `{init['commit']}`" if init.get("commit") else ""
    wider = (f", its feed-forward layers widened from {init['ffn_dim']} to {meta['config']['ffn_dim']} units "
             "(the new units' outputs starting at zero)" if init.get("ffn_dim") else "")
    return (f"{meta['steps']} steps starting from the weights of a model trained for {init['steps']} steps"
            f"{commit}{wider} ({trained_steps(meta)} steps in all)")


def _guidance_text(guidance: float, cfg: dict[str, Any]) -> str:
    shift = cfg.get("sample_shift")
    euler = "Euler flow sampling" + (f" with timestep shift {shift:g} (`sample_shift` in the config)"
                                     if shift is not None else "")
    if cfg.get("sample_noise"):
        euler += (f", each step re-noised with a share {cfg['sample_noise']:g} of fresh noise "
                  "(`sample_noise` in the config)")
    if guidance == 1.0:
        return f"{euler}, no guidance."
    return (f"{euler}, classifier-free guidance {guidance:g} against the null condition "
            f"(`sample(..., guidance={guidance:g})`; `shipped_guidance()`).")


def _plan_text(plan: dict[str, Any]) -> str:
    if plan.get("score") == "loss":
        at = plan.get("probe_at", LOSS_RATIOS)
        ratios = ", ".join(f"{r:g}x" for r in at)
        return (f"written by `freeloc.probe_loss` on the model's own loss at {ratios} (`score=\"loss\"`): from each "
                f"ratio on, a layer takes `{plan.get('bounded_vrpr', 'tsa+vrpr')}` where that lowers the loss against "
                f"`tsa` on every layer by more than {plan.get('min_z', 0.0):g} standard errors (`min_z`), and `tsa` "
                f"otherwise; `direct` below {at[0]:g}x")
    text = (f"written by `freeloc.probe` at {plan.get('probe_at', 4)}x the trained length with its "
            f"`{plan.get('score', 'attention')}` scores")
    bound, positions = plan.get("bound_from"), plan.get("position_from")
    bounded = plan.get("bounded_vrpr", "tsa+vrpr")
    if positions is not None and bound is not None and positions > bound:
        text += (f"; from {bound:g}x on, its VRPR layers take `tsa` (`bound_from`), and from {positions:g}x on "
                 f"`{bounded}` (`position_from`)")
    elif positions is not None:
        text += f"; its VRPR layers take no position correction below {positions:g}x (`position_from`)"
        if bound is not None:
            text += f", and from {bound:g}x on they take `{bounded}` (`bound_from`)"
    elif bound is not None:
        text += f"; from {bound:g}x on, its VRPR layers take `{bounded}` (`bound_from`)"
    return text


def _card(meta: dict[str, Any], note: str) -> str:
    cfg = meta["config"]
    origin = "" if meta.get("init") else "from scratch "
    return f"""# Shapes model (freeloc's built-in video model)

A `diffusers.WanTransformer3DModel` trained {origin}by `python -m freeloc.shapes.train` on
synthetic clips of one to three coloured squares or discs bouncing in a 32 x 32 frame
(`freeloc.shapes.clips`). It exists so that long-video methods can be compared on a real model offline.

- Architecture: {cfg["num_layers"]} layers, {cfg["num_heads"]} heads x {cfg["head_dim"]}, FFN {cfg["ffn_dim"]},
  patch (1, 2, 2) on a pixel-unshuffled latent (48 x 8 x 8 per frame, 16 tokens per frame, one latent
  frame per video frame); {meta["parameters"]:,} parameters; {meta["weights"]}.
- Condition (the "text"): {_condition_text(cfg)}: per shape present, colour, square or disc and
  velocity; the start positions are zeroed, so the model chooses the layout.
- Trained length: **{cfg["trained_frames"]} frames**. Training: flow matching as in Wan (predict
  noise - x0, timestep shift {cfg["shift"]}), {_lr_text(cfg)}, batch
  {cfg["batch"]}, EMA {cfg["ema"]}, seed {cfg["seed"]}, {_steps_text(meta)}, on CPU; {_dropout_text(cfg)}.
- Sampling: {_guidance_text(meta.get("guidance", 1.0), cfg)}
- Final loss (mean of the last {meta["loss_window"]} steps): {meta["final_loss"]}. Curve: `loss.png`.
- Training code: `freeloc/shapes/` at commit `{meta["commit"]}`.
- Data generator settings: see `model.json` (`data`).
- Layer plan: `plan.json`, {_plan_text(meta.get("plan", {}))}.
{note}
Load it offline with `freeloc.shapes.model.load_shipped()` where it is the shipped model, else with
`load_exported(folder)`; sample with `freeloc.shapes.model.sample`.
"""


def main(argv: list[str] | None = None) -> int:
    """``python -m freeloc.shapes.train``: train (or resume) a run, or export one with ``--export``; the exit code."""
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
    ap.add_argument("--layers", type=int, default=ShapesConfig.num_layers,
                    help=f"transformer blocks (default {ShapesConfig.num_layers})")
    ap.add_argument("--ffn-dim", type=int, default=ShapesConfig.ffn_dim,
                    help=f"width of each block's feed-forward layer (default {ShapesConfig.ffn_dim})")
    ap.add_argument("--device", default="cpu", help="train on this device, e.g. cuda (default cpu)")
    ap.add_argument("--init-from", type=Path, default=None, metavar="DIR",
                    help="start from the weights of an exported model (e.g. the shipped one, "
                         "freeloc/shapes/data) instead of a random initialisation; the same network, or "
                         "one with a wider --ffn-dim (the new units start with zero output)")
    ap.add_argument("--export", type=Path, default=None, metavar="DIR",
                    help="do not train: write the run in --out as a shippable checkpoint in DIR")
    ap.add_argument("--commit", default=None, help="with --export: the commit of the training code")
    ap.add_argument("--guidance", type=float, default=1.0,
                    help="with --export: the classifier-free guidance scale to sample the model with")
    ap.add_argument("--sample-shift", type=float, default=None,
                    help="with --export: the sampler's timestep shift (default: the training shift)")
    ap.add_argument("--sample-noise", type=float, default=0.0,
                    help="with --export: the sampler's share of fresh noise per step, in [0, 1] (default 0, "
                         "deterministic Euler steps)")
    ap.add_argument("--evaluate", default=None, metavar="G1,G2,...",
                    help="with --export: guidance scales for the model card's table at the trained length "
                         "(default: 1 and --guidance; 'none' for no table)")
    ap.add_argument("--evaluate-clips", type=int, default=8, help="with --export: conditions per table row")
    ap.add_argument("--probe-score", choices=PLAN_SCORES, default="attention",
                    help="with --export: the probe's scores for the shipped plan (freeloc.probe's score), or "
                         "'loss' (freeloc.probe_loss on the model's own loss)")
    ap.add_argument("--probe-min-z", type=float, default=0.0,
                    help="with --export --probe-score loss: the z-score a layer's loss gain must exceed "
                         "(freeloc.probe_loss's min_z; default 0)")
    ap.add_argument("--bound-from", type=float, default=None,
                    help="with --export: the length ratio from which the plan's VRPR layers get tsa+vrpr "
                         "(freeloc.probe's bound_from; default none)")
    ap.add_argument("--position-from", type=float, default=None,
                    help="with --export: the length ratio below which the plan's VRPR layers get no position "
                         "correction (freeloc.probe's position_from; default none)")
    ap.add_argument("--bounded-vrpr", choices=list(BOUNDED_VRPR), default="tsa+vrpr",
                    help="with --export: what the plan's VRPR layers take from --bound-from on "
                         "(freeloc.probe's bounded_vrpr; default tsa+vrpr)")
    args = ap.parse_args(argv)
    if args.export is not None:
        if args.sample_shift is not None and not is_shift(args.sample_shift):
            ap.error(f"--sample-shift must be a finite number > 0, got {args.sample_shift}")
        if not is_sample_noise(args.sample_noise):
            ap.error(f"--sample-noise must be a number in [0, 1], got {args.sample_noise}")
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
                      evaluate_clips=args.evaluate_clips, score=args.probe_score, bound_from=args.bound_from,
                      position_from=args.position_from, bounded_vrpr=args.bounded_vrpr,
                      sample_shift=args.sample_shift, sample_noise=args.sample_noise, min_z=args.probe_min_z)
        print(f"wrote {dest}")
        return 0
    if args.layers < 1 or args.ffn_dim < 1:
        ap.error(f"--layers and --ffn-dim must be >= 1, got {args.layers} and {args.ffn_dim}")
    cfg = ShapesConfig(num_layers=args.layers, ffn_dim=args.ffn_dim, seed=args.seed, cond_drop=args.cond_drop,
                       cond_drop_start=args.cond_drop_start,
                       slot_tokens=args.slot_tokens, lr_decay_start=args.lr_decay[0],
                       lr_decay_end=args.lr_decay[1])
    try:
        result = train(cfg, args.steps, args.out, save_every=args.save_every, device=args.device,
                       init=args.init_from)
    except (ValueError, FileNotFoundError) as err:  # a config or --init-from that does not fit: nothing trained
        ap.error(str(err))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
