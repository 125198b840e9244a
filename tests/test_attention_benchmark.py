"""``benchmarks/attention.py`` runs end to end at a tiny CPU shape (the table's shape, not its numbers)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "attention.py"


@pytest.mark.slow
def test_attention_benchmark_prints_times_memory_and_targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rows.json"
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--shapes", "2x3", "--reps", "1", "--json", str(out)])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    text = capsys.readouterr().out
    rows = json.loads(out.read_text())["CPU 81x6"]
    print(text)
    assert [r["method"] for r in rows] == ["dense", "tsa", "vrpr"]
    assert all(r["seconds"] > 0 and r["time_ratio"] > 0 for r in rows)
    if Path("/proc/self/clear_refs").exists():  # Linux: the peak memory of each call, in a fresh process
        assert all(r["peak_mib"] > 0 for r in rows), rows
        assert rows[0]["memory_ratio"] == 1.0
    else:
        print("peak memory not checked: no /proc/self/clear_refs on this system")
    assert "(1.3 x density):" in text and "<= 1.50:" in text


def test_striped_tier_benchmark_says_it_needs_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """``benchmarks/striped_tier.py`` times CUDA kernels at the full Wan shape; without CUDA it stops
    with a message that says so (not a traceback)."""
    import torch

    script = SCRIPT.parent / "striped_tier.py"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", [str(script), "--reps", "1"])
    with pytest.raises(SystemExit, match="no CUDA device here"):
        runpy.run_path(str(script), run_name="__main__")
