"""Layer-adaptive probing: which self-attention layers suffer from positions, which from context.

For each self-attention layer alone (every other layer untouched), at a length longer than trained:

* **position probe**: that layer's key temporal positions are shifted by each of ``shifts`` frames
  (default ``+-T`` and ``+-2T``, the paper's +-20 / +-40 at T = 21). Measured: the relative change of
  the layer's attention logits, ``sqrt(sum_h ||A'_h - A_h||^2) / sqrt(sum_h ||A_h||^2)`` over a sample
  of query tokens (all keys), averaged over the shifts; and the relative change of the model's output;
* **context probe**: that layer is restricted to a sliding window of the trained length
  (``+-(T - 1) // 2`` frames). Measured: the relative change of its attention entropy on the same
  sampled queries, ``||H' - H|| / ||H||``; and the relative change of the model's output.

Logits and entropies come from the layer's own q/k (seen through the adapter while the model runs) and
are computed for the sampled queries only, in chunks of keys: no [N, N] map is built. The model's
outputs are compared with one shared unperturbed run.

Selection rule (``select``): each score is divided by its largest value over the layers; a layer
gets TSA when its normalized context score exceeds its normalized position score by more than
``margin`` (context sensitivity dominates), VRPR otherwise (docs/method.md §4). With ``tsa_count``
the ``tsa_count`` layers with the largest difference get TSA instead. ``score`` chooses which pair of
scores the rule compares: ``"attention"`` (the paper's: logit change and entropy change) or ``"output"``
(the relative change of the model's output under the same two perturbations). The entropy change is
ill-conditioned for sharp, low-entropy layers (a small ``||H||``), whatever their use of context; the
output change measures what the perturbation does to the model. Both pairs are always recorded in the
plan's scores.

Long videos (``bound_from``): far past the trained length every layer meets context dilution, so a
layer that needs its positions corrected needs a bounded context too. With ``bound_from=r`` the plan
gets a length range (``LayerPlan.ranges``) from ``r`` times the trained length on, in which the layers
the rule gives VRPR get ``tsa+vrpr`` (VRPR's positions inside TSA's bounded context) and the TSA layers
keep TSA. Just past the trained length a model may need no position correction: with
``position_from=p`` the layers the rule gives VRPR get it only from ``p`` times the trained length on;
below ``p`` they run unchanged (``direct``), or TSA where ``bound_from`` already bounds their context.
At a length ratio ``x``, a layer the rule gives VRPR runs ``direct`` when ``x`` is below both ratios,
``tsa`` from ``bound_from`` and below ``position_from``, ``vrpr`` from ``position_from`` and below
``bound_from``, and ``tsa+vrpr`` from both (``bound_from=None`` is never reached; ``position_from=None``
is reached at every length). ``plan.methods`` holds the assignment below the first of the two ratios.
``bounded_vrpr="window+vrpr"`` bounds those layers with a sliding window instead of TSA (``tsa+vrpr``
becomes ``window+vrpr``; ``tsa`` below ``position_from`` stays).

Inputs: with a pipeline, ``inputs=`` are its own call arguments (a real prompt): the pipeline runs until
its transformer is first called (the first denoising step), and that call is probed; with a transformer
module, ``inputs=`` are its forward keyword arguments; else synthetic ones from the adapter
(``TransformerAdapter.synthetic_inputs``: Gaussian latents of the target shape, Gaussian text embeddings
of the model's width, timestep 500 of 1000: mid-denoising). ``text=`` puts given text embeddings (a
prompt encoded by the pipeline's own text encoder) in place of the synthetic inputs' Gaussian ones.

Cost: ``2 + sum over the probed layers of (shifts + 1)`` forwards of the model (a layer without RoPE has
no position probe: 1). With progress on, the count and an estimate of the time (the faster of the first
two forwards' times, times the count) are printed before the layers are probed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._progress import reporter
from .plan import LayerPlan, LengthRange
from .rotary import RotaryLayout

__all__ = ["probe", "select", "check_rule", "length_ranges", "BOUNDED_VRPR", "DEFAULT_QUERIES", "SCORES"]

#: Sampled query tokens per layer.
DEFAULT_QUERIES = 1024
#: Keys per chunk when computing logits for the sampled queries.
KEY_CHUNK = 8192
#: The pairs of scores (position, context) the selection rule can compare, by name.
SCORES = {"attention": ("position", "context"), "output": ("position_output", "context_output")}
#: The composed methods the rule's VRPR layers may take from ``bound_from`` on.
BOUNDED_VRPR = ("tsa+vrpr", "window+vrpr")


def select(position: list[float], context: list[float], *, margin: float = 0.0,
           tsa_count: int | None = None) -> list[str]:
    """The method per layer from the two scores (see the module docstring)."""
    if len(position) != len(context) or not position:
        raise ValueError(f"position and context scores need one value per layer, got {len(position)} and "
                         f"{len(context)}")
    pmax = max(max(position), 1e-12)
    cmax = max(max(context), 1e-12)
    diff = [c / cmax - p / pmax for p, c in zip(position, context, strict=True)]
    if tsa_count is not None:
        if not 0 <= tsa_count <= len(diff):
            raise ValueError(f"tsa_count must be between 0 and {len(diff)} (the layer count), got {tsa_count}")
        top = set(sorted(range(len(diff)), key=lambda i: -diff[i])[:tsa_count])
        return ["tsa" if i in top else "vrpr" for i in range(len(diff))]
    return ["tsa" if d > margin else "vrpr" for d in diff]


def _rotate(rotary: RotaryLayout, x: Tensor, grid: tuple[int, int, int], video: slice, t_shift: float) -> Tensor:
    """Video tokens of ``x`` (B, S, H, D) rotated at their original positions + ``t_shift`` (text unrotated)."""
    f, h, w = grid
    t = torch.arange(f, dtype=torch.float64).repeat_interleave(h * w) + t_shift
    hp = torch.arange(h, dtype=torch.float64).repeat_interleave(w).repeat(f)
    wp = torch.arange(w, dtype=torch.float64).repeat(f * h)
    out = x.float().clone()
    out[:, video] = rotary.rotate(x[:, video].float(), t.to(x.device), hp.to(x.device), wp.to(x.device))
    return out


def _logits(q: Tensor, k: Tensor, chunk: int = KEY_CHUNK) -> Any:
    """Yields (key slice, logits [B, H, Qs, chunk]) for sampled queries over all keys, chunk by chunk."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    for start in range(0, k.shape[1], chunk):
        sl = slice(start, min(k.shape[1], start + chunk))
        yield sl, torch.einsum("bqhd,bkhd->bhqk", q, k[:, sl]) * scale


