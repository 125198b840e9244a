"""UltraViCo's backends against dense attention: time, memory and exactness, as ratios to dense.

UltraViCo scales the positive logits of far pairs, which fused dense kernels cannot do. ``flex`` runs one
``flex_attention`` call with a ``score_mod`` (compiled on CUDA); ``chunked`` computes chunks of query
rows, one matmul each, with each frame pair's factor broadcast; ``reference`` (the definition) builds
every band's logits, in chunks of query rows past ``AttentionOptions.max_dense_tokens``. Dense is
``attend(method=None)``: SDPA on q/k rotated once, what the unmodified model computes, and the cost
UltraViCo is measured against.

CUDA (when present): the full Wan2.1-1.3B shape at 4x its trained length (81 latent frames x 1560
tokens, 12 heads x 128, bf16), dense vs ``flex``, ``chunked`` and ``reference``. CPU (always): a
scaled-down Wan shape (81 frames x 6 x 10 tokens, 2 heads x 64, fp32), dense vs ``chunked`` and
``reference`` (eager flex on the CPU builds the whole score matrix, so it is checked for exactness at
a small shape, not timed).

    python benchmarks/ultravico.py [--reps 5] [--cpu-only]

Timing: a warm-up call each (plans, compilation), then the repetitions interleaved, median per method.
Memory (CUDA): the peak of one call above what was allocated before it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import freeloc
from freeloc.attention import attend

TRAINED = 21
CPU_SHAPE = dict(frames=81, height=6, width=10, heads=2, head_dim=64, dtype=torch.float32)
CUDA_SHAPE = dict(frames=81, height=30, width=52, heads=12, head_dim=128, dtype=torch.bfloat16)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(device: str, shape: dict, backends: list[str], reps: int) -> None:
    f, h, w = shape["frames"], shape["height"], shape["width"]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, f * h * w, shape["heads"], shape["head_dim"], generator=g).to(device, shape["dtype"])
               for _ in range(3))
    rot = freeloc.RotaryLayout.wan(shape["head_dim"])
    method = freeloc.UltraViCo.for_length(f, TRAINED)
    calls: dict[str, Callable[[], torch.Tensor]] = {
        "dense": lambda: attend(q, k, v, grid=(f, h, w), method=None, rotary=rot),
        **{f"ultravico:{be}": (lambda be=be: attend(q, k, v, grid=(f, h, w), method=method, rotary=rot, backend=be))
           for be in backends},
    }
    print(f"{device}: {f} frames x {h * w} tokens ({f * h * w} tokens), {shape['heads']} heads x "
          f"{shape['head_dim']}, {str(shape['dtype']).removeprefix('torch.')}; {method}", flush=True)
    peaks, outs = {}, {}
    for name, fn in calls.items():
        print(f"  warm-up {name}", flush=True)
        if device == "cuda":
            _sync(device)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        outs[name] = fn()
        _sync(device)
        peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else float("nan")
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(reps):
        print(f"  repetition {r + 1}/{reps}", flush=True)
        for name, fn in calls.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    dense_t, dense_m = statistics.median(times["dense"]), peaks["dense"]
    print(f"{'method':<22}{'seconds':>10}{'x dense':>10}{'peak MiB':>11}{'x dense':>10}{'max |diff|':>14}")
    ref = outs.get("ultravico:reference")
    for name in calls:
        t = statistics.median(times[name])
        diff = "" if ref is None or name == "dense" else f"{(outs[name].float() - ref.float()).abs().max().item():.2e}"
        mem = (f"{peaks[name]:>11.1f}{peaks[name] / dense_m:>10.2f}" if device == "cuda"
               else f"{'-':>11}{'-':>10}")  # no allocator statistics on the CPU
        print(f"{name:<22}{t:>10.4f}{t / dense_t:>10.2f}{mem}{diff:>14}", flush=True)
    if ref is not None:
        print("  (max |diff|: against ultravico:reference; dense differs from it by "
              f"{(outs['dense'].float() - ref.float()).abs().max().item():.2e}, UltraViCo's change)", flush=True)


def cpu_flex_exactness() -> None:
    """Eager flex on the CPU against the reference at a small shape (the eager call builds every score)."""
    f, h, w = 33, 2, 3
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, f * h * w, 2, 64, generator=g) for _ in range(3))
    kw = dict(grid=(f, h, w), method=freeloc.UltraViCo.for_length(f, TRAINED), rotary=freeloc.RotaryLayout.wan(64))
    diff = (attend(q, k, v, backend="flex", **kw) - attend(q, k, v, backend="reference", **kw)).abs().max().item()
    print(f"cpu: eager flex vs reference at {f} frames x {h * w} tokens: max |diff| {diff:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cpu-only", action="store_true", help="skip the CUDA shape even where a GPU is present")
    args = ap.parse_args()
    if args.reps < 1:
        ap.error(f"--reps must be >= 1, got {args.reps}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads", flush=True)
    if torch.cuda.is_available() and not args.cpu_only:
        print(f"device: {torch.cuda.get_device_name(0)}")
        run("cuda", CUDA_SHAPE, ["flex", "chunked", "reference"], args.reps)
    run("cpu", CPU_SHAPE, ["chunked", "reference"], args.reps)
    cpu_flex_exactness()


if __name__ == "__main__":
    main()
