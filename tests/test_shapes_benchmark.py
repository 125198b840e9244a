"""``benchmarks/long_video.py`` runs end to end (one clip, one sampling step: the table's shape, not its numbers)."""

from __future__ import annotations

import json
import math
import runpy
import sys
from pathlib import Path
from typing import Any

import pytest

from freeloc.shapes.model import load_shipped

pytest.importorskip("diffusers", reason="the shapes model is a diffusers WanTransformer3DModel (extra 'shapes')")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "long_video.py"


def test_long_video_benchmark_prints_every_method_and_length(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "table.json"
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--lengths", "1,2", "--conditions", "2", "--steps", "1",
                                      "--methods", "direct,riflex,tsa,tsa+vrpr,freeloc-uniform,freeloc-probe",
                                      "--score", "output", "--bound-from", "2", "--position-from", "4",
                                      "--bounded-vrpr", "window+vrpr", "--json", str(out),
                                      "--png", str(tmp_path / "strip.png"), "--plot", str(tmp_path / "plot.png")])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    rows = data["results"]
    methods = ("direct", "riflex", "tsa", "tsa+vrpr", "freeloc-uniform", "freeloc-probe")
    expected = [(m, name) for m in (1, 2) for name in ("real clips", *methods)]
    assert [(r["length"], r["method"]) for r in rows] == expected
    assert all(r["palette_fidelity"] == 1.0 and len(r["per_clip"]) == 2 for r in rows if r["method"] == "real clips")
    assert "probe plan at 4x (score 'output', bound_from 2.0, position_from 4.0, bounded_vrpr 'window+vrpr')" in text
    assert "; from 2x: ['tsa', " in text and "; from 4x: [" in text
    assert [layer["method"] for layer in data["plan"]["ranges"][0]["layers"]] == ["tsa"] * 8
    assert data["plan"]["meta"]["rule"]["bound_from"] == 2.0 and data["plan"]["meta"]["rule"]["position_from"] == 4.0
    assert "RIFLEx k = 2" in text and "2x (32)" in text and "test split (seeds 50000-50001)" in text
    colours = data["intervals"]["2"]["color_consistency"]
    assert set(colours) == set(methods) and "vs_direct" not in colours["direct"]
    assert colours["tsa"]["best_uniform"] in ("riflex", "tsa+vrpr", "freeloc-uniform")
    assert len(colours["tsa"]["vs_direct"]) == 3 and (tmp_path / "plot.png").stat().st_size > 10_000


def test_long_video_benchmark_resumes_from_its_json_and_refuses_other_settings(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "table.json"
    common = ["--conditions", "1", "--steps", "1", "--json", str(out), "--plot", str(tmp_path / "plot.png")]
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--lengths", "1", "--methods", "direct,tsa", *common])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    first = {(r["length"], r["method"]): r for r in json.loads(out.read_text())["results"]}
    capsys.readouterr()
    # extended: one more length and one more method; the earlier pairs are read back, not sampled again
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--lengths", "1,2", "--methods", "direct,vrpr", "--resume",
                                      *common])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    rows = {(r["length"], r["method"]): r for r in data["results"]}
    assert set(rows) == {(m, name) for m in (1, 2) for name in ("real clips", "direct", "vrpr")} | {(1, "tsa")}
    assert rows[(1, "direct")] == first[(1, "direct")] and rows[(1, "tsa")] == first[(1, "tsa")]
    assert text.count("(from --json)") == 1 and "1x (16) direct" in text  # only 1x direct is printed from the file
    assert set(data["intervals"]["1"]["color_consistency"]) == {"direct", "tsa", "vrpr"}  # tsa kept at 1x
    assert (tmp_path / "plot.png").stat().st_size > 10_000
    # other settings: refused before sampling, naming what differs; the file is left as it was
    before = out.read_text()
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--lengths", "1", "--methods", "direct", "--resume",
                                      *common[:2], "--steps", "2", *common[4:]])
    with pytest.raises(SystemExit):
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert "other settings (steps: [1], this run: [2])" in capsys.readouterr().err and out.read_text() == before
    shipped_shift = data["sample_shift"]
    assert shipped_shift == load_shipped()[1].sampling_shift  # the shipped model's own
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--lengths", "1", "--methods", "direct", "--resume",
                                      "--sample-shift", "7", *common])
    with pytest.raises(SystemExit):
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert f"other settings (sample_shift: [{shipped_shift}], this run: [7.0])" in capsys.readouterr().err
    assert out.read_text() == before
    shipped_noise = data["sample_noise"]
    assert shipped_noise == load_shipped()[1].sample_noise  # the shipped model's own
    for noise, refusal in (("0.25", f"other settings (sample_noise: [{shipped_noise}], this run: [0.25])"),
                           ("2", "--sample-noise must be a number in [0, 1], got 2.0")):
        monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--lengths", "1", "--methods", "direct", "--resume",
                                          "--sample-noise", noise, *common])
        with pytest.raises(SystemExit):
            runpy.run_path(str(SCRIPT), run_name="__main__")
        assert refusal in capsys.readouterr().err
    assert out.read_text() == before
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--resume"])
    with pytest.raises(SystemExit):
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert "give --json" in capsys.readouterr().err


