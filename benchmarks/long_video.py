"""Long-video quality on the shipped shapes model: every method at 1x, 2x, 4x and 8x its trained length.

    python benchmarks/long_video.py [--lengths 1,2,4,8] [--conditions 8] [--steps 20] [--guidance G]
                                    [--png benchmarks/long_video.png] [--json out.json] [--run DIR]

The model (``freeloc.shapes.model.load_shipped``, or a training folder with ``--run``) was trained on
16-frame clips of bouncing shapes. For each length, the same conditions and the same initial noise are
sampled with each method; the videos are scored from their pixels (``freeloc.shapes.metrics``), against
the clip the condition asks for, starting where the video's first frame put the shapes
(``freeloc.shapes.metrics.fit_spec``). ``real clips`` rows score rendered clips of the same conditions:
the best a video can score. Sampling uses the model's own classifier-free guidance scale
(``freeloc.shapes.model.shipped_guidance``) unless ``--guidance`` is given.

Methods: ``direct`` (no change), ``sliding-window``, ``pi``, ``ntk``, ``riflex`` (k: the temporal
frequency whose period is closest to the trained length), ``vrpr``, ``tsa``, ``freeloc-uniform``
(``plan="uniform"``: VRPR on every layer, which is what the uniform plan is for a model with RoPE) and
``freeloc-probe`` (the plan ``freeloc.probe`` writes for this model at 4x, computed in this run).
Prints one table (means over the conditions) and the seconds per video; saves a PNG strip of frames of
``direct`` vs ``freeloc-probe`` at 4x.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

import freeloc
from freeloc.app.plots import frames_png
from freeloc.shapes.clips import random_spec, render
from freeloc.shapes.metrics import evaluate_generated
from freeloc.shapes.model import load, load_shipped, model_condition, probe_plan, sample, shipped_guidance, shipped_plan

METHODS = ["direct", "sliding-window", "pi", "ntk", "riflex", "vrpr", "tsa", "freeloc-uniform", "freeloc-probe"]
METRICS = [("palette_fidelity", "palette", "{:.3f}"), ("shape_presence", "shapes", "{:.2f}"),
           ("shape_count_consistency", "count", "{:.3f}"),
           ("color_consistency", "colour", "{:.3f}"), ("motion_error", "motion err", "{:.2f}"),
           ("dynamic_degree", "dynamic", "{:.2f}"), ("freeze_fraction", "freeze", "{:.2f}"),
           ("repetition", "repeat", "{:.2f}")]


def riflex_k(model: torch.nn.Module, trained: int) -> int:
    """1-based index of the temporal RoPE frequency whose period is closest to the trained length."""
    from freeloc.adapters.wan import rotary_layout

    rotary = rotary_layout(model)
    periods = 2 * math.pi / rotary.temporal_freqs().double()
    return int((periods - trained).abs().argmin()) + 1


def session_kwargs(method: str, k: int, plan: freeloc.LayerPlan) -> dict[str, Any]:
    if method == "freeloc-uniform":
        return dict(method="freeloc", plan="uniform")
    if method == "freeloc-probe":
        return dict(method="freeloc", plan=plan)
    if method == "riflex":
        return dict(method="riflex", method_params={"k": k})
    return dict(method=method)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1,2,4,8", help="multiples of the trained length (default 1,2,4,8)")
    ap.add_argument("--conditions", type=int, default=8, help="conditions (clips) per length and method")
    ap.add_argument("--steps", type=int, default=20, help="Euler sampling steps")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--png", type=Path, default=Path("benchmarks/long_video.png"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--run", type=Path, default=None, help="a training folder instead of the shipped model")
    ap.add_argument("--guidance", type=float, default=None,
                    help="classifier-free guidance scale (default: the shipped model's own; 1 with --run)")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    methods = args.methods.split(",")
    if unknown := [m for m in methods if m not in METHODS]:
        ap.error(f"--methods: unknown {unknown}; choose from {METHODS}")
    model, cfg = load(args.run) if args.run is not None else load_shipped()
    guidance = args.guidance if args.guidance is not None else 1.0 if args.run is not None else shipped_guidance()
    trained = cfg.trained_frames
    specs = [random_spec(10_000 + i) for i in range(args.conditions)]
    cond = torch.stack([model_condition(s) for s in specs])
    k = riflex_k(model, trained)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; shapes model trained on {trained} frames; "
          f"{args.conditions} conditions, {args.steps} Euler steps, guidance {guidance:g}; RIFLEx k = {k}", flush=True)
    plan = freeloc.LayerPlan.uniform("vrpr", len(model.blocks))
    if "freeloc-probe" in methods:
        plan = probe_plan(model, cfg, 4)
        print(f"probe plan at 4x: {plan.methods}", flush=True)
        if args.run is None:
            shipped = shipped_plan().methods
            same = "the same" if shipped == plan.methods else "differs"
            print(f"the plan shipped with the model: {shipped} ({same})")
    results: list[dict[str, Any]] = []
    strip: dict[str, torch.Tensor] = {}
    header = f"{'length':>10} {'method':<16}" + "".join(f"{h:>11}" for _, h, _ in METRICS) + f"{'s/video':>9}"
    lines = [header]
    print(header, flush=True)
    for mult in lengths:
        frames = mult * trained
        real = torch.stack([render(s, frames) for s in specs])
        entries = [("real clips", evaluate_generated(real, specs), 0.0)]
        for method in methods:
            t0 = time.perf_counter()
            with freeloc.enable(model, num_frames=frames, trained_frames=trained, temporal_factor=1,
                                **session_kwargs(method, k, plan)):
                videos = sample(model, cfg, cond, frames, steps=args.steps, seed=mult, guidance=guidance)
            seconds = (time.perf_counter() - t0) / len(specs)
            scores = evaluate_generated(videos, specs)
            entries.append((method, scores, seconds))
            if mult == 4 and method in ("direct", "freeloc-probe"):
                strip[method] = videos[0]
        for method, scores, seconds in entries:
            line = (f"{f'{mult}x ({frames})':>10} {method:<16}"
                    + "".join(f"{fmt.format(scores[key]):>11}" for key, _, fmt in METRICS) + f"{seconds:>9.2f}")
            lines.append(line)
            print(line, flush=True)
            results.append(dict(length=mult, frames=frames, method=method, seconds_per_video=seconds, **scores))
    if len(strip) == 2:
        strip = {"real clip": render(specs[0], 4 * trained), **strip}
        print(f"wrote {frames_png(strip, args.png, f'4x ({4 * trained} frames), condition 0: every column a frame')}")
    if args.json is not None:
        summary = dict(results=results, plan=plan.to_dict(), riflex_k=k, guidance=guidance)
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
