"""Optional dependencies: a missing package stops with one error that names the extra to install."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from freeloc._extras import require


def test_require_returns_the_module() -> None:
    assert require("math", "app", "a test") is math


@pytest.mark.parametrize(("module", "extra", "message"), [
    ("matplotlib", "app", 'freeloc explain --png needs matplotlib: pip install "freeloc[app]"'),
    ("safetensors.torch", "shapes", 'freeloc explain --png needs safetensors: pip install "freeloc[shapes]"'),
    ("PIL.Image", "app", 'freeloc explain --png needs PIL (package pillow): pip install "freeloc[app]"'),
    ("imageio_ffmpeg", "diffusers",
     'freeloc explain --png needs imageio_ffmpeg (package imageio-ffmpeg): pip install "freeloc[diffusers]"'),
])
def test_a_missing_module_names_its_extra(module: str, extra: str, message: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    top = module.partition(".")[0]
    monkeypatch.setitem(sys.modules, top, None)  # importing it now fails, as if it were not installed
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError) as err:
        require(module, extra, "freeloc explain --png")
    print(err.value)
    assert str(err.value) == message and err.value.name == top
    assert isinstance(err.value.__cause__, ImportError)  # the original error is kept


def test_an_unknown_extra_is_refused() -> None:
    with pytest.raises(ValueError, match=r"extra must be one of \['app', 'shapes', 'diffusers'\], got 'plots'"):
        require("math", "plots", "a test")


def test_explain_png_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The command says which extra is missing, in one line (exit code 1), before any work."""
    from freeloc.app.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["explain", "--num-frames", "321", "--trained-frames", "81", "--png", str(tmp_path / "x.png")]) == 1
    assert capsys.readouterr().err == ('freeloc explain: error: freeloc explain --png needs matplotlib: '
                                       'pip install "freeloc[app]"\n')
    assert not (tmp_path / "x.png").exists()
    assert main(["explain", "--num-frames", "321", "--trained-frames", "81", "--json"]) == 0  # no picture: no need


def test_the_shipped_shapes_model_without_safetensors(monkeypatch: pytest.MonkeyPatch) -> None:
    from freeloc.shapes.model import load_shipped

    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match=r'needs safetensors: pip install "freeloc\[shapes\]"'):
        load_shipped()


def test_the_probe_command_without_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    from freeloc.app.cli import tqdm_progress

    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(ImportError, match=r'progress bar needs tqdm: pip install "freeloc\[app\]"'):
        tqdm_progress("probing layers", "layer")


def test_the_shapes_clips_and_metrics_need_only_the_core(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clips render and score with none of the optional packages."""
    from freeloc.shapes.clips import random_spec, render
    from freeloc.shapes.metrics import evaluate

    for name in ("diffusers", "safetensors", "matplotlib", "imageio", "PIL", "tqdm"):
        monkeypatch.setitem(sys.modules, name, None)
    spec = random_spec(0)
    assert evaluate(render(spec, 8), spec)["palette_fidelity"] == 1.0
