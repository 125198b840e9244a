"""Per-layer ablation on the shapes model: the ground truth the probe's cheap scores approximate.

    python benchmarks/ablation.py [--lengths 4,8] [--methods vrpr,tsa,tsa+vrpr] [--base direct]
                                  [--conditions 16] [--steps 20] [--split validation] [--run DIR]
                                  [--json out.json] [--read a.json,b.json]

For each length and each layer, each candidate method is applied to that layer alone (every other
layer runs ``--base``: plain attention by default) and the videos of the same conditions and initial
noise are scored from their pixels (``freeloc.shapes.metrics``), as in ``benchmarks/long_video.py``. A
layer's **effect** of a method is its mean right colours plus right count minus the base's (no layer
changed), over the clips, printed with its paired 95% bootstrap interval (per clip).

``--base tsa`` is the leave-one-out ablation: from TSA on every layer (what a plan with ``bound_from``
runs past it, but for the layers the probe gives VRPR), one layer at a time switches to each candidate
method. In a deep model a single layer's change is small against plain attention; against the plan's
own base it is what the probe's per-layer choice actually decides. A method equal to the base has effect
0 and is not sampled.

Then the probe (``freeloc.shapes.model.probe_plan``, at 4x) scores every layer, and for each probe score
the script prints its Spearman rank correlation with the ablation's **TSA advantage** of each layer (the
effect of TSA minus the effect of VRPR): the score the probe's rule compares (normalized context minus
normalized position, above which a layer gets TSA) should rank the layers as the ablation does:
a positive correlation is agreement. With ``tsa+vrpr`` among the methods it also correlates every
score with the **VRPR gain inside TSA** (the effect of ``tsa+vrpr`` minus that of ``tsa``): what a plan
that bounds every layer's context (``bound_from``) asks the probe to rank, through its position score
(agreement is a positive correlation of the position score and a negative one of the rule, which
gives TSA to its high values). Either correlation is printed when its methods are measured (the base
counts as measured, with effect 0). It also prints the plan the ablation itself implies (per layer, the
method with the largest effect) beside the probe's.

The loss probe (``freeloc.probe_loss``: each layer's switch from TSA to TSA+VRPR judged by the model's own
loss on rendered clips) is correlated with the VRPR gain inside TSA as well, at each length with the gains
of its range that holds there (the model's own plan's when its rule is the loss probe, else computed). With
``--base tsa`` the script then lists the layers whose gain resolves (its interval excludes 0) and, for the
loss probe and both rules, on how many of them the choice has the gain's sign: the probe's choices should
match the ablation wherever the ablation can tell.

``--read a.json,b.json`` samples nothing: it analyses the effects of earlier ``--json`` runs (the shipped
model's are ``benchmarks/ablation/``) with the probes of the model now.

Conditions come from the validation seeds (10000 on) by default: the ablation is what probe settings are
tuned against. Cost: ``lengths x (1 + layers x methods)`` sets of ``--conditions`` videos (methods
other than the base).
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
from freeloc._progress import reporter
from freeloc.loss_probe import loss_score_name
from freeloc.methods import METHODS
from freeloc.plan import DIRECT
from freeloc.shapes.clips import random_spec
from freeloc.shapes.metrics import bootstrap_mean as bootstrap
from freeloc.shapes.metrics import evaluate_generated, nanmean
from freeloc.shapes.model import (
    LOSS_RATIOS,
    load_folder,
    load_shipped,
    model_condition,
    probe_plan,
    sample,
    shipped_guidance,
    shipped_plan,
)

SEEDS = {"validation": 10_000, "test": 50_000}
KEYS = ("color_consistency", "shape_count_consistency")


def ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in range(i, j + 1):
            out[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation of two equally long lists (NaN when either is constant)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"spearman needs two lists of the same length >= 2, got {len(a)} and {len(b)}")
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else float("nan")


def normalized_difference(position: list[float], context: list[float]) -> list[float]:
    """The probe rule's per-layer quantity (``freeloc.probing.select``): context / max - position / max."""
    pmax, cmax = max(max(position), 1e-12), max(max(context), 1e-12)
    return [c / cmax - p / pmax for p, c in zip(position, context, strict=True)]


