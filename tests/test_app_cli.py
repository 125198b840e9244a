"""The ``freeloc`` command line: ``freeloc explain`` in-process and as ``python -m freeloc``, and ``freeloc probe``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import freeloc
from freeloc.app.cli import main, video_to_latent

EXPECTED_KEYS = {"input", "num_frames", "trained_frames", "cap", "extension", "tokens_per_frame", "vrpr",
                 "max_abs_r_before", "max_abs_r_after", "profile", "tsa", "sliding_window"}


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["explain", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(("video", "latent"), [(321, 81), (161, 41), (81, 21), (1, 1), (5, 2), (320, 80)])
def test_video_to_latent(video: int, latent: int) -> None:
    assert video_to_latent(video, 4) == latent


def test_explain_text_shows_the_published_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--num-frames", "321", "--trained-frames", "81"]) == 0
    out = capsys.readouterr().out
    assert "321 video frames -> F = 81 temporal tokens" in out
    assert "81 video frames -> T = 21" in out
    assert "(video - 1) // 4 + 1" in out
    assert "w1=10 w2=14 g1=2 g2=8 cap=20" in out
    assert "published setting for F=81, T=21" in out
    assert "c1=5 c2=11" in out
    assert "max |r|: before 80 (F - 1), after 20" in out
    assert "properties: all hold" in out
    assert " 0:0 1:1 " in out and " 80:20" in out  # the r(Δ) profile, from Δ = 0 to F - 1
    assert "TSA (d1=8, d2=24, stripe 195)" in out
    assert "sliding window (±10, sink)" in out


def test_explain_json(capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(capsys, "--num-frames", "321", "--trained-frames", "81")
    assert set(data) == EXPECTED_KEYS
    assert data["input"] == {"num_frames": 321, "trained_frames": 81, "unit": "video frames",
                             "temporal_factor": 4}
    assert (data["num_frames"], data["trained_frames"], data["cap"]) == (81, 21, 20)
    v = data["vrpr"]
    assert (v["w1"], v["w2"], v["g1"], v["g2"], v["cap"], v["c1"], v["c2"]) == (10, 14, 2, 8, 20, 5, 11)
    assert v["source"] == "published" and v["applied"] is True and v["violations"] == []
    assert (data["max_abs_r_before"], data["max_abs_r_after"]) == (80, 20)
    prof = data["profile"]
    assert prof["delta"] == list(range(81))
    assert prof["r_min"][:10] == prof["r_max"][:10] == list(range(10))  # near tier: r = Δ exactly
    assert all(lo <= hi <= 20 for lo, hi in zip(prof["r_min"], prof["r_max"], strict=True))
    assert prof["r_max"][-1] == 20
    assert data["tsa"]["block_density"] == pytest.approx(0.33, abs=0.01)  # "about 0.33", docs/method.md §3
    assert data["tsa"]["stripe_tokens"] == 195
    assert 0 < data["tsa"]["token_density"] < data["tsa"]["block_density"]
    assert data["sliding_window"]["window"] == 10
    assert 0 < data["sliding_window"]["block_density"] < 1


def test_explain_latent_flag_takes_temporal_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(capsys, "--num-frames", "81", "--trained-frames", "21", "--latent")
    assert data["input"]["unit"] == "temporal tokens"
    assert (data["num_frames"], data["trained_frames"]) == (81, 21)
    assert data["vrpr"]["source"] == "published"
    main(["explain", "--num-frames", "81", "--trained-frames", "21", "--latent"])
    assert "given as temporal tokens, --latent" in capsys.readouterr().out


def test_explain_derived_setting(capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(capsys, "--num-frames", "241", "--trained-frames", "81")
    assert data["num_frames"] == 61
    assert data["vrpr"]["source"] == "derived"
    assert data["vrpr"]["violations"] == []
    assert data["max_abs_r_after"] <= 20 < data["max_abs_r_before"]
    main(["explain", "--num-frames", "241", "--trained-frames", "81"])
    assert "derived by the rule" in capsys.readouterr().out


def test_explain_not_longer_than_trained_changes_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(capsys, "--num-frames", "81", "--trained-frames", "81")
    assert data["vrpr"]["applied"] is False and data["tsa"]["applied"] is False
    assert data["max_abs_r_after"] == data["max_abs_r_before"] == 20
    assert data["tsa"]["block_density"] == 1.0
    main(["explain", "--num-frames", "81", "--trained-frames", "81"])
    assert "FreeLOC changes nothing" in capsys.readouterr().out


def test_explain_notes_frame_counts_not_of_the_vae_form(capsys: pytest.CaptureFixture[str]) -> None:
    main(["explain", "--num-frames", "320", "--trained-frames", "81"])
    assert "--num-frames 320 is not of the form 4k + 1" in capsys.readouterr().out


def test_explain_png(tmp_path: Path, capsys: pytest.CaptureFixture[str], is_png: Callable[[Path], bool]) -> None:
    png = tmp_path / "explain.png"
    assert main(["explain", "--num-frames", "321", "--trained-frames", "81", "--png", str(png)]) == 0
    assert f"wrote {png}" in capsys.readouterr().out
    assert png.stat().st_size > 10_000 and is_png(png)


def test_explain_png_into_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--num-frames", "321", "--trained-frames", "81",
              "--png", str(tmp_path / "no" / "x.png")])
    assert exc.value.code == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "value"),
    [
        (["--num-frames", "0", "--trained-frames", "81"], "'0'"),
        (["--num-frames", "-5", "--trained-frames", "81"], "'-5'"),
        (["--num-frames", "abc", "--trained-frames", "81"], "'abc'"),
        (["--num-frames", "2.5", "--trained-frames", "81"], "'2.5'"),
        (["--num-frames", "321", "--trained-frames", "0"], "'0'"),
        (["--num-frames", "321", "--trained-frames", "81", "--tokens-per-frame", "x"], "'x'"),
        (["--num-frames", "321", "--trained-frames", "81", "--temporal-factor", "0"], "'0'"),
    ],
)
def test_explain_bad_input_exits_2_naming_the_value(
    args: list[str], value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["explain", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "expected a positive integer" in err
    assert value in err


def test_unknown_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["dmeo"])
    assert exc.value.code == 2
    assert "invalid choice: 'dmeo'" in capsys.readouterr().err


def test_python_m_freeloc_explain_json() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "freeloc", "explain",
         "--num-frames", "161", "--trained-frames", "81", "--json"],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1], check=False,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["num_frames"] == 41
    v = data["vrpr"]
    assert (v["w1"], v["w2"], v["g1"], v["g2"]) == (12, 20, 2, 8)
    assert v["source"] == "published"


def test_probe_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], pipeline_loader: Callable[..., type],
                   is_png: Callable[[Path], bool]) -> None:
    """``freeloc probe`` end to end: the loader is stubbed (no hub here) and returns a tiny Wan pipeline."""
    from freeloc.app.video import tiny_wan_pipeline

    pipeline_loader(lambda: tiny_wan_pipeline(num_layers=3))
    out, png = tmp_path / "plan.json", tmp_path / "scores.png"
    assert main(["probe", "--model", "tiny/wan", "--num-frames", "93", "--trained-frames", "21", "--height", "32",
                 "--width", "32", "--device", "cpu", "--dtype", "float32", "--out", str(out), "--png", str(png)]) == 0
    plan = freeloc.LayerPlan.load(out)
    assert len(plan.methods) == 3 and plan.meta["probe"]["model"] == "tiny/wan"
    assert plan.meta["probe"]["latent_frames"] == 24 and is_png(png)
    captured = capsys.readouterr()
    assert "probe: 3 layers" in captured.out
    assert "probing layers" in captured.err and "3/3" in captured.err  # the tqdm bar, on stderr


def test_generate_help_gives_every_default_and_the_methods(capsys: pytest.CaptureFixture[str]) -> None:
    """``freeloc generate --help`` says what --steps, --guidance, --height, --width and --seed default to, and
    lists the methods; an unknown method is a usage error (exit code 2) that lists them too."""
    with pytest.raises(SystemExit) as done:
        main(["generate", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("denoising steps (default: 50)", "guidance scale (default: 5.0", "(default: the pipeline's own",
                     "seed of the initial noise (default: 0)", "freeloc, direct, ntk, pi, riflex, sliding-window"):
        assert expected in text, expected
    with pytest.raises(SystemExit) as done:
        main(["generate", "--model", "m", "--prompt", "p", "--num-frames", "9", "--out", "v.mp4", "--method", "fast"])
    err = capsys.readouterr().err
    print(err.splitlines()[-1])
    assert done.value.code == 2 and "invalid choice: 'fast'" in err and "'vrpr'" in err


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``freeloc argv``, expecting a usage error (exit code 2); returns the message's last line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    print(err)
    return err


def test_output_paths_are_checked_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """An output that cannot be written (under a file, in a folder nobody may write, a folder given for a
    file) is a usage error before anything is loaded or computed."""
    import freeloc.app.cli as cli

    ran: list[str] = []
    monkeypatch.setattr(cli, "demo", lambda *a, **kw: ran.append("demo"))
    monkeypatch.setattr(cli, "generate", lambda *a, **kw: ran.append("generate"))
    monkeypatch.setattr(cli, "explain_data", lambda *a, **kw: ran.append("explain"))
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    gen = ["generate", "--model", "org/model", "--prompt", "p", "--num-frames", "81"]
    assert "is not a folder" in _usage_error(["demo", "--out", str(a_file / "sub")], capsys)
    assert "is not a folder" in _usage_error([*gen, "--out", str(a_file / "x.mp4")], capsys)
    assert "cannot write in folder '/proc'" in _usage_error(
        ["explain", "--num-frames", "321", "--trained-frames", "81", "--png", "/proc/x.png"], capsys)
    assert "is a folder; give a file name" in _usage_error(
        ["probe", "--model", "org/model", "--num-frames", "321", "--out", str(tmp_path)], capsys)
    assert ran == []


def test_a_local_model_folder_that_does_not_exist_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    err = _usage_error(["generate", "--model", "./models/nowhere", "--prompt", "p", "--num-frames", "81", "--out",
                        "x.mp4"], capsys)
    assert "--model: no such local folder './models/nowhere'" in err


def test_explain_refuses_a_length_that_would_not_fit_in_memory(capsys: pytest.CaptureFixture[str]) -> None:
    """``explain --num-frames 1000000`` would allocate hundreds of TiB: refused first, with the figure."""
    from freeloc.app.cli import explain_memory

    err = _usage_error(["explain", "--num-frames", "1000000", "--trained-frames", "81"], capsys)
    assert "explaining 250000 latent frames of 1560 tokens needs about" in err and "GiB are available" in err
    assert explain_memory(81, 1560) < 2**30  # the lengths people ask for stay well under a GiB


def test_errors_while_working_are_one_line_and_ctrl_c_too(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          pipeline_loader: Callable[..., type]) -> None:
    """A model that cannot be loaded: one line, exit code 1 (no traceback). Ctrl-C: one line, exit code 130,
    and no partial output file."""
    def unreachable() -> Any:
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them "
                      "in the cached files.\nCheck your internet connection.")

    def interrupted() -> Any:
        raise KeyboardInterrupt

    out = tmp_path / "v.mp4"
    argv = ["generate", "--model", "org/model", "--prompt", "p", "--num-frames", "81", "--out", str(out)]
    pipeline_loader(unreachable)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("freeloc generate: error: We couldn't connect")
    pipeline_loader(interrupted)
    assert main(argv) == 130
    assert capsys.readouterr().err == "freeloc generate: interrupted\n"
    assert list(tmp_path.iterdir()) == []


def test_probe_refuses_a_frame_count_that_is_not_an_int() -> None:
    """``probe``'s own check (the test-time type checker, which refuses it first, is unwrapped here)."""
    import inspect

    with pytest.raises(ValueError, match=r"probe: num_frames must be an int >= 1, got '93'"):
        inspect.unwrap(freeloc.probe)(object(), "93")


