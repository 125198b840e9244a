"""Methods that scale logits (UltraViCo) on the ``flex`` and ``chunked`` backends: ``ScaledPart``.

Such a method's bands all have the original positions, cover every frame pair between them and differ
only in the factor of their positive logits (``Band.positive_logit_scale``). So one rotation of q and
k serves every band, and each pair's factor is read from an [F, F] table by query and key frame:

* ``flex``: one ``flex_attention`` call whose ``score_mod`` multiplies the positive logits by the
  pair's factor, the softmax scale already applied. Compiled on CUDA, where no score matrix is built;
  elsewhere the eager implementation runs, which materialises the scores (small shapes only).
* ``chunked``: the query rows in chunks, each one matmul over every video key, the factors broadcast
  over each key frame's tokens, then the softmax and its LSE, in float32 (float64 for float64 inputs);
  at most ``AttentionOptions.float_logits`` logits at once (per call: its batch and heads).

Both return the video part's output and LSE by frame, which ``attend`` merges with the text part.
"""

from __future__ import annotations

import functools
import typing
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from ..bands import BandSet
from ._flex import _run, check_eager_size, flex_function
from ._flex_groups import BLOCK_SIZE
from .options import AttentionOptions

if TYPE_CHECKING:
    from ._planning import ScaledPart

__all__ = ["chunk_rows", "run_scaled", "scaled_refusal"]


def scaled_refusal(bands: BandSet) -> str | None:
    """Why a factor per frame pair over one rotation cannot compute ``bands`` (None: it can)."""
    first = bands.bands[0]
    if any(b.stripe is not None for b in bands.bands):
        return "a band is striped"
    if not all(torch.equal(b.q_pos, first.q_pos) and torch.equal(b.k_pos, first.k_pos) for b in bands.bands):
        return "its bands have different positions"
    if not bool(bands.frame_pairs().all()):
        return "its bands leave frame pairs out"
    return None


@functools.lru_cache(maxsize=64)
def _factors(bands: BandSet, device_str: str) -> Tensor:
    """[F, F] float32: each frame pair's factor of its positive logits (1 where the band has none)."""
    out = torch.ones(bands.num_frames, bands.num_frames, dtype=torch.float32)
    for b in bands.bands:
        if b.positive_logit_scale is not None:
            out[b.pairs] = float(b.positive_logit_scale)
    return out.to(device_str)


def chunk_rows(n: int, calls: int, float_logits: int) -> int:
    """Query rows per chunk of the chunked path over ``n`` video tokens for ``calls`` (batch x heads)
    matrices at once: the most whose logits stay within ``float_logits``, at least one."""
    return max(1, min(n, float_logits // max(1, calls * n)))


def run_scaled(
    part: ScaledPart,
    backend: str,
    q: Float[Tensor, "batch heads nv dim"],
    k: Float[Tensor, "batch heads nv dim"],
    v: Float[Tensor, "batch heads nv dim"],
    scale: float,
    options: AttentionOptions,
) -> tuple[Float[Tensor, "batch heads frames s dim"], Float[Tensor, "batch heads frames s"]]:
    """Every video query over every video key, the positive logits of each frame pair times its band's
    factor: the output and the LSE, by frame, on ``backend`` (``"flex"`` or ``"chunked"``). ``q``/``k``:
    the video tokens rotated at the bands' (shared) positions."""
    factors = _factors(part.bands, str(v.device))
    if backend == "chunked":
        return _in_rows(q, k, v, factors, part.tokens_per_frame, scale, options)
    return _in_flex(q, k, v, factors, part.tokens_per_frame, scale, options)


def _in_rows(q: Tensor, k: Tensor, v: Tensor, factors: Tensor, s: int, scale: float,
             options: AttentionOptions) -> tuple[Tensor, Tensor]:
    b, h, n, d = v.shape
    f = n // s
    wide = torch.promote_types(q.dtype, torch.float32)
    kt, vw, fw = k.to(wide).transpose(-1, -2), v.to(wide), factors.to(wide)
    rows = chunk_rows(n, b * h, options.float_logits)
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    out = None if grad else q.new_empty(b, h, n, d, dtype=wide)
    outs, lses = [], []
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        logits = torch.matmul(q[:, :, r0:r1].to(wide) * scale, kt)  # (B, H, rows, N)
        framed = logits.view(b, h, r1 - r0, f, s)
        factor = fw[torch.arange(r0, r1, device=q.device) // s][None, None, :, :, None]  # (1, 1, rows, F, 1)
        # factors are in (0, 1]: the smaller of l and factor * l scales positive logits and keeps the others
        if grad:
            logits = torch.minimum(framed, framed * factor).view(b, h, r1 - r0, n)
            lse = torch.logsumexp(logits, dim=-1)
            outs.append(torch.matmul(torch.exp(logits - lse[..., None]), vw))
        else:  # in place: one chunk of logits at a time
            torch.minimum(framed, framed * factor, out=framed)
            lse = torch.logsumexp(logits, dim=-1)
            torch.matmul(logits.sub_(lse[..., None]).exp_(), vw, out=out[:, :, r0:r1])  # type: ignore[index]
        lses.append(lse)
    result = torch.cat(outs, dim=2) if grad else out
    return result.view(b, h, f, s, d), torch.cat(lses, dim=2).view(b, h, f, s)  # type: ignore[union-attr]


def _in_flex(q: Tensor, k: Tensor, v: Tensor, factors: Tensor, s: int, scale: float,
             options: AttentionOptions) -> tuple[Tensor, Tensor]:
    b, h, n, d = v.shape
    check_eager_size(n, v.device, options, "chunked")
    if not torch.is_grad_enabled():  # flex_attention refuses inputs that require grad on CPU, even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()

    @typing.no_type_check  # traced by flex_attention: no runtime type-checking wrapper around it
    def score_mod(score: Tensor, batch: Tensor, head: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        factor = factors[q_idx // s, kv_idx // s]
        return torch.where(score > 0, score * factor, score)

    out, lse = _run(flex_function(v.device, options), q, k, v, None, scale, BLOCK_SIZE, options, score_mod)
    return out.view(b, h, n // s, s, d), lse.view(b, h, n // s, s)