def _entropy(q: Tensor, k: Tensor, allowed: Callable[[slice], Tensor] | None) -> Tensor:
    """Attention entropy per (batch, head, sampled query), in two passes over key chunks.

    ``H = lse - sum_k p_k s_k`` with ``lse = logsumexp_k s_k``: nothing larger than one chunk of logits
    for the sampled queries is held. ``allowed(sl)`` -> [Qs, chunk] bool restricts the keys.
    """
    def chunks() -> Any:
        for sl, s in _logits(q, k):
            yield s if allowed is None else s.masked_fill(~allowed(sl), float("-inf"))

    lse = None
    for s in chunks():
        part = torch.logsumexp(s, dim=-1)
        lse = part if lse is None else torch.logaddexp(lse, part)
    assert lse is not None
    expected = torch.zeros_like(lse)
    for s in chunks():
        p = torch.exp(s - lse[..., None])
        expected += (p * torch.where(p > 0, s, 0.0)).sum(-1)
    return lse - expected


class _Capture:
    """Keeps each layer's q/k (and text layout) from the attend calls of one forward."""

    def __init__(self) -> None:
        self.layers: dict[int, dict[str, Any]] = {}

    def __call__(self, ctx: Any, q: Tensor, k: Tensor, v: Tensor, method: Any, kwargs: dict[str, Any]) -> None:
        if ctx.layer not in self.layers:
            self.layers[ctx.layer] = dict(q=q.detach(), k=k.detach(), grid=ctx.grid.value, rotary=ctx.rotary,
                                          text_before=kwargs["text_before"], text_after=kwargs["text_after"])


class _StopError(Exception):
    """Raised by the capture hook to stop the pipeline after the transformer's first call."""