@pytest.mark.slow
def test_probe_the_shipped_shapes_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``freeloc probe --model shapes``: the shipped model, offline (just past its trained 16 frames, to be
    quick); the forward count and the time estimate come first."""
    pytest.importorskip("diffusers", reason="the shapes model is a diffusers transformer (extra 'shapes')")
    out = tmp_path / "plan.json"
    assert main(["probe", "--model", "shapes", "--num-frames", "20", "--out", str(out), "--device", "cpu",
                 "--dtype", "float32", "--bound-from", "3", "--position-from", "2",
                 "--bounded-vrpr", "window+vrpr"]) == 0
    plan = freeloc.LayerPlan.load(out)
    rule = plan.meta["rule"]
    assert (rule["bound_from"], rule["position_from"], rule["bounded_vrpr"]) == (3, 2, "window+vrpr")
    assert [r.from_ratio for r in plan.ranges] == [2, 3] and "window+vrpr" in plan.ranges[1].methods
    from freeloc.shapes.model import load_shipped

    n = load_shipped()[1].num_layers
    assert len(plan.methods) == n and set(plan.methods) <= {"direct", "tsa"}
    assert plan.meta["probe"]["model"] == "shapes" and plan.trained_frames == 16
    assert plan.meta["probe"]["latent_frames"] == 20
    assert all(x > 0 for x in plan.scores["position"]) and all(x > 0 for x in plan.scores["context"])
    printed = capsys.readouterr().out
    estimate = next(line for line in printed.splitlines() if "(an estimate)" in line)
    print(estimate)
    forwards = 2 + n * (4 + 1)  # the clean run, then every layer with its four shifts and its window
    assert estimate.startswith(f"probe: {n} layers, {forwards} forwards of the model, about ")
    assert printed.index("(an estimate)") < printed.index(f"probe: {n} layers, {forwards} forwards, ")  # estimate first


@pytest.mark.parametrize("flag,value", [("--prompt", "a red ball"), ("--height", "64"), ("--trained-frames", "8")])
def test_probe_shapes_refuses_the_pipeline_options(flag: str, value: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    err = _usage_error(["probe", "--model", "shapes", "--out", str(tmp_path / "p.json"), flag, value], capsys)
    assert f"{flag} is for pipelines; --model shapes probes the shipped shapes model" in err


@pytest.mark.parametrize("flag", ["--bound-from", "--position-from"])
def test_probe_refuses_a_ratio_not_above_one_before_loading(flag: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Refused before any model is loaded: ``org/model`` is not reachable here, so loading would fail otherwise."""
    err = _usage_error(["probe", "--model", "org/model", "--num-frames", "321", "--out", str(tmp_path / "p.json"),
                        flag, "1"], capsys)
    assert f"{flag} must be a length ratio > 1 (or None), got 1.0" in err