def test_long_video_benchmark_adds_baselines_to_a_file_with_a_plan(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A resumed run without ``freeloc-probe`` samples no plan: the file keeps its plan and its plan's rows."""
    out = tmp_path / "table.json"
    common = ["--lengths", "1", "--conditions", "1", "--steps", "1", "--json", str(out), "--plot",
              str(tmp_path / "plot.png"), "--png", str(tmp_path / "strip.png")]
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--methods", "direct,freeloc-probe", "--score", "output",
                                      *common])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    first = json.loads(out.read_text())
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--methods", "tsa", "--resume", *common])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    assert "probe plan" not in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["plan"] == first["plan"] and data["plan_methods"] == first["plan_methods"]
    assert {r["method"] for r in data["results"]} == {"real clips", "direct", "freeloc-probe", "tsa"}
    assert [r for r in data["results"] if r["method"] == "freeloc-probe"] == \
        [r for r in first["results"] if r["method"] == "freeloc-probe"]


def test_bootstrap_intervals_are_paired_and_cover_the_mean() -> None:
    bench = runpy.run_path(str(SCRIPT))
    assert bench["bootstrap"]([0.5] * 16) == (0.5, 0.5, 0.5)
    mean, lo, hi = bench["bootstrap"]([0.0, 1.0] * 8)
    assert mean == 0.5 and 0.1 < lo < 0.5 < hi < 0.9
    assert bench["bootstrap"]([float("nan"), 1.0, 1.0]) == (1.0, 1.0, 1.0)  # NaN clips are skipped
    # paired: a method that beats another on every clip by 0.1 has a tight interval at +0.1, however far apart
    # the clips' own scores are
    a = [{"c": x} for x in (0.1, 0.9, 0.4, 0.7)]
    b = [{"c": x["c"] - 0.1} for x in a]
    clips = {"direct": b, "tsa": a, "vrpr": b}
    found = bench["intervals"](clips, "c")
    assert found["tsa"]["vs_direct"] == pytest.approx((0.1, 0.1, 0.1))
    assert found["tsa"]["best_uniform"] == "vrpr" and found["vrpr"]["best_uniform"] == "tsa"


