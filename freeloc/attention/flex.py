"""The ``flex`` backend: one ``flex_attention`` call per band, block-sparse, merged by LSE.

Each band's :class:`~torch.nn.attention.flex_attention.BlockMask` is built with
``BlockMask.from_kv_blocks`` from the band's frame-level block table (never ``create_block_mask``
over N^2 tokens) and carries a ``mask_mod`` that cuts partial blocks exactly (frame pair, stripe,
and sequence end): eager flex ignores the block table and evaluates ``mask_mod`` everywhere, so the
two must agree, and they do. Block masks are cached per band set, grid and device.

On CUDA the compiled kernel is used (the default backend there). On CPU the eager implementation
runs, which materialises the score matrix: it is for checking semantics on small shapes and refuses
sequences longer than the reference backend's limit.
"""

from __future__ import annotations

import functools
import typing
import warnings
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..bands import Band, BandSet
from .merge import MergeAccumulator
from .reference import MAX_TOKENS

__all__ = ["flex_band_attention", "BLOCK_SIZE"]

BLOCK_SIZE = 128


@functools.lru_cache(maxsize=1)
def _compiled_flex() -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _table_to_indices(table: Tensor) -> tuple[Tensor, Tensor]:
    """[Qb, Kb] bool -> (num_blocks [1, 1, Qb], indices [1, 1, Qb, Kb]) with the selected blocks first."""
    num = table.sum(-1).to(torch.int32)
    order = torch.argsort((~table).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num[None, None], order[None, None]


def _band_mask_mod(band: Band, s: int, n: int, device: torch.device) -> Any:
    pairs = band.pairs.to(device)
    last = band.num_frames - 1
    stripe = band.stripe

    @typing.no_type_check  # traced by flex_attention: no runtime type-checking wrapper around it
    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        qf = torch.clamp(q_idx // s, max=last)
        kf = torch.clamp(kv_idx // s, max=last)
        ok = pairs[qf, kf] & (kv_idx < n) & (q_idx < n)
        if stripe is not None:
            ok = ok & ((q_idx % s - kv_idx % s).abs() < stripe)
        return ok

    return mask_mod


@functools.lru_cache(maxsize=64)
def _block_masks(band_set: BandSet, s: int, device_str: str) -> tuple[Any, ...]:
    from torch.nn.attention.flex_attention import BlockMask

    device = torch.device(device_str)
    n = band_set.num_frames * s
    masks = []
    for band in band_set.bands:
        any_t, full_t = band.block_table(s, BLOCK_SIZE)
        partial = any_t & ~full_t
        kv_num, kv_idx = _table_to_indices(partial)
        full_num, full_idx = _table_to_indices(full_t)
        masks.append(BlockMask.from_kv_blocks(
            kv_num.to(device), kv_idx.to(device), full_num.to(device), full_idx.to(device),
            BLOCK_SIZE=BLOCK_SIZE, mask_mod=_band_mask_mod(band, s, n, device), seq_lengths=(n, n),
        ))
    return tuple(masks)


def flex_band_attention(
    qs: list[Float[Tensor, "batch heads n dim"]],
    ks: list[Float[Tensor, "batch heads n dim"]],
    v: Float[Tensor, "batch heads n dim"],
    band_set: BandSet,
    tokens_per_frame: int,
    scale: float,
) -> tuple[Float[Tensor, "batch heads n dim"], Float[Tensor, "batch heads n"]]:
    """Merged attention of every video query over the bands' video keys (float32 output, LSE)."""
    from torch.nn.attention.flex_attention import flex_attention

    n = v.shape[2]
    if v.device.type == "cpu" and n > MAX_TOKENS:
        raise ValueError(f"flex on CPU runs eagerly and materialises the scores; it accepts N <= {MAX_TOKENS} "
                         f"video tokens, got N={n}; use backend='chunked' on CPU")
    fn = _compiled_flex() if v.device.type == "cuda" else flex_attention
    acc = MergeAccumulator()
    for qb, kb, bm in zip(qs, ks, _block_masks(band_set, tokens_per_frame, str(v.device)), strict=True):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            warnings.filterwarnings("ignore", message=".*return_lse is deprecated.*")
            out, lse = fn(qb, kb, v, block_mask=bm, scale=scale, return_lse=True)
        acc.add(out, lse)
    return acc.result()
