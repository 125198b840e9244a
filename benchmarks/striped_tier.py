"""TSA's striped tier alone at the full Wan 1.3B shape (CUDA): where its time goes, and two ways around flex.

    python benchmarks/striped_tier.py [--reps 5] [--flex-options '{"num_warps": 4}' [--flex-options ...]]

The striped tier (``D1 < |Δ| <= D2``, token pairs with ``|s_q - s_k| < Ds``, ``Ds = 195`` at 1560 tokens per
frame) is the part of TSA that stays on ``flex_attention`` (``benchmarks/HISTORY.md``). This script times, in
one run, against dense SDPA on the same q, k, v (81 frames x 1560 tokens, 12 heads x 128, bf16, no rotation):

* the tier on ``flex`` (the library's path: its calls, with their padded copies, before the final merge
  that ``attend`` shares with the other parts), with key blocks of 128 and of 64
  (``AttentionOptions.stripe_key_block``; the default, ``"auto"``, is 64 here), with 64 and ``PRESCALE_QK``
  (q scaled once per tile instead of each score twice), for each ``--flex-options`` (repeatable) both
  again with those extra ``kernel_options`` (``AttentionOptions.flex_kernel_options``: tile sizes, warps,
  stages), and on ``chunked`` (fused kernel with a mask);
* a decomposition by raster sub-blocks of ``B`` queries: every query of a sub-block attends the same
  ``2 Ds - B`` keys of each striped key frame (the *middle*), which run unmasked as stacks on the fused
  dense kernel (one call per sub-block and direction, its query frames the batch, the 16-frame key
  windows overlapping views of one gathered buffer; the edge frames, 12% of the pairs, left out);
* what the middle leaves, two ``B x B`` triangles per sub-block and key frame, as one ``flex_attention``
  call over gathered copies (queries ``(sub-block, frame, row)``, keys ``(sub-block, frame, side, column)``),
  with a mask that tests the triangle alone (the block table holds the frames).

The pieces are timed separately; no output is merged (it measures cost, not numbers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import freeloc
from freeloc.attention import AttentionOptions, band_set_for
from freeloc.attention._chunked import run_chunked
from freeloc.attention._flex import run_flex
from freeloc.attention._flex_groups import stripe_key_block
from freeloc.attention._kernels import attention_with_lse, checked_kernels
from freeloc.attention._passes import plan_passes
from freeloc.attention._planning import plan_attention
from freeloc.bands import BandSet

NF, HH, WW, H, D = 81, 30, 52, 12, 128
S = HH * WW
N = NF * S
D1, D2 = 8, 24
DS = S // 8


def timeit(fn: Callable[[], object], reps: int) -> float:
    fn(), fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def middle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: int, scale: float) -> None:
    """The unmasked middle of every sub-block of ``b`` queries, interior query frames (both directions)."""
    q5, k5, v5 = (x.view(1, H, NF, S, D) for x in (q, k, v))
    for a in range(-(-S // b)):
        a0, a1 = a * b, min(S, (a + 1) * b)
        bq = a1 - a0
        lo, hi = max(0, a1 - DS), min(S, a0 + DS)
        w = hi - lo
        qa = q5[:, :, :, a0:a1].reshape(H, NF * bq, D)
        ka = k5[0, :, :, lo:hi].reshape(H, NF * w, D)
        va = v5[0, :, :, lo:hi].reshape(H, NF * w, D)
        nwin, ent = D2 - D1, NF - D2
        for qoff, koff in ((0, D1 + 1), (D2, 0)):  # future: frames i+9..i+24; past: i-24..i-9
            qv = qa.as_strided((ent, H, bq, D), (bq * D, NF * bq * D, D, 1), qoff * bq * D)
            kv = ka.as_strided((ent, H, nwin * w, D), (w * D, NF * w * D, D, 1), koff * w * D)
            vv = va.as_strided((ent, H, nwin * w, D), (w * D, NF * w * D, D, 1), koff * w * D)
            attention_with_lse(qv, kv, vv, None, scale)


def triangles(dev: str) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Gather indices of the queries and keys of the triangles (sub-blocks of 128), and their block mask."""
    from torch.nn.attention.flex_attention import BlockMask

    bb = 128
    nsub = -(-S // bb)
    a_ = torch.arange(nsub)[:, None, None]
    f_ = torch.arange(NF)[None, :, None]
    sq = a_ * bb + torch.arange(bb)[None, None, :]
    q_idx = (f_ * S + sq.clamp(max=S - 1)).reshape(-1)
    side_ = torch.arange(2)[None, None, :, None]
    j_ = torch.arange(bb)[None, None, None, :]
    sk = a_[..., None] * bb + torch.where(side_ == 0, -DS + j_, DS + j_)  # left: a0 - Ds + j; right: a0 + Ds + j
    k_idx = (f_[..., None] * S + sk.clamp(0, S - 1)).reshape(-1)
    fr = torch.arange(NF)
    dist = (fr[:, None] - fr[None, :]).abs()
    frame_ok = (dist > D1) & (dist <= D2)
    kv_num = torch.zeros(nsub * NF, dtype=torch.int32)
    kv_idx = torch.zeros(nsub * NF, nsub * NF * 2, dtype=torch.int32)  # from_kv_blocks: the full key-block width
    for a in range(nsub):
        for fq in range(NF):
            fks = frame_ok[fq].nonzero().flatten()
            blocks = torch.stack([(a * NF + fks) * 2, (a * NF + fks) * 2 + 1], 1).flatten()
            kv_num[a * NF + fq] = len(blocks)
            kv_idx[a * NF + fq, :len(blocks)] = blocks.to(torch.int32)

    def mask_mod(b: torch.Tensor, h: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
        i, j, slot = qi % bb, ki % bb, ki // bb
        side = slot % 2
        tri = torch.where(side == 0, i < j, j < i)
        # keys past the frame's edge: sub-block 1's left slots and sub-block 10's right slots
        bad_l = (side == 0) & (slot >= 2 * NF) & (slot < 4 * NF) & (j < DS - bb)
        bad_r = (side == 1) & (slot >= 20 * NF) & (slot < 22 * NF) & (j >= S - 10 * bb - DS)
        return tri & ~bad_l & ~bad_r

    bm = BlockMask.from_kv_blocks(kv_num[None, None].to(dev), kv_idx[None, None].to(dev), BLOCK_SIZE=bb,
                                  mask_mod=mask_mod, seq_lengths=(nsub * NF * bb, nsub * NF * 2 * bb))
    return q_idx.to(dev), k_idx.to(dev), bm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--flex-options", type=json.loads, action="append", default=[],
                    help="extra flex kernel_options as JSON, timed beside the default ones (repeatable)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("striped_tier.py times CUDA kernels at the full Wan shape: no CUDA device here")
    from torch.nn.attention.flex_attention import flex_attention

    dev = "cuda"
    scale = D**-0.5
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, N, D, generator=g).to(dev, torch.bfloat16) for _ in range(3))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: {NF} x {S} tokens, {H} heads x {D}, bf16",
          flush=True)
    rows: list[tuple[str, float]] = []

    def row(name: str, fn: Callable[[], object], reps: int = args.reps) -> None:
        rows.append((name, timeit(fn, reps)))
        print(f"  {name:48s} {rows[-1][1] * 1e3:8.2f} ms", flush=True)

    row("dense SDPA (all pairs)", lambda: F.scaled_dot_product_attention(q, k, v, scale=scale))
    bands = band_set_for(freeloc.TSA(cap=20), NF, S, freeloc.RotaryLayout.wan(D)).aligned()
    striped = BandSet(NF, tuple(b for b in bands.bands if b.stripe), bands.t_freqs)

    def on_flex(key_block: int | str, extra: dict | None) -> Callable[[], object]:
        """The tier as attend's flex part runs it (its calls, padded copies, no merge)."""
        options = AttentionOptions(unstriped="flex", stripe_key_block=key_block, flex_kernel_options=extra or {})
        plan = plan_attention(q.transpose(1, 2), striped, (NF, HH, WW), 0, 0, "flex", options)
        (part,) = plan.parts
        return lambda: run_flex(part, [q], [k], plan.rotations.q_source, v, scale, options)

    row(f"striped tier on flex (default: key blocks of {stripe_key_block(AttentionOptions(), q.dtype, D)})",
        on_flex("auto", None))
    row("striped tier on flex, key blocks of 128", on_flex(128, None))
    row("striped tier on flex, key blocks of 64 (shifted)", on_flex(64, None))
    # q pre-scaled by the softmax scale and log2(e) in the kernel: two multiplies fewer per score, one
    # more rounding of q to bf16
    row("  key blocks of 64, PRESCALE_QK", on_flex(64, {"PRESCALE_QK": True}))
    for options in args.flex_options:
        row(f"  key blocks of 128, {options}", on_flex(128, options))
        row(f"  key blocks of 64, {options}", on_flex(64, options))
    defaults = AttentionOptions()
    passes = plan_passes(striped, S, D, defaults)
    row("striped tier on chunked (masked fused kernel)",
        lambda: run_chunked(passes, [q], [k], {}, v.transpose(1, 2), S, scale, defaults), reps=3)
    for b in (64, 96, 128):
        row(f"middle, B = {b}, interior frames (cuDNN stacks)", lambda b=b: middle(q, k, v, b, scale))
    qi, ki, bm = triangles(dev)
    fn = torch.compile(flex_attention, dynamic=False)
    opts = {"USE_TMA": True} if torch.cuda.get_device_capability()[0] >= 9 else None
    row("triangles, B = 128, on flex (with the gathers)",
        lambda: fn(q[:, :, qi], k[:, :, ki], v[:, :, ki], block_mask=bm, scale=scale, return_lse=True,
                   kernel_options=opts))
    print("fused kernels chosen:", checked_kernels())
    dense = rows[0][1]
    print("\nx dense SDPA:")
    for name, t in rows:
        print(f"  {name:48s} {t / dense:6.3f}")


if __name__ == "__main__":
    main()
