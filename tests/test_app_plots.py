"""The pictures of the ``freeloc`` command, drawn directly (the command's own runs are in test_app_cli/video)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from freeloc import LayerPlan
from freeloc.app.cli import explain_data
from freeloc.app.plots import explain_png, frames_png, plot_scores


def test_frames_png_takes_explicit_frames_and_rejects_bad_ones(tmp_path: Path, is_png: Callable[[Path], bool]) -> None:
    video = torch.rand(6, 3, 8, 8)
    plain = frames_png({"a": video}, tmp_path / "even.png", "t", columns=3)
    chosen = frames_png({"a": video, "b": video}, tmp_path / "chosen.png", "t", frames=[2, 3, 4])
    assert is_png(plain) and is_png(chosen)
    for bad in ([], [6], [-1, 2]):
        with pytest.raises(ValueError, match=r"frames must be a non-empty list of indices in \[0, 6\), got"):
            frames_png({"a": video}, tmp_path / "bad.png", "t", frames=bad)


def test_plot_scores_draws_a_probed_plan(tmp_path: Path, is_png: Callable[[Path], bool]) -> None:
    plan = LayerPlan(methods=["vrpr", "tsa", "vrpr"],
                     scores={"position": [0.9, 0.1, 0.5], "context": [0.2, 1.0, 0.4]})
    path = tmp_path / "scores.png"
    assert plot_scores(plan, path) == path and is_png(path)
    assert plot_scores(plan, str(tmp_path / "as-text.png")) == str(tmp_path / "as-text.png")
    assert is_png(tmp_path / "as-text.png")


@pytest.mark.parametrize(("num_frames", "trained_frames"), [(321, 81), (81, 81)], ids=["longer", "not-longer"])
def test_explain_png_draws_longer_and_trained_lengths(num_frames: int, trained_frames: int, tmp_path: Path,
                                                      is_png: Callable[[Path], bool]) -> None:
    """At the trained length TSA is not applied; the picture still shows what it would attend."""
    path = explain_png(explain_data(num_frames, trained_frames), tmp_path / "explain.png")
    assert path.stat().st_size > 10_000 and is_png(path)
