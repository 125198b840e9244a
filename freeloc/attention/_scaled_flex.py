"""The ``flex`` backend's executor for methods that scale logits (UltraViCo): ``ScaledFlexPart``.

Such a method's bands all have the original positions, cover every frame pair between them and differ
only in the factor of their positive logits (``Band.positive_logit_scale``). So one rotation of q and
k serves every band, and one ``flex_attention`` call computes the whole video part: its ``score_mod``
reads each (query frame, key frame) pair's factor from an [F, F] table and multiplies the positive
logits by it, the softmax scale already applied, exactly as the ``reference`` backend does. No score
matrix is built on CUDA, where the call is compiled; elsewhere the eager implementation runs, which
materialises the scores, and is for checking semantics on small shapes.
"""

from __future__ import annotations

import functools
import typing
import warnings
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..bands import BandSet
from ._flex import _compiled_flex, _compiled_here
from ._fused import recompile_limit_at_least
from .options import AttentionOptions

if TYPE_CHECKING:
    from ._planning import ScaledFlexPart

__all__ = ["run_scaled_flex", "scaled_flex_refusal"]


def scaled_flex_refusal(bands: BandSet) -> str | None:
    """Why one ``flex_attention`` call with a factor per frame pair cannot compute ``bands`` (None: it can)."""
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


def run_scaled_flex(
    part: ScaledFlexPart,
    q: Float[Tensor, "batch heads nv dim"],
    k: Float[Tensor, "batch heads nv dim"],
    v: Float[Tensor, "batch heads nv dim"],
    scale: float,
    options: AttentionOptions,
) -> tuple[Float[Tensor, "batch heads frames s dim"], Float[Tensor, "batch heads frames s"]]:
    """Every video query over every video key, the positive logits of each frame pair times its band's
    factor: the output (in v's dtype) and the LSE, by frame. ``q``/``k``: the video tokens rotated at the
    bands' (shared) positions."""
    from torch.nn.attention.flex_attention import flex_attention

    b, h, n, d = v.shape
    s = part.tokens_per_frame
    if v.device.type == "cpu" and n > options.max_dense_tokens:
        raise ValueError(f"flex on CPU runs eagerly and materialises the scores; it accepts N <= "
                         f"{options.max_dense_tokens} video tokens (AttentionOptions.max_dense_tokens), got N={n}; "
                         f"use backend='reference' on CPU, which computes long sequences in rows")
    if not torch.is_grad_enabled():  # flex_attention refuses inputs that require grad on CPU, even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    factors = _factors(part.bands, str(v.device))

    @typing.no_type_check  # traced by flex_attention: no runtime type-checking wrapper around it
    def score_mod(score: Tensor, batch: Tensor, head: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        factor = factors[q_idx // s, kv_idx // s]
        return torch.where(score > 0, score * factor, score)

    compiled = _compiled_here(v.device, options) and v.device.type == "cuda"
    fn = _compiled_flex() if compiled else flex_attention
    extra: dict[str, Any] = dict(options.kernel_options) if compiled else {}
    with warnings.catch_warnings(), recompile_limit_at_least(64):
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        warnings.filterwarnings("ignore", message=".*return_lse is deprecated.*")
        out, lse = fn(q, k, v, score_mod=score_mod, scale=scale, return_lse=True,
                      **({"kernel_options": extra} if extra else {}))
    return out.view(b, h, n // s, s, d), lse.view(b, h, n // s, s)
