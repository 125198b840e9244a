"""One forward of a Wan transformer on 1 process against 2 gloo ranks (Ulysses), with and without FreeLOC.

For each setting: time per forward, the peak resident memory of each rank above what it held before
the forward, and the bytes each rank sends per self-attention layer (every collective counted: the
all-to-alls of Ulysses attention, and diffusers' gathers of the output). FreeLOC's layers must send
exactly what diffusers' own Ulysses attention sends.

Settings, at 4x the trained length of a small random Wan (built from config, CPU, fp32, one thread per
process so that the ranks do not share cores):

* ``direct``: no FreeLOC; on 2 ranks diffusers' own context parallelism;
* ``vrpr``, ``tsa``: that method on every layer; on 2 ranks freeloc's Ulysses layers on top of it.

Every process is fresh (a single process is one rank of a group of one), warms up with one forward,
then times ``--reps`` forwards and takes the median; memory is the resident high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs``) of a last forward, glibc returning freed blocks of
64 KiB or more to the system so that resident memory is live memory.

    python benchmarks/context_parallel.py [--reps 3] [--frames 24] [--size 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

TRAINED_VIDEO = 21  # the small model's trained length: 6 latent frames
SETTINGS = ("direct", "vrpr", "tsa")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class SentBytes:
    """Counts the bytes this rank sends through torch.distributed's collectives while installed."""

    def __init__(self) -> None:
        self.total = 0
        self._undo: list[tuple[Any, str, Any]] = []

    def install(self) -> None:
        from torch.distributed import _functional_collectives as funcol

        world, rank = dist.get_world_size(), dist.get_rank()

        def all_to_all(fn: Any) -> Any:
            def counted(x: torch.Tensor, output_split_sizes: Any, input_split_sizes: Any, group: Any,
                        *args: Any, **kwargs: Any) -> Any:
                sizes = input_split_sizes or [x.numel() // world] * world
                per = x.numel() // max(sum(sizes), 1)
                self.total += (x.numel() - sizes[rank] * per) * x.element_size()  # what stays here is not sent
                return fn(x, output_split_sizes, input_split_sizes, group, *args, **kwargs)
            return counted

        def gather(fn: Any) -> Any:
            def counted(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                self.total += x.numel() * x.element_size() * (world - 1)
                return fn(x, *args, **kwargs)
            return counted

        def gather_list(fn: Any) -> Any:
            def counted(out: list, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                self.total += x.numel() * x.element_size() * (world - 1)
                return fn(out, x, *args, **kwargs)
            return counted

        # the base functions only: their autograd variants call them
        for owner, name, wrap in ((funcol, "all_to_all_single", all_to_all),
                                  (funcol, "all_gather_tensor", gather),
                                  (dist, "all_gather", gather_list)):
            original = getattr(owner, name)
            self._undo.append((owner, name, original))
            setattr(owner, name, wrap(original))


def _model(layers: int, heads: int) -> torch.nn.Module:
    import diffusers

    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=32, in_channels=16, out_channels=16,
        text_dim=64, freq_dim=32, ffn_dim=256, num_layers=layers, rope_max_seq_len=512,
    ).eval()


def rank_main(rank: int, world: int, init: str, out: str, args: dict[str, Any]) -> None:
    """One process of one setting: time and memory of a forward, bytes sent."""
    torch.set_num_threads(1)
    torch.accelerator.device_count = lambda: 1  # diffusers maps ranks to devices by rank % device_count
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    from diffusers import ContextParallelConfig

    import freeloc

    model = _model(args["layers"], args["heads"])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, args["frames"], args["size"], args["size"], generator=g)
    enc = torch.randn(1, 16, 64, generator=g)
    setting = args["setting"]
    session = None if setting == "direct" else freeloc.enable(model, method=setting, trained_frames=TRAINED_VIDEO)
    if world > 1:
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(x, torch.tensor([500]), enc, return_dict=False)[0]

    forward()  # warm-up: plans, masks, caches
    sent = SentBytes()
    sent.install()
    times = []
    for _ in range(args["reps"]):
        dist.barrier()
        t0 = time.perf_counter()
        forward()
        times.append(time.perf_counter() - t0)
    per_forward = sent.total / args["reps"]
    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:  # reset the high-water mark to the current RSS
        fh.write("5")
    result = forward()
    peak = (_status_kib("VmHWM") - before) / 1024
    torch.save(dict(time=statistics.median(times), peak_mib=peak, sent_per_layer=per_forward / args["layers"],
                    out=result if rank == 0 else None), Path(out) / f"{setting}-{world}-{rank}.pt")
    if session is not None:
        session.remove()
    dist.destroy_process_group()


def measure(setting: str, world: int, args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    os.environ.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    store = tmp / f"store-{setting}-{world}"
    config = dict(vars(args), setting=setting)
    mp.spawn(rank_main, args=(world, f"file://{store}", str(tmp), config), nprocs=world)
    return [torch.load(tmp / f"{setting}-{world}-{r}.pt", weights_only=False) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--frames", type=int, default=24, help="latent frames (default 24: 4x the trained 6)")
    parser.add_argument("--size", type=int, default=32, help="latent height and width (default 32: 16x16 tokens)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    tokens = args.frames * (args.size // 2) ** 2
    print(f"Wan, {args.layers} layers, {args.heads} heads x 32, {args.frames} latent frames x {(args.size // 2) ** 2} "
          f"tokens = {tokens} tokens, fp32, 1 thread per process, {args.reps} timed forwards", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for setting in SETTINGS:
            for world in (1, 2):
                print(f"  {setting}, {world} process{'es' if world > 1 else ''} ...", flush=True)
                ranks = measure(setting, world, args, Path(tmp))
                rows.append(dict(setting=setting, world=world, time=max(r["time"] for r in ranks),
                                 peak_mib=[round(r["peak_mib"], 1) for r in ranks],
                                 sent_per_layer=[int(r["sent_per_layer"]) for r in ranks], out=ranks[0]["out"]))
    print()
    print(f"{'setting':8} {'ranks':>5} {'s/forward':>10} {'x 1 rank':>9} {'peak MiB per rank':>20} "
          f"{'KiB sent per layer per rank':>28} {'max |out - 1 rank|':>19}")
    single = {r["setting"]: r for r in rows if r["world"] == 1}
    direct_sent = {r["world"]: r["sent_per_layer"] for r in rows if r["setting"] == "direct"}
    for r in rows:
        base = single[r["setting"]]
        diff = float((r["out"] - base["out"]).abs().max())
        print(f"{r['setting']:8} {r['world']:5d} {r['time']:10.3f} {r['time'] / base['time']:9.2f} "
              f"{', '.join(f'{p:.1f}' for p in r['peak_mib']):>20} "
              f"{', '.join(f'{s / 1024:.1f}' for s in r['sent_per_layer']):>28} {diff:19.2e}")
    extra = {r["setting"]: [s - d for s, d in zip(r["sent_per_layer"], direct_sent[2], strict=True)]
             for r in rows if r["world"] == 2}
    print(f"\nbytes sent per layer beyond diffusers' own Ulysses (2 ranks): {extra}")
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "out"} for r in rows], indent=1))


if __name__ == "__main__":
    sys.exit(main())
