"""Dense SDPA vs TSA vs VRPR: time and memory, as ratios to dense measured in the same run.

CPU (always): the ``chunked`` backend at scaled-down Wan shapes: 81 latent frames, 2 heads x 64,
fp32, with 12 x 13 = 156 tokens per frame (the target check; Wan 480p has 30 x 52 = 1560) and
6 x 10 = 60 tokens per frame (small frames, where the fixed cost of each pass weighs most).
CUDA (when present): the ``flex`` backend at the full Wan2.1-1.3B shape (81 frames x 1560 tokens,
12 heads x 128, bf16). Dense is ``attend(method=None)``: SDPA on q/k rotated once, as the model does.

Targets: TSA time <= 1.3 x block density x dense; VRPR time <= 1.5 x dense.

    python benchmarks/attention.py [--reps 7] [--shapes 12x13,6x10] [--variants packed,aligned,stacks]
                                   [--json out.json] [--png out.png]

``--variants`` (or ``--flex-layouts``) adds rows such as ``tsa:packed`` on CUDA, beside the default
choice: ``aligned`` / ``packed`` force that flex token layout; ``stacks`` runs the sliding key windows
of the bands without a stripe as stacks (one fused dense call each, no mask: cuDNN's kernel where it
passes its check) and the rest on flex (``AttentionOptions(unstriped="stacks")``, the default where
such a kernel passes); ``flex`` runs every band on flex (``unstriped="flex"``); ``split`` runs every
band without a stripe as the chunked backend does and the striped ones on flex
(``unstriped="chunked"``); ``chunked`` runs the chunked backend for the whole call; ``tiles64`` and
``tiles128`` run the default path with key blocks of 64 (keys shifted in their padded frames) or 128 in
the striped flex calls (``stripe_key_block``; the default, ``"auto"``, is 64 at the CUDA shape);
``prescale`` runs the default path with q pre-scaled inside the flex kernels
(``flex_kernel_options={"PRESCALE_QK": True}``). Each variant is an :class:`freeloc.AttentionOptions`.

Timing: every method is warmed up (plans, block masks, compilation), then the repetitions run
interleaved (dense, TSA, VRPR, dense, ...) and each method's median is taken, so that a slow phase
of the machine hits every method alike. Memory: the peak of one call above what was allocated
before it. On CUDA from ``torch.cuda.max_memory_allocated``; on CPU, where PyTorch keeps no allocator
statistics, from the resident-memory high-water mark of a fresh process per method (Linux ``VmHWM``,
reset through ``/proc/self/clear_refs`` after a warm-up call; glibc told to return every block of
64 KiB or more to the system when it is freed, so that the mark is the call's live memory), after all
timings, since the load of those processes slows the timings that follow them. On CPU
the table also gives the largest single attention call in query x key tokens (dense: one N x N call
that the fused kernel tiles; chunked: a pass, bounded by a chunk, or a stack of one-frame batch
entries over their key windows, which the kernel tiles like dense and which needs no mask and no key
copy) and the fraction of the N x N pairs the plan computes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

import freeloc
from freeloc.attention import AttentionOptions, attend, band_set_for
from freeloc.attention._kernels import checked_kernels
from freeloc.attention._passes import plan_cost, plan_passes
from freeloc.methods import Method

CPU_SHAPE = dict(frames=81, height=12, width=13, heads=2, head_dim=64, dtype="float32", backend="chunked")
CUDA_SHAPE = dict(frames=81, height=30, width=52, heads=12, head_dim=128, dtype="bfloat16", backend="flex")
TRAINED = 21
METHODS = ("dense", "tsa", "vrpr")


def make(shape: dict, device: str) -> tuple[torch.Tensor, ...]:
    n = shape["frames"] * shape["height"] * shape["width"]
    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = getattr(torch, shape["dtype"])
    return tuple(torch.randn(1, n, shape["heads"], shape["head_dim"], generator=g).to(device, dtype)
                 for _ in range(3))


#: Settings a CUDA row may force (``tsa:stacks``...), as :class:`freeloc.AttentionOptions`: the flex token
#: layout (``aligned``, ``packed``); what part of the call runs on the chunked backend's fused dense calls:
#: the sliding windows of the unstriped bands (``stacks``), nothing (``flex``) or all the unstriped bands
#: (``split``: ``unstriped="chunked"``); or the chunked backend for the whole call (``chunked``); or key
#: blocks of 64 or 128 in the striped flex calls (``tiles64`` / ``tiles128``; the default, ``"auto"``,
#: takes 64 at this shape); or the default path with q pre-scaled in the flex kernels (``prescale``).
VARIANTS: dict[str, AttentionOptions] = {
    "auto": AttentionOptions(),
    "aligned": AttentionOptions(layout="aligned"),
    "packed": AttentionOptions(layout="packed"),
    "stacks": AttentionOptions(unstriped="stacks"),
    "flex": AttentionOptions(unstriped="flex"),
    "split": AttentionOptions(unstriped="chunked"),
    "chunked": AttentionOptions(),
    "tiles64": AttentionOptions(stripe_key_block=64),
    "tiles128": AttentionOptions(stripe_key_block=128),
    "prescale": AttentionOptions(flex_kernel_options={"PRESCALE_QK": True}),
}


def method_of(name: str) -> Method | None:
    """``dense``, ``tsa``, ``vrpr``, or one of them with a variant: ``tsa:packed``, ``vrpr:chunked``."""
    return {"dense": None, "tsa": freeloc.TSA(cap=TRAINED - 1),
            "vrpr": freeloc.VRPR.for_length(81, TRAINED)}[name.split(":")[0]]


def runner(name: str, shape: dict, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], torch.Tensor]:
    grid = (shape["frames"], shape["height"], shape["width"])
    rot = freeloc.RotaryLayout.wan(shape["head_dim"])
    method = method_of(name)
    # dense: plain SDPA on q/k rotated once at the original positions (what the unmodified model computes)
    backend = shape["backend"] if method is not None else "auto"
    variant = name.split(":")[1] if ":" in name else "auto"
    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r} in {name!r}; accepted: {', '.join(VARIANTS)}")
    if variant == "chunked":
        backend = "chunked"
    options = VARIANTS[variant]

    def run() -> torch.Tensor:
        return attend(q, k, v, grid=grid, method=method, rotary=rot, backend=backend, options=options)

    return run


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def chunked_work(name: str, shape: dict) -> tuple[int, float]:
    """Largest call (query x key tokens) and computed fraction of N x N of the chunked plan."""
    s = shape["height"] * shape["width"]
    n = shape["frames"] * s
    m = method_of(name)
    if m is None:
        return n * n, 1.0
    # the band set attend plans with (bands sharing query positions aligned)
    bands = band_set_for(m, shape["frames"], s, freeloc.RotaryLayout.wan(shape["head_dim"])).aligned()
    passes = plan_passes(bands, s, shape["head_dim"])
    return max(plan_cost((p,), s) for p in passes), plan_cost(passes, s) / n**2


def bench(device: str, shape: dict, reps: int, names: tuple[str, ...] = METHODS) -> list[dict]:
    q, k, v = make(shape, device)
    s = shape["height"] * shape["width"]
    rot = freeloc.RotaryLayout.wan(shape["head_dim"])
    fns = {name: runner(name, shape, q, k, v) for name in names}
    peaks = {}
    for name, fn in fns.items():  # warm-up, and one call's peak memory on CUDA
        if device == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        fn()
        sync(device)
        peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else float("nan")
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        print(f"  repetition {r + 1}/{reps}", flush=True)
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    rows = []
    for name in names:
        m = method_of(name)
        density = 1.0 if m is None else band_set_for(m, shape["frames"], s, rot).block_density(s, 128)
        call, computed = chunked_work(name, shape) if shape["backend"] == "chunked" else (0, float("nan"))
        rows.append(dict(method=name, seconds=statistics.median(times[name]), peak_mib=peaks[name],
                         block_density=density, largest_call=call, computed=computed))
    dense = rows[0]
    for r in rows:
        r["time_ratio"] = r["seconds"] / dense["seconds"]
    memory_ratios(rows)
    return rows


def memory_ratios(rows: list[dict]) -> None:
    dense = rows[0]
    for r in rows:
        r["memory_ratio"] = r["peak_mib"] / dense["peak_mib"] if dense["peak_mib"] > 0 else float("nan")


def add_cpu_memory(rows: list[dict], shape: dict) -> None:
    """Peak memory of each method's call at this CPU shape (:func:`cpu_peak_mib`), into ``rows``. Run after
    all timings: the measuring processes' load slows the chunked path's timing right after them."""
    print(f"  peak memory at {shape['height']}x{shape['width']}: one fresh process per method", flush=True)
    for r in rows:
        r["peak_mib"] = cpu_peak_mib(r["method"], shape)
    memory_ratios(rows)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        match = re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.MULTILINE)
    if match is None:
        raise OSError(f"no {field} in /proc/self/status")
    return int(match.group(1))


def peak_of_one_call(name: str, shape: dict) -> float:
    """In this process: MiB by which one call (after a warm-up call) raises resident memory at its peak."""
    q, k, v = make(shape, "cpu")
    fn = runner(name, shape, q, k, v)
    fn()
    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:  # reset the high-water mark to the current RSS
        fh.write("5")
    out = fn()
    peak = _status_kib("VmHWM")
    del out
    return (peak - before) / 1024


def cpu_peak_mib(name: str, shape: dict) -> float:
    """:func:`peak_of_one_call` in a fresh process, glibc returning freed blocks of 64 KiB or more to the
    system (so that resident memory is live memory); NaN where that cannot be measured (not Linux)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--peak-of", name, "--shapes", f"{shape['height']}x{shape['width']}"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    try:
        return float(run.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        print(f"  peak memory of {name}: not measured ({run.stderr.strip().splitlines()[-1:]})")
        return float("nan")


def exactness(device: str, shape: dict, names: tuple[str, ...] = METHODS[1:]) -> None:
    """Max difference of each timed row to the ``chunked`` backend (exact, bounded memory) at the same shape."""
    q, k, v = make(shape, device)
    grid = (shape["frames"], shape["height"], shape["width"])
    rot = freeloc.RotaryLayout.wan(shape["head_dim"])
    refs: dict[str, torch.Tensor] = {}
    for name in names:
        if name.endswith(":chunked"):
            continue
        base = name.split(":")[0]
        if base not in refs:
            refs[base] = attend(q, k, v, grid=grid, method=method_of(base), rotary=rot, backend="chunked").float()
        ref = refs[base]
        out = runner(name, shape, q, k, v)().float()
        print(f"  {name}: vs chunked, max |difference| {(out - ref).abs().max().item():.2e} "
              f"(outputs up to {ref.abs().max().item():.2f}, {shape['dtype']})")


def target(r: dict) -> str:
    if r["method"].startswith("tsa"):
        limit = 1.3 * r["block_density"]
        return f"<= {limit:.2f} (1.3 x density): {'met' if r['time_ratio'] <= limit else 'MISSED'}"
    if r["method"].startswith("vrpr"):
        return f"<= 1.50: {'met' if r['time_ratio'] <= 1.5 else 'MISSED'}"
    return ""


def report(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'method':12} {'time s':>8} {'x dense':>8} {'peak MiB':>9} {'x dense':>8} {'largest call':>13} "
          f"{'computed':>9} {'block dens':>10}  target")
    for r in rows:
        print(f"{r['method']:12} {r['seconds']:8.4f} {r['time_ratio']:8.2f} {r['peak_mib']:9.1f} "
              f"{r['memory_ratio']:8.2f} {r['largest_call']:13d} {r['computed']:9.3f} {r['block_density']:10.3f}"
              f"  {target(r)}")


