"""Dense SDPA vs TSA vs VRPR: time and peak memory, as ratios to dense measured in the same run.

CPU (always): the ``chunked`` backend at a scaled-down Wan shape (81 frames x 60 tokens/frame,
2 heads x 64, fp32). CUDA (when present): the ``flex`` backend at the full Wan2.1-1.3B shape
(81 frames x 1560 tokens/frame, 12 heads x 128, bf16).

Targets: TSA time <= 1.3 x block density x dense; VRPR time <= 1.5 x dense.

    python benchmarks/attention.py [--reps 5] [--height 6 --width 10] [--json out.json]

Peak memory is measured on CUDA with ``torch.cuda.max_memory_allocated``. On CPU (where PyTorch has no
allocator statistics) the table shows instead the largest single attention call, in query x key
tokens: dense is one N x N call (the fused kernel tiles it), the chunked passes are bounded by a chunk.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F  # noqa: N812

import freeloc
from freeloc.attention import attend, band_set_for
from freeloc.attention.chunked import plan_cost, plan_passes

CPU_SHAPE = dict(frames=81, height=6, width=10, heads=2, head_dim=64, dtype="float32", backend="chunked")
CUDA_SHAPE = dict(frames=81, height=30, width=52, heads=12, head_dim=128, dtype="bfloat16", backend="flex")
TRAINED = 21


def make(shape: dict, device: str) -> tuple[torch.Tensor, ...]:
    n = shape["frames"] * shape["height"] * shape["width"]
    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = getattr(torch, shape["dtype"])
    return tuple(torch.randn(1, n, shape["heads"], shape["head_dim"], generator=g).to(device, dtype)
                 for _ in range(3))


def method_of(name: str) -> freeloc.Method | None:
    return {"dense": None, "tsa": freeloc.TSA(cap=TRAINED - 1),
            "vrpr": freeloc.VRPR.for_length(81, TRAINED)}[name]


def runner(name: str, shape: dict, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):  # noqa: ANN201
    grid = (shape["frames"], shape["height"], shape["width"])
    rot = freeloc.RotaryLayout.wan(shape["head_dim"])
    if name == "dense":
        # plain SDPA on q/k rotated once (what the unmodified model computes)
        t = torch.arange(grid[0], dtype=torch.float64).repeat_interleave(grid[1] * grid[2]).to(q.device)
        hp = torch.arange(grid[1], dtype=torch.float64).repeat_interleave(grid[2]).repeat(grid[0]).to(q.device)
        wp = torch.arange(grid[2], dtype=torch.float64).repeat(grid[0] * grid[1]).to(q.device)

        def run() -> torch.Tensor:
            qr, kr = rot.rotate(q, t, hp, wp), rot.rotate(k, t, hp, wp)
            return F.scaled_dot_product_attention(qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2))

        return run
    method = method_of(name)
    return lambda: attend(q, k, v, grid=grid, method=method, rotary=rot, backend=shape["backend"])


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_it(fn, device: str, reps: int) -> float:  # noqa: ANN001
    fn()  # warm-up (plans, block masks, compilation)
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def largest_pass(name: str, shape: dict) -> int:
    """Query x key tokens of the largest attention call the chunked backend makes (dense: N x N)."""
    s = shape["height"] * shape["width"]
    n = shape["frames"] * s
    m = method_of(name)
    if m is None:
        return n * n
    bands = band_set_for(m, shape["frames"], s, freeloc.RotaryLayout.wan(shape["head_dim"]))
    return max(plan_cost((p,)) for p in plan_passes(bands, s, shape["head_dim"]))


def bench(device: str, shape: dict, reps: int) -> list[dict]:
    q, k, v = make(shape, device)
    s = shape["height"] * shape["width"]
    rot = freeloc.RotaryLayout.wan(shape["head_dim"])
    rows = []
    names = ["dense", "tsa", "vrpr"]
    for i, name in enumerate(names, 1):
        print(f"  [{i}/{len(names)}] {name} ...", flush=True)
        fn = runner(name, shape, q, k, v)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t = time_it(fn, device, reps)
        if device == "cuda":
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            peak = float("nan")
        call = largest_pass(name, shape) if shape["backend"] == "chunked" else 0
        m = method_of(name)
        density = 1.0 if m is None else band_set_for(m, shape["frames"], s, rot).block_density(s, 128)
        rows.append(dict(method=name, seconds=t, peak_mib=peak, block_density=density, largest_call=call))
    dense = rows[0]
    for r in rows:
        r["time_ratio"] = r["seconds"] / dense["seconds"]
        r["memory_ratio"] = r["peak_mib"] / dense["peak_mib"] if dense["peak_mib"] > 0 else float("nan")
    return rows


def report(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'method':8} {'time s':>9} {'x dense':>8} {'peak MiB':>9} {'x dense':>8} {'largest call':>13} "
          f"{'block dens':>10}  target")
    for r in rows:
        target = ""
        if r["method"] == "tsa":
            limit = 1.3 * r["block_density"]
            target = f"<= {limit:.2f} (1.3 x density): {'met' if r['time_ratio'] <= limit else 'MISSED'}"
        elif r["method"] == "vrpr":
            target = f"<= 1.50: {'met' if r['time_ratio'] <= 1.5 else 'MISSED'}"
        print(f"{r['method']:8} {r['seconds']:9.4f} {r['time_ratio']:8.2f} {r['peak_mib']:9.1f} "
              f"{r['memory_ratio']:8.2f} {r['largest_call']:13d} {r['block_density']:10.3f}  {target}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--height", type=int, default=CPU_SHAPE["height"], help="CPU shape: latent height")
    ap.add_argument("--width", type=int, default=CPU_SHAPE["width"], help="CPU shape: latent width")
    ap.add_argument("--json", type=str, default=None, help="also write the rows to this JSON file")
    args = ap.parse_args()
    results = {}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    shape = dict(CPU_SHAPE, height=args.height, width=args.width)
    print(f"CPU, chunked backend, {shape['frames']} frames x {shape['height'] * shape['width']} tokens/frame, "
          f"{shape['heads']} heads x {shape['head_dim']}, {shape['dtype']}")
    results["cpu"] = bench("cpu", shape, args.reps)
    report("CPU (chunked)", results["cpu"])
    if torch.cuda.is_available():
        shape = CUDA_SHAPE
        print(f"\nCUDA ({torch.cuda.get_device_name()}), flex backend, full Wan2.1-1.3B shape")
        results["cuda"] = bench("cuda", shape, args.reps)
        report(f"CUDA {torch.cuda.get_device_name()} (flex)", results["cuda"])
    else:
        print("\nCUDA: not available on this machine; the flex/full-shape part was not run")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
