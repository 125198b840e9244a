"""Video generation from the command line: ``freeloc generate`` and ``freeloc demo``.

This module sits beside the CLI, above the core: it imports diffusers, imageio and Pillow inside the
functions that use them (the ``diffusers`` and ``app`` extras), so ``import freeloc`` never does.

* ``generate``: a diffusers pipeline from ``from_pretrained`` (a hub id or a local folder), one
  ``freeloc.enable`` block around the call, an mp4 and a JSON sidecar with every setting and the
  session's per-layer report. ``generate_compare``: the same prompt and seed once per method, one
  video of labelled panels and one sidecar with each method's report.
* ``demo``: by default the shapes model shipped with the package (a small Wan transformer trained
  on 16-frame clips of bouncing shapes, ``freeloc.shapes.model``) generating at 4x its trained
  length with ``direct`` and with FreeLOC (the probe's plan for that model): both mp4s, a PNG strip of
  frames and a table of pixel metrics. ``model="random"``: a tiny random Wan pipeline at 4x its declared
  trained length (noise: it shows the mechanics, not quality).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

from .._extras import require
from .._files import atomic_path
from ..plan import LayerPlan, _ranges
from ..session import enable
from ..shapes.clips import random_spec, render
from ..shapes.metrics import evaluate_generated, fit_spec, frames_right
from ..shapes.model import load_shipped, model_condition, sample, shipped_guidance, shipped_plan
from .plots import frames_png, report_png
from .progress import tqdm_progress

__all__ = ["DEMO_MODELS", "compare_frames", "demo", "telling_frames", "generate", "generate_compare", "load_pipeline",
           "tiny_wan_pipeline", "video_tensor", "write_video"]

#: The demo model's declared trained length (video frames) and its 4x length.
DEMO_TRAINED_FRAMES = 81
DEMO_FRAMES = 321


def write_video(frames: Any, path: Path, fps: int = 16) -> Path:
    """Write frames (a list of PIL images, an array (T, H, W, C) in [0, 1], or such a tensor) as mp4."""
    purpose = f"writing {path.name}"
    require("imageio", "app", purpose)
    require("imageio_ffmpeg", "app", purpose)
    export_to_video = require("diffusers.utils", "diffusers", purpose).export_to_video

    if isinstance(frames, torch.Tensor):
        frames = frames.float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() if frames.shape[1] in (1, 3) \
            else frames.float().clamp(0, 1).cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # whole or not at all
        export_to_video(list(frames), str(tmp), fps=fps)
    return path


def tiny_wan_pipeline(seed: int = 0, num_layers: int = 4) -> Any:
    """A Wan pipeline with a tiny random transformer and VAE (no text encoder: pass ``prompt_embeds``)."""
    diffusers = require("diffusers", "diffusers", "the tiny random Wan pipeline")
    torch.manual_seed(seed)
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=num_layers, rope_max_seq_len=128,
    ).eval()
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True]).eval()
    return diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))


#: Models ``freeloc demo`` can run.
DEMO_MODELS = ("shapes", "random")


def demo(out_dir: Path = Path("freeloc-demo"), steps: int | None = None, size: int = 64, seed: int = 0,
         model: str = "shapes", conditions: int = 4, guidance: float | None = None) -> dict[str, Any]:
    """Generate at 4x the model's trained length, direct and with FreeLOC, and write both videos.

    Args:
        out_dir: output folder.
        steps: sampling steps (default 20 for ``shapes``, 4 for ``random``).
        size: frame size of the ``random`` model's videos.
        seed: the initial noise's seed (and, for ``random``, the weights' and the prompt's).
        model: ``"shapes"`` (the shipped trained model) or ``"random"`` (a tiny random Wan pipeline).
        conditions: ``shapes`` only: how many clips (conditions) to generate side by side, 1 to 8.
        guidance: classifier-free guidance scale (default: ``shapes``, the shipped model's own,
            ``shipped_guidance``; ``random``, 3.0). 1.0 turns it off.
    """
    if guidance is not None and (not isinstance(guidance, (int, float)) or isinstance(guidance, bool)
                                 or not math.isfinite(guidance) or guidance < 0):
        raise ValueError(f"guidance must be a finite number >= 0 (1.0: no guidance), got {guidance!r}")
    if model not in DEMO_MODELS:
        raise ValueError(f"model must be one of {list(DEMO_MODELS)}, got {model!r}")
    if model == "shapes":
        if not 1 <= conditions <= 8:
            raise ValueError(f"conditions must be between 1 and 8, got {conditions}")
        return _demo_shapes(out_dir, 20 if steps is None else steps, seed, conditions, guidance)
    return _demo_random(out_dir, 4 if steps is None else steps, size, seed, 3.0 if guidance is None else guidance)


def _tile(videos: Float[Tensor, "batch frames 3 height width"], scale: int = 4,
          columns: int = 4) -> Float[Tensor, "frames 3 tile_height tile_width"]:
    """(B, T, 3, H, W) -> (T, 3, rows*H*scale, columns*W*scale): the clips side by side, enlarged."""
    b, t, c, h, w = videos.shape
    columns = min(columns, b)
    rows = -(-b // columns)
    pad = torch.ones(rows * columns - b, t, c, h, w)
    # a 2-pixel border: 32 + 4 px, x4 is a multiple of 16
    clips = torch.nn.functional.pad(torch.cat([videos, pad]), (2, 2, 2, 2), value=1.0)
    grid = rearrange(clips, "(rows cols) t c h w -> t c (rows h) (cols w)", rows=rows, cols=columns)
    return grid.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)


def _label(text: str, height: int, width: int = 96) -> Float[Tensor, "3 height width"]:
    """(3, height, width): black text on white, for the left margin of a comparison video."""
    Image = require("PIL.Image", "app", "the labels of compare.mp4")  # noqa: N806
    ImageDraw = require("PIL.ImageDraw", "app", "the labels of compare.mp4")  # noqa: N806

    img = Image.new("RGB", (width, height), (255, 255, 255))
    ImageDraw.Draw(img).text((6, height // 2 - 6), text, fill=(0, 0, 0))
    pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return pixels.view(height, width, 3).permute(2, 0, 1).float() / 255


def compare_frames(rows: dict[str, Float[Tensor, "frames 3 _height width"]]
                   ) -> Float[Tensor, "frames 3 stacked_height labelled_width"]:
    """Labelled (T, 3, H, W) tiles (from ``_tile``) stacked top to bottom: one video to compare them."""
    pieces = []
    for i, (name, tile) in enumerate(rows.items()):
        label = _label(name, tile.shape[2])[None].expand(tile.shape[0], -1, -1, -1)
        pieces.append(torch.cat([label, tile], dim=3))
        if i < len(rows) - 1:
            pieces.append(torch.ones(tile.shape[0], 3, 16, pieces[-1].shape[3]))
    return torch.cat(pieces, dim=2)


def _demo_shapes(out_dir: Path, steps: int, seed: int, conditions: int, guidance: float | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    print("loading the shipped shapes model ...", flush=True)
    model, cfg = load_shipped()
    plan = shipped_plan()
    guidance = shipped_guidance() if guidance is None else float(guidance)
    trained = cfg.trained_frames
    frames = 4 * trained
    specs = [random_spec(20_000 + i, frame_size=cfg.frame_size) for i in range(conditions)]
    cond = torch.stack([model_condition(s) for s in specs])
    at_length = plan.methods_at(frames, trained)[0]  # the plan's methods at this length (its ranges applied)
    results: dict[str, Any] = {"model": "shapes", "num_frames": frames, "trained_frames": trained, "videos": {},
                               "plan": at_length, "scores": {}, "guidance": guidance}
    videos: dict[str, torch.Tensor] = {}
    runs = (("direct", dict(method="direct")), ("freeloc", dict(plan=plan)))
    for i, (label, kwargs) in enumerate(runs):
        print(f"[{i + 1}/2] {conditions} clips of {frames} frames (4x the trained {trained}) with {label} ...",
              flush=True)
        with enable(model, num_frames=frames, trained_frames=trained, temporal_factor=1, **kwargs):
            videos[label] = sample(model, cfg, cond, frames, steps=steps, seed=seed, guidance=guidance,
                                   progress=tqdm_progress(f"{label}: sampling", "step"))
        results["videos"][label] = str(write_video(_tile(videos[label]), out_dir / f"{label}.mp4", fps=8))
        results["scores"][label] = evaluate_generated(videos[label], specs,
                                                      progress=tqdm_progress(f"{label}: scoring", "clip"))
    print("writing compare.mp4, frames.png and motion.png ...", flush=True)
    clip, shown, wins = telling_frames(videos["direct"], videos["freeloc"], specs)
    first = [clip, *(i for i in range(conditions) if i != clip)]  # the telling clip top left
    results["compare"] = str(write_video(compare_frames({"direct": _tile(videos["direct"][first]),
                                                         "FreeLOC": _tile(videos["freeloc"][first])}),
                                         out_dir / "compare.mp4", fps=8))
    results["shown"] = dict(clip=clip, frames=shown, direct_wrong_freeloc_right=wins)
    strip = {"asked (a real clip)": render(specs[clip], frames), "direct": videos["direct"][clip],
             "FreeLOC": videos["freeloc"][clip]}
    marked = [i for i in shown if i in wins]
    results["png"] = str(frames_png(strip, out_dir / "frames.png",
                                    f"shapes model, {frames} frames = 4x its trained {trained}: clip {clip}. In the "
                                    f"{len(marked)} frames numbered in red (of {len(wins)} such frames), direct "
                                    f"draws the wrong shapes or colours and FreeLOC the right ones\n(the real clip "
                                    "starts elsewhere: the model picks the layout)", frames=shown, highlight=marked))
    middle = list(range(frames // 2 - trained // 2, frames // 2 + trained - trained // 2))
    results["motion_png"] = str(frames_png(strip, out_dir / "motion.png",
                                           f"the same clips, {trained} consecutive frames from the middle "
                                           f"({middle[0]}-{middle[-1]})", frames=middle))
    results["seconds"] = round(time.perf_counter() - t0, 2)
    names = [("palette_fidelity", "palette colours"), ("shape_presence", "shapes drawn / asked"),
             ("shape_count_consistency", "right shape count"),
             ("color_consistency", "right colours"), ("motion_error", "speed error (px/frame)"),
             ("dynamic_degree", "speed / asked speed")]
    print(f"\n{'metric (mean of ' + str(conditions) + ' clips)':<28}{'direct':>10}{'FreeLOC':>10}   best")
    for key, label in names:
        best = "0" if key == "motion_error" else "1"
        print(f"{label:<28}{results['scores']['direct'][key]:>10.3f}{results['scores']['freeloc'][key]:>10.3f}"
              f"   {best}")
    print(f"\nFreeLOC plan at {frames} frames (from freeloc probe --score loss on this model): {at_length}")
    print(f"clip {clip} shows the difference best: direct draws the wrong shapes or colours and FreeLOC the right "
          f"ones in {len(wins)} of its {frames} frames ({_ranges(wins) or 'none'}); frames.png shows it, and it is "
          f"the top-left clip of compare.mp4")
    print(f"wrote {results['compare']} (direct above FreeLOC), {results['videos']['direct']}, "
          f"{results['videos']['freeloc']}, {results['png']} and {results['motion_png']} in {results['seconds']} s")
    print(f"\nThe model saw only 16-frame clips in training; both videos are 64 frames (guidance {guidance:g}). "
          "Run directly past its trained length it loses shapes and the asked colours; FreeLOC keeps about what "
          "it draws at 16 frames (benchmarks/RESULTS.md compares every method from 1x to 16x).\n"
          "`freeloc demo --model random` runs the tiny random Wan pipeline instead.\nWith a real model:  "
          "freeloc generate --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --prompt \"...\" --num-frames 321 "
          "--device cuda --dtype bfloat16 --out video.mp4")
    return results


def telling_frames(direct: Float[Tensor, "clips frames 3 height width"],
                   freeloc: Float[Tensor, "clips frames 3 height width"], specs: list[Any],
                   count: int = 16) -> tuple[int, list[int], list[int]]:
    """Where a person sees the difference: the clip with the most frames that direct gets wrong and
    FreeLOC right (``freeloc.shapes.metrics.frames_right``, each video against its own fitted clip),
    ``count`` of its frames to show (such frames first, spread over the clip, then evenly spaced ones),
    and every such frame of it.

    Returns:
        ``(clip, frames to show, frames where direct is wrong and FreeLOC right)``.
    """
    best: tuple[int, float, int, list[int]] | None = None
    for i, spec in enumerate(specs):
        right_d, scored = frames_right(direct[i], fit_spec(direct[i], spec))
        right_f, _ = frames_right(freeloc[i], fit_spec(freeloc[i], spec))
        wins = (right_f & ~right_d & scored).nonzero().flatten().tolist()
        gain = float(right_f.float().mean() - right_d.float().mean())
        if best is None or (len(wins), gain) > (best[0], best[1]):
            best = (len(wins), gain, i, wins)
    assert best is not None
    _, _, clip, wins = best
    length = direct.shape[1]
    count = min(count, length)
    if len(wins) >= count:
        shown = [wins[round(j * (len(wins) - 1) / max(count - 1, 1))] for j in range(count)]
    else:
        others = [i for i in torch.linspace(0, length - 1, count).round().long().tolist() if i not in wins]
        shown = wins + others[: count - len(wins)]
    return clip, sorted(set(shown)), wins


@contextmanager
def _decoding_progress(vae: torch.nn.Module, latent_frames: int, desc: str) -> Iterator[None]:
    """A progress bar over the latent frames a Wan VAE decodes (its decoder runs once per latent frame)."""
    update = tqdm_progress(desc, "frame")
    done = [0]

    def count(module: torch.nn.Module, args: tuple, output: Any) -> None:
        done[0] += 1
        update(min(done[0], latent_frames), latent_frames)

    handle = vae.decoder.register_forward_hook(count)
    try:
        yield
    finally:
        handle.remove()


def _demo_random(out_dir: Path, steps: int, size: int, seed: int, guidance: float) -> dict[str, Any]:
    """Generate with a tiny random Wan pipeline at 4x its declared trained length, direct and FreeLOC."""
    t0 = time.perf_counter()
    print("building a tiny random Wan pipeline ...", flush=True)
    pipe = tiny_wan_pipeline(seed)
    n_layers = len(pipe.transformer.blocks)
    plan = LayerPlan.from_lists(tsa_layers=list(range(0, n_layers, 2)), vrpr_layers=list(range(1, n_layers, 2)),
                                num_layers=n_layers, meta={"source": "freeloc demo: alternating TSA / VRPR"})
    embeds = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(seed))
    results: dict[str, Any] = {"num_frames": DEMO_FRAMES, "trained_frames": DEMO_TRAINED_FRAMES, "videos": {}}
    latent = (DEMO_FRAMES - 1) // 4 + 1
    sessions = {}
    for label, kwargs in (("direct", dict(method="direct")), ("freeloc", dict(plan=plan))):
        print(f"[{len(sessions) + 1}/2] generating {DEMO_FRAMES} frames with {label} ...", flush=True)
        with (enable(pipe, num_frames=DEMO_FRAMES, trained_frames=DEMO_TRAINED_FRAMES, **kwargs) as session,
              _decoding_progress(pipe.vae, latent, f"{label}: decoding")):
            frames = pipe(prompt_embeds=embeds, negative_prompt_embeds=embeds, height=size, width=size,
                          num_frames=DEMO_FRAMES, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                          generator=torch.Generator().manual_seed(seed)).frames[0]
        sessions[label] = session
        results["videos"][label] = str(write_video(frames, out_dir / f"{label}.mp4"))
    trained = (DEMO_TRAINED_FRAMES - 1) // 4 + 1
    print("drawing report.png ...", flush=True)
    results["png"] = str(report_png(sessions["direct"], sessions["freeloc"], out_dir / "report.png", latent, trained))
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


def load_pipeline(model: str, device: str = "cpu", dtype: str = "float32") -> Any:
    """``DiffusionPipeline.from_pretrained(model)`` (a hub id or a local folder) in ``dtype``, on ``device``."""
    diffusers = require("diffusers", "diffusers", "loading a pipeline")
    return diffusers.DiffusionPipeline.from_pretrained(model, torch_dtype=getattr(torch, dtype)).to(device)


def _call_arguments(prompt: str, num_frames: int, height: int | None, width: int | None, steps: int,
                    guidance: float, seed: int, negative_prompt: str | None) -> dict[str, Any]:
    """The pipeline call of ``generate``: the same seed (a fresh generator) on every call."""
    kwargs: dict[str, Any] = dict(prompt=prompt, num_frames=num_frames, num_inference_steps=steps,
                                  guidance_scale=guidance, generator=torch.Generator(device="cpu").manual_seed(seed))
    for key, value in (("height", height), ("width", width), ("negative_prompt", negative_prompt)):
        if value is not None:
            kwargs[key] = value
    return kwargs


def _run(pipeline: Any, call: dict[str, Any], method: str, plan: str | None, trained_frames: int | None,
         method_params: dict[str, Any] | None = None) -> tuple[Any, Any, float]:
    """One generation inside a freeloc session: (frames, session, seconds)."""
    t0 = time.perf_counter()
    with enable(pipeline, num_frames=call["num_frames"], plan=plan, method=method, trained_frames=trained_frames,
                method_params=method_params) as session:
        frames = pipeline(**call).frames[0]
    return frames, session, time.perf_counter() - t0


def _report(settings: dict[str, Any], seconds: float, out: Path, session: Any) -> dict[str, Any]:
    """What a ``generate`` sidecar holds for one run: its settings, time, video, plan and per-layer report."""
    return dict(settings=settings, seconds=round(seconds, 3), video=str(out),
                plan=session.plan.to_dict() if session.plan is not None else None, layers=session.stats())


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:  # whole or not at all
        tmp.write_text(json.dumps(data, indent=2))


def generate(model: str, prompt: str, num_frames: int, out: Path, *, height: int | None = None,
             width: int | None = None, steps: int = 50, guidance: float = 5.0, seed: int = 0,
             method: str = "freeloc", plan: str | None = None, device: str = "cpu", dtype: str = "float32",
             negative_prompt: str | None = None, trained_frames: int | None = None,
             pipeline: Any = None, writes: bool = True, context_parallel: int = 1,
             method_params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a pipeline, generate ``num_frames`` video frames inside a freeloc session, write mp4 + JSON.

    ``writes=False``: generate only (the other ranks of a context-parallel run); ``context_parallel`` is
    recorded in the sidecar. ``method_params``: the parameters of a single ``method`` (``freeloc.enable``'s).
    """
    if pipeline is None:
        pipeline = load_pipeline(model, device, dtype)
    call = _call_arguments(prompt, num_frames, height, width, steps, guidance, seed, negative_prompt)
    frames, session, seconds = _run(pipeline, call, method, plan, trained_frames, method_params)
    settings = dict(model=model, prompt=prompt, num_frames=num_frames, height=height, width=width, steps=steps,
                    guidance=guidance, seed=seed, method=method, method_params=method_params or {}, plan=plan,
                    device=device, dtype=dtype, negative_prompt=negative_prompt, trained_frames=trained_frames,
                    context_parallel=context_parallel)
    sidecar = _report(settings, seconds, out, session)
    if writes:
        write_video(frames, out)
        side = out.with_suffix(".json")
        _write_json(side, sidecar)
        print(f"wrote {out} and {side} ({seconds:.1f} s)")
    return sidecar


