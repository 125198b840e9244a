"""``benchmarks/long_video.py`` runs end to end (one clip, one sampling step: the table's shape, not its numbers)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers", reason="the shapes model is a diffusers WanTransformer3DModel (extra 'shapes')")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "long_video.py"


def test_long_video_benchmark_prints_every_method_and_length(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "table.json"
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--lengths", "1,2", "--conditions", "1", "--steps", "1",
                                      "--methods", "direct,riflex,tsa,freeloc-uniform", "--json", str(out),
                                      "--png", str(tmp_path / "strip.png")])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    text = capsys.readouterr().out
    rows = json.loads(out.read_text())["results"]
    assert [(r["length"], r["method"]) for r in rows] == [
        (m, name) for m in (1, 2) for name in ("real clips", "direct", "riflex", "tsa", "freeloc-uniform")]
    assert all(r["palette_fidelity"] == 1.0 for r in rows if r["method"] == "real clips")
    assert "RIFLEx k = 2" in text and "2x (32)" in text


def test_long_video_benchmark_rejects_an_unknown_method(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--methods", "direct,freenoise"])
    with pytest.raises(SystemExit):
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert "unknown ['freenoise']" in capsys.readouterr().err
