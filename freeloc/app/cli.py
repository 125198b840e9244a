"""The ``freeloc`` command line (``python -m freeloc`` runs the same).

Subcommands:

* ``freeloc explain``: what FreeLOC does at a given length, without a model: the VRPR setting and
  its effective relative distances r(Δ), and how sparse TSA's attention is, next to the sliding-window
  baseline. ``--json`` prints the same as one JSON object, ``--png`` draws it. ``--memory`` prints the
  estimated peak memory of one attention call instead, dense, TSA and VRPR, for a model shape
  (``--model wan2.1-1.3b`` or ``wan2.1-14b``, or ``--heads``, ``--head-dim``, ``--height``, ``--width``).
* ``freeloc demo``: the shipped shapes model (or a tiny random Wan pipeline) at 4x its trained length,
  direct and with FreeLOC (``freeloc.app.video.demo``).
* ``freeloc generate``: a long video with a diffusers pipeline (``freeloc.app.video.generate``), or one
  video comparing several methods (``--compare``, ``freeloc.app.video.generate_compare``).
* ``freeloc probe``: the layer plan (``freeloc.probe``) of the shipped shapes model (``--model shapes``) or
  of a diffusers pipeline's transformer (a local folder or a hub id), optionally on a real prompt (``--prompt``).

``explain`` without ``--png`` needs only the core. The pictures, the progress bar and the videos need
the ``app`` extra, the shapes model the ``shapes`` extra and real pipelines the ``diffusers`` extra; a
missing package stops the command with an error that names its extra.

Frame counts on the command line are **video frames** (what a user asks a pipeline for: 321 and 81
for Wan2.1); they are turned into temporal tokens (latent frames) with ``(n - 1) // factor + 1``
(``--temporal-factor``, 4 for the Wan and HunyuanVideo VAEs: 321 -> 81, 81 -> 21). With ``--latent``
the numbers are taken as temporal tokens already.

Examples:
    >>> main(["explain", "--num-frames", "161", "--trained-frames", "81", "--json"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .._extras import require
from .._files import check_writable
from ..attention.options import AttentionOptions
from ..patterns import TSA, SlidingWindow
from ..plan import DIRECT, LayerPlan
from ..positions import PUBLISHED_VRPR, VRPR
from ..probing import BOUNDED_VRPR, check_rule, probe
from ..session import METHOD_CHOICES
from .plots import explain_png, plot_scores
from .progress import tqdm_progress
from .video import demo, generate, generate_compare, load_pipeline

__all__ = ["main", "build_parser", "encode_prompt", "explain_data", "explain_text", "tqdm_progress", "video_to_latent"]

#: Tile size of block-sparse attention kernels, used for the block density.
BLOCK_SIZE = 128
#: The ``--model`` name of the shapes model shipped with freeloc (``freeloc demo``, ``freeloc probe``).
SHAPES = "shapes"
#: ``freeloc explain --memory --model``: attention shape of a model (its config: heads, head dim; tokens per
#: frame after its VAE's 8x and its 2x2 patch at the video size it was trained at) and its trained length in
#: video frames.
MEMORY_PRESETS: dict[str, dict[str, int]] = {
    "wan2.1-1.3b": {"heads": 12, "head_dim": 128, "height": 30, "width": 52, "trained_frames": 81},  # 480x832
    "wan2.1-14b": {"heads": 40, "head_dim": 128, "height": 45, "width": 80, "trained_frames": 81},  # 720x1280
}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: Video size of ``freeloc probe``'s inputs for a pipeline (Wan 2.1's 480p).
PROBE_HEIGHT, PROBE_WIDTH = 480, 832


def video_to_latent(video_frames: int, temporal_factor: int) -> int:
    """Temporal tokens (latent frames) of ``video_frames`` frames: ``(n - 1) // factor + 1``.

    Examples:
        >>> video_to_latent(321, 4), video_to_latent(81, 4)
        (81, 21)
    """
    if video_frames < 1 or temporal_factor < 1:
        raise ValueError(f"video_frames and temporal_factor must be >= 1, "
                         f"got {video_frames!r} and {temporal_factor!r}")
    return (video_frames - 1) // temporal_factor + 1


def _non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0, with an error that names the value."""
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    """argparse type: a positive integer, with an error that names the value."""
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer (>= 1), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``freeloc`` command."""
    parser = argparse.ArgumentParser(
        prog="freeloc",
        description="FreeLOC: training-free long video generation for video diffusion transformers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    ex = sub.add_parser(
        "explain",
        help="show the VRPR setting, its relative distances and TSA's sparsity at a given length",
        description="Show what FreeLOC does at a given length: the VRPR setting and its effective relative "
                    "distances r(Δ), and the density of TSA next to the sliding-window baseline. Frame "
                    "counts are video frames unless --latent is given.",
    )
    ex.add_argument("--num-frames", type=_positive_int,
                    help="length to generate, in video frames (e.g. 321 for Wan2.1 at 4x); with --memory: "
                         "default 1x, 2x and 4x the trained length")
    ex.add_argument("--trained-frames", type=_positive_int,
                    help="length the model was trained on, in video frames (e.g. 81 for Wan2.1); with --memory: "
                         "default the --model's")
    ex.add_argument("--latent", action="store_true",
                    help="the frame counts are temporal tokens (latent frames) already, not video frames")
    ex.add_argument("--temporal-factor", type=_positive_int, default=4,
                    help="VAE temporal compression: latent = (video - 1) // factor + 1 "
                         "(default 4: Wan, HunyuanVideo)")
    ex.add_argument("--tokens-per-frame", type=_positive_int, default=1560,
                    help="tokens per temporal token after spatial patching (default 1560: Wan2.1 at 832x480)")
    ex.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ex.add_argument("--png", type=Path, metavar="FILE", help="also draw the explanation to this PNG file")
    mem = ex.add_argument_group("--memory: estimated peak attention memory of one layer's call, dense, TSA, VRPR")
    mem.add_argument("--memory", action="store_true",
                     help="print the estimated peak memory of one attention call (above q, k, v) instead")
    mem.add_argument("--model", choices=sorted(MEMORY_PRESETS), default="wan2.1-1.3b",
                     help="the attention shape and trained length of this model (default wan2.1-1.3b: 12 heads x "
                          "128 at 480p, 30 x 52 tokens per frame); the options below override it")
    mem.add_argument("--heads", type=_positive_int, help="attention heads")
    mem.add_argument("--head-dim", type=_positive_int, help="channels per head")
    mem.add_argument("--height", type=_positive_int, help="tokens per frame along the height (after patching)")
    mem.add_argument("--width", type=_positive_int, help="tokens per frame along the width (after patching)")
    mem.add_argument("--text-tokens", type=_non_negative_int, default=0,
                     help="text tokens in the same sequence as the video (default 0: Wan attends text by cross-"
                          "attention)")
    mem.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="dtype of q, k, v (default bf16)")
    mem.add_argument("--head-group", type=_head_group, default="auto",
                     help="heads per group (AttentionOptions.head_group): 'auto' (default: the most heads within "
                          "1.5 x dense's peak) or an int >= 1 (1: the least memory)")
    ex.set_defaults(func=_cmd_explain, subparser=ex)

    de = sub.add_parser(
        "demo",
        help="generate with a built-in model at 4x its trained length, direct vs FreeLOC (no download)",
        description="Generate at 4x a built-in model's trained length with 'direct' and with FreeLOC and write "
                    "both mp4s, a PNG and a table. --model shapes (default): the small Wan model shipped with "
                    "freeloc, trained on 16-frame clips of bouncing shapes, makes 64-frame clips. --model random: "
                    "a tiny random Wan pipeline makes 321 frames (4x its declared 81); its videos are noise, it "
                    "shows the mechanics.",
    )
    de.add_argument("--model", default="shapes", choices=["shapes", "random"],
                    help="shapes (default: the trained shapes model) or random (a tiny random Wan pipeline)")
    de.add_argument("--out", type=Path, default=Path("freeloc-demo"), help="output folder (default freeloc-demo)")
    de.add_argument("--steps", type=_positive_int, default=None,
                    help="sampling steps (default 20 for shapes, 4 for random)")
    de.add_argument("--clips", type=_positive_int, default=4, help="shapes: clips side by side, 1 to 8 (default 4)")
    de.add_argument("--seed", type=int, default=0)
    de.add_argument("--guidance", type=float, default=None,
                    help="classifier-free guidance scale (default: the shapes model's own; 3.0 for random; "
                         "1 turns it off)")
    de.set_defaults(func=_cmd_demo, subparser=de)

    ge = sub.add_parser(
        "generate",
        help="generate a long video with a diffusers pipeline (hub id or local folder) and FreeLOC",
        description="Load a pipeline with DiffusionPipeline.from_pretrained, generate inside freeloc.enable, "
                    "write the mp4 and a JSON sidecar (settings and the per-layer report). With --compare, the "
                    "same prompt and seed once per listed method: one mp4 of labelled panels and one sidecar "
                    "with each method's report.",
    )
    ge.add_argument("--model", required=True, help="hub id or local folder, e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    ge.add_argument("--prompt", required=True)
    ge.add_argument("--negative-prompt", default=None)
    ge.add_argument("--num-frames", type=_positive_int, required=True, help="video frames, e.g. 321")
    ge.add_argument("--height", type=_positive_int, default=None,
                    help="video height in pixels (default: the pipeline's own, 480 for Wan 2.1)")
    ge.add_argument("--width", type=_positive_int, default=None,
                    help="video width in pixels (default: the pipeline's own, 832 for Wan 2.1)")
    ge.add_argument("--steps", type=_positive_int, default=50, help="denoising steps (default: 50)")
    ge.add_argument("--guidance", type=float, default=5.0,
                    help="classifier-free guidance scale (default: 5.0; 1 turns it off)")
    ge.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default: 0)")
    ge.add_argument("--method", default=None, choices=METHOD_CHOICES, metavar="METHOD",
                    help=f"the layer plan ('freeloc', the default), one method on every layer, or 'direct' (no "
                         f"change); one of: {', '.join(METHOD_CHOICES)}")
    ge.add_argument("--compare", type=_method_list, default=None, metavar="METHOD,METHOD[,...]",
                    help="instead of --method: run each of these methods (comma-separated, e.g. direct,freeloc) "
                         "with the same prompt and seed and write one video of labelled panels, top to bottom, "
                         "and one sidecar with each method's report")
    ge.add_argument("--params", action="append", type=_method_params, default=None, metavar="METHOD:JSON",
                    help="parameters of one method on every layer (--method, or one of --compare's), as JSON; "
                         "repeat for several methods, e.g. --params 'riflex:{\"k\": 4}' --params "
                         "'ultravico:{\"beta\": null}'; the parameters not given are derived from the length")
    ge.add_argument("--plan", default=None, help="plan JSON path, or 'uniform' (default: the shipped plan)")
    ge.add_argument("--trained-frames", type=_positive_int, default=None,
                    help="the model's trained length in video frames (default: freeloc's data for the model)")
    ge.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ge.add_argument("--dtype", default="bfloat16" if _cuda() else "float32",
                    choices=["float32", "bfloat16", "float16"])
    ge.add_argument("--out", type=Path, required=True, help="output mp4 (a JSON sidecar is written beside it)")
    ge.add_argument("--context-parallel", type=_positive_int, default=1, metavar="N",
                    help="split each sequence over N processes with diffusers' Ulysses context parallelism; start "
                         "it with torchrun --nproc-per-node N -m freeloc generate ... (default: 1, no split)")
    ge.set_defaults(func=_cmd_generate, subparser=ge)

    pr = sub.add_parser(
        "probe",
        help="probe each self-attention layer's position and context sensitivity and write a layer plan",
        description="Probe every self-attention layer of a model alone (key positions shifted; context restricted "
                    "to a window of the trained length) and write the resulting layer plan (with its scores) as "
                    "JSON. --model shapes probes the shapes model shipped with freeloc (no download, on a rendered "
                    "clip); a pipeline folder or hub id is probed on synthetic inputs, conditioned on --prompt "
                    "when given. The number of forwards and an estimate of the time are printed first.",
    )
    pr.add_argument("--model", required=True,
                    help=f"'{SHAPES}' (the shapes model shipped with freeloc, as in `freeloc demo`), a local "
                         f"pipeline folder (saved with save_pretrained) or a hub id")
    pr.add_argument("--num-frames", type=_positive_int, default=None,
                    help="video frames to probe at, longer than trained, e.g. 321 (default for shapes: 64, 4x its "
                         "trained 16; required for a pipeline)")
    pr.add_argument("--out", type=Path, required=True, help="the plan JSON to write")
    pr.add_argument("--png", type=Path, default=None, help="also plot the scores and the assignment to this PNG")
    pr.add_argument("--prompt", default=None,
                    help="pipelines: encode this prompt once with the pipeline's text encoder and condition the "
                         "probe's inputs on it (default: Gaussian text embeddings)")
    pr.add_argument("--trained-frames", type=_positive_int, default=None,
                    help="pipelines: the model's trained length in video frames (default: freeloc's data for the "
                         "model)")
    pr.add_argument("--height", type=_positive_int, default=None,
                    help=f"pipelines: video height of the probe's inputs (default {PROBE_HEIGHT})")
    pr.add_argument("--width", type=_positive_int, default=None,
                    help=f"pipelines: video width of the probe's inputs (default {PROBE_WIDTH})")
    pr.add_argument("--tsa-count", type=int, default=None, help="exactly this many TSA layers (default: the rule)")
    pr.add_argument("--score", choices=["attention", "output", "loss"], default="attention",
                    help="the scores the rule compares: attention (logit and entropy change, the paper's) or output "
                         "(the model's output change); both are recorded (default attention). loss: with --model "
                         f"{SHAPES} only, each layer's method at 2x, 4x and 8x by the model's own loss on rendered "
                         "clips (freeloc.probe_loss)")
    pr.add_argument("--min-z", type=float, default=None, metavar="Z",
                    help="with --score loss: a layer takes TSA+VRPR only where its loss gain exceeds Z standard "
                         "errors (default 0: any gain)")
    pr.add_argument("--bound-from", type=float, default=None, metavar="RATIO",
                    help="from RATIO x the trained length on, the VRPR layers get tsa+vrpr (a length range of the "
                         "plan); default: one assignment for every length")
    pr.add_argument("--position-from", type=float, default=None, metavar="RATIO",
                    help="below RATIO x the trained length, the VRPR layers get no position correction (direct, "
                         "or tsa from --bound-from); default: VRPR at every length")
    pr.add_argument("--bounded-vrpr", choices=list(BOUNDED_VRPR), default="tsa+vrpr",
                    help="what the VRPR layers take from --bound-from on: VRPR inside TSA's or a sliding window's "
                         "bounded context (default tsa+vrpr)")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--device", default="cuda" if _cuda() else "cpu")
    pr.add_argument("--dtype", default="bfloat16" if _cuda() else "float32",
                    choices=["float32", "bfloat16", "float16"])
    pr.set_defaults(func=_cmd_probe, subparser=pr)
    return parser


def _cmd_probe(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    shapes = args.model == SHAPES
    if args.score == "loss" and not shapes:
        parser.error(f"--score loss: the loss probe needs clean videos at each length and the model's training "
                     f"target; on the command line only --model {SHAPES} has them (its rendered clips). From Python: "
                     "freeloc.probe_loss(pipe.transformer, {ratio: [(forward kwargs, target)]})")
    if args.min_z is not None and args.score != "loss":
        parser.error(f"--min-z is for --score loss, got --score {args.score}")
    if args.score == "loss":
        for flag, value in (("--num-frames", args.num_frames), ("--tsa-count", args.tsa_count),
                            ("--bound-from", args.bound_from), ("--position-from", args.position_from)):
            if value is not None:
                parser.error(f"{flag} does not apply to --score loss, which chooses each layer's method at 2x, 4x "
                             f"and 8x itself (from 8x on for longer videos)")
    try:
        if args.score != "loss":  # the loss rule's flags are checked above
            check_rule(args.score, args.bound_from, args.position_from)
    except ValueError as err:
        parser.error(str(err).replace("probe: bound_from", "--bound-from").replace("probe: position_from",
                                                                                 "--position-from"))
    if shapes:
        for flag, value in (("--prompt", args.prompt), ("--trained-frames", args.trained_frames),
                            ("--height", args.height), ("--width", args.width)):
            if value is not None:
                parser.error(f"{flag} is for pipelines; --model {SHAPES} probes the shipped shapes model on its own "
                             f"32 x 32 clips, conditioned on shapes (trained on 16 frames)")
        require("diffusers", "shapes", f"freeloc probe --model {SHAPES}")
    else:
        if args.num_frames is None:
            parser.error(f"--num-frames is required for a pipeline (only --model {SHAPES} has a default)")
        if args.prompt is not None and not args.prompt.strip():
            parser.error("--prompt: expected some text, got an empty prompt")
        require("diffusers", "diffusers", "freeloc probe")
    progress = (tqdm_progress("loss probe", "forward") if args.score == "loss"
                else tqdm_progress("probing layers", "layer"))
    _check_outputs(parser, ("--out", args.out, False), ("--png", args.png, False))
    if not shapes:
        _check_model(parser, args.model)
    if args.png is not None:
        require("matplotlib", "app", "freeloc probe --png")  # a missing matplotlib stops it before the probe runs
    dtype = getattr(torch, args.dtype)
    if shapes:
        from ..shapes.model import load_shipped, probe_plan

        model, cfg = load_shipped(dtype)
        where = ("by its loss at 2x, 4x and 8x" if args.score == "loss"
                 else f"at {args.num_frames or 4 * cfg.trained_frames} frames")
        print(f"probing the shipped shapes model (trained on {cfg.trained_frames} frames) {where}", flush=True)
        plan = probe_plan(model.to(args.device), cfg, num_frames=args.num_frames, seed=args.seed,
                          tsa_count=args.tsa_count, progress=progress, score=args.score,
                          bound_from=args.bound_from, position_from=args.position_from,
                          bounded_vrpr=args.bounded_vrpr,
                          **({"min_z": args.min_z} if args.min_z is not None else {}))
    else:
        diffusers = require("diffusers", "diffusers", "freeloc probe")
        print(f"loading {args.model}", flush=True)
        pipe = diffusers.DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype).to(args.device)
        text = None if args.prompt is None else encode_prompt(pipe, args.prompt, args.device)
        spatial = int(getattr(pipe, "vae_scale_factor_spatial", 8) or 8)
        height, width = args.height or PROBE_HEIGHT, args.width or PROBE_WIDTH
        plan = probe(pipe, args.num_frames, trained_frames=args.trained_frames, seed=args.seed,
                     tsa_count=args.tsa_count, latent_size=(height // spatial, width // spatial), progress=progress,
                     text=text, score=args.score, bound_from=args.bound_from,
                     position_from=args.position_from, bounded_vrpr=args.bounded_vrpr)
        if args.prompt is not None:
            plan.meta["probe"]["prompt"] = args.prompt
    plan.meta["probe"]["model"] = args.model
    plan.save(args.out)
    print(f"wrote {args.out}: {plan.summary()}")
    if args.png is not None:
        plot_scores(plan, args.png)
        print(f"wrote {args.png}")
    return 0


def encode_prompt(pipe: Any, prompt: str, device: str) -> Any:
    """``prompt`` encoded once by the pipeline's own text encoder: its embeddings (1, tokens, width).

    Raises:
        ValueError: If the pipeline has no text encoder (or no ``encode_prompt``).
    """
    import inspect

    import torch

    encode = getattr(pipe, "encode_prompt", None)
    if encode is None or getattr(pipe, "text_encoder", None) is None:
        raise ValueError(f"--prompt: this {type(pipe).__name__} has no text encoder to encode the prompt with; "
                         f"probe it without --prompt")
    kwargs: dict[str, Any] = {"prompt": prompt, "device": torch.device(device)}
    if "do_classifier_free_guidance" in inspect.signature(encode).parameters:
        kwargs["do_classifier_free_guidance"] = False  # the prompt's embeddings only, no negative prompt
    with torch.no_grad():
        out = encode(**kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _cmd_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.clips > 8:
        parser.error(f"--clips: expected 1 to 8, got {args.clips}")
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        parser.error(f"--guidance: expected a finite number >= 0 (1 = no guidance), got {args.guidance}")
    _check_outputs(parser, ("--out", args.out, True))
    demo(args.out, steps=args.steps, seed=args.seed, model=args.model, conditions=args.clips, guidance=args.guidance)
    return 0


def _method_list(text: str) -> list[str]:
    """argparse type of ``--compare``: two or more different methods, comma-separated."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        if name not in METHOD_CHOICES:
            raise argparse.ArgumentTypeError(f"unknown method {name!r} in {text!r}; accepted: "
                                             f"{', '.join(METHOD_CHOICES)}")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"method {twice[0]!r} is listed twice in {text!r}")
    if len(names) < 2:
        raise argparse.ArgumentTypeError(f"expected two or more methods separated by commas (e.g. direct,freeloc), "
                                         f"got {text!r}")
    return names