def read_runs(paths: list[Path], ap: argparse.ArgumentParser) -> tuple[dict[int, Any], dict[int, Any], dict[int, Any],
                                                                     dict[str, Any]]:
    """The effects, intervals and raw scores by length of earlier ``--json`` runs, and their shared settings;
    runs with other settings (base, split, seeds, steps, methods) are refused."""
    effects: dict[int, Any] = {}
    spread: dict[int, Any] = {}
    raw: dict[int, Any] = {}
    meta: dict[str, Any] = {}
    for path in paths:
        if not path.exists():
            ap.error(f"--read: {path} does not exist")
        data = json.loads(path.read_text())
        these = dict(base=data["base"], split=data["split"], seeds=data["seeds"], steps=data["steps"],
                     conditions=data["seeds"][1] - data["seeds"][0] + 1,
                     methods=sorted(next(iter(data["effects"].values()))))
        if meta and these != meta:
            ap.error(f"--read: {path} was run with other settings ({these}) than the first file ({meta})")
        meta = these
        for key, value in data["effects"].items():
            if int(key) in effects:
                ap.error(f"--read: length {key}x is in more than one file")
            effects[int(key)] = value
            spread[int(key)] = data["intervals"][key]
            raw[int(key)] = data.get("raw", {}).get(key, {})
    return effects, spread, raw, meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="4,8", help="multiples of the trained length (default 4,8)")
    ap.add_argument("--methods", default="vrpr,tsa,tsa+vrpr", help="candidate methods per layer")
    ap.add_argument("--base", default="direct",
                    help="the method of every other layer (default direct; 'tsa' for the leave-one-out ablation)")
    ap.add_argument("--conditions", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--split", choices=sorted(SEEDS), default="validation")
    ap.add_argument("--run", type=Path, default=None,
                    help="a training run, or an exported model with its guidance, instead of the shipped model")
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--read", default=None, metavar="JSON[,JSON]",
                    help="no sampling: the effects of earlier --json runs (e.g. one per length), analysed with "
                         "the probes of the model now")
    args = ap.parse_args()
    if args.read is not None:
        effects, spread, raw, read_meta = read_runs([Path(x) for x in args.read.split(",")], ap)
        lengths, args.base = sorted(effects), read_meta["base"]
        measured = list(effects[lengths[0]])
        sampled = [m for m in measured if m != args.base]
        model, cfg, _, own_plan = load_folder(args.run) if args.run is not None else (
            *load_shipped(), None, shipped_plan())
        first, args.conditions, args.steps, args.split = (read_meta["seeds"][0], read_meta["conditions"],
                                                          read_meta["steps"], read_meta["split"])
        n_layers = len(model.blocks)
    else:
        lengths = [int(x) for x in args.lengths.split(",")]
        methods = args.methods.split(",")
        known = {DIRECT, *METHODS}
        if unknown := [m for m in [*methods, args.base] if m not in known]:
            ap.error(f"--methods/--base: unknown {unknown}; choose from {sorted(known)}")
        sampled = [m for m in dict.fromkeys(methods) if m != args.base]
        measured = [args.base, *sampled]  # the base's effect is 0 on every layer
        if not ({"vrpr", "tsa"} <= set(measured) or {"tsa", "tsa+vrpr"} <= set(measured)):
            ap.error(f"--methods with --base {args.base!r} measure {sorted(measured)}: they must cover vrpr and tsa "
                     "(the TSA advantage) or tsa and tsa+vrpr (the VRPR gain inside TSA)")
        model, cfg, own_guidance, own_plan = load_folder(args.run) if args.run is not None else (
            *load_shipped(), shipped_guidance(), shipped_plan())
        guidance = args.guidance if args.guidance is not None else own_guidance
        trained, n_layers = cfg.trained_frames, len(model.blocks)
        first = SEEDS[args.split]
        specs = [random_spec(first + i) for i in range(args.conditions)]
        cond = torch.stack([model_condition(s) for s in specs])
        total = len(lengths) * (1 + n_layers * len(sampled))
        print(f"{n_layers} layers, methods {sampled} on one layer, {args.base} on the others, lengths {lengths}; "
              f"{args.split} split ({args.conditions} clips), "
              f"{args.steps} steps (shift {cfg.sampling_shift:g}, fresh noise {cfg.sample_noise:g}), guidance "
              f"{guidance:g}: {total} sets of videos", flush=True)
        t0, done = time.perf_counter(), 0

        def score(frames: int, plan: freeloc.LayerPlan, mult: int) -> dict[str, Any]:
            nonlocal done
            with freeloc.enable(model, plan=plan, num_frames=frames, trained_frames=trained, temporal_factor=1):
                videos = sample(model, cfg, cond, frames, steps=args.steps, seed=mult, guidance=guidance,
                                progress=reporter(True, f"[{done + 1}/{total}] sampling steps"))
            done += 1
            clips = [evaluate_generated(videos[i:i + 1], [s]) for i, s in enumerate(specs)]
            # the means over clips (NaN skipped, as evaluate_generated), and per clip for the paired intervals
            out: dict[str, Any] = {k: nanmean([c[k] for c in clips]) for k in clips[0]}
            out["per_clip"] = [sum(c[k] for k in KEYS) for c in clips]
            elapsed = time.perf_counter() - t0
            print(f"  [{done}/{total}] {mult}x {plan.methods}: colour {out[KEYS[0]]:.3f} count {out[KEYS[1]]:.3f} "
                  f"({elapsed / done * (total - done):.0f} s left)", flush=True)
            return out

        effects: dict[int, dict[str, list[float]]] = {}
        spread: dict[int, dict[str, list[tuple[float, float]]]] = {}
        raw: dict[int, Any] = {}
        for mult in lengths:
            frames = mult * trained
            reference = score(frames, freeloc.LayerPlan.uniform(args.base, n_layers), mult)
            base = sum(reference[k] for k in KEYS)
            effects[mult] = {m: [] for m in measured}
            spread[mult] = {m: [] for m in measured}
            raw[mult] = {args.base: reference}
            for layer in range(n_layers):
                effects[mult][args.base].append(0.0)
                spread[mult][args.base].append((0.0, 0.0))
                for m in sampled:
                    plan = freeloc.LayerPlan.uniform(args.base, n_layers)
                    plan.methods[layer] = m
                    got = score(frames, plan, mult)
                    raw[mult][f"{layer}:{m}"] = got
                    effects[mult][m].append(sum(got[k] for k in KEYS) - base)
                    diffs = [a - b for a, b in zip(got["per_clip"], reference["per_clip"], strict=True)]
                    spread[mult][m].append(bootstrap(diffs)[1:])
    plan = probe_plan(model, cfg, 4, progress=False)
    scores = dict(plan.scores)
    scores["rule (attention)"] = normalized_difference(plan.scores["position"], plan.scores["context"])
    scores["rule (output)"] = normalized_difference(plan.scores["position_output"], plan.scores["context_output"])
    # the loss probe's gains: the model's own plan's where its rule is the loss probe, else computed here
    own = own_plan if own_plan is not None and all(loss_score_name(r) in own_plan.scores for r in LOSS_RATIOS) else None
    loss_plan = own if own is not None else probe_plan(model, cfg, score="loss", progress=False)
    source = "the model's own plan's" if own is not None else "computed now (freeloc.probe_loss)"
    print(f"\nthe loss probe's gains: {source}", flush=True)
    # the gains of the loss probe's range that holds at each length
    loss_at = {mult: loss_plan.scores[loss_score_name(max([r for r in LOSS_RATIOS if r <= mult] or LOSS_RATIOS[:1]))]
               for mult in lengths}
    columns = dict(scores) | {f"loss gain {mult}x": loss_at[mult] for mult in lengths}
    print(f"\neffect = right colours + right count, minus {args.base} on every layer's [paired 95%]; "
          f"probe scores at 4x; the loss probe's gains at each length (from its nearest ratio at or below)\n"
          f"{'layer':>5} " + " ".join(f"{f'{mult}x {m}':>24}" for mult in lengths for m in sampled)
          + " " + " ".join(f"{k:>17}" for k in columns))
    for layer in range(n_layers):
        print(f"{layer:>5} " + " ".join(f"{effects[mult][m][layer]:>+8.3f} [{spread[mult][m][layer][0]:+.2f}, "
                                        f"{spread[mult][m][layer][1]:+.2f}]"
                                        for mult in lengths for m in sampled)
              + " " + " ".join(f"{columns[k][layer]:>17.4f}" for k in columns))
    correlations: dict[str, dict[str, float]] = {}
    if {"vrpr", "tsa"} <= set(measured):
        print("\nSpearman rank correlation of each probe score with the ablation's TSA advantage "
              "(tsa - vrpr effect; a score that agrees with it: context and rule positive, position negative):")
        for mult in lengths:
            advantage = [t - v for t, v in zip(effects[mult]["tsa"], effects[mult]["vrpr"], strict=True)]
            correlations[str(mult)] = {k: spearman(values, advantage) for k, values in scores.items()}
            print(f"  {mult}x: " + ", ".join(f"{k} {c:+.2f}" for k, c in correlations[str(mult)].items()))
    agreement: dict[str, dict[str, Any]] = {}
    if {"tsa", "tsa+vrpr"} <= set(measured):
        print("\nSpearman rank correlation of each probe score with the ablation's VRPR gain inside TSA "
              "(tsa+vrpr - tsa effect: what re-encoding adds once the context is bounded; a score that agrees "
              "with it: position positive, context and rule negative, since the rule gives TSA to high values):")
        for mult in lengths:
            gain = [c - t for c, t in zip(effects[mult]["tsa+vrpr"], effects[mult]["tsa"], strict=True)]
            correlations[f"{mult} vrpr gain inside tsa"] = {k: spearman(values, gain) for k, values in scores.items()}
            correlations[f"{mult} vrpr gain inside tsa"]["loss gain"] = spearman(loss_at[mult], gain)
            print(f"  {mult}x: " + ", ".join(f"{k} {c:+.2f}"
                                            for k, c in correlations[f"{mult} vrpr gain inside tsa"].items()))
    implied = {str(mult): [max(measured, key=lambda m, i=i, mult=mult: effects[mult][m][i]) for i in range(n_layers)]
               for mult in lengths}
    print(f"\nthe probe's plan at 4x: {plan.methods}")
    print(f"the loss probe's plan: {loss_plan.summary()}")
    for mult, p in implied.items():
        print(f"the ablation's best method per layer at {mult}x: {p}")
    if args.base == "tsa" and "tsa+vrpr" in measured:
        print("\nthe layers whose VRPR gain inside TSA resolves (its paired 95% interval excludes 0), and whether "
              "each rule gives them the position correction as the gain's sign asks; then, over every layer, "
              "how often each probe's choice is the ablation's best method:")
        vrpr_layers = {"rule (attention)": [v <= 0 for v in scores["rule (attention)"]],
                       "rule (output)": [v <= 0 for v in scores["rule (output)"]]}
        for mult in lengths:
            gain = effects[mult]["tsa+vrpr"]
            chosen = {"loss": [g > 0 for g in loss_at[mult]], **vrpr_layers}
            resolved = [i for i in range(n_layers) if not spread[mult]["tsa+vrpr"][i][0] <= 0
                        <= spread[mult]["tsa+vrpr"][i][1]]
            agree = {name: [i for i in resolved if picks[i] == (gain[i] > 0)] for name, picks in chosen.items()}
            best = [m == "tsa+vrpr" for m in implied[str(mult)]]
            same = {name: sum(a == b for a, b in zip(picks, best, strict=True)) for name, picks in chosen.items()}
            agreement[str(mult)] = dict(resolved=resolved, agree=agree, same_as_best=same)
            print(f"  {mult}x: resolved layers {resolved} (" + ", ".join(f"{gain[i]:+.3f}" for i in resolved) + "); "
                  + ", ".join(f"{name} agrees on {len(a)}/{len(resolved)}" for name, a in agree.items()))
            print(f"  {mult}x, layers whose choice is the ablation's best method: "
                  + ", ".join(f"{name} {k}/{n_layers}" for name, k in same.items()))
    if args.json is not None:
        out = dict(effects={str(k): v for k, v in effects.items()}, intervals={str(k): v for k, v in spread.items()},
                   raw={str(k): v for k, v in raw.items()}, base=args.base, probe=plan.to_dict(),
                   loss_probe=loss_plan.to_dict(), agreement=agreement,
                   correlations=correlations, implied=implied, split=args.split,
                   seeds=[first, first + args.conditions - 1], steps=args.steps)
        args.json.write_text(json.dumps(out, indent=2))

if __name__ == "__main__":
    main()
