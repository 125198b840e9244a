"""Ulysses context parallelism for the hooked layers: ``attend`` on the full grid, a subset of heads per rank.

Under context (sequence) parallelism every rank holds a shard of the video tokens. A hooked layer
computes q, k, v on its shard (before RoPE, as on one process), and ``Ulysses.attend`` then

1. exchanges them all-to-all, so that every rank holds **every** video token for its group of heads;
2. runs ``attend`` on the full grid for those heads (RoPE and every band are per head, so this is exact);
3. exchanges the output back, so that every rank holds its own tokens for every head.

These are the all-to-alls of Ulysses attention and nothing more. Text tokens in the same sequence
(``text_before`` / ``text_after``) are replicated on every rank: each rank takes its heads of them
locally and, after attention, gathers the text output of the other ranks' heads.

Shards follow ``torch.tensor_split``: rank ``r`` of ``P`` holds the ``r``-th of ``P`` nearly equal
consecutive pieces of the video tokens, and the ``r``-th piece of the heads. With sizes that divide
evenly this is the equal split of diffusers' Ulysses; uneven sizes are those of its "anything" mode.

The configuration is read from diffusers' ``ParallelConfig`` (``transformer.enable_parallelism``);
``Ulysses.from_config`` says clearly what is not supported.

``enable_parallelism`` puts a pipeline's transformers under diffusers' context parallelism, also those
diffusers has no context-parallel plan for: their adapter gives the plan (where to split the video
tokens and where to gather them; text tokens stay whole on every rank) and a processor per
self-attention layer that runs the layer's own attention between Ulysses' exchanges.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["ContextParallelProcessor", "Ulysses", "enable_parallelism", "split_sizes"]


def split_sizes(n: int, parts: int) -> list[int]:
    """The sizes of ``torch.tensor_split`` of ``n`` items into ``parts`` pieces (the first ``n % parts`` one larger)."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def _exchange(pieces: list[Tensor], receive_shapes: list[tuple[int, ...]], group: Any) -> list[Tensor]:
    """All-to-all: ``pieces[j]`` goes to rank ``j``; returns what each rank sent here, shaped
    ``receive_shapes[i]``. Differentiable (the backward is the reverse exchange)."""
    from torch.distributed import _functional_collectives as funcol

    send = torch.cat([p.reshape(-1) for p in pieces])
    sizes_in = [p.numel() for p in pieces]
    sizes_out = [int(torch.Size(s).numel()) for s in receive_shapes]
    received = funcol.wait_tensor(funcol.all_to_all_single_autograd(send, sizes_out, sizes_in, group))
    return [x.reshape(s) for x, s in zip(received.split(sizes_out), receive_shapes, strict=True)]


