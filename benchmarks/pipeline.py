"""One forward of the Wan 2.1 1.3B transformer at 4x its trained length: direct against FreeLOC and its methods.

The transformer is ``diffusers.WanTransformer3DModel`` at the real Wan 2.1 T2V 1.3B config (30 layers,
12 heads x 128, dim 1536, ffn 8960, text dim 4096), with random weights built from the config. Its input
is 321 video frames (81 latent frames, 4x the trained 81 video = 21 latent frames), Gaussian latents, one
timestep and Gaussian text tokens. Methods (``--methods``):

* ``direct``: the model as it is (diffusers' dense SDPA), no hooks;
* ``freeloc``: the shipped Wan 2.1 1.3B layer plan (TSA or VRPR per layer);
* ``tsa``, ``vrpr``: that method on every layer.

For each: seconds per forward and its ratio to ``direct`` timed in the same run, the seconds spent in the
self-attention modules (``blocks.{i}.attn1``, timed by forward pre/post hooks on every method alike) and
their share of the forward and of the blocks' time, and the peak memory of one forward above what the
process held before it, with its ratio to ``direct``.

Shapes (``--shape``; ``--height``, ``--width``, ``--frames``, ``--layers`` override a shape's values):

* ``small`` (CPU): 32 x 48 pixels (2 x 3 tokens a frame, 486 tokens), all 30 layers: the per-layer fixed
  costs, where attention is a small part of the forward;
* ``attention-heavy`` (CPU): 192 x 224 pixels (12 x 14 tokens a frame, 13,608 tokens), where self-attention
  is over half of a block's time. A whole forward there takes many minutes on a CPU, so ``--layers`` times
  a slice of consecutive blocks: a model with that many blocks, given the plan's methods of exactly those
  layers; by default layers 0-6, whose methods have the whole plan's mix (4 TSA, 3 VRPR; the plan 17 TSA,
  13 VRPR): about 70 s a forward on 2 CPU cores, 14 minutes for ``--methods direct,freeloc``
  (``--layers 1-2``, one layer of each, is quicker);
* ``gpu``: 480 x 832 (30 x 52 tokens a frame, 126,360 tokens), bf16 (the modules the model class keeps in
  float32 stay in float32, as ``from_pretrained(torch_dtype=torch.bfloat16)`` loads them), all 30 layers;
* ``tiny``: a 2-layer, 2-head model at a few tokens a frame, for a check that the script runs.

Targets at ``attention-heavy`` (CPU): the plan's forward <= 0.95 x direct, its peak memory <= direct + 10%.

Timing: every method runs one warm-up forward (plans, masks, caches), then the repetitions run interleaved
(direct, freeloc, tsa, vrpr, direct, ...) and each method's median is taken, so that a slow phase of the
machine hits every method alike; the fastest forward of each method is shown beside it (on a machine shared
with other jobs, the one least slowed by them). The methods' models are copies sharing one set of weights, each with its
own hooks. Memory: on CUDA, ``torch.cuda.max_memory_allocated`` over one forward after the warm-up; on CPU,
where PyTorch keeps no allocator statistics, the resident-memory high-water mark (Linux ``VmHWM``, reset
through ``/proc/self/clear_refs`` after a warm-up forward) of a fresh process per method, glibc told to
return every block of 64 KiB or more to the system when it is freed, so that the mark is the forward's live
memory; measured after all timings, since those processes' load would slow the timings beside them.

    python benchmarks/pipeline.py [--shape small|attention-heavy|gpu|tiny] [--reps 3]
                                  [--methods direct,freeloc,tsa,vrpr] [--layers 0-3]
                                  [--device cuda --dtype bfloat16 --height 480 --width 832 --frames 321]
                                  [--no-memory] [--json out.json] [--png out.png]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

import freeloc

METHODS = ("direct", "freeloc", "tsa", "vrpr")
TRAINED_VIDEO_FRAMES = 81  # Wan 2.1: 21 latent frames
PLAN = "wan2.1-t2v-1.3b"

#: Wan 2.1 T2V 1.3B's transformer config (its ``config.json``).
WAN_1_3B: dict[str, Any] = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
#: The same architecture, a few channels wide: for a check that the script runs.
TINY: dict[str, Any] = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=32, text_dim=64, freq_dim=32,
                            ffn_dim=128)

#: Presets of ``--shape``: pixels (VAE factor 8, patch 2: 16 pixels a token side), video frames, layers, text.
SHAPES: dict[str, dict[str, Any]] = {
    "small": dict(height=32, width=48, frames=321, layers="0-29", text=512, device="cpu", dtype="float32"),
    "attention-heavy": dict(height=192, width=224, frames=321, layers="0-6", text=512, device="cpu",
                            dtype="float32"),
    "gpu": dict(height=480, width=832, frames=321, layers="0-29", text=512, device="cuda", dtype="bfloat16"),
    "tiny": dict(height=32, width=32, frames=321, layers="1-2", text=16, device="cpu", dtype="float32"),
}

FORWARD_TARGET = 0.95  # the plan's forward, x direct
MEMORY_TARGET = 1.10  # the plan's peak memory, x direct


def layer_range(spec: str) -> range:
    """``"0-3"`` -> layers 0, 1, 2, 3; ``"5"`` -> layer 5."""
    first, _, last = spec.partition("-")
    return range(int(first), int(last or first) + 1)


def plan_slice(layers: range) -> freeloc.LayerPlan:
    """The shipped plan's entries of ``layers``, as a plan of a model with exactly those blocks."""
    plan = freeloc.LayerPlan.published(PLAN)
    if layers.start < 0 or layers.stop > plan.num_layers or len(layers) == 0:
        raise SystemExit(f"--layers must lie in 0-{plan.num_layers - 1}, got {layers.start}-{layers.stop - 1}")
    return freeloc.LayerPlan(methods=[plan.methods[i] for i in layers], params=[plan.params[i] for i in layers],
                             trained_frames=plan.trained_frames,
                             model=dict(plan.model, num_layers=len(layers)), meta=dict(plan.meta))


