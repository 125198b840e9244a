"""Draw the picture of docs/architecture.md: the layers of the package and the flow of one hooked forward.

    python docs/images/make_architecture.py

writes architecture.png next to this file.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

HERE = Path(__file__).resolve().parent

LAYERS = [  # (title, modules, colour), top to bottom: imports point down
    ("apps", "freeloc.app: the freeloc command, video, plots\nfreeloc.shapes: the shapes test bed\n"
             "benchmarks/, docs/", "#fde2c8"),
    ("adapters", "freeloc.adapters: wan, hunyuan, cogvideox, opensora\nexternal packages, found by the entry "
                 "point\ngroup freeloc.adapters", "#d6e9f8"),
    ("core (torch only)", "positions, patterns, bands, rotary, methods, plan\nsession, probing, adapter, registry, "
                          "testing\nattention: attend, options, planner, backends", "#dcefd8"),
]

FLOW = [  # one hooked forward, top to bottom
    ("pipeline call", "#eeeeee"),
    ("transformer pre-hook: latent grid (F, H', W')", "#d6e9f8"),
    ("layer processor (adapter): q, k, v before RoPE, text placement", "#d6e9f8"),
    ("LayerContext: the layer's method at this grid (LayerPlan)", "#dcefd8"),
    ("attend: validate -> method.band_set(grid) -> bands", "#dcefd8"),
    ("plan (pure, cached by bands, shape, options):\nrotations + parts, each bound to one backend", "#dcefd8"),
    ("rotate q, k as the plan says", "#dcefd8"),
    ("parts: dense | reference | chunked | flex | text", "#dcefd8"),
    ("one log-sum-exp merge -> output", "#dcefd8"),
    ("adapter: output projection, the rest of the block", "#d6e9f8"),
]


def box(ax: plt.Axes, x: float, y: float, w: float, h: float, text: str, colour: str, size: float = 9,
        title: str | None = None) -> None:
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.01,rounding_size=0.015", fc=colour,
                                ec="#555555", lw=0.8))
    if title is None:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size)
    else:
        ax.text(x + 0.015, y + h - 0.02, title, ha="left", va="top", fontsize=size + 1, fontweight="bold")
        ax.text(x + 0.015, y + h - 0.065, text, ha="left", va="top", fontsize=size - 0.5, family="monospace")


def arrow(ax: plt.Axes, x0: float, y0: float, x1: float, y1: float) -> None:
    ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=10, color="#444444", lw=0.9))


def main() -> None:
    fig, ax = plt.subplots(figsize=(13, 6.4))
    ax.set_xlim(0, 1.3)
    ax.set_ylim(0, 1)
    ax.axis("off")
    ax.text(0.02, 0.97, "Layers: each imports only the ones below it", fontsize=11, fontweight="bold")
    h, gap, top = 0.2, 0.08, 0.92
    for i, (title, modules, colour) in enumerate(LAYERS):
        y = top - (i + 1) * h - i * gap
        box(ax, 0.02, y, 0.52, h, modules, colour, title=title)
        if i:
            arrow(ax, 0.28, y + h + gap, 0.28, y + h + 0.005)
    ax.text(0.62, 0.97, "One hooked forward", fontsize=11, fontweight="bold")
    n = len(FLOW)
    step = 0.92 / n
    for i, (text, colour) in enumerate(FLOW):
        y = 0.93 - (i + 1) * step
        box(ax, 0.62, y + 0.012, 0.66, step - 0.024, text, colour, size=8.5)
        if i:
            arrow(ax, 0.95, y + step + 0.012, 0.95, y + step - 0.012)
    fig.tight_layout()
    fig.savefig(HERE / "architecture.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