@dataclass(frozen=True)
class Ulysses:
    """One rank's place in a Ulysses group: the process group, its size and this rank's index in it."""

    group: Any
    degree: int
    rank: int
    #: whether sizes that do not divide by the degree are accepted (diffusers' ``ulysses_anything``)
    uneven: bool = False

    @classmethod
    def from_config(cls, config: Any) -> Ulysses | None:
        """The Ulysses group of a diffusers ``ParallelConfig`` (or ``None``: no context parallelism).

        Raises:
            ValueError: for ring attention (``ring_degree > 1``), which freeloc's layers do not run.
            RuntimeError: for a diffusers whose context-parallel configuration lacks what is read here.
        """
        cp = getattr(config, "context_parallel_config", None)
        if cp is None:
            return None
        missing = [a for a in ("ring_degree", "ulysses_degree", "_ulysses_mesh") if not hasattr(cp, a)]
        if missing:
            raise RuntimeError(f"freeloc's context parallelism reads diffusers' ContextParallelConfig "
                               f"(ring_degree, ulysses_degree, _ulysses_mesh; tested with diffusers 0.42), "
                               f"and this diffusers' config lacks {missing}")
        if int(cp.ring_degree) > 1:
            raise ValueError(f"freeloc's hooked layers run Ulysses context parallelism only, got ring_degree="
                             f"{cp.ring_degree}: use ContextParallelConfig(ulysses_degree=N) (ring attention "
                             f"all-gathers K/V in diffusers and saves no memory over Ulysses)")
        degree = int(cp.ulysses_degree)
        if degree <= 1:
            return None
        mesh = cp._ulysses_mesh
        if mesh is None:
            raise RuntimeError("diffusers' ContextParallelConfig has no Ulysses mesh yet: call "
                               "transformer.enable_parallelism(config=...) before running the model")
        group = mesh.get_group()
        return cls(group, degree, torch.distributed.get_rank(group), bool(getattr(cp, "ulysses_anything", False)))

    def check_heads(self, heads: int) -> None:
        if heads < self.degree:
            raise ValueError(f"Ulysses context parallelism gives every rank a group of heads: {heads} heads cannot "
                             f"be shared by ulysses_degree={self.degree} ranks (use a degree <= {heads})")
        if heads % self.degree and not self.uneven:
            raise ValueError(f"{heads} attention heads do not divide by ulysses_degree={self.degree}: use a degree "
                             f"that divides {heads}, or ContextParallelConfig(ulysses_degree={self.degree}, "
                             f"ulysses_anything=True) for uneven groups of heads")

    def to_heads(self, x: Float[Tensor, "batch shard heads dim"], tokens: int) -> Float[Tensor, "batch tokens h dim"]:
        """Sequence-sharded ``x`` (this rank's shard of ``tokens``) -> every token, this rank's heads."""
        b, s, h, d = x.shape
        heads = split_sizes(h, self.degree)
        shards = split_sizes(tokens, self.degree)
        if s != shards[self.rank]:
            raise ValueError(f"rank {self.rank} holds {s} video tokens, but the {tokens} tokens of the grid split "
                             f"into {shards} over {self.degree} ranks")
        pieces = [p.permute(1, 0, 2, 3) for p in x.split(heads, dim=2)]  # (shard, B, h_j, D) to rank j
        got = _exchange(pieces, [(shards[i], b, heads[self.rank], d) for i in range(self.degree)], self.group)
        return torch.cat(got, dim=0).permute(1, 0, 2, 3)

    def to_tokens(self, x: Float[Tensor, "batch tokens h dim"], heads: int) -> Float[Tensor, "batch shard heads dim"]:
        """Every token for this rank's heads -> this rank's shard of tokens, every one of ``heads`` heads."""
        b, n, h, d = x.shape
        head_sizes = split_sizes(heads, self.degree)
        shards = split_sizes(n, self.degree)
        pieces = [p.permute(1, 0, 2, 3) for p in x.split(shards, dim=1)]  # (shard_j, B, h, D) to rank j
        got = _exchange(pieces, [(shards[self.rank], b, head_sizes[i], d) for i in range(self.degree)], self.group)
        return torch.cat(got, dim=2).permute(1, 0, 2, 3)

    def gather_heads(self, x: Float[Tensor, "batch tokens h dim"],
                     heads: int) -> Float[Tensor, "batch tokens heads dim"]:
        """This rank's heads of replicated tokens -> every head, on every rank."""
        b, n, _, d = x.shape
        head_sizes = split_sizes(heads, self.degree)
        piece = x.permute(1, 0, 2, 3)
        got = _exchange([piece] * self.degree, [(n, b, head_sizes[i], d) for i in range(self.degree)], self.group)
        return torch.cat(got, dim=2).permute(1, 0, 2, 3)

    def my_heads(self, heads: int) -> slice:
        sizes = split_sizes(heads, self.degree)
        start = sum(sizes[:self.rank])
        return slice(start, start + sizes[self.rank])

    def attend(
        self,
        run: Callable[[Tensor, Tensor, Tensor], Tensor],
        q: Float[Tensor, "batch seq heads dim"],
        k: Float[Tensor, "batch seq heads dim"],
        v: Float[Tensor, "batch seq heads dim"],
        video_tokens: int,
        text_before: int = 0,
        text_after: int = 0,
    ) -> Float[Tensor, "batch seq heads dim"]:
        """``run(q, k, v)`` (attention over the full sequence) for this rank's heads, between the exchanges.

        ``q``, ``k``, ``v``: this rank's sequence, ``text_before`` replicated text tokens, its shard of the
        ``video_tokens`` video tokens, ``text_after`` replicated text tokens. Returns the output of the
        same layout, every head.
        """
        heads = q.shape[2]
        self.check_heads(heads)
        mine = self.my_heads(heads)
        shard = slice(text_before, q.shape[1] - text_after)

        def full(x: Tensor) -> Tensor:
            parts = [x[:, :text_before, mine], self.to_heads(x[:, shard], video_tokens), x[:, shard.stop:, mine]]
            return torch.cat(parts, dim=1) if text_before or text_after else parts[1]

        out = run(full(q), full(k), full(v))
        video = self.to_tokens(out[:, text_before:text_before + video_tokens], heads)
        if not (text_before or text_after):
            return video
        text = self.gather_heads(torch.cat([out[:, :text_before], out[:, text_before + video_tokens:]], dim=1),
                                 heads)
        return torch.cat([text[:, :text_before], video, text[:, text_before:]], dim=1)


class ContextParallelProcessor:
    """Base of the adapters' context-parallel processors (``TransformerAdapter.context_parallel_processor``).

    diffusers' ``enable_parallelism`` sets ``_parallel_config`` and ``set_attention_backend`` sets
    ``_attention_backend`` on it, as on its own processors. On one process (no Ulysses degree) the layer
    runs ``original``, the processor it replaced.
    """

    _attention_backend: Any = None
    _parallel_config: Any = None

    def __init__(self, original: Any, tokens: Any) -> None:
        self.original = original
        self.tokens = tokens  # a GridState: the grid of the current forward, every rank's tokens
        self._attention_backend = getattr(original, "_attention_backend", None)

    def ulysses(self) -> Ulysses | None:
        return None if self._parallel_config is None else Ulysses.from_config(self._parallel_config)

    def video_tokens(self) -> int:
        """Video tokens of the whole sequence (every rank's shard) in the current forward."""
        grid = self.tokens.value
        if grid is None:
            raise RuntimeError("the context-parallel processor ran outside its transformer's forward (no grid)")
        f, h, w = grid
        return f * h * w