def build_model(cfg: dict[str, Any], layers: range, device: str, dtype: torch.dtype) -> torch.nn.Module:
    import diffusers

    torch.manual_seed(0)
    with torch.device(device):
        model = diffusers.WanTransformer3DModel(**dict(cfg, num_layers=len(layers)))
    model.eval().requires_grad_(False)
    # as ``from_pretrained(torch_dtype=...)`` loads it: the modules the class names stay in float32
    keep = set(model._keep_in_fp32_modules or [])
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        tensor.data = tensor.data.to(torch.float32 if keep & set(name.split(".")) else dtype)
    return model


def make_inputs(cfg: dict[str, Any], args: argparse.Namespace, device: str, dtype: torch.dtype) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    latent_frames = (args.frames - 1) // 4 + 1
    x = torch.randn(1, cfg["in_channels"], latent_frames, args.height // 8, args.width // 8, generator=g)
    text = torch.randn(1, args.text, cfg["text_dim"], generator=g)
    return dict(hidden_states=x.to(device, dtype), timestep=torch.tensor([500], device=device),
                encoder_hidden_states=text.to(device, dtype), return_dict=False)


class ModuleClock:
    """Total time spent inside some modules (forward pre/post hooks): CUDA events on a GPU, the clock on a CPU."""

    def __init__(self, modules: list[torch.nn.Module], cuda: bool) -> None:
        self.cuda = cuda
        self.spans: list[tuple[Any, Any]] = []
        self._open: list[Any] = []
        self.handles = [h for m in modules for h in (m.register_forward_pre_hook(self._start),
                                                     m.register_forward_hook(self._stop))]

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _start(self, *_: Any) -> None:
        self._open.append(self._now())

    def _stop(self, *_: Any) -> None:
        self.spans.append((self._open.pop(), self._now()))

    def take(self) -> float:
        """Seconds inside the modules since the last ``take`` (call after the device is synchronized)."""
        if self.cuda:
            total = sum(a.elapsed_time(b) for a, b in self.spans) / 1000
        else:
            total = sum(b - a for a, b in self.spans)
        self.spans.clear()
        return total


class Runner:
    """One method's model (a copy sharing the weights), its hooks and clocks."""

    def __init__(self, name: str, base: torch.nn.Module, plan: freeloc.LayerPlan, inputs: dict[str, Any],
                 cuda: bool) -> None:
        self.name = name
        shared = {id(t): t for t in (*base.parameters(), *base.buffers())}
        self.model = copy.deepcopy(base, memo=shared)  # new modules, the same weight tensors
        self.session = None
        if name == "freeloc":
            self.session = freeloc.enable(self.model, plan=plan, trained_frames=TRAINED_VIDEO_FRAMES)
        elif name != "direct":
            self.session = freeloc.enable(self.model, method=name, trained_frames=TRAINED_VIDEO_FRAMES)
        blocks = list(self.model.blocks)
        self.attention = ModuleClock([b.attn1 for b in blocks], cuda)
        self.blocks = ModuleClock(blocks, cuda)
        self.inputs = inputs
        self.cuda = cuda

    def forward(self) -> tuple[float, float, float, torch.Tensor]:
        """Seconds of one forward, of its self-attention modules and of its blocks; the output."""
        sync(self.cuda)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.model(**self.inputs)[0]
        sync(self.cuda)
        return time.perf_counter() - t0, self.attention.take(), self.blocks.take(), out


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def setting(args: argparse.Namespace) -> tuple[dict[str, Any], range, torch.dtype]:
    cfg = TINY if args.shape == "tiny" else WAN_1_3B
    return cfg, layer_range(args.layers), getattr(torch, args.dtype)


def bench(args: argparse.Namespace, names: list[str]) -> list[dict[str, Any]]:
    cfg, layers, dtype = setting(args)
    cuda = args.device == "cuda"
    t0 = time.perf_counter()
    base = build_model(cfg, layers, args.device, dtype)
    inputs = make_inputs(cfg, args, args.device, dtype)
    plan = plan_slice(layers)
    runners = [Runner(name, base, plan, inputs, cuda) for name in names]
    print(f"  model built in {time.perf_counter() - t0:.1f} s; plan of layers {args.layers}: "
          f"{' '.join(plan.methods)}", flush=True)
    peaks: dict[str, float] = {}
    for r in runners:
        seconds, _, _, out = r.forward()
        finite = bool(torch.isfinite(out).all())
        print(f"  {r.name}: warm-up forward {seconds:.2f} s{'' if finite else ' (output not finite)'}", flush=True)
        if cuda:  # one more forward, for its peak
            del out
            gc.collect()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            r.forward()
            peaks[r.name] = (torch.cuda.max_memory_allocated() - before) / 2**20
    times: dict[str, list[tuple[float, float, float]]] = {r.name: [] for r in runners}
    for rep in range(args.reps):
        line = []
        for r in runners:
            seconds, attention, blocks, _ = r.forward()
            times[r.name].append((seconds, attention, blocks))
            line.append(f"{r.name} {seconds:.2f} s")
        print(f"  repetition {rep + 1}/{args.reps}: {', '.join(line)}", flush=True)
    rows = []
    for r in runners:
        ts = times[r.name]
        seconds = statistics.median(t[0] for t in ts)
        attention = statistics.median(t[1] for t in ts)
        blocks = statistics.median(t[2] for t in ts)
        rows.append(dict(method=r.name, seconds=seconds, best_seconds=min(t[0] for t in ts),
                         attention_seconds=attention,
                         attention_share=attention / seconds, attention_share_of_blocks=attention / blocks,
                         peak_mib=peaks.get(r.name, float("nan"))))
        if r.session is not None:
            r.session.remove()
    ratios(rows)
    return rows


def ratios(rows: list[dict[str, Any]]) -> None:
    direct = next((r for r in rows if r["method"] == "direct"), None)
    for r in rows:
        r["time_ratio"] = r["seconds"] / direct["seconds"] if direct else float("nan")
        r["best_ratio"] = r["best_seconds"] / direct["best_seconds"] if direct else float("nan")
        ok = direct is not None and direct["peak_mib"] > 0
        r["memory_ratio"] = r["peak_mib"] / direct["peak_mib"] if ok else float("nan")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def peak_of_one_forward(args: argparse.Namespace, name: str) -> float:
    """In this process: MiB by which one forward (after a warm-up forward) raises resident memory at its peak."""
    cfg, layers, dtype = setting(args)
    base = build_model(cfg, layers, "cpu", dtype)
    runner = Runner(name, base, plan_slice(layers), make_inputs(cfg, args, "cpu", dtype), cuda=False)
    runner.forward()
    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:  # reset the high-water mark to the current RSS
        fh.write("5")
    out = runner.forward()
    peak = _status_kib("VmHWM")
    del out
    return (peak - before) / 1024


def add_cpu_memory(args: argparse.Namespace, rows: list[dict[str, Any]], argv: list[str]) -> None:
    """Each method's :func:`peak_of_one_forward` in a fresh process; NaN where it cannot be measured."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    for r in rows:
        print(f"  peak memory of {r['method']}: a fresh process ...", flush=True)
        cmd = [sys.executable, __file__, *argv, "--peak-of", r["method"]]
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
        try:
            r["peak_mib"] = float(run.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            print(f"  peak memory of {r['method']}: not measured ({run.stderr.strip().splitlines()[-1:]})")
    ratios(rows)


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """Whether the plan meets the forward and memory targets (they are set for the attention-heavy shape)."""
    plan = next((r for r in rows if r["method"] == "freeloc"), None)
    direct = next((r for r in rows if r["method"] == "direct"), None)
    if plan is None or direct is None:
        return ["targets: need both direct and freeloc in --methods"]
    time_ok = plan["time_ratio"] <= FORWARD_TARGET
    lines = [f"target forward <= {FORWARD_TARGET:.2f} x direct: {plan['time_ratio']:.2f} (medians), "
             f"{'met' if time_ok else 'MISSED'}; fastest forwards: {plan['best_ratio']:.2f}"]
    if plan["memory_ratio"] == plan["memory_ratio"]:  # measured (not NaN)
        mem_ok = plan["memory_ratio"] <= MEMORY_TARGET
        over = plan["peak_mib"] - MEMORY_TARGET * direct["peak_mib"]
        lines.append(f"target peak <= {MEMORY_TARGET:.2f} x direct ({MEMORY_TARGET * direct['peak_mib']:.0f} MiB): "
                     f"{plan['memory_ratio']:.2f} ({plan['peak_mib']:.0f} MiB), "
                     + ("met" if mem_ok else f"MISSED by {over:.0f} MiB"))
    else:
        lines.append("target peak memory: not measured")
    return lines


def report(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    print(f"{'method':8} {'s/forward':>10} {'x direct':>9} {'fastest s':>10} {'x direct':>9} "
          f"{'attn s':>8} {'attn share':>11} {'of blocks':>10} "
          f"{'peak MiB':>9} {'x direct':>9}")
    for r in rows:
        print(f"{r['method']:8} {r['seconds']:10.3f} {r['time_ratio']:9.2f} {r['best_seconds']:10.3f} "
              f"{r['best_ratio']:9.2f} {r['attention_seconds']:8.3f} "
              f"{r['attention_share']:11.2f} {r['attention_share_of_blocks']:10.2f} {r['peak_mib']:9.1f} "
              f"{r['memory_ratio']:9.2f}")
    direct = next((r for r in rows if r["method"] == "direct"), None)
    if direct is not None:
        heavy = round(direct["attention_share_of_blocks"], 2) >= 0.5
        print(f"self-attention, direct: {direct['attention_share_of_blocks']:.0%} of the blocks' time "
              f"({'at least' if heavy else 'under'} half: the targets are set where it is at least half)")
    for line in targets(rows):
        print(line)


def plot(rows: list[dict[str, Any]], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 3.4))
    ax.bar([r["method"] for r in rows], [r["time_ratio"] for r in rows], color="tab:blue")
    ax.axhline(FORWARD_TARGET, color="tab:orange", linestyle=":", label=f"target {FORWARD_TARGET}")
    ax.set_ylabel("time per forward / direct")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="small")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--layers", default=None, help="the blocks timed, e.g. 0-3 (a model with those blocks only)")
    ap.add_argument("--height", type=int, default=None, help="video height in pixels (latent: / 8)")
    ap.add_argument("--width", type=int, default=None, help="video width in pixels (latent: / 8)")
    ap.add_argument("--frames", type=int, default=None, help="video frames (321: 81 latent frames, 4x trained)")
    ap.add_argument("--text", type=int, default=None, help="text tokens (default 512)")
    ap.add_argument("--device", default=None, help="cpu or cuda")
    ap.add_argument("--dtype", default=None, help="float32, bfloat16...")
    ap.add_argument("--no-memory", action="store_true", help="CPU: time only, no peak-memory processes")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--png", default=None, help="also plot the time ratios to this PNG")
    ap.add_argument("--peak-of", default=None, help=argparse.SUPPRESS)  # the child of add_cpu_memory
    args = ap.parse_args(argv)
    for key, value in SHAPES[args.shape].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.peak_of:
        print(f"{peak_of_one_forward(args, args.peak_of):.3f}")
        return
    names = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; accepted: {', '.join(METHODS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run a CPU shape (--shape small, attention-heavy, tiny)")
    cfg, layers, _ = setting(args)
    h, w = args.height // 16, args.width // 16
    latent = (args.frames - 1) // 4 + 1
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    title = (f"Wan 2.1 1.3B{' (tiny)' if args.shape == 'tiny' else ''}, layers {args.layers} of 30 "
             f"({len(layers)} blocks), {args.frames} frames = {latent} latent x {h}x{w} = {latent * h * w} tokens, "
             f"{args.text} text tokens, {args.dtype}, {device}")
    print(f"torch {torch.__version__}; {cfg['num_attention_heads']} heads x {cfg['attention_head_dim']}, "
          f"ffn {cfg['ffn_dim']}; trained {TRAINED_VIDEO_FRAMES} frames (4x: 321)")
    print(f"{title}: {args.reps} repetitions, interleaved", flush=True)
    rows = bench(args, names)
    if args.device == "cpu" and not args.no_memory:
        if os.path.exists("/proc/self/clear_refs"):
            print("peak memory, measured after all timings", flush=True)
            add_cpu_memory(args, rows, argv)
        else:
            print("peak memory: not measured (no /proc/self/clear_refs on this system)")
    report(title, rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(title=title, rows=rows), fh, indent=2)
    if args.png:
        plot(rows, title, args.png)


if __name__ == "__main__":
    main()
