"""``--context-parallel N``: one pipeline over N processes started by ``torchrun``, with diffusers' Ulysses.

    torchrun --nproc-per-node 4 -m freeloc generate --model ... --num-frames 321 --context-parallel 4 --out v.mp4

Every process loads the pipeline, joins the process group (NCCL on CUDA, gloo on CPU), puts its
transformers under diffusers' context parallelism and runs the same call with the same seed; every
process then holds the whole video, and only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ContextParallelRun", "start"]


@dataclass(frozen=True)
class ContextParallelRun:
    """This process's place in a ``--context-parallel`` run (degree 1: a plain single-process run)."""

    degree: int
    rank: int
    device: str

    @property
    def writes(self) -> bool:
        """Whether this process writes the outputs (rank 0 only)."""
        return self.rank == 0

    def parallelize(self, pipeline: Any) -> None:
        """Put every transformer of ``pipeline`` under diffusers' Ulysses context parallelism, with freeloc's
        plan for models diffusers has none for (``freeloc.parallel.enable_parallelism``)."""
        if self.degree == 1:
            return
        from diffusers import ContextParallelConfig

        from ..parallel import enable_parallelism

        enable_parallelism(pipeline, ContextParallelConfig(ulysses_degree=self.degree))

    def finish(self) -> None:
        if self.degree > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def start(degree: int, device: str) -> ContextParallelRun:
    """Join the process group ``torchrun`` set up for ``degree`` processes; ``degree=1``: nothing to join.

    Raises:
        ValueError: outside ``torchrun``, or when its number of processes is not ``degree``.
    """
    if degree == 1:
        return ContextParallelRun(1, 0, device)
    world = os.environ.get("WORLD_SIZE")
    if world is None:
        raise ValueError(f"--context-parallel {degree} runs one process per part of the sequence: start it with "
                         f"torchrun --nproc-per-node {degree} -m freeloc generate ...")
    if int(world) != degree:
        raise ValueError(f"--context-parallel {degree}, but torchrun started {world} processes: give them the same "
                         f"number")
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
        backend = "nccl"
    else:
        backend = "gloo"
        if torch.accelerator.device_count() == 0:
            # diffusers places rank r on accelerator r % device_count(), which is 0 on a CPU-only torch
            torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]
    torch.distributed.init_process_group(backend)
    return ContextParallelRun(degree, rank, device)