def test_probe_score_loss_is_for_the_shapes_model_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A pipeline has no clean clips at each length on the command line: refused before loading, naming the
    Python entry point; with the shapes model, the other rules' options are refused."""
    err = _usage_error(["probe", "--model", "org/model", "--num-frames", "321", "--score", "loss",
                        "--out", str(tmp_path / "p.json")], capsys)
    assert "--score loss: the loss probe needs clean videos at each length" in err and "freeloc.probe_loss(" in err
    for flag, value in (("--num-frames", "64"), ("--bound-from", "2"), ("--tsa-count", "2")):
        err = _usage_error(["probe", "--model", "shapes", "--score", "loss", flag, value,
                            "--out", str(tmp_path / "p.json")], capsys)
        assert f"{flag} does not apply to --score loss" in err
    err = _usage_error(["probe", "--model", "shapes", "--min-z", "2", "--out", str(tmp_path / "p.json")], capsys)
    assert "--min-z is for --score loss, got --score attention" in err
    assert not (tmp_path / "p.json").exists()


def test_probe_a_pipeline_needs_a_length(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _usage_error(["probe", "--model", "org/model", "--out", str(tmp_path / "p.json")], capsys)
    assert "--num-frames is required for a pipeline" in err


def test_probe_a_saved_pipeline_folder_with_and_without_a_prompt(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 spy: Callable[[object, str], list]) -> None:
    """A tiny Wan pipeline saved with ``save_pretrained`` (a tiny UMT5 encoder and an in-memory tokenizer): probed
    from its folder through the real ``DiffusionPipeline.from_pretrained``, no hub. With ``--prompt`` the text
    encoder runs once and its embeddings condition the probe, which changes the scores."""
    pytest.importorskip("diffusers", reason="probing a pipeline needs diffusers (extra 'diffusers')")
    import transformers
    from support import saved_tiny_wan

    folder = saved_tiny_wan(tmp_path / "tiny-wan")
    argv = ["probe", "--model", str(folder), "--num-frames", "45", "--trained-frames", "21", "--height", "32",
            "--width", "32", "--device", "cpu", "--dtype", "float32"]
    plain, prompted = tmp_path / "plain.json", tmp_path / "prompted.json"
    assert main([*argv, "--out", str(plain)]) == 0
    encoded = spy(transformers.UMT5EncoderModel, "forward")
    assert main([*argv, "--out", str(prompted), "--prompt", "a red ball"]) == 0
    assert len(encoded) == 1  # the prompt is encoded once
    a, b = freeloc.LayerPlan.load(plain), freeloc.LayerPlan.load(prompted)
    assert a.meta["probe"]["inputs"] == "synthetic" and a.meta["probe"]["model"] == str(folder)
    assert b.meta["probe"]["inputs"] == "synthetic latents, given text" and b.meta["probe"]["prompt"] == "a red ball"
    assert len(a.methods) == len(b.methods) == 4 and a.meta["probe"]["latent_frames"] == 12
    assert a.scores["position"] != b.scores["position"]  # other conditioning, other attention
    printed = capsys.readouterr().out
    assert printed.count("probe: 4 layers, 22 forwards of the model, about ") == 2


def test_probe_prompt_needs_a_text_encoder(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          pipeline_loader: Callable[..., type]) -> None:
    """A pipeline without a text encoder cannot encode ``--prompt``: one line, exit code 1, nothing written."""
    from freeloc.app.video import tiny_wan_pipeline

    pipeline_loader(lambda: tiny_wan_pipeline(num_layers=1))
    out = tmp_path / "plan.json"
    assert main(["probe", "--model", "tiny/wan", "--num-frames", "93", "--trained-frames", "21", "--height", "32",
                 "--width", "32", "--device", "cpu", "--prompt", "a red ball", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--prompt: this WanPipeline has no text encoder" in err
    assert not out.exists()