def _pipeline_inputs(pipeline: Any, module: torch.nn.Module, call: dict[str, Any], num_frames: int) -> dict[str, Any]:
    """The transformer's forward arguments of the pipeline's first denoising call with ``call`` (a real prompt).

    The pipeline runs until its transformer is first called; the call is recorded and the run stopped.
    """
    import inspect

    seen: dict[str, Any] = {}

    def hook(mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        names = list(inspect.signature(mod.forward).parameters)
        seen.update(dict(zip(names, args, strict=False)), **kwargs)
        raise _StopError

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipeline(**({"num_frames": num_frames} | call))
    except _StopError:
        pass
    finally:
        handle.remove()
    if not seen:
        raise ValueError("the pipeline call never reached its transformer: check the call arguments in inputs=")
    seen = {k: v.detach() if isinstance(v, Tensor) else v for k, v in seen.items()}
    seen["return_dict"] = False
    return seen


def _synthetic_text(kwargs: dict[str, Any], text: Tensor) -> Tensor:
    """``text`` in place of the synthetic inputs' Gaussian text embeddings (same width, device and dtype)."""
    gaussian = kwargs.get("encoder_hidden_states")
    if not isinstance(gaussian, Tensor):
        raise ValueError("probe: text= needs synthetic inputs with encoder_hidden_states; pass inputs= instead")
    if text.ndim != 3 or text.shape[0] != 1 or text.shape[-1] != gaussian.shape[-1]:
        raise ValueError(f"probe: text must be (1, tokens, {gaussian.shape[-1]}) (the model's text width), "
                         f"got {tuple(text.shape)}")
    return text.detach().to(gaussian.device, gaussian.dtype)


def _duration(seconds: float) -> str:
    """``seconds`` for people: ``12 s``, ``3.5 min``, ``2.1 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def trained_tokens(adapter: Any, pipeline: Any, trained_frames: int | None,
                   temporal_factor: int | None) -> tuple[int, int]:
    """Video frames per latent frame and the trained length in temporal tokens, as the adapter counts them:
    the given ``temporal_factor``, else the pipeline's VAE factor, else the model data's; the given
    ``trained_frames`` (video frames), else the model data's."""
    factor = int(getattr(pipeline, "vae_scale_factor_temporal", 0) or 0) or None
    data_factor = temporal_factor or factor or adapter.model_data.temporal_factor
    t_video = trained_frames if trained_frames is not None else adapter.trained_video_frames()
    return data_factor, adapter.video_to_latent(t_video, data_factor)


def model_identity(module: torch.nn.Module, n_layers: int) -> dict[str, Any]:
    """The plan's record of the model it was made for: class, layer count and the config's shape keys."""
    cfg = getattr(module, "config", None)
    identity: dict[str, Any] = {"class": type(module).__name__, "num_layers": n_layers}
    for key in ("num_attention_heads", "attention_head_dim", "num_layers", "patch_size", "in_channels"):
        value = getattr(cfg, key, None)
        if value is not None and key != "num_layers":
            identity[key] = list(value) if isinstance(value, tuple) else value
        elif value is not None and value != n_layers:  # e.g. HunyuanVideo: dual-stream blocks only
            identity["config_num_layers"] = value
    return identity


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def check_rule(score: str, bound_from: float | int | None, position_from: float | int | None = None,
               bounded_vrpr: str = "tsa+vrpr") -> None:
    """Raise ``ValueError`` unless ``score`` names a key of ``SCORES``, ``bound_from`` and
    ``position_from`` are each ``None`` or a length ratio > 1 and ``bounded_vrpr`` is one of
    ``BOUNDED_VRPR``: the rule's settings, checked before any probing (``probe``, the shapes export)."""
    if score not in SCORES:
        raise ValueError(f"probe: score must be one of {sorted(SCORES)}, got {score!r}")
    if bounded_vrpr not in BOUNDED_VRPR:
        raise ValueError(f"probe: bounded_vrpr must be one of {list(BOUNDED_VRPR)}, got {bounded_vrpr!r}")
    for label, ratio in (("bound_from", bound_from), ("position_from", position_from)):
        if ratio is not None and (not isinstance(ratio, (int, float)) or isinstance(ratio, bool)
                                  or not ratio > 1):
            raise ValueError(f"probe: {label} must be a length ratio > 1 (or None), got {ratio!r}")


def length_ranges(methods: list[str], bound_from: float | int | None, position_from: float | int | None,
                  bounded_vrpr: str = "tsa+vrpr") -> tuple[list[str], list[LengthRange]]:
    """The plan's methods below the first ratio and its length ranges, from the rule's per-layer
    choice ``methods`` (``"vrpr"`` or ``"tsa"``), ``bound_from``, ``position_from`` and ``bounded_vrpr``
    (module docstring)."""

    def at(ratio: float | int) -> list[str]:
        positions = position_from is None or ratio >= position_from
        bounded = bound_from is not None and ratio >= bound_from
        vrpr_layer = {(True, True): bounded_vrpr, (True, False): "vrpr", (False, True): "tsa",
                      (False, False): "direct"}[(positions, bounded)]
        return [vrpr_layer if m == "vrpr" else m for m in methods]

    cuts = sorted({r for r in (bound_from, position_from) if r is not None})
    return at(1.0), [LengthRange(r, at(r)) for r in cuts]


def probe(target: Any, num_frames: int, *, inputs: dict[str, Any] | None = None,
          shifts: list[float] | None = None, window: int | None = None, layers: list[int] | None = None,
          seed: int = 0, trained_frames: int | None = None, max_queries: int = DEFAULT_QUERIES,
          margin: float = 0.0, tsa_count: int | None = None, latent_size: tuple[int, int] | None = None,
          progress: bool | Callable[[int, int], None] = True,
          temporal_factor: int | None = None, text: Tensor | None = None, score: str = "attention",
          bound_from: float | int | None = None, position_from: float | int | None = None,
          bounded_vrpr: str = "tsa+vrpr") -> LayerPlan:
    """Probe every self-attention layer of ``target`` at ``num_frames`` video frames; returns the plan.

    Args:
        target: a transformer module or a pipeline (its ``transformer`` is probed).
        num_frames: video frames to probe at; must be longer than the trained length.
        inputs: for a pipeline, its own call arguments (e.g. a real prompt): the pipeline runs until its
            transformer's first call, whose arguments are then used; for a transformer module, its forward
            keyword arguments. Default: the adapter's synthetic inputs.
        shifts: key position shifts in latent frames; default ``[T, -T, 2T, -2T]``.
        window: the context probe's half window in frames; default ``(T - 1) // 2``.
        layers: the layers to probe (default all); the others get the rule's default (VRPR) and score 0.
        seed: seeds the synthetic inputs and the query sample.
        trained_frames: the trained length in video frames (default: the model's data).
        max_queries: sampled query tokens per layer.
        margin: TSA for a layer whose normalized context score exceeds its normalized position score
            by more than this (``select``).
        tsa_count: instead of ``margin``, TSA for exactly this many layers, those with the largest
            difference (``select``).
        latent_size: (height, width) of the synthetic latents (default: the adapter's, e.g. Wan 480p).
        progress: ``True`` writes a status line over the layers to stderr; a callable receives
            ``(done, total)`` layers instead (``(0, total)`` first); either prints the cost when done.
            ``False``: silent.
        temporal_factor: video frames per latent frame, as in ``freeloc.enable`` (1 for a model
            without temporal compression); default: the pipeline's, else the model data's.
        text: text embeddings (1, tokens, the model's text width), e.g. a prompt encoded with the
            pipeline's ``encode_prompt``: the synthetic inputs' conditioning instead of Gaussian tokens.
            Not with ``inputs=``.
        score: the scores the rule compares: ``"attention"`` (logit and entropy change, the paper's) or
            ``"output"`` (the model's output change); see the module docstring.
        bound_from: a length ratio (> 1) from which VRPR layers get ``tsa+vrpr`` (a length range of the
            plan); ``None``: one assignment for every length.
        position_from: a length ratio (> 1) below which the VRPR layers get no position correction
            (``direct``, or ``tsa`` from ``bound_from``); ``None``: VRPR at every length.
        bounded_vrpr: what the VRPR layers take from ``bound_from`` (and ``position_from``) on:
            ``"tsa+vrpr"`` (default) or ``"window+vrpr"`` (a sliding window's bounded context).
    """
    import freeloc
    from freeloc.registry import adapters_for

    for label, value, low in (("num_frames", num_frames, 1), ("max_queries", max_queries, 1),
                              ("trained_frames", trained_frames, 1), ("temporal_factor", temporal_factor, 1),
                              ("seed", seed, 0)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            raise ValueError(f"probe: {label} must be an int >= {low}, got {value!r}")
    if text is not None and inputs is not None:
        raise ValueError("probe: text= conditions the synthetic inputs; with inputs=, put the text embeddings in them")
    check_rule(score, bound_from, position_from, bounded_vrpr)
    name, module, adapter_cls = adapters_for(target)[0]
    adapter = adapter_cls(module, name=name)
    pipeline = None if module is target else target
    t0 = time.perf_counter()
    enable_kw: dict[str, Any] = dict(trained_frames=trained_frames, temporal_factor=temporal_factor)
    # the trained and probed lengths in temporal tokens, as the adapter counts them
    data_factor, t_latent = trained_tokens(adapter, pipeline, trained_frames, temporal_factor)
    f_latent = adapter.video_to_latent(num_frames, data_factor)
    if f_latent <= t_latent:
        raise ValueError(f"probe at a length longer than trained: num_frames={num_frames} gives {f_latent} temporal "
                         f"tokens, the model was trained on {t_latent}")
    shifts = [float(s) for s in (shifts if shifts is not None else [t_latent, -t_latent, 2 * t_latent,
                                                                    -2 * t_latent])]
    window = (t_latent - 1) // 2 if window is None else window
    if inputs is None:
        kwargs = adapter.synthetic_inputs(f_latent, seed, latent_size)
        if text is not None:
            kwargs["encoder_hidden_states"] = _synthetic_text(kwargs, text)
            mask = kwargs.get("encoder_attention_mask")
            if isinstance(mask, Tensor) and mask.shape[-1] != text.shape[1]:  # every given token attended
                kwargs["encoder_attention_mask"] = mask.new_ones(mask.shape[0], text.shape[1])
    elif pipeline is not None:
        kwargs = _pipeline_inputs(pipeline, module, dict(inputs), num_frames)
    else:
        kwargs = dict(inputs)

    def forward() -> Tensor:
        with torch.no_grad():
            out = module(**kwargs)
        out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
        return out.detach().float()

    with freeloc.enable(module, method="direct", **enable_kw) as s:
        n_layers = len(s.layers)
    probed = list(range(n_layers)) if layers is None else sorted(set(layers))
    if any(not 0 <= i < n_layers for i in probed):
        raise ValueError(f"layers must be in 0..{n_layers - 1}, got {layers}")
    forwards = 0
    t_forward = time.perf_counter()
    base = forward()
    t_forward = time.perf_counter() - t_forward
    forwards += 1
    capture = _Capture()
    f = f_latent
    # every layer through attend with plain attention: one VRPR band, or (a model without RoPE, where
    # position methods are refused) a sliding window as wide as the video
    rope = adapter.rotary_layout_or_none()
    plain = (LayerPlan.uniform("vrpr", n_layers, w1=f, w2=f + 1, g1=1, g2=1, cap=f - 1) if rope
             else LayerPlan.uniform("sliding-window", n_layers, window=f, sink=False))
    t_capture = time.perf_counter()
    with freeloc.enable(module, plan=plain, observer=capture, **enable_kw):
        forward()
        forwards += 1
    # the faster of the first two forwards: the first one also pays for one-time setup
    t_forward = min(t_forward, time.perf_counter() - t_capture)
    total = forwards + sum(1 + (len(shifts) if capture.layers[i]["rotary"] is not None else 0) for i in probed)
    if progress:
        print(f"probe: {len(probed)} layers, {total} forwards of the model, about {t_forward:.2f} s each: about "
              f"{_duration(total * t_forward)} in all (an estimate)", flush=True)

    def one_layer(layer: int, method: str, **params: Any) -> Tensor:
        plan = LayerPlan.uniform("direct", n_layers)
        plan.methods[layer] = method
        plan.params[layer] = params
        with freeloc.enable(module, plan=plan, **enable_kw):
            return forward()

    position = [0.0] * n_layers
    context = [0.0] * n_layers
    position_out = [0.0] * n_layers
    context_out = [0.0] * n_layers
    report = reporter(progress, "probing layers")
    report(0, len(probed))
    for done, layer in enumerate(probed, start=1):
        c = capture.layers[layer]
        q, k, grid = c["q"], c["k"], c["grid"]
        n = q.shape[1]
        video = slice(c["text_before"], n - c["text_after"])
        nv = video.stop - video.start
        gen = torch.Generator().manual_seed(seed * 100_003 + layer)  # per layer: independent of the probing order
        sample = torch.randperm(nv, generator=gen)[: min(max_queries, nv)].sort().values + video.start
        rotary = c["rotary"]
        if rotary is not None:
            kr = _rotate(rotary, k, grid, video, 0.0)
            qs = _rotate(rotary, q, grid, video, 0.0)[:, sample]
            diffs = []
            for shift in shifts:
                ks = _rotate(rotary, k, grid, video, shift)
                num = den = 0.0
                for (sl, a), (_, a2) in zip(_logits(qs, kr), _logits(qs, ks), strict=True):
                    del sl
                    num += float((a2 - a).pow(2).sum())
                    den += float(a.pow(2).sum())
                diffs.append(math.sqrt(num / max(den, 1e-30)))
            position[layer] = sum(diffs) / len(diffs)
            position_out[layer] = sum(_rel(one_layer(layer, "key-shift", shift=s), base) for s in shifts) / len(shifts)
            forwards += len(shifts)
        else:
            kr, qs = k.float(), q.float()[:, sample]
        hh, ww = grid[1], grid[2]
        frame_q = (sample - video.start) // (hh * ww)
        token_frame = torch.full((n,), -1, dtype=torch.long)
        token_frame[video] = torch.arange(nv) // (hh * ww)

        def allowed(sl: slice, frame_q: Tensor = frame_q, token_frame: Tensor = token_frame) -> Tensor:
            fk = token_frame[sl]
            ok = (frame_q[:, None] - fk[None, :]).abs() <= window
            return ok | (fk[None, :] < 0)  # text keys stay attended

        h_full = _entropy(qs, kr, None)
        h_win = _entropy(qs, kr, allowed)
        context[layer] = float((h_win - h_full).norm() / h_full.norm().clamp_min(1e-12))
        context_out[layer] = _rel(one_layer(layer, "sliding-window", window=window, sink=False), base)
        forwards += 1
        report(done, len(probed))
    # without RoPE the position methods do not apply: every layer gets TSA, whatever its scores
    all_scores = {"position": position, "context": context, "position_output": position_out,
                  "context_output": context_out}
    by_position, by_context = (all_scores[name] for name in SCORES[score])
    methods = select(by_position, by_context, margin=margin, tsa_count=tsa_count) if rope else ["tsa"] * n_layers
    if layers is not None:
        methods = [m if i in probed else "vrpr" for i, m in enumerate(methods)]
    seconds = time.perf_counter() - t0
    identity = model_identity(module, n_layers)
    methods, ranges = length_ranges(methods, bound_from, position_from, bounded_vrpr)
    plan = LayerPlan(methods=methods, params=[{} for _ in range(n_layers)], ranges=ranges,
                     scores=all_scores,
                     model=identity, trained_frames=t_latent,
                     meta={"source": "freeloc.probe",
                           "rule": {"name": "normalized dominance", "score": score, "margin": margin,
                                    "tsa_count": tsa_count, "bound_from": bound_from,
                                    "position_from": position_from, "bounded_vrpr": bounded_vrpr},
                           "probe": {"num_frames": num_frames, "latent_frames": f_latent, "shifts": shifts,
                                     "window": window, "layers": probed, "seed": seed, "max_queries": max_queries,
                                     "temporal_factor": data_factor,
                                     "timestep": None if inputs is not None else 500,
                                     "inputs": "given" if inputs is not None else
                                     "synthetic" if text is None else "synthetic latents, given text"},
                           "cost": {"seconds": round(seconds, 3), "forwards": forwards}})
    if progress:
        print(f"probe: {len(probed)} layers, {forwards} forwards, {seconds:.1f} s")
    return plan