def _method_params(text: str) -> tuple[str, dict[str, Any]]:
    """argparse type of ``--params``: ``METHOD:JSON``, a single method and a JSON object of its parameters."""
    name, sep, data = text.partition(":")
    name = name.strip()
    single = [m for m in METHOD_CHOICES if m not in ("freeloc", DIRECT)]
    if not sep or name not in single:
        raise argparse.ArgumentTypeError(f"expected METHOD:JSON with METHOD one of {', '.join(single)} (a plan's "
                                         f"layers take their parameters in the plan file), got {text!r}")
    try:
        params = json.loads(data)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{name}: the parameters are not JSON ({e}), got {data!r}") from None
    if not isinstance(params, dict):
        raise argparse.ArgumentTypeError(f"{name}: expected a JSON object of parameters, e.g. {{\"k\": 4}}, "
                                         f"got {data!r}")
    try:
        LayerPlan.uniform(name, 1, **params)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name, params


def _params_by_method(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``--params`` by method name, each for a method that runs (``--method`` or one of ``--compare``'s)."""
    given = args.params or []
    names = [name for name, _ in given]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        parser.error(f"--params gives {twice[0]!r} twice")
    running = args.compare if args.compare is not None else [args.method or "freeloc"]
    unused = [n for n in names if n not in running]
    if unused:
        parser.error(f"--params {unused[0]}:... is for a method that does not run (running: {', '.join(running)})")
    return dict(given)


def _cmd_generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.compare is not None and args.method is not None:
        parser.error(f"--compare and --method exclude each other: --compare {','.join(args.compare)} runs each of "
                     f"its methods, --method {args.method} one")
    params = _params_by_method(parser, args)
    if args.compare is not None and args.plan is not None and "freeloc" not in args.compare:
        parser.error(f"--plan is the freeloc method's, and --compare {','.join(args.compare)} does not list freeloc")
    if args.out.suffix.lower() != ".mp4":
        parser.error(f"--out must end in .mp4, got {str(args.out)!r}")
    _check_outputs(parser, ("--out", args.out, False),
                   ("--out (its JSON sidecar)", args.out.with_suffix(".json"), False))
    _check_model(parser, args.model)
    from .parallel import start

    run = start(args.context_parallel, args.device)  # one process of torchrun's group, or the only one
    try:
        pipeline = load_pipeline(args.model, run.device, args.dtype)
        run.parallelize(pipeline)
        common: dict[str, Any] = dict(height=args.height, width=args.width, steps=args.steps, guidance=args.guidance,
                                      seed=args.seed, plan=args.plan, device=run.device, dtype=args.dtype,
                                      negative_prompt=args.negative_prompt, trained_frames=args.trained_frames,
                                      pipeline=pipeline, writes=run.writes, context_parallel=run.degree)
        if args.compare is not None:
            generate_compare(args.model, args.prompt, args.num_frames, args.out, args.compare, method_params=params,
                             **common)
        else:
            method = args.method or "freeloc"
            generate(args.model, args.prompt, args.num_frames, args.out, method=method,
                     method_params=params.get(method), **common)
    finally:
        run.finish()
    return 0


# ---------------------------------------------------------------------------------------- explain
def explain_data(
    num_frames: int,
    trained_frames: int,
    tokens_per_frame: int = 1560,
    *,
    latent: bool = False,
    temporal_factor: int = 4,
) -> dict[str, Any]:
    """Everything ``freeloc explain`` reports, as a JSON-ready dict.

    Args:
        num_frames: length to generate (video frames, or temporal tokens when ``latent``).
        trained_frames: trained length (video frames, or temporal tokens when ``latent``).
        tokens_per_frame: tokens per temporal token (for the attention densities).
        latent: the frame counts are temporal tokens already.
        temporal_factor: VAE temporal compression used to convert video frames.

    Returns:
        A dict with the keys ``input``, ``num_frames``, ``trained_frames``, ``cap``, ``extension``,
        ``tokens_per_frame``, ``vrpr``, ``max_abs_r_before``, ``max_abs_r_after``, ``profile``,
        ``tsa`` and ``sliding_window``.
    """
    if latent:
        f, t = num_frames, trained_frames
    else:
        f, t = video_to_latent(num_frames, temporal_factor), video_to_latent(trained_frames, temporal_factor)
    cap = max(t - 1, 1)
    longer = f > t
    vrpr = VRPR.for_length(f, t)
    if not longer:
        source = "identity"
    elif (f, t) in PUBLISHED_VRPR:
        source = "published"
    else:
        source = "derived"
    r = vrpr.relative_distance(f)
    r_min = [int(r.diagonal(-d).min()) for d in range(f)]
    r_max = [int(r.diagonal(-d).max()) for d in range(f)]

    tsa = TSA.for_length(f, t)
    window = SlidingWindow.for_length(f, t)
    s = tokens_per_frame
    tsa_info: dict[str, Any] = {"applied": tsa is not None, "block_size": BLOCK_SIZE}
    if tsa is not None:
        tsa_info.update(d1=tsa.d1, d2=tsa.d2, stripe=tsa.stripe, stripe_tokens=tsa.stripe_tokens(s),
                        sink_group=tsa.sink_group, sink_window=tsa.sink_window, cap=tsa.cap,
                        block_density=tsa.block_density(f, s, BLOCK_SIZE),
                        token_density=tsa.token_density(f, s))
    else:
        tsa_info.update(block_density=1.0, token_density=1.0)
    window_info: dict[str, Any] = {"applied": window is not None, "block_size": BLOCK_SIZE}
    if window is not None:
        bands = window.band_set(f, s)
        window_info.update(window=window.window, sink=window.sink,
                           block_density=bands.block_density(s, BLOCK_SIZE),
                           token_density=bands.token_density(s))
    else:
        window_info.update(block_density=1.0, token_density=1.0)

    return {
        "input": {
            "num_frames": num_frames,
            "trained_frames": trained_frames,
            "unit": "temporal tokens" if latent else "video frames",
            "temporal_factor": None if latent else temporal_factor,
        },
        "num_frames": f,
        "trained_frames": t,
        "cap": cap,
        "extension": f / t,
        "tokens_per_frame": s,
        "vrpr": {
            "applied": longer,
            "source": source,
            "w1": vrpr.w1, "w2": vrpr.w2, "g1": vrpr.g1, "g2": vrpr.g2, "cap": vrpr.cap,
            "c1": vrpr.c1, "c2": vrpr.c2,
            "violations": vrpr.violations(f),
        },
        "max_abs_r_before": f - 1,
        "max_abs_r_after": int(r.abs().max()),
        "profile": {"delta": list(range(f)), "r_min": r_min, "r_max": r_max},
        "tsa": tsa_info,
        "sliding_window": window_info,
    }


def _profile_text(r_min: list[int], r_max: list[int], width: int = 96) -> list[str]:
    """``Δ:r`` items (``Δ:a..b`` where r varies over query frames), wrapped to ``width`` columns."""
    pairs = enumerate(zip(r_min, r_max, strict=True))
    items = [f"{d}:{lo}" if lo == hi else f"{d}:{lo}..{hi}" for d, (lo, hi) in pairs]
    lines, line = [], "   "
    for item in items:
        if len(line) + 1 + len(item) > width:
            lines.append(line)
            line = "   "
        line += " " + item
    lines.append(line)
    return lines


def explain_text(data: dict[str, Any]) -> str:
    """The human-readable report of ``freeloc explain`` for ``explain_data``'s output."""
    inp, f, t, cap = data["input"], data["num_frames"], data["trained_frames"], data["cap"]
    v, tsa, win = data["vrpr"], data["tsa"], data["sliding_window"]
    out = []
    if inp["unit"] == "video frames":
        k = inp["temporal_factor"]
        out.append(f"frames: {inp['num_frames']} video frames -> F = {f} temporal tokens, trained on "
                   f"{inp['trained_frames']} video frames -> T = {t}")
        out.append(f"        (latent = (video - 1) // {k} + 1, VAE temporal factor {k}; pass --latent if the "
                   f"numbers are temporal tokens already)")
        for label, n in (("--num-frames", inp["num_frames"]), ("--trained-frames", inp["trained_frames"])):
            if (n - 1) % k:
                out.append(f"        note: {label} {n} is not of the form {k}k + 1, the frame count "
                           f"such VAEs expect; it is rounded down to {((n - 1) // k) * k + 1}")
    else:
        out.append(f"frames: F = {f} temporal tokens, T = {t} (given as temporal tokens, --latent)")
    out.append(f"length: {data['extension']:.2f}x the trained length; "
               f"trained relative distances |Δ| <= {cap}")
    out.append("")
    if not v["applied"]:
        out.append(f"F = {f} <= T = {t}: nothing is out of range; every method is the identity and FreeLOC "
                   f"changes nothing (plain attention on every layer).")
        return "\n".join(out)

    origin = {
        "published": f"published setting for F={f}, T={t}",
        "derived": f"derived by the rule (VRPR.derive; no published setting for F={f}, T={t})",
    }[v["source"]]
    out.append("VRPR (relative-position fix)")
    out.append(f"  setting: w1={v['w1']} w2={v['w2']} g1={v['g1']} g2={v['g2']} cap={v['cap']}   [{origin}]")
    out.append(f"  constants: c1={v['c1']} c2={v['c2']}")
    out.append(f"  tiers: near |Δ| < {v['w1']} exact; mid {v['w1']} <= |Δ| < {v['w2']} grouped by {v['g1']}; "
               f"far |Δ| >= {v['w2']} grouped by {v['g2']}, clipped at {v['cap']}")
    out.append(f"  max |r|: before {data['max_abs_r_before']} (F - 1), after {data['max_abs_r_after']}")
    broken = "; ".join(v["violations"])
    out.append("  properties: " + ("all hold" if not broken else "VIOLATED: " + broken))
    out.append("  r(Δ) for past keys, Δ = i - j (future keys mirror: r(-Δ) = -r(Δ)); 'a..b' = min..max over "
               "query frames:")
    out.extend(_profile_text(data["profile"]["r_min"], data["profile"]["r_max"]))
    out.append("")
    s, b = data["tokens_per_frame"], tsa["block_size"]
    out.append(f"Attention density (fraction of dense attention; S = {s} tokens per frame)")
    out.append(f"  {'':34s} {f'{b}-token blocks':>16s} {'token pairs':>12s}")
    label = f"TSA (d1={tsa['d1']}, d2={tsa['d2']}, stripe {tsa['stripe_tokens']})"
    out.append(f"  {label:34s} {tsa['block_density']:16.3f} {tsa['token_density']:12.3f}")
    label = f"sliding window (±{win['window']}{', sink' if win['sink'] else ''})"
    out.append(f"  {label:34s} {win['block_density']:16.3f} {win['token_density']:12.3f}")
    return "\n".join(out)


def explain_memory(num_frames: int, tokens_per_frame: int) -> int:
    """Estimated peak bytes of :func:`explain_data` at ``num_frames`` temporal tokens: its block tables hold
    one entry per pair of pieces (a frame cut at 128-token block boundaries), about 96 bytes per pair at
    their peak (measured at 81-241 frames of 1560 tokens: 85-119)."""
    pieces = -(-num_frames * tokens_per_frame // BLOCK_SIZE) + num_frames
    return 96 * pieces * pieces


def _available_memory() -> int:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``; elsewhere 8 GiB)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def _head_group(text: str) -> int | str:
    """``--head-group``: 'auto' or an int >= 1."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an int >= 1 (heads per group), got {text!r}")
    return value


def memory_table(*, heads: int, head_dim: int, height: int, width: int, frames: Sequence[int], trained_frames: int,
                 dtype: str = "bf16", text_tokens: int = 0, head_group: int | str = "auto") -> dict[str, Any]:
    """The estimated peak memory of one attention call (``freeloc.attention.memory.estimate_peak``) at each
    of ``frames`` (latent frames), dense, TSA and VRPR, as a JSON-ready dict with one row per length;
    ``head_group``: ``AttentionOptions.head_group``."""
    from ..attention.memory import estimate_peak

    rows = []
    options = AttentionOptions(head_group=head_group)
    for f in frames:
        peaks = estimate_peak(heads=heads, head_dim=head_dim, dtype=_DTYPES[dtype], height=height, width=width,
                              frames=f, trained_frames=trained_frames, text_tokens=text_tokens, options=options)
        dense = peaks["dense"].bytes
        rows.append({"frames": f, "tokens": text_tokens + f * height * width,
                     **{name: {"bytes": p.bytes, "x_dense": p.bytes / dense, "head_group": p.head_group,
                               "groups": p.groups} for name, p in peaks.items()}})
    return {"heads": heads, "head_dim": head_dim, "height": height, "width": width, "dtype": dtype,
            "text_tokens": text_tokens, "trained_frames": trained_frames, "head_group": head_group, "rows": rows}


def memory_text(data: dict[str, Any], title: str) -> str:
    """``memory_table``'s dict as the table ``freeloc explain --memory`` prints."""
    out = [f"{title}: {data['heads']} heads x {data['head_dim']}, {data['height']} x {data['width']} = "
           f"{data['height'] * data['width']} tokens per frame, {data['dtype']}, trained on {data['trained_frames']} "
           f"latent frames, head_group={data['head_group']}",
           "peak memory of one attention call above q, k, v (GiB; TSA and VRPR: x dense, heads per group)", "",
           "| latent frames | length (x trained) | tokens | dense | TSA | VRPR |", "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        cells = [f"{r[m]['bytes'] / 2**30:.2f} ({r[m]['x_dense']:.2f}x, {r[m]['head_group']})" for m in ("tsa", "vrpr")]
        length = (r["frames"] - 1) / max(1, data["trained_frames"] - 1)
        out.append(f"| {r['frames']} | {length:.3g}x | {r['tokens']:,} | {r['dense']['bytes'] / 2**30:.2f} | "
                   f"{cells[0]} | {cells[1]} |")
    return "\n".join(out)


def _cmd_memory(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    preset = MEMORY_PRESETS[args.model]
    shape = {name: getattr(args, name) if getattr(args, name) is not None else preset[name]
             for name in ("heads", "head_dim", "height", "width")}
    factor = 1 if args.latent else args.temporal_factor
    trained = (video_to_latent(args.trained_frames, factor) if args.trained_frames is not None
               else video_to_latent(preset["trained_frames"], args.temporal_factor))
    frames = ([video_to_latent(args.num_frames, factor)] if args.num_frames is not None
              else [(trained - 1) * m + 1 for m in (1, 2, 4)])  # 1x, 2x, 4x in video frames
    data = memory_table(**shape, frames=frames, trained_frames=trained, dtype=args.dtype, text_tokens=args.text_tokens,
                        head_group=args.head_group)
    changed = any(getattr(args, name) is not None for name in shape)
    print(json.dumps(data) if args.json else memory_text(data, args.model + (" (shape changed)" if changed else "")))
    return 0


def _cmd_explain(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.memory:
        if args.png is not None:
            parser.error("--png draws the explanation, not --memory's table: give one of them")
        return _cmd_memory(args, parser)
    for flag, value in (("--num-frames", args.num_frames), ("--trained-frames", args.trained_frames)):
        if value is None:
            parser.error(f"{flag} is required (without --memory)")
    _check_outputs(parser, ("--png", args.png, False))
    if args.png is not None:
        require("matplotlib", "app", "freeloc explain --png")  # a missing extra stops it before any work
    f = args.num_frames if args.latent else video_to_latent(args.num_frames, args.temporal_factor)
    need, have = explain_memory(f, args.tokens_per_frame), _available_memory()
    if need > have:
        parser.error(f"--num-frames {args.num_frames}: explaining {f} latent frames of {args.tokens_per_frame} tokens "
                     f"needs about {need / 2**30:,.1f} GiB of memory and {have / 2**30:,.1f} GiB are available; "
                     f"choose a shorter length or fewer --tokens-per-frame")
    data = explain_data(args.num_frames, args.trained_frames, args.tokens_per_frame,
                        latent=args.latent, temporal_factor=args.temporal_factor)
    if args.png is not None:
        explain_png(data, args.png)
        data["png"] = str(args.png)
    if args.json:
        print(json.dumps(data))
    else:
        print(explain_text(data))
        if args.png is not None:
            print(f"\nwrote {args.png}")
    return 0


def _check_outputs(parser: argparse.ArgumentParser, *outputs: tuple[str, Path | None, bool]) -> None:
    """Every ``(flag, path, is_folder)`` output can be written, before any work (usage error otherwise)."""
    for flag, path, folder in outputs:
        if path is not None:
            try:
                check_writable(path, flag, folder)
            except ValueError as err:
                parser.error(str(err))


def _check_model(parser: argparse.ArgumentParser, model: str) -> None:
    """A ``--model`` written as a local path must exist (a hub id is ``org/name``)."""
    if not Path(model).expanduser().exists() and (model.startswith((".", "/", "~")) or model.count("/") > 1
                                                  or os.sep != "/" and os.sep in model):
        parser.error(f"--model: no such local folder {model!r} (a hub id looks like 'org/name')")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``freeloc`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit code.

    Invalid arguments exit with code 2 and a message naming the value (argparse's convention). An error
    while working (a model that cannot be loaded, a bad plan file, a missing extra) prints one line and
    returns 1; Ctrl-C prints one line and returns 130. Outputs are written whole or not at all.
    """
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else sys.argv[1:])
    try:
        return int(args.func(args, args.subparser))
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        sys.stdout = open(os.devnull, "w")  # keeps Python from failing again when it flushes at exit
        return 0
    except KeyboardInterrupt:
        print(f"freeloc {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"freeloc {args.command}: error: {first}", file=sys.stderr)
        return 1
