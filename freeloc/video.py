"""Video generation from the command line: ``freeloc generate`` and ``freeloc demo``.

This module sits beside the CLI, above the core: it imports diffusers (lazily, inside functions),
so ``import freeloc`` never does.

* :func:`generate`: a diffusers pipeline from ``from_pretrained`` (a hub id or a local folder), one
  ``freeloc.enable`` block around the call, an mp4 and a JSON sidecar with every setting and the
  session's per-layer report.
* :func:`demo`: a tiny Wan pipeline built in-process (random weights, no download) generating at 4x
  its declared trained length with ``direct`` and with ``freeloc``; both mp4s, a PNG report and a
  table. A random model makes noise: the demo shows the mechanics, not quality.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from .plan import LayerPlan
from .session import Session, enable

__all__ = ["demo", "generate", "tiny_wan_pipeline", "write_video"]

#: The demo model's declared trained length (video frames) and its 4x length.
DEMO_TRAINED_FRAMES = 81
DEMO_FRAMES = 321


def write_video(frames: Any, path: Path, fps: int = 16) -> Path:
    """Write frames (a list of PIL images, an array (T, H, W, C) in [0, 1], or such a tensor) as mp4."""
    from diffusers.utils import export_to_video

    if isinstance(frames, torch.Tensor):
        frames = frames.float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() if frames.shape[1] in (1, 3) \
            else frames.float().clamp(0, 1).cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    export_to_video(list(frames), str(path), fps=fps)
    return path


def tiny_wan_pipeline(seed: int = 0, num_layers: int = 4) -> Any:
    """A Wan pipeline with a tiny random transformer and VAE (no text encoder: pass ``prompt_embeds``)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=num_layers, rope_max_seq_len=128,
    ).eval()
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    return WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def _report_png(direct: Session, long: Session, path: Path, num_frames: int, trained: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [s.layer for s in long.layers]
    methods = [s.method for s in long.layers]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    x = torch.arange(len(layers)).tolist()
    for ax, key, label in ((axes[0], "max_abs_distance", "max |temporal relative distance|"),
                           (axes[1], "density", "attended fraction of token pairs")):
        d = [getattr(s, key) for s in direct.layers]
        f = [getattr(s, key) for s in long.layers]
        ax.bar([i - 0.2 for i in x], d, 0.4, label="direct", color="tab:gray")
        ax.bar([i + 0.2 for i in x], f, 0.4, label="FreeLOC", color="tab:blue")
        ax.set_xticks(x, [f"{i}\n{m}" for i, m in zip(layers, methods, strict=True)])
        ax.set_xlabel("layer / FreeLOC method")
        ax.set_title(label)
        if key == "max_abs_distance":
            ax.axhline(trained - 1, color="tab:red", linestyle=":", label=f"trained range ({trained - 1})")
        ax.legend(fontsize=8)
    fig.suptitle(f"tiny Wan, {num_frames} latent frames = 4x its trained {trained}: direct vs FreeLOC")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def demo(out_dir: Path = Path("freeloc-demo"), steps: int = 4, size: int = 64, seed: int = 0) -> dict[str, Any]:
    """Generate with a tiny random Wan pipeline at 4x its declared trained length, direct and FreeLOC."""
    t0 = time.perf_counter()
    pipe = tiny_wan_pipeline(seed)
    n_layers = len(pipe.transformer.blocks)
    plan = LayerPlan.from_lists(tsa_layers=list(range(0, n_layers, 2)), vrpr_layers=list(range(1, n_layers, 2)),
                                num_layers=n_layers, meta={"source": "freeloc demo: alternating TSA / VRPR"})
    embeds = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(seed))
    results: dict[str, Any] = {"num_frames": DEMO_FRAMES, "trained_frames": DEMO_TRAINED_FRAMES, "videos": {}}
    sessions = {}
    for label, kwargs in (("direct", dict(method="direct")), ("freeloc", dict(plan=plan))):
        print(f"[{len(sessions) + 1}/2] generating {DEMO_FRAMES} frames with {label} ...", flush=True)
        with enable(pipe, num_frames=DEMO_FRAMES, trained_frames=DEMO_TRAINED_FRAMES, **kwargs) as session:
            frames = pipe(prompt_embeds=embeds, negative_prompt_embeds=embeds, height=size, width=size,
                          num_frames=DEMO_FRAMES, num_inference_steps=steps, guidance_scale=3.0, output_type="np",
                          generator=torch.Generator().manual_seed(seed)).frames[0]
        sessions[label] = session
        results["videos"][label] = str(write_video(frames, out_dir / f"{label}.mp4"))
    latent = (DEMO_FRAMES - 1) // 4 + 1
    trained = (DEMO_TRAINED_FRAMES - 1) // 4 + 1
    results["png"] = str(_report_png(sessions["direct"], sessions["freeloc"], out_dir / "report.png", latent, trained))
    results["layers"] = {k: s.stats() for k, s in sessions.items()}
    results["seconds"] = round(time.perf_counter() - t0, 2)
    print("\nper layer, FreeLOC (the direct run attends every pair, max |r| = "
          f"{latent - 1}):\n{sessions['freeloc'].report()}\n")
    print(f"wrote {results['videos']['direct']}, {results['videos']['freeloc']} and {results['png']} "
          f"in {results['seconds']} s")
    print("\nThis model is tiny and random: both videos are noise. The demo shows the mechanics (the relative "
          "distances brought back into the trained range, the sparser attention), not quality.\nWith a real "
          "model:  freeloc generate --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --prompt \"...\" --num-frames 321 "
          "--device cuda --dtype bfloat16 --out video.mp4")
    return results


def generate(model: str, prompt: str, num_frames: int, out: Path, *, height: int | None = None,
             width: int | None = None, steps: int = 50, guidance: float = 5.0, seed: int = 0,
             method: str = "freeloc", plan: str | None = None, device: str = "cpu", dtype: str = "float32",
             negative_prompt: str | None = None, trained_frames: int | None = None,
             pipeline: Any = None) -> dict[str, Any]:
    """Load a pipeline, generate ``num_frames`` video frames inside a freeloc session, write mp4 + JSON."""
    if pipeline is None:
        from diffusers import DiffusionPipeline

        pipeline = DiffusionPipeline.from_pretrained(model, torch_dtype=getattr(torch, dtype)).to(device)
    kwargs: dict[str, Any] = dict(prompt=prompt, num_frames=num_frames, num_inference_steps=steps,
                                  guidance_scale=guidance, generator=torch.Generator(device="cpu").manual_seed(seed))
    if height is not None:
        kwargs["height"] = height
    if width is not None:
        kwargs["width"] = width
    if negative_prompt is not None:
        kwargs["negative_prompt"] = negative_prompt
    t0 = time.perf_counter()
    with enable(pipeline, num_frames=num_frames, plan=plan, method=method, trained_frames=trained_frames) as session:
        frames = pipeline(**kwargs).frames[0]
    seconds = time.perf_counter() - t0
    write_video(frames, out)
    settings = dict(model=model, prompt=prompt, num_frames=num_frames, height=height, width=width, steps=steps,
                    guidance=guidance, seed=seed, method=method, plan=plan, device=device, dtype=dtype,
                    negative_prompt=negative_prompt, trained_frames=trained_frames)
    sidecar = dict(settings=settings, seconds=round(seconds, 3), video=str(out),
                   plan=session.plan.to_dict() if session.plan is not None else None, layers=session.stats())
    side = out.with_suffix(".json")
    side.write_text(json.dumps(sidecar, indent=2))
    print(f"wrote {out} and {side} ({seconds:.1f} s)")
    return sidecar