def _context_parallel_config(config: Any) -> Any:
    """The ``ContextParallelConfig`` of a diffusers ``ContextParallelConfig`` or ``ParallelConfig``."""
    cp = getattr(config, "context_parallel_config", config)
    missing = [a for a in ("ring_degree", "ulysses_degree") if not hasattr(cp, a)]
    if cp is None or missing:
        raise TypeError(f"config must be a diffusers ContextParallelConfig (or a ParallelConfig holding one), "
                        f"got {type(config).__name__}" + (f" without {missing}" if cp is not None else ""))
    return cp


def enable_parallelism(target: torch.nn.Module | Any, config: Any, *, adapter: Any = None) -> None:
    """Put every transformer of a pipeline (or one transformer) under diffusers' Ulysses context parallelism.

    A transformer diffusers declares a context-parallel plan for (``_cp_plan``: Wan) gets diffusers' own
    ``transformer.enable_parallelism(config=config)``. One it has none for (HunyuanVideo, HunyuanVideo
    1.5, CogVideoX) gets its adapter's plan (video tokens split before the first block and gathered after
    the output projection; text tokens replicated on every rank) and a context-parallel processor on every
    self-attention layer, so it runs on several processes with or without FreeLOC, exactly as on one.

    It composes with ``freeloc.enable`` in either order; removing a FreeLOC session afterwards leaves the
    model context-parallel. Call it inside an initialised process group (``torchrun``), once per model,
    before the first forward.

    Args:
        target: a diffusers pipeline or transformer.
        config: diffusers' ``ContextParallelConfig(ulysses_degree=N)`` (or a ``ParallelConfig`` holding
            one); ``ulysses_anything=True`` for heads or tokens that do not divide by ``N``.
        adapter: an adapter class to use instead of the registry's.

    Raises:
        ValueError: ring attention, heads that ``N`` does not divide (without ``ulysses_anything``) or
            fewer heads than ``N``, a model with no plan from diffusers or its adapter; raised before
            the model is changed.

    Example::

        torch.distributed.init_process_group("nccl")
        freeloc.parallel.enable_parallelism(pipe, ContextParallelConfig(ulysses_degree=world_size))
        with freeloc.enable(pipe, num_frames=509):
            video = pipe(prompt, num_frames=509).frames[0]
    """
    from .adapter import FreeLOCProcessor, GridHook, GridState
    from .registry import adapters_for

    cp = _context_parallel_config(config)
    if int(cp.ring_degree) > 1:
        raise ValueError(f"freeloc's context parallelism runs Ulysses only, got ring_degree={cp.ring_degree}: use "
                         f"ContextParallelConfig(ulysses_degree=N)")
    degree = int(cp.ulysses_degree)
    found = adapters_for(target, adapter)
    setups: list[tuple[torch.nn.Module, Any, dict[str, Any] | None]] = []
    for name, module, adapter_cls in found:
        ad = adapter_cls(module, name=name)
        what = f"{type(module).__name__} ({name})"
        if getattr(module, "_parallel_config", None) is not None:
            raise RuntimeError(f"{what} already runs under diffusers' parallelism")
        plan = ad.context_parallel_plan()
        if plan is None and getattr(module, "_cp_plan", None) is None:
            raise ValueError(f"neither diffusers nor freeloc's {adapter_cls.__name__} has a context-parallel plan for "
                             f"{what}; run it on one process")
        if degree > 1:
            check = Ulysses(None, degree, 0, bool(getattr(cp, "ulysses_anything", False)))
            for attn in ad.attention_layers():
                heads = getattr(attn, "heads", None)
                if heads is not None:
                    try:
                        check.check_heads(int(heads))
                    except ValueError as err:
                        raise ValueError(f"{what}: {err}") from None
        setups.append((module, ad, plan))
    for module, ad, plan in setups:
        if plan is None:
            module.enable_parallelism(config=config)
            continue
        tokens = GridState(None)
        for attn in ad.attention_layers():
            current = attn.processor
            if isinstance(current, FreeLOCProcessor):  # freeloc first: its layers wrap the parallel processor
                current.original = ad.context_parallel_processor(current.original, tokens)
            else:
                attn.set_processor(ad.context_parallel_processor(current, tokens))
        module.register_forward_pre_hook(GridHook(ad, tokens), with_kwargs=True)
        module.enable_parallelism(config=config, cp_plan=plan)
