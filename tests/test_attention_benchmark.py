"""``benchmarks/attention.py`` runs end to end at a tiny CPU shape (the table's shape, not its numbers)."""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch

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


@pytest.mark.slow
def test_gpu_check_dry_run_starts_every_step(tmp_path: Path) -> None:
    """``benchmarks/gpu_check.sh --dry-run`` on a machine without a GPU: every step starts, the figures file
    names the device; without ``--dry-run`` and without a GPU it refuses in one line."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "gpu.txt"
    env = dict(os.environ, PYTHON=sys.executable)
    run = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    text = out.read_text()
    assert run.returncode == 0, text
    assert text.startswith("device: ") and text.count("done in") == 5 and "every step passed" in text
    if not torch.cuda.is_available():
        run = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--out", str(tmp_path / "real.txt")], cwd=root,
                             env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 1 and "no CUDA device here; use --dry-run" in run.stderr
