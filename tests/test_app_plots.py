"""The pictures of the ``freeloc`` command, drawn directly (the command's own runs are in test_app_cli/video)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from freeloc import LayerPlan
from freeloc.app.cli import explain_data
from freeloc.app.plots import explain_png, frames_png, metrics_by_length_png, plot_scores
from freeloc.plan import LengthRange


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


def test_plot_scores_draws_a_loss_probe_plan_and_refuses_a_plan_without_scores(
        tmp_path: Path, is_png: Callable[[Path], bool]) -> None:
    plan = LayerPlan(methods=["direct"] * 3, ranges=[LengthRange(2, ["tsa", "tsa+vrpr", "tsa"]),
                                                     LengthRange(4, ["tsa+vrpr", "tsa", "tsa"])],
                     scores={"loss_gain_2x": [-0.01, 0.02, -0.003], "loss_gain_4x": [0.004, -0.02, -0.001]},
                     meta={"rule": {"name": "loss", "base": "tsa", "candidate": "tsa+vrpr"}})
    path = tmp_path / "gains.png"
    assert plot_scores(plan, path) == path and is_png(path)
    with pytest.raises(ValueError, match=r"neither the probe's position/context scores nor a loss gain per length "
                                         r"range; its scores: \[\]"):
        plot_scores(LayerPlan(methods=["tsa"]), tmp_path / "none.png")


@pytest.mark.parametrize(("num_frames", "trained_frames"), [(321, 81), (81, 81)], ids=["longer", "not-longer"])
def test_explain_png_draws_longer_and_trained_lengths(num_frames: int, trained_frames: int, tmp_path: Path,
                                                      is_png: Callable[[Path], bool]) -> None:
    """At the trained length TSA is not applied; the picture still shows what it would attend."""
    path = explain_png(explain_data(num_frames, trained_frames), tmp_path / "explain.png")
    assert path.stat().st_size > 10_000 and is_png(path)


def test_metrics_by_length_gives_every_method_its_own_colour_in_every_panel(
        tmp_path: Path, is_png: Callable[[Path], bool], monkeypatch: pytest.MonkeyPatch) -> None:
    """Twelve methods (more than one colour cycle): no two share a colour, a method keeps its colour across
    panels, and the plan's line is black."""
    from matplotlib.axes import Axes
    from matplotlib.colors import to_hex

    drawn: list[tuple[str, str]] = []
    plot = Axes.plot

    def recording(self: Axes, *args: object, **kwargs: object) -> object:
        drawn.append((str(kwargs["label"]), to_hex(kwargs["color"])))  # type: ignore[arg-type]
        return plot(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", recording)
    methods = [f"m{i}" for i in range(10)] + ["freeloc-uniform", "freeloc-probe"]
    points = {m: [(1, 0.8, 0.7, 0.9), (2, 0.7 - 0.01 * i, 0.6, 0.8)] for i, m in enumerate(methods)}
    path = metrics_by_length_png({"a": points, "b": dict(points)}, tmp_path / "lengths.png", 16, "test")
    assert is_png(path)
    colours = dict(drawn)
    assert len(drawn) == 24 and len(set(colours.values())) == 12 and set(drawn) == set(colours.items())
    assert colours["freeloc-probe"] == "#000000"
