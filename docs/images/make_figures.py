"""Draw the two pictures used in docs/concepts.md.

    python docs/images/make_figures.py

writes vrpr_distance.png and tsa_pattern.png next to this file. The VRPR formula is written out here
on purpose (independent of the library), as in the method's specification, for F = 81 latent frames.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

HERE = Path(__file__).resolve().parent
F = 81  # latent frames (321 video frames of Wan 2.1)
W1, W2, G1, G2, CAP = 10, 14, 2, 8, 20  # published VRPR setting for F = 81 (T = 21, cap = T - 1)
D1, D2 = 8, 24  # TSA tier bounds


def vrpr_distance(f, w1, w2, g1, g2, cap):
    """Effective relative distance r[i, j] = q_pos - k_pos (i: query frame, j: key frame)."""
    i, j = np.meshgrid(np.arange(f), np.arange(f), indexing="ij")
    d = i - j
    c1 = w1 - (-(-w1 // g1))  # W1 - ceil(W1 / G1)
    c2 = w2 - w2 // g2 - (w2 - w1) // g1
    q, k = i.copy(), j.copy()  # near tier, |d| < W1: exact positions
    mid_past, mid_future = (d >= w1) & (d < w2), (-d >= w1) & (-d < w2)
    far_past, far_future = d >= w2, -d >= w2
    q = np.where(mid_past, i // g1 + c1, q)
    k = np.where(mid_past, j // g1, k)
    q = np.where(mid_future, i // g1, q)
    k = np.where(mid_future, j // g1 + c1, k)
    q = np.where(far_past, np.minimum(i // g2 + c2, cap), q)
    k = np.where(far_past, j // g2, k)
    q = np.where(far_future, i // g2, q)
    k = np.where(far_future, np.minimum(j // g2 + c2, cap), k)
    return q - k


def tsa_pattern(f, d1, d2):
    """Frame-level TSA tiers: 0 not attended, 1 dense, 2 striped, 3 first-frame sink."""
    i, j = np.meshgrid(np.arange(f), np.arange(f), indexing="ij")
    a = np.abs(i - j)
    tier = np.zeros((f, f), dtype=int)
    tier[a <= d1] = 1
    tier[(a > d1) & (a <= d2)] = 2
    tier[(j == 0) & (i > d2)] = 3  # queries farther than D2 see frame 0 through the sink tier
    return tier


def draw_vrpr(path):
    r = vrpr_distance(F, W1, W2, G1, G2, CAP)
    assert np.abs(r).max() <= CAP and (r == -r.T).all()
    delta = np.subtract.outer(np.arange(F), np.arange(F))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.7), constrained_layout=True)
    for ax, m, title in (
        (axes[0], delta, f"original  i - j  (up to ±{F - 1})"),
        (axes[1], r, f"VRPR  r[i, j]  (|r| ≤ {CAP})"),
    ):
        lim = np.abs(m).max()
        im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, origin="upper")
        ax.contour(np.abs(delta) > CAP, levels=[0.5], colors="k", linewidths=0.8)
        ax.set_title(title)
        ax.set_xlabel("key frame j")
        ax.set_ylabel("query frame i")
        fig.colorbar(im, ax=ax, shrink=0.85)
    fig.suptitle(
        f"Temporal relative distance, F = {F} latent frames, trained range ±{CAP} "
        f"(black line: |i - j| = {CAP})\nVRPR setting W1={W1}, W2={W2}, G1={G1}, G2={G2}, cap={CAP}",
        fontsize=10,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_tsa(path):
    tier = tsa_pattern(F, D1, D2)
    colours = ["#ffffff", "#1f77b4", "#ff7f0e", "#2ca02c"]
    fig, ax = plt.subplots(figsize=(5.6, 5.2), constrained_layout=True)
    ax.imshow(tier, cmap=ListedColormap(colours), vmin=0, vmax=3, interpolation="nearest")
    ax.set_xlabel("key frame j")
    ax.set_ylabel("query frame i")
    ax.set_title(f"TSA frame-level pattern, F = {F} latent frames", fontsize=10)
    ax.legend(
        handles=[
            Patch(color=colours[1], label=f"dense  |i - j| ≤ {D1}"),
            Patch(color=colours[2], label=f"striped  {D1} < |i - j| ≤ {D2}"),
            Patch(color=colours[3], label="sink  j = 0 (grouped positions)"),
            Patch(facecolor=colours[0], edgecolor="0.6", label="not attended"),
        ],
        loc="upper right",
        fontsize=8,
        framealpha=0.95,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    draw_vrpr(HERE / "vrpr_distance.png")
    draw_tsa(HERE / "tsa_pattern.png")
    print(f"wrote {HERE / 'vrpr_distance.png'} and {HERE / 'tsa_pattern.png'}")