def plot(results: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(results), 3.6))
    labels = list(results)
    width = 0.25
    for i, name in enumerate(METHODS):
        ratios = [next(r["time_ratio"] for r in results[label] if r["method"] == name) for label in labels]
        ax.bar([x + (i - 1) * width for x in range(len(labels))], ratios, width, label=name)
    for x, label in enumerate(labels):
        tsa = next(r for r in results[label] if r["method"] == "tsa")
        ax.hlines(1.3 * tsa["block_density"], x - 0.4, x + 0.4, colors="tab:orange", linestyles=":")
        ax.hlines(1.5, x - 0.4, x + 0.4, colors="tab:green", linestyles=":")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("time / dense (same run)")
    ax.set_title("attention time vs dense (dotted: targets)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--shapes", default="12x13,6x10",
                    help="CPU latent shapes HxW, comma-separated; 'none' skips the CPU part")
    ap.add_argument("--flex-layouts", "--variants", default="",
                    help="CUDA: also time TSA and VRPR with these settings (comma-separated: aligned, packed: "
                         "that flex layout forced; stacks: sliding windows of unstriped bands on the dense kernel, "
                         "the rest on flex; split: unstriped bands on the chunked backend; chunked: the chunked "
                         "backend), beside the default choice, interleaved in the same run")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--png", default=None, help="also plot the time ratios to this PNG")
    ap.add_argument("--peak-of", default=None, help=argparse.SUPPRESS)  # the child of cpu_peak_mib
    args = ap.parse_args()
    if args.peak_of:
        h, w = (int(x) for x in args.shapes.lower().split("x"))
        print(f"{peak_of_one_call(args.peak_of, dict(CPU_SHAPE, height=h, width=w)):.3f}")
        return
    results: dict[str, list[dict]] = {}
    cpu_shapes: dict[str, dict] = {}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    for spec in [] if args.shapes == "none" else args.shapes.split(","):
        h, w = (int(x) for x in spec.lower().split("x"))
        shape = dict(CPU_SHAPE, height=h, width=w)
        label = f"CPU {shape['frames']}x{h * w}"
        print(f"\n{label}: chunked backend, {shape['frames']} frames x {h}x{w} = {h * w} tokens/frame, "
              f"{shape['heads']} heads x {shape['head_dim']}, {shape['dtype']}")
        results[label] = bench("cpu", shape, args.reps)
        cpu_shapes[label] = shape
    if cpu_shapes:
        print("\nCPU peak memory, measured after all timings")
    for label, shape in cpu_shapes.items():
        add_cpu_memory(results[label], shape)
    for label in cpu_shapes:
        report(f"{label} (chunked)", results[label])
    if torch.cuda.is_available():
        shape = CUDA_SHAPE
        label = f"{torch.cuda.get_device_name()} 81x1560"
        print(f"\n{label}: flex backend, full Wan2.1-1.3B shape, 12 heads x 128, bf16")
        extra = tuple(f"{m}:{lay}" for lay in filter(None, args.flex_layouts.split(",")) for m in METHODS[1:])
        results[label] = bench("cuda", shape, args.reps, METHODS + extra)
        report(f"{label} (flex)", results[label])
        print(f"fused kernels chosen for the chunked calls: {checked_kernels() or 'none used'}")
        exactness("cuda", shape, METHODS[1:] + extra)
    else:
        print("\nCUDA: not available on this machine; the flex / full-shape part was not run")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    if args.png:
        plot(results, args.png)


if __name__ == "__main__":
    main()
