"""Long-video quality on the shipped shapes model: every method from 1x to 16x its trained length.

    python benchmarks/long_video.py [--split test|validation] [--lengths 1,2,4,8,16] [--conditions 16]
                                    [--steps 20] [--methods ...] [--quick] [--guidance G] [--sample-shift S]
                                    [--sample-noise N] [--run DIR]
                                    [--png benchmarks/long_video.png] [--plot benchmarks/long_video_lengths.png]
                                    [--json out.json [--resume]]

The model (``freeloc.shapes.model.load_shipped``, or with ``--run`` a training run or an exported model,
``load_folder``) was trained on
16-frame clips of bouncing shapes. For each length, the same conditions and the same initial noise are
sampled with each method; every video is scored from its pixels (``freeloc.shapes.metrics``) against the
clip its condition asks for, starting where the video's first frame put the shapes
(``freeloc.shapes.metrics.fit_spec``). ``real clips`` rows score rendered clips of the same conditions:
the best a video can score. Sampling uses the model's own classifier-free guidance scale
(``freeloc.shapes.model.shipped_guidance``) unless ``--guidance`` is given.

The protocol. Conditions come from two disjoint seed ranges: ``--split validation`` (seeds 10000 on) is
where anything may be tuned (probe thresholds, method parameters); ``--split test`` (seeds 50000 on, the
default) is what results are reported on. Every number in the table is a mean over the clips; for the
right colours and the right count, each method also gets a paired 95% bootstrap interval (per clip, 2000
resamples) of its difference to ``direct`` and to the best uniform method at that length (the method on
every layer with the highest mean, ``freeloc-probe`` and ``direct`` excluded). ``--quick`` runs a small
subset (2x and 8x, 4 clips, 10 steps, five methods) in a few minutes.

Methods: ``direct`` (no change), ``sliding-window``, ``pi``, ``ntk``, ``riflex`` (k: the temporal
frequency whose period is closest to the trained length), ``ultravico`` (alpha 0.9), ``vrpr``, ``tsa``,
the composed ``tsa+vrpr`` and ``window+vrpr``, ``freeloc-uniform`` (``plan="uniform"``: VRPR on every
layer, which is what the uniform plan is for a model with RoPE) and ``freeloc-probe`` (the plan
``freeloc.probe`` writes for this model at 4x, computed in this run). Prints the table; saves a PNG
strip of frames of ``direct`` vs ``freeloc-probe`` at 4x (``--png``) and a plot of the right colours
and count against length, one line per method with its 95% interval shaded (``--plot``).

A full run takes hours on a CPU. ``--json`` is rewritten after every method of every length; with
``--resume`` a run reads it first and samples only the (length, method) pairs it lacks, so a run may be
stopped and continued, or extended with more lengths or methods (the split, clips, steps, guidance and
plan must match the file's, or it refuses before sampling; a run without ``freeloc-probe`` samples no
plan and keeps the file's).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import freeloc
from freeloc._progress import reporter
from freeloc.app.plots import frames_png, metrics_by_length_png
from freeloc.probing import BOUNDED_VRPR
from freeloc.shapes.clips import random_spec, render
from freeloc.shapes.metrics import bootstrap_mean, evaluate_generated, nanmean
from freeloc.shapes.model import (
    LOSS_RATIOS,
    PLAN_SCORES,
    check_plan_rule,
    is_sample_noise,
    is_shift,
    load_folder,
    load_shipped,
    model_condition,
    probe_plan,
    sample,
    shipped_guidance,
    shipped_plan,
)

METHODS = ["direct", "sliding-window", "pi", "ntk", "riflex", "ultravico", "vrpr", "tsa", "tsa+vrpr", "window+vrpr",
           "freeloc-uniform", "freeloc-probe"]
#: The methods that apply one method to every layer: the plan is compared with the best of them.
UNIFORM = [m for m in METHODS if m not in ("direct", "freeloc-probe")]
#: First condition seed of each split: tune on validation, report on test.
SEEDS = {"validation": 10_000, "test": 50_000}
METRICS = [("palette_fidelity", "palette", "{:.3f}"), ("shape_presence", "shapes", "{:.2f}"),
           ("shape_count_consistency", "count", "{:.3f}"),
           ("color_consistency", "colour", "{:.3f}"), ("motion_error", "motion err", "{:.2f}"),
           ("dynamic_degree", "dynamic", "{:.2f}"), ("freeze_fraction", "freeze", "{:.2f}"),
           ("repetition", "repeat", "{:.2f}")]
#: The metrics reported with paired intervals and plotted against length.
HEADLINE = [("color_consistency", "right colours"), ("shape_count_consistency", "right count")]
QUICK = dict(lengths="2,8", conditions=4, steps=10, methods="direct,sliding-window,tsa,tsa+vrpr,freeloc-probe")
RESAMPLES = 2000
#: Mean and 95% interval of per-clip values (``RESAMPLES`` resamples); pass per-clip differences for a paired one.
bootstrap = functools.partial(bootstrap_mean, resamples=RESAMPLES)


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


def per_clip(videos: torch.Tensor, specs: list[Any]) -> list[dict[str, float]]:
    """Every metric of every video, scored against its own asked clip."""
    return [evaluate_generated(videos[i:i + 1], [s]) for i, s in enumerate(specs)]


def differences(a: list[dict[str, float]], b: list[dict[str, float]], key: str) -> list[float]:
    """Per-clip ``a - b`` of ``key`` (the same conditions and noise in both)."""
    return [x[key] - y[key] for x, y in zip(a, b, strict=True)]


def intervals(clips: dict[str, list[dict[str, float]]], key: str) -> dict[str, dict[str, Any]]:
    """Per method at one length: the mean of ``key`` with its interval, and the paired intervals against
    ``direct`` and the best uniform method (the uniform method with the highest mean, not itself)."""
    out: dict[str, dict[str, Any]] = {}
    means = {m: nanmean([c[key] for c in rows]) for m, rows in clips.items() if m != "real clips"}
    for method, rows in clips.items():
        if method == "real clips":
            continue
        row: dict[str, Any] = dict(mean=bootstrap([c[key] for c in rows]))
        if "direct" in clips and method != "direct":
            row["vs_direct"] = bootstrap(differences(rows, clips["direct"], key))
        others = [m for m in UNIFORM if m in clips and m != method and not math.isnan(means[m])]
        if others:
            best = max(others, key=lambda m: means[m])
            row["best_uniform"] = best
            row["vs_best_uniform"] = bootstrap(differences(rows, clips[best], key))
        out[method] = row
    return out


def _interval(t: tuple[float, float, float] | None) -> str:
    if t is None:
        return f"{'':>24}"
    m, lo, hi = t
    return f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]".rjust(24)


def _resumed(path: Path, settings: dict[str, Any], ap: argparse.ArgumentParser,
             plan: dict[str, Any] | None = None) -> dict[tuple[int, str], Any]:
    """The rows of an earlier run's ``--json`` by (length, method), if it was run with these settings.
    ``plan``: a run that samples no plan passes an empty dict, which receives the file's plan (its
    ``freeloc-probe`` rows keep it) and is not compared."""
    if not path.exists():
        print(f"--resume: {path} does not exist yet; starting afresh", flush=True)
        return {}
    earlier = json.loads(path.read_text())
    earlier.setdefault("sample_shift", 2.0)  # a file without it was sampled with the training shift, 2.0
    earlier.setdefault("sample_noise", 0.0)  # and with deterministic Euler steps
    if "plan_methods" not in earlier and "plan" in earlier:
        earlier["plan_methods"] = dict(layers=earlier["plan"]["layers"], ranges=earlier["plan"].get("ranges", []))
    if plan is not None:
        plan.update(earlier.get("plan", {}))
        settings["plan_methods"] = earlier["plan_methods"]
    if differ := [key for key, value in settings.items() if earlier.get(key) != value]:
        ap.error(f"--resume: {path} was run with other settings ({', '.join(differ)}: "
                 f"{[earlier.get(key) for key in differ]}, this run: {[settings[key] for key in differ]}); "
                 "give a new --json or the same settings")
    return {(int(row["length"]), row["method"]): row for row in earlier["results"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=sorted(SEEDS), default="test",
                    help="condition seeds: 'validation' to tune on, 'test' to report (default)")
    ap.add_argument("--lengths", default=None, help="multiples of the trained length (default 1,2,4,8,16)")
    ap.add_argument("--conditions", type=int, default=None, help="conditions (clips) per length and method (16)")
    ap.add_argument("--steps", type=int, default=None, help="Euler sampling steps (default 20)")
    ap.add_argument("--methods", default=None, help=f"comma-separated, from {METHODS} (default all)")
    ap.add_argument("--quick", action="store_true",
                    help=f"a small subset: lengths {QUICK['lengths']}, {QUICK['conditions']} clips, "
                         f"{QUICK['steps']} steps, methods {QUICK['methods']} (each still overridable)")
    ap.add_argument("--png", type=Path, default=Path("benchmarks/long_video.png"))
    ap.add_argument("--plot", type=Path, default=Path("benchmarks/long_video_lengths.png"))
    ap.add_argument("--json", type=Path, default=None, help="write every clip's scores here, after each method")
    ap.add_argument("--resume", action="store_true",
                    help="reuse the (length, method) results already in --json; sample only the rest")
    ap.add_argument("--run", type=Path, default=None,
                    help="a training run, or an exported model (with its guidance and plan) for the shipped one")
    ap.add_argument("--guidance", type=float, default=None,
                    help="classifier-free guidance scale (default: the model's own; 1 for a training run)")
    ap.add_argument("--sample-shift", type=float, default=None,
                    help="the sampler's timestep shift (default: the model's own, ShapesConfig.sampling_shift)")
    ap.add_argument("--sample-noise", type=float, default=None,
                    help="the sampler's share of fresh noise per step, in [0, 1] (default: the model's own, "
                         "ShapesConfig.sample_noise)")
    ap.add_argument("--score", choices=PLAN_SCORES, default=None,
                    help="the probe's scores for freeloc-probe, or 'loss' for freeloc.probe_loss (default: the "
                         "shipped plan's, else 'attention')")
    ap.add_argument("--bound-from", type=float, default=None,
                    help="freeloc-probe: the length ratio from which VRPR layers get tsa+vrpr "
                         "(default: the shipped plan's, else none)")
    ap.add_argument("--position-from", type=float, default=None,
                    help="freeloc-probe: the length ratio below which VRPR layers get no position correction "
                         "(default: the shipped plan's, else none)")
    ap.add_argument("--min-z", type=float, default=None,
                    help="freeloc-probe with --score loss: the z-score a layer's loss gain must exceed "
                         "(default: the shipped plan's, else 0)")
    ap.add_argument("--bounded-vrpr", choices=list(BOUNDED_VRPR), default=None,
                    help="freeloc-probe: what VRPR layers take from --bound-from on "
                         "(default: the shipped plan's, else tsa+vrpr)")
    args = ap.parse_args()
    defaults = QUICK if args.quick else dict(lengths="1,2,4,8,16", conditions=16, steps=20, methods=",".join(METHODS))
    lengths = [int(x) for x in (args.lengths or str(defaults["lengths"])).split(",")]
    methods = (args.methods or str(defaults["methods"])).split(",")
    conditions = args.conditions or int(defaults["conditions"])
    steps = args.steps or int(defaults["steps"])
    if unknown := [m for m in methods if m not in METHODS]:
        ap.error(f"--methods: unknown {unknown}; choose from {METHODS}")
    if args.resume and args.json is None:
        ap.error("--resume reads and extends the file given by --json; give --json")
    if args.sample_shift is not None and not is_shift(args.sample_shift):
        ap.error(f"--sample-shift must be a finite number > 0, got {args.sample_shift}")
    if args.sample_noise is not None and not is_sample_noise(args.sample_noise):
        ap.error(f"--sample-noise must be a number in [0, 1], got {args.sample_noise}")
    model, cfg, own_guidance, own_plan = load_folder(args.run) if args.run is not None else (
        *load_shipped(), shipped_guidance(), shipped_plan())
    if args.sample_shift is not None:
        cfg = replace(cfg, sample_shift=args.sample_shift)
    if args.sample_noise is not None:
        cfg = replace(cfg, sample_noise=args.sample_noise)
    guidance = args.guidance if args.guidance is not None else own_guidance
    trained = cfg.trained_frames
    first = SEEDS[args.split]
    specs = [random_spec(first + i) for i in range(conditions)]
    cond = torch.stack([model_condition(s) for s in specs])
    k = riflex_k(model, trained)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; shapes model trained on {trained} frames; "
          f"{args.split} split (seeds {first}-{first + conditions - 1}), {steps} Euler steps (shift "
          f"{cfg.sampling_shift:g}, fresh noise {cfg.sample_noise:g}), guidance {guidance:g}; "
          f"RIFLEx k = {k}", flush=True)
    plan = freeloc.LayerPlan.uniform("vrpr", len(model.blocks))
    if "freeloc-probe" in methods:
        shipped = own_plan
        rule = shipped.meta.get("rule", {}) if shipped is not None else {}
        score = args.score or rule.get("score", "attention")
        same_score = score == rule.get("score", "attention")  # the shipped ratios go with the shipped score
        bound_from = args.bound_from if args.bound_from is not None else rule.get("bound_from") if same_score else None
        position_from = (args.position_from if args.position_from is not None
                         else rule.get("position_from") if same_score else None)
        bounded_vrpr = args.bounded_vrpr or rule.get("bounded_vrpr", "tsa+vrpr")
        min_z = args.min_z if args.min_z is not None else rule.get("min_z", 0.0) if same_score else 0.0
        try:
            check_plan_rule(score, bound_from, position_from, bounded_vrpr, min_z=min_z)
        except ValueError as err:
            ap.error(str(err))
        plan = probe_plan(model, cfg, 4, score=score, bound_from=bound_from, position_from=position_from,
                          bounded_vrpr=bounded_vrpr, min_z=min_z)
        where = f"by the loss at {list(LOSS_RATIOS)}x" if score == "loss" else "at 4x"
        if score == "loss":
            where += f", min_z {min_z:g}"
        print(f"probe plan {where} (score {score!r}, bound_from {bound_from}, position_from {position_from}, "
              f"bounded_vrpr {bounded_vrpr!r}): "
              f"{plan.methods}"
              + "".join(f"; from {r.from_ratio:g}x: {r.methods}" for r in plan.ranges), flush=True)
        if shipped is not None:
            same = "the same" if (shipped.methods, shipped.ranges) == (plan.methods, plan.ranges) else "differs"
            print(f"the plan shipped with the model: {shipped.methods} ({same})")
    plan_dict = plan.to_dict()
    settings = dict(split=args.split, seeds=[first, first + conditions - 1], steps=steps, guidance=guidance,
                    sample_shift=cfg.sampling_shift, sample_noise=cfg.sample_noise, riflex_k=k,
                    plan_methods=dict(layers=plan_dict["layers"], ranges=plan_dict.get("ranges", [])))
    # Without freeloc-probe no plan is sampled: a resumed file keeps its own plan, whatever it is.
    no_plan = args.resume and "freeloc-probe" not in methods and args.json.exists()
    if no_plan:
        plan_dict = {}
    results = _resumed(args.json, settings, ap, plan_dict if no_plan else None) if args.resume else {}

    def summary() -> dict[int, dict[str, dict[str, dict[str, Any]]]]:
        """Intervals at every length in ``results``, over every method sampled at that length."""
        out = {}
        for mult in sorted({m for m, _ in results}):
            clips = {meth: results[(mult, meth)]["per_clip"] for meth in ["real clips", *METHODS]
                     if (mult, meth) in results}
            out[mult] = {key: intervals(clips, key) for key, _ in HEADLINE}
        return out

    def save() -> None:
        if args.json is not None:
            out = dict(results=list(results.values()), intervals={str(m): s for m, s in summary().items()},
                       **settings, plan=plan_dict)
            args.json.write_text(json.dumps(out, indent=2))

    strip: dict[str, torch.Tensor] = {}
    header = f"{'length':>10} {'method':<16}" + "".join(f"{h:>11}" for _, h, _ in METRICS) + f"{'s/video':>9}"
    print(header, flush=True)
    for mult in lengths:
        frames = mult * trained
        real = torch.stack([render(s, frames) for s in specs])
        for method in ["real clips", *methods]:
            origin = " (from --json)"
            if (mult, method) not in results:
                t0 = time.perf_counter()
                if method == "real clips":
                    videos = real
                else:
                    with freeloc.enable(model, num_frames=frames, trained_frames=trained, temporal_factor=1,
                                        **session_kwargs(method, k, plan)):
                        videos = sample(model, cfg, cond, frames, steps=steps, seed=mult, guidance=guidance,
                                        progress=reporter(True, f"{mult}x {method}: sampling steps"))
                    if mult == 4 and method in ("direct", "freeloc-probe"):
                        strip[method] = videos[0]
                seconds = (time.perf_counter() - t0) / len(specs) if method != "real clips" else 0.0
                per = per_clip(videos, specs)
                scores = {key: nanmean([c[key] for c in per]) for key, _, _ in METRICS}
                results[(mult, method)] = dict(length=mult, frames=frames, method=method, seconds_per_video=seconds,
                                               per_clip=per, **scores)
                origin = ""
                save()
            row = results[(mult, method)]
            if method != "real clips":
                print(f"{f'{mult}x ({frames})':>10} {method:<16}"
                      + "".join(f"{fmt.format(row[key]):>11}" for key, _, fmt in METRICS)
                      + f"{row['seconds_per_video']:>9.2f}{origin}", flush=True)
    save()  # the intervals over everything in the file, even when nothing new was sampled
    every = summary()
    print(f"\nmean, and paired 95% bootstrap intervals of the difference (per clip, {RESAMPLES} resamples)"
          + (f", every length and method in {args.json}" if args.resume else "") + ":")
    for key, label in HEADLINE:
        print(f"\n{label}\n{'length':>10} {'method':<16}{'mean [95%]':>24}{'minus direct':>24}"
              f"{'minus best uniform':>24}  best uniform")
        for mult, rows in every.items():
            for method, row in rows[key].items():
                print(f"{f'{mult}x':>10} {method:<16}{_interval(row['mean'])}{_interval(row.get('vs_direct'))}"
                      f"{_interval(row.get('vs_best_uniform'))}  {row.get('best_uniform', '')}")
    if len(strip) == 2:
        strip = {"real clip": render(specs[0], 4 * trained), **strip}
        print(f"wrote {frames_png(strip, args.png, f'4x ({4 * trained} frames), condition 0: every column a frame')}")
    if len(every) > 1:
        # One line per method, over the lengths where it was sampled.
        lines = {label: {m: [(mult, *rows[key][m]["mean"]) for mult, rows in every.items() if m in rows[key]]
                         for m in METHODS if any(m in rows[key] for rows in every.values())}
                 for key, label in HEADLINE}
        print(f"wrote {metrics_by_length_png(lines, args.plot, trained, f'{args.split} split, {conditions} clips')}")

if __name__ == "__main__":
    main()
