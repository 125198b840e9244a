"""Where the time of one attention call goes: the profiler's top operations per method.

    python benchmarks/profile_attention.py [--shape 30x52] [--methods dense,tsa,vrpr] [--rows 12]

Runs the shape of ``benchmarks/attention.py`` (CUDA: flex, bf16, 12 heads x 128; CPU: chunked,
fp32, 2 heads x 64) after a warm-up, and prints the operations that took the most device time
(CUDA) or CPU time, with the wall time of the call.
"""

from __future__ import annotations

import argparse
import time

import torch
from attention import CPU_SHAPE, CUDA_SHAPE, make, runner, sync


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default=None, help="latent HxW (default: 30x52 on CUDA, 12x13 on CPU)")
    ap.add_argument("--methods", default="dense,tsa,vrpr")
    ap.add_argument("--rows", type=int, default=12)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = dict(CUDA_SHAPE if device == "cuda" else CPU_SHAPE)
    if args.shape:
        shape["height"], shape["width"] = (int(x) for x in args.shape.lower().split("x"))
    q, k, v = make(shape, device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    for name in args.methods.split(","):
        fn = runner(name, shape, q, k, v)
        fn(), fn()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - t0
        with torch.profiler.profile(activities=activities) as prof:
            fn()
            sync(device)
        print(f"\n== {name}: {wall * 1e3:.1f} ms per call ({device}, {shape['frames']}x"
              f"{shape['height'] * shape['width']} tokens, {shape['backend']})")
        print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
