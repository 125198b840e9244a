"""``benchmarks/pipeline.py`` runs end to end on a tiny Wan (the table's shape, not its numbers)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "pipeline.py"


@pytest.mark.slow
def test_pipeline_benchmark_prints_every_method_with_ratios_to_direct(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rows.json"
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--shape", "tiny", "--reps", "1", "--json", str(out)])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    text = capsys.readouterr().out
    print(text)
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["direct", "freeloc", "tsa", "vrpr"]
    assert rows[0]["time_ratio"] == 1.0
    assert all(r["seconds"] > 0 and r["time_ratio"] > 0 and 0 < r["attention_share"] <= 1 for r in rows)
    table = text[text.index("method    s/forward"):].splitlines()
    assert [line.split()[0] for line in table[1:5]] == ["direct", "freeloc", "tsa", "vrpr"]
    assert "x direct" in table[0] and "attn share" in table[0]
    if Path("/proc/self/clear_refs").exists():  # Linux: each method's peak in a fresh process
        assert all(r["peak_mib"] > 0 for r in rows), rows
        assert rows[0]["memory_ratio"] == 1.0
        assert "target peak <= 1.10 x direct" in text
    assert "target forward <= 0.95 x direct" in text
    assert "self-attention, direct:" in text


def test_pipeline_benchmark_refuses_unknown_methods_and_a_missing_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv, message in ((["--shape", "tiny", "--methods", "direct,dense"], "unknown methods"),
                          (["--shape", "gpu"], "no CUDA device here")):
        monkeypatch.setattr(sys, "argv", [str(SCRIPT), *argv])
        with pytest.raises(SystemExit, match=message):
            runpy.run_path(str(SCRIPT), run_name="__main__")