def test_long_video_benchmark_rejects_an_unknown_method(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--methods", "direct,freenoise"])
    with pytest.raises(SystemExit):
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert "unknown ['freenoise']" in capsys.readouterr().err


ABLATION = Path(__file__).resolve().parents[1] / "benchmarks" / "ablation.py"


def test_ablation_scores_every_layer_and_method_and_correlates_the_probe(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ablation.json"
    monkeypatch.setattr(sys, "argv", [str(ABLATION), "--lengths", "2", "--conditions", "1", "--steps", "1",
                                      "--methods", "vrpr,tsa,tsa+vrpr", "--json", str(out)])
    runpy.run_path(str(ABLATION), run_name="__main__")
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    n = len(data["probe"]["layers"])  # the shipped model's layers
    methods = ("vrpr", "tsa", "tsa+vrpr")
    assert sorted(data["raw"]["2"]) == sorted(["direct", *(f"{i}:{m}" for i in range(n) for m in methods)])
    assert list(data["effects"]["2"]) == ["direct", *methods] and data["effects"]["2"]["direct"] == [0.0] * n
    assert [len(v) for v in data["effects"]["2"].values()] == [n] * 4
    assert set(data["correlations"]["2"]) >= {"position", "context", "rule (attention)", "rule (output)"}
    assert set(data["correlations"]["2 vrpr gain inside tsa"]) == set(data["correlations"]["2"]) | {"loss gain"}
    assert f"[{1 + 3 * n}/{1 + 3 * n}]" in text and "the ablation's best method per layer at 2x" in text
    assert "VRPR gain inside TSA" in text


def test_leave_one_out_ablation_from_tsa_measures_the_vrpr_gain_inside_tsa(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ablation.json"
    monkeypatch.setattr(sys, "argv", [str(ABLATION), "--lengths", "2", "--conditions", "2", "--steps", "1",
                                      "--base", "tsa", "--methods", "tsa,tsa+vrpr", "--json", str(out)])
    runpy.run_path(str(ABLATION), run_name="__main__")
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    n = len(data["probe"]["layers"])
    # the base is sampled once, on every layer; tsa (the base) is not sampled again on any layer
    assert sorted(data["raw"]["2"]) == sorted(["tsa", *(f"{i}:tsa+vrpr" for i in range(n))])
    assert f"[{1 + n}/{1 + n}]" in text and "methods ['tsa+vrpr'] on one layer, tsa on the others" in text
    assert data["effects"]["2"]["tsa"] == [0.0] * n and len(data["effects"]["2"]["tsa+vrpr"]) == n
    lo, hi = data["intervals"]["2"]["tsa+vrpr"][0]
    assert lo <= data["effects"]["2"]["tsa+vrpr"][0] + 1e-9 and data["effects"]["2"]["tsa+vrpr"][0] <= hi + 1e-9
    assert len(data["raw"]["2"]["tsa"]["per_clip"]) == 2
    # only the correlation whose methods were measured
    assert "2 vrpr gain inside tsa" in data["correlations"] and "2" not in data["correlations"]
    assert "TSA advantage" not in text and data["base"] == "tsa"


def test_the_shipped_plan_matches_the_leave_one_out_ablation_where_it_resolves(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``--read`` the shipped model's ablation files (validation seeds, 4x and 8x): the one layer that resolves
    (layer 3 at 8x, where TSA+VRPR costs) keeps TSA in the shipped loss-probe plan, which the output rule's
    plan does not; the loss gains rank the layers as the ablation does (positive correlation at both lengths)."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks" / "ablation"
    out = tmp_path / "analysis.json"
    monkeypatch.setattr(sys, "argv", [str(ABLATION), "--read", f"{folder / 'tsa_vrpr_4x.json'},"
                                      f"{folder / 'tsa_vrpr_8x.json'}", "--json", str(out)])
    runpy.run_path(str(ABLATION), run_name="__main__")
    text = capsys.readouterr().out
    print(text[-1500:])
    data = json.loads(out.read_text())
    assert "sampling steps" not in text and "the loss probe's gains: the model's own plan's" in text
    assert data["agreement"]["4"]["resolved"] == [] and data["agreement"]["4"]["agree"] == {
        "loss": [], "rule (attention)": [], "rule (output)": []}
    assert data["agreement"]["8"]["resolved"] == [3] and data["agreement"]["8"]["agree"]["loss"] == [3]
    assert data["agreement"]["8"]["agree"]["rule (output)"] == []
    assert all(data["correlations"][f"{m} vrpr gain inside tsa"]["loss gain"] > 0 for m in (4, 8))
    assert "8x: resolved layers [3] (-0.074); loss agrees on 1/1" in text
    assert data["agreement"]["4"]["same_as_best"] == {"loss": 7, "rule (attention)": 5, "rule (output)": 3}


@pytest.mark.parametrize(("argv", "message"), [
    (["--methods", "tsa+vrpr"], "must cover vrpr and tsa"),
    (["--base", "freenoise"], "unknown ['freenoise']"),
])
def test_ablation_refuses_methods_it_cannot_correlate(argv: list[str], message: str,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", [str(ABLATION), *argv])
    with pytest.raises(SystemExit):
        runpy.run_path(str(ABLATION), run_name="__main__")
    assert message in capsys.readouterr().err


def test_spearman_and_ranks() -> None:
    bench = runpy.run_path(str(ABLATION))
    assert bench["ranks"]([3.0, 1.0, 2.0, 2.0]) == [4.0, 1.0, 2.5, 2.5]
    assert bench["spearman"]([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert bench["spearman"]([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(bench["spearman"]([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="same length >= 2"):
        bench["spearman"]([1], [2])


def test_long_video_benchmark_runs_an_exported_model_with_its_guidance_and_plan(
        tiny_shapes: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``--run`` takes an export as well as a training run: the export's guidance and plan are its defaults."""
    from dataclasses import replace

    from freeloc.shapes.model import load_folder
    from freeloc.shapes.train import export, train

    train(replace(tiny_shapes, cond_drop=0.5), 1, tmp_path / "run", progress=False)
    ship = export(tmp_path / "run", tmp_path / "ship", guidance=2.5, evaluate=None, score="output", bound_from=2)
    model, cfg, guidance, plan = load_folder(ship)
    assert (guidance, cfg.trained_frames, len(model.blocks)) == (2.5, 4, 1) and plan is not None
    assert load_folder(tmp_path / "run")[2:] == (1.0, None)
    with pytest.raises(FileNotFoundError, match="not an exported shapes model"):
        load_folder(tmp_path)
    out = tmp_path / "table.json"
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--run", str(ship), "--lengths", "1", "--conditions", "1",
                                      "--steps", "1", "--methods", "direct,freeloc-probe", "--json", str(out),
                                      "--png", str(tmp_path / "strip.png"), "--plot", str(tmp_path / "plot.png")])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    text = capsys.readouterr().out
    assert "shapes model trained on 4 frames" in text and "guidance 2.5" in text
    assert "probe plan at 4x (score 'output', bound_from 2," in text
    assert "the plan shipped with the model: ['vrpr'] (the same)" in text
    assert json.loads(out.read_text())["guidance"] == 2.5