def video_tensor(frames: Any) -> Float[Tensor, "frames 3 height width"]:
    """A pipeline's frames (a list of PIL images, an array (T, H, W, C) in [0, 1] or of uint8, or a tensor
    (T, C, H, W) or (T, H, W, C)) as a float tensor (T, 3, H, W) in [0, 1]."""
    if isinstance(frames, torch.Tensor):
        video = frames.detach().float().cpu()
        video = video if video.shape[1] in (1, 3) else video.permute(0, 3, 1, 2)
    else:
        np = require("numpy", "app", "the comparison video")
        array = np.stack([np.asarray(frame) for frame in frames])
        video = torch.from_numpy(array.astype("float32") / (255.0 if array.dtype == np.uint8 else 1.0))
        video = video.permute(0, 3, 1, 2)
    return video.expand(-1, 3, -1, -1).clamp(0, 1) if video.shape[1] == 1 else video.clamp(0, 1)


def generate_compare(model: str, prompt: str, num_frames: int, out: Path, methods: Sequence[str], *,
                     height: int | None = None, width: int | None = None, steps: int = 50, guidance: float = 5.0,
                     seed: int = 0, plan: str | None = None, device: str = "cpu", dtype: str = "float32",
                     negative_prompt: str | None = None, trained_frames: int | None = None,
                     pipeline: Any = None, writes: bool = True, context_parallel: int = 1,
                     method_params: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The same prompt and seed once per method, into one comparison video and one JSON sidecar.

    The video shows each method as a labelled panel (stacked top to bottom in the order given, the same
    frames in each); the sidecar (``out`` with ``.json``) holds, per method, the report a single
    ``generate`` writes. ``plan`` is the ``freeloc`` method's. Every method is installed on the pipeline
    once before anything is generated, so that a method that cannot run stops the comparison first.
    ``writes`` and ``context_parallel``: as in ``generate``. ``method_params``: per method name, the
    parameters of that single method.
    """
    params = dict(method_params or {})
    if len(methods) < 2 or len(set(methods)) != len(methods):
        raise ValueError(f"methods: expected two or more different methods, got {list(methods)}")
    if plan is not None and "freeloc" not in methods:
        raise ValueError(f"plan is the freeloc method's, and methods {list(methods)} do not include freeloc")
    unused = sorted(set(params) - set(methods))
    if unused:
        raise ValueError(f"method_params has parameters for {unused}, which are not among the methods {list(methods)}")
    if pipeline is None:
        pipeline = load_pipeline(model, device, dtype)
    plans = {m: plan if m == "freeloc" else None for m in methods}
    for m in methods:  # installs and removes at once: an unusable method stops here, before any generation
        with enable(pipeline, num_frames=num_frames, plan=plans[m], method=m, trained_frames=trained_frames,
                    method_params=params.get(m)):
            pass
    panels: dict[str, Tensor] = {}
    reports: dict[str, dict[str, Any]] = {}
    for i, m in enumerate(methods, start=1):
        if writes:
            print(f"[{i}/{len(methods)}] generating {num_frames} frames with {m} ...", flush=True)
        call = _call_arguments(prompt, num_frames, height, width, steps, guidance, seed, negative_prompt)
        frames, session, seconds = _run(pipeline, call, m, plans[m], trained_frames, params.get(m))
        panels[m] = video_tensor(frames)
        settings = dict(model=model, prompt=prompt, num_frames=num_frames, height=height, width=width, steps=steps,
                        guidance=guidance, seed=seed, method=m, method_params=params.get(m, {}), plan=plans[m],
                        device=device, dtype=dtype,
                        negative_prompt=negative_prompt, trained_frames=trained_frames,
                        context_parallel=context_parallel)
        reports[m] = _report(settings, seconds, out, session)
    sidecar = dict(video=str(out), methods=list(methods), reports=reports)
    if writes:
        write_video(compare_frames(panels), out)
        side = out.with_suffix(".json")
        _write_json(side, sidecar)
        times = ", ".join(f"{m} {r['seconds']:.1f} s" for m, r in reports.items())
        print(f"wrote {out} ({' above '.join(methods)}) and {side} ({times})")
    return sidecar
