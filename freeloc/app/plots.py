"""The pictures of the ``freeloc`` command: explain, probe scores, and the demo's reports and frame strips.

Every function draws with matplotlib (the ``app`` extra) on the Agg backend and writes one PNG.
matplotlib is imported when a picture is drawn, never when this module is imported.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .._extras import require
from .._files import atomic_path
from ..loss_probe import loss_score_name
from ..patterns import TSA
from ..plan import LayerPlan
from ..positions import VRPR
from ..session import Session

__all__ = ["explain_png", "frames_png", "metrics_by_length_png", "plot_scores", "report_png"]


def _save(plt: ModuleType, fig: Any, path: Any, dpi: int, make_folder: bool = False) -> Any:
    """Write ``fig`` to ``path`` whole or not at all, close it, return ``path``."""
    if make_folder:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    return path


def _pyplot(purpose: str) -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend (no display needed), or the error naming the ``app`` extra."""
    matplotlib = require("matplotlib", "app", purpose)
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", "app", purpose)


def explain_png(data: dict[str, Any], path: Path) -> Path:
    """Draw ``freeloc.app.cli.explain_data``'s result: r[i, j], the r(Δ) profile, and TSA's frame pattern."""
    plt = _pyplot("freeloc explain --png")
    np = require("numpy", "app", "freeloc explain --png")
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    f, t, cap, v = data["num_frames"], data["trained_frames"], data["cap"], data["vrpr"]
    vrpr = VRPR(v["w1"], v["w2"], v["g1"], v["g2"], v["cap"])
    r = vrpr.relative_distance(f).numpy()
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.4), constrained_layout=True)

    ax = axes[0]
    lim = max(int(np.abs(r).max()), 1)
    im = ax.imshow(r, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.85, label="r[i, j]")
    ax.set_title(f"VRPR effective distance r[i, j]   (cap ±{v['cap']}, max |r| = {data['max_abs_r_after']})",
                 fontsize=10)
    ax.set_xlabel("key frame j")
    ax.set_ylabel("query frame i")

    ax = axes[1]
    d = np.arange(-(f - 1), f)
    r_min = np.array(data["profile"]["r_min"])
    r_max = np.array(data["profile"]["r_max"])
    lo = np.concatenate([-r_max[:0:-1], r_min])  # future keys mirror past keys: r(-Δ) = -r(Δ)
    hi = np.concatenate([-r_min[:0:-1], r_max])
    ax.plot(d, d, color="0.6", ls="--", lw=1, label="original r = Δ")
    ax.fill_between(d, lo, hi, color="#1f77b4", alpha=0.35, step="mid", lw=0)
    ax.plot(d, hi, color="#1f77b4", lw=1.3, drawstyle="steps-mid", label="VRPR r(Δ), min..max over queries")
    ax.plot(d, lo, color="#1f77b4", lw=1.3, drawstyle="steps-mid")
    for sign in (1, -1):
        ax.axhline(sign * cap, color="#d62728", ls=":", lw=1.2, label=f"cap ±{cap}" if sign == 1 else None)
    ax.set_ylim(-(f - 1) * 1.05 - 1, (f - 1) * 1.05 + 1)
    ax.set_xlabel("original Δ = i - j (frames)")
    ax.set_ylabel("effective distance r")
    ax.set_title(f"r(Δ): max |r| {data['max_abs_r_before']} -> {data['max_abs_r_after']}   "
                 f"(w1={v['w1']}, w2={v['w2']}, g1={v['g1']}, g2={v['g2']})", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[2]
    tsa_info = data["tsa"]
    tsa = TSA.for_length(f, t) or TSA(cap=cap)
    tier = np.zeros((f, f), dtype=int)
    codes = {"local": 1, "striped": 2, "sink": 3}
    for band in tsa.band_set(f, data["tokens_per_frame"]).bands:
        tier[band.pairs.numpy()] = codes[band.name]
    colours = ["#f2f2f2", "#1f77b4", "#ff7f0e", "#2ca02c"]
    ax.imshow(tier, cmap=ListedColormap(colours), vmin=0, vmax=3, interpolation="nearest")
    ax.set_xlabel("key frame j")
    ax.set_ylabel("query frame i")
    ax.set_title(f"TSA frame pattern: {tsa_info['block_density']:.2f} of dense "
                 f"({tsa_info['block_size']}-token blocks)"
                 + ("" if tsa_info["applied"] else " [not applied: F <= T]"), fontsize=10)
    ax.legend(handles=[
        Patch(color=colours[1], label=f"local  |Δ| ≤ {tsa.d1} (+ frame 0 for i ≤ {tsa.d2})"),
        Patch(color=colours[2], label=f"striped  {tsa.d1} < |Δ| ≤ {tsa.d2}"),
        Patch(color=colours[3], label="sink  j = 0 (grouped positions)"),
        Patch(facecolor=colours[0], edgecolor="0.6", label="not attended"),
    ], loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=2, fontsize=8, frameon=False)

    inp = data["input"]
    unit = ("" if inp["unit"] != "video frames"
            else f" ({inp['num_frames']} video frames, trained on {inp['trained_frames']})")
    fig.suptitle(f"FreeLOC at F = {f} temporal tokens, T = {t}{unit}: VRPR {v['source']} setting",
                 fontsize=11)
    return _save(plt, fig, Path(path), 100)


def plot_scores(plan: LayerPlan, path: Path | str) -> Path | str:
    """Both sensitivity scores per layer (normalized by their maximum) and the resulting assignment, as PNG.

    ``plan`` is a plan written by ``freeloc.probe`` (it holds the scores), or by ``freeloc.probe_loss``
    (its gains per length ratio and layer are drawn instead); returns ``path``.
    """
    plt = _pyplot("freeloc probe --png")
    if "position" not in plan.scores:
        return _plot_loss_gains(plt, plan, path)

    pos, ctx = plan.scores["position"], plan.scores["context"]
    n = len(pos)
    pmax, cmax = max(max(pos), 1e-12), max(max(ctx), 1e-12)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * n + 2), 3.6))
    x = list(range(n))
    ax.bar([i - 0.2 for i in x], [p / pmax for p in pos], 0.4, label=f"position (max {pmax:.3g})", color="tab:blue")
    ax.bar([i + 0.2 for i in x], [c / cmax for c in ctx], 0.4, label=f"context (max {cmax:.3g})",
           color="tab:orange")
    for i, m in enumerate(plan.methods):
        ax.text(i, 1.04, m.upper(), ha="center", fontsize=7, color="tab:orange" if m == "tsa" else "tab:blue")
    ax.set_ylim(0, 1.15)
    ax.set_xticks(x)
    ax.set_xlabel("self-attention layer")
    ax.set_ylabel("sensitivity / max over layers")
    ax.set_title("layer sensitivity (TSA where context dominates)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _save(plt, fig, path, 110)


def _plot_loss_gains(plt: Any, plan: LayerPlan, path: Path | str) -> Path | str:
    """``freeloc.probe_loss``'s relative loss gain per layer at each of its ratios, and the choice there."""
    ranges = plan.ranges
    if not ranges or any(loss_score_name(r.from_ratio) not in plan.scores for r in ranges):
        raise ValueError(f"plot_scores: the plan has neither the probe's position/context scores nor a loss gain per "
                         f"length range; its scores: {sorted(plan.scores)}")
    n = len(plan.methods)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * n * len(ranges) / 2 + 2), 3.8))
    width = 0.8 / len(ranges)
    candidate = plan.meta.get("rule", {}).get("candidate")
    for j, r in enumerate(ranges):
        gains = [100 * g for g in plan.scores[loss_score_name(r.from_ratio)]]
        xs = [i - 0.4 + width * (j + 0.5) for i in range(n)]
        bars = ax.bar(xs, gains, width, label=f"from {float(r.from_ratio):g}x")
        for x, g, m in zip(xs, gains, r.methods, strict=True):
            if m == candidate:
                ax.text(x, g, "*", ha="center", va="bottom" if g >= 0 else "top", fontsize=9,
                        color=bars.patches[0].get_facecolor())
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(list(range(n)))
    ax.set_xlabel("self-attention layer")
    ax.set_ylabel("loss gain of the switch, %")
    ax.set_title(f"loss probe: {plan.meta.get('rule', {}).get('base')} -> {candidate} on one layer "
                 "(* taken)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(plt, fig, path, 110)


def report_png(direct: Session, long: Session, path: Path, num_frames: int, trained: int) -> Path:
    """Per layer, direct against FreeLOC: the largest temporal relative distance and the attended density.

    ``direct`` and ``long`` are the two sessions of ``freeloc demo --model random``; ``num_frames`` and
    ``trained`` are latent frames, for the title and the trained range.
    """
    plt = _pyplot("the demo's report.png")

    layers = [s.layer for s in long.layers]
    methods = [s.method for s in long.layers]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    x = torch.arange(len(layers)).tolist()
    for ax, key, label in ((axes[0], "max_abs_distance", "max |temporal relative distance|"),
                           (axes[1], "density", "attended fraction of token pairs")):
        d = [getattr(s, key) for s in direct.layers]
        f = [getattr(s, key) for s in long.layers]
        ax.bar([i - 0.2 for i in x], d, 0.4, label="direct", color="tab:gray")
        ax.bar([i + 0.2 for i in x], f, 0.4, label="FreeLOC", color="tab:blue")
        ax.set_xticks(x, [f"{i}\n{m}" for i, m in zip(layers, methods, strict=True)])
        ax.set_xlabel("layer / FreeLOC method")
        ax.set_title(label)
        if key == "max_abs_distance":
            ax.axhline(trained - 1, color="tab:red", linestyle=":", label=f"trained range ({trained - 1})")
        ax.legend(fontsize=8)
    fig.suptitle(f"tiny Wan, {num_frames} latent frames = 4x its trained {trained}: direct vs FreeLOC")
    fig.tight_layout()
    return _save(plt, fig, path, 110, make_folder=True)


def frames_png(rows: dict[str, Float[Tensor, "_frames 3 _height _width"]], path: Path, title: str,
               columns: int = 16,
               frames: list[int] | None = None, highlight: list[int] | None = None) -> Path:
    """A PNG with one row per labelled (T, 3, H, W) video: ``columns`` evenly spaced frames, or the
    given ``frames`` (indices, for example consecutive ones to show motion); the frame numbers in
    ``highlight`` are drawn in bold red."""
    plt = _pyplot("the frame strips (frames_png)")

    length = min(v.shape[0] for v in rows.values())
    if frames is not None:
        bad = [i for i in frames if not 0 <= i < length]
        if not frames or bad:
            raise ValueError(f"frames must be a non-empty list of indices in [0, {length}), got {frames}")
        idx = torch.tensor(frames)
    else:
        idx = torch.linspace(0, length - 1, columns).round().long()
    columns = len(idx)
    fig, axes = plt.subplots(len(rows), 1, figsize=(columns * 0.75, 1.05 * len(rows) + 0.5), squeeze=False)
    axes = axes[:, 0]
    for ax, (label, video) in zip(axes, rows.items(), strict=True):
        h = video.shape[-1] + 2
        row = torch.cat([torch.nn.functional.pad(video[i], (1, 1, 1, 1), value=1.0) for i in idx], dim=2)
        ax.imshow(row.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_yticks([])
        ax.set_xticks([h * j + h // 2 for j in range(columns)], [str(int(i)) for i in idx], fontsize=6)
        for tick, i in zip(ax.get_xticklabels(), idx.tolist(), strict=True):
            if highlight is not None and i in highlight:
                tick.set_color("tab:red")
                tick.set_fontweight("bold")
        ax.set_ylabel(label, fontsize=8)
    axes[-1].set_xlabel("frame")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(plt, fig, path, 110, make_folder=True)


def metrics_by_length_png(lines: dict[str, dict[str, list[tuple[int, float, float, float]]]], path: Path,
                          trained: int, subtitle: str = "") -> Path:
    """One panel per metric, the length (x the trained length, log scale) across: one line per method, its
    95% interval shaded.

    Args:
        lines: ``{metric label: {method: [(multiple, mean, low, high), ...]}}``.
        path: the PNG to write.
        trained: the trained length in frames (for the axis label).
        subtitle: appended to the title.
    """
    plt = _pyplot("the metrics-by-length plot (metrics_by_length_png)")
    if not lines or not all(lines.values()):
        raise ValueError("metrics_by_length_png needs at least one metric with at least one method")
    fig, axes = plt.subplots(1, len(lines), figsize=(5.2 * len(lines), 4.2), squeeze=False)
    # One colour per method in every panel: the hues of tab20 but its grey first, then their light shades;
    # FreeLOC's own lines black (the last one, in practice the plan) and greys, drawn thicker.
    names = list(dict.fromkeys(m for methods in lines.values() for m in methods))
    palette = [plt.get_cmap("tab20")(i) for i in [*range(0, 20, 2), *range(1, 20, 2)] if i not in (14, 15)]
    others = iter(palette * (len(names) // len(palette) + 1))
    colours = {m: next(others) for m in names if not m.startswith("freeloc")}
    ours = [m for m in names if m.startswith("freeloc")][::-1]
    colours |= {m: ["black", "dimgray", "darkgray", "silver"][i % 4] for i, m in enumerate(ours)}
    for ax, (label, methods) in zip(axes[0], lines.items(), strict=True):
        for method, points in methods.items():
            points = sorted(points)
            x = [p[0] for p in points]
            ax.plot(x, [p[1] for p in points], marker="o", markersize=3, label=method, color=colours[method],
                    linewidth=2.2 if method.startswith("freeloc") else 1.2)
            ax.fill_between(x, [p[2] for p in points], [p[3] for p in points], color=colours[method], alpha=0.12)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({p[0] for pts in methods.values() for p in pts}))
        ax.set_xticklabels([f"{m}x" for m in sorted({p[0] for pts in methods.values() for p in pts})])
        ax.set_xlabel(f"length (x the trained {trained} frames)")
        ax.set_ylabel(f"{label} (fraction of frames)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.set_title(label)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.suptitle("quality against length, mean and 95% bootstrap interval" + (f": {subtitle}" if subtitle else ""),
                 fontsize=10)
    fig.tight_layout()
    return _save(plt, fig, path, 110, make_folder=True)
