"""``freeloc demo`` and ``freeloc generate`` end to end on tiny random Wan pipelines (CPU, no download)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers", reason="video generation needs diffusers (extra 'diffusers')")
pytest.importorskip("imageio_ffmpeg", reason="mp4 writing needs imageio-ffmpeg (extra 'app')")

from support import saved_tiny_wan  # noqa: E402

import freeloc  # noqa: E402
from freeloc.app.cli import main  # noqa: E402
from freeloc.app.video import compare_frames, demo, tiny_wan_pipeline, write_video  # noqa: E402


def run_demo(args: list[str], out_dir: Path, capsys: pytest.CaptureFixture[str],
             is_mp4: Callable[[Path], bool]) -> tuple[str, str]:
    """Run ``freeloc demo ARGS``, check both videos were written, return what it printed (stdout, stderr)."""
    t0 = time.perf_counter()
    assert main(["demo", *args]) == 0
    captured = capsys.readouterr()
    print(f"demo took {time.perf_counter() - t0:.1f} s")
    assert is_mp4(out_dir / "direct.mp4") and is_mp4(out_dir / "freeloc.mp4")
    return captured.out, captured.err


def test_shapes_demo_writes_videos_frames_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    is_png: Callable[[Path], bool],
                                                    is_mp4: Callable[[Path], bool]) -> None:
    """The default demo: the shipped shapes model, 64 frames (4x its 16), direct and FreeLOC (fewer steps here)."""
    out, err = run_demo(["--out", str(tmp_path), "--steps", "3", "--clips", "1"], tmp_path, capsys, is_mp4)
    assert is_png(tmp_path / "frames.png") and is_png(tmp_path / "motion.png")
    assert "shows the difference best" in out and "top-left clip of compare.mp4" in out
    assert "loading the shipped shapes model" in out.splitlines()[0]
    for label in ("direct", "freeloc"):  # a bar over the sampling steps and one over the scored clips, per run
        assert f"{label}: sampling: 100%" in err and "3/3" in err and f"{label}: scoring: 100%" in err
    assert "64 frames" in out and "motion.png" in out and "freeloc generate --model" in out
    assert "FreeLOC plan at 64 frames (from freeloc probe --score loss on this model): [" in out
    assert is_mp4(tmp_path / "compare.mp4")
    table = {line[:28].strip(): line[28:].split() for line in out.splitlines()
             if line.startswith(("palette", "right", "shapes"))}
    assert set(table) == {"palette colours", "shapes drawn / asked", "right shape count", "right colours"}
    assert all(0.0 <= float(x) <= 1.0 for name, row in table.items() for x in row[:2] if name != "shapes drawn / asked")


def test_telling_frames_pick_the_clip_and_frames_where_direct_fails_and_freeloc_does_not() -> None:
    """Clip 0 of ``direct`` loses its shape in frames 4-11 (blank), clip 1 its shapes in frame 13 only: clip 0
    is shown, with all of 4-11 among its frames."""
    from freeloc.app.video import telling_frames
    from freeloc.shapes.clips import random_spec, render

    specs = [random_spec(20_000 + i) for i in range(2)]
    good = torch.stack([render(s, 20) for s in specs])
    bad = good.clone()
    bad[0, 4:12] = bad[0, 0, :, :1, :1]  # the background colour everywhere: no shape drawn
    bad[1, 13] = bad[1, 0, :, :1, :1]
    clip, shown, wins = telling_frames(bad, good, specs, count=10)
    assert clip == 0 and wins == list(range(4, 12))
    assert set(wins) <= set(shown) and len(shown) == 10 and shown == sorted(shown)
    clip, shown, wins = telling_frames(bad, good, specs, count=3)  # fewer frames than wins: spread over them
    assert clip == 0 and shown == [4, 8, 11]


def test_frames_right_judges_each_frame() -> None:
    from freeloc.shapes.clips import random_spec, render
    from freeloc.shapes.metrics import frames_right, shape_count_consistency

    spec = random_spec(20_000)  # one shape: every frame is scored
    video = render(spec, 12)
    video[3] = video[0, :, :1, :1]
    right, scored = frames_right(video, spec)
    assert right.tolist() == [i != 3 for i in range(12)] and bool(scored.all())
    assert float(right.float().mean()) == pytest.approx(shape_count_consistency(video, spec))
    overlapping = random_spec(20_001)  # three shapes that overlap in some frames: those are not scored
    _, scored = frames_right(render(overlapping, 20), overlapping)
    assert 0 < int(scored.sum()) < 20


def test_demo_rejects_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="model must be one of"):
        demo(model="wan")
    with pytest.raises(ValueError, match="conditions must be between 1 and 8, got 9"):
        demo(conditions=9)
    with pytest.raises(SystemExit):
        main(["demo", "--clips", "9"])
    assert "--clips: expected 1 to 8, got 9" in capsys.readouterr().err
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="guidance must be a finite number >= 0"):
            demo(guidance=bad)
    with pytest.raises(SystemExit):
        main(["demo", "--guidance", "-2"])
    assert "--guidance: expected a finite number >= 0 (1 = no guidance), got -2.0" in capsys.readouterr().err


@pytest.mark.slow
def test_random_demo_writes_videos_report_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    is_png: Callable[[Path], bool],
                                                    is_mp4: Callable[[Path], bool]) -> None:
    out, err = run_demo(["--model", "random", "--out", str(tmp_path), "--steps", "2"], tmp_path, capsys, is_mp4)
    assert is_png(tmp_path / "report.png")
    assert out.splitlines()[0] == "building a tiny random Wan pipeline ..." and "drawing report.png ..." in out
    for label in ("direct", "freeloc"):  # the VAE decodes 81 latent frames, one by one
        assert f"{label}: decoding: 100%" in err and "81/81" in err
    assert "tiny and random" in out and "freeloc generate --model" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("transformer ")]
    assert [r[2] for r in rows] == ["tsa", "vrpr", "tsa", "vrpr"]
    assert all(float(r[4]) <= 20 for r in rows if r[2] == "vrpr")  # VRPR keeps |r| within the trained 20
    assert all(float(r[5]) < 0.5 for r in rows if r[2] == "tsa")  # TSA attends a fraction of the pairs


def _encode_random_prompt(prompt: Any, negative_prompt: Any = None, do_classifier_free_guidance: bool = True,
                          num_videos_per_prompt: int = 1, prompt_embeds: Any = None,
                          negative_prompt_embeds: Any = None, max_sequence_length: int = 512,
                          device: Any = None, dtype: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiny Wan pipeline's prompt encoder: random embeddings, seeded by the prompt's length."""
    e = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(len(prompt)))
    return e, e


def test_generate_writes_video_and_sidecar(tmp_path: Path, pipeline_loader: Callable[..., type],
                                          is_mp4: Callable[[Path], bool]) -> None:
    loader = pipeline_loader(tiny_wan_pipeline, _encode_random_prompt)
    out = tmp_path / "long.mp4"
    code = main(["generate", "--model", "some/wan-model", "--prompt", "a red ball", "--num-frames", "61",
                 "--height", "32", "--width", "32", "--steps", "2", "--plan", "uniform", "--device", "cpu",
                 "--dtype", "float32", "--out", str(out)])
    assert code == 0
    assert loader.calls[-1] == ("some/wan-model", torch.float32)
    assert is_mp4(out)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["settings"]["num_frames"] == 61 and side["settings"]["prompt"] == "a red ball"
    assert side["plan"]["layers"][0]["method"] == "vrpr"
    assert [layer["calls"] for layer in side["layers"]] == [4, 4, 4, 4]  # 2 steps x (cond, uncond)
    assert all(layer["max_abs_distance"] <= 20 for layer in side["layers"])


def test_generate_loads_a_saved_wan_pipeline_from_its_folder(tmp_path: Path, is_mp4: Callable[[Path], bool]) -> None:
    """A Wan pipeline saved with ``save_pretrained`` loads through the real ``DiffusionPipeline.from_pretrained``
    (which needs ``accelerate`` for Wan's float32 modules: part of the ``diffusers`` extra) and generates."""
    folder = saved_tiny_wan(tmp_path / "tiny-wan")
    out = tmp_path / "long.mp4"
    code = main(["generate", "--model", str(folder), "--prompt", "a red ball", "--num-frames", "21", "--height", "32",
                 "--width", "32", "--steps", "1", "--plan", "uniform", "--device", "cpu", "--dtype", "float32",
                 "--out", str(out)])
    assert code == 0 and is_mp4(out)
    assert json.loads(out.with_suffix(".json").read_text())["settings"]["model"] == str(folder)


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--method", "fast"], "argument --method: invalid choice: 'fast'"),
        (["--out", "video.gif"], "--out must end in .mp4"),
        (["--num-frames", "0"], "expected a positive integer"),
    ],
)
def test_generate_bad_input(argv: list[str], match: str, capsys: pytest.CaptureFixture[str]) -> None:
    base = {"--model": "m", "--prompt": "p", "--num-frames": "81", "--out": "v.mp4"}
    for flag, value in zip(argv[::2], argv[1::2], strict=True):
        base[flag] = value
    args = ["generate"] + [x for kv in base.items() for x in kv]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


def _hunyuan_pipeline() -> Any:
    import diffusers
    from test_hunyuan_adapter import tiny_hunyuan

    vae = diffusers.AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                              norm_num_groups=4).eval()
    return diffusers.HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=tiny_hunyuan(), vae=vae,
                                          scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0),
                                          text_encoder_2=None, tokenizer_2=None)


def _hunyuan_encode(prompt: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from test_hunyuan_adapter import TEXT

    g = torch.Generator().manual_seed(len(prompt))
    return torch.randn(1, TEXT, 16, generator=g), torch.randn(1, 8, generator=g), torch.ones(1, TEXT)


def _cogvideox_pipeline() -> Any:
    from test_cogvideox_adapter import cog10, tiny_pipeline

    return tiny_pipeline(cog10(sample_height=4, sample_width=4))


def _cogvideox_encode(prompt: Any, negative_prompt: Any = None, do_classifier_free_guidance: bool = True,
                      **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    e = torch.randn(1, 7, 16, generator=torch.Generator().manual_seed(len(prompt)))
    return e, e


@pytest.mark.parametrize("model,build,encode,size", [
    ("hunyuanvideo-community/HunyuanVideo", _hunyuan_pipeline, _hunyuan_encode, "16"),
    ("THUDM/CogVideoX-5b", _cogvideox_pipeline, _cogvideox_encode, "32"),
], ids=["hunyuan", "cogvideox"])
def test_generate_with_other_pipelines(model: str, build: Any, encode: Any, size: str, tmp_path: Path,
                                       pipeline_loader: Callable[..., type],
                                       is_mp4: Callable[[Path], bool]) -> None:
    loader = pipeline_loader(build, encode)
    out = tmp_path / "long.mp4"
    assert main(["generate", "--model", model, "--prompt", "a red ball", "--num-frames", "45", "--trained-frames",
                 "9", "--height", size, "--width", size, "--steps", "2", "--plan", "uniform", "--device", "cpu",
                 "--dtype", "float32", "--out", str(out)]) == 0
    assert loader.calls == [(model, torch.float32)] and is_mp4(out)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["settings"]["trained_frames"] == 9
    assert all(layer["calls"] > 0 for layer in side["layers"])
    assert max(layer["max_abs_distance"] for layer in side["layers"]) <= 2  # 9 frames = 3 latent: |r| <= 2


def test_compare_frames_stacks_labelled_tiles() -> None:
    a, b = torch.rand(5, 3, 32, 48), torch.rand(5, 3, 32, 48)
    both = compare_frames({"direct": a, "FreeLOC": b})
    assert both.shape == (5, 3, 32 + 16 + 32, 96 + 48)
    assert torch.equal(both[:, :, :32, 96:], a) and torch.equal(both[:, :, 48:, 96:], b)
    label = both[0, :, :32, :96]
    assert bool((label < 0.5).any()) and bool((label == 1).any())  # dark text on white
    assert torch.equal(both[:, :, 32:48], torch.ones(5, 3, 16, 144))


def test_an_interrupted_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Videos, plans and pictures are written under a temporary name and renamed when whole: an error (or
    Ctrl-C) in the middle leaves neither the target nor the temporary file."""
    import diffusers.utils

    def half_written(frames: Any, path: str, fps: int = 16) -> None:
        Path(path).write_bytes(b"\0" * 1000)
        raise KeyboardInterrupt

    monkeypatch.setattr(diffusers.utils, "export_to_video", half_written)
    with pytest.raises(KeyboardInterrupt):
        write_video(torch.rand(3, 3, 8, 8), tmp_path / "v.mp4")
    assert list(tmp_path.iterdir()) == []
    real_write = Path.write_text

    def half_text(self: Path, text: str, *args: Any, **kwargs: Any) -> int:
        real_write(self, text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", half_text)
    with pytest.raises(KeyboardInterrupt):
        freeloc.LayerPlan.uniform("vrpr", 2).save(tmp_path / "plan.json")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_generate_compare_writes_one_video_of_panels_and_each_report(tmp_path: Path,
                                                                     is_mp4: Callable[[Path], bool]) -> None:
    """``--compare direct,freeloc`` on a saved tiny Wan pipeline: one mp4 with a labelled panel per method (the
    same 21 frames each), one sidecar holding each method's report, as a single ``generate`` writes it."""
    import imageio.v3 as iio

    folder = saved_tiny_wan(tmp_path / "tiny-wan")
    out = tmp_path / "compare.mp4"
    assert main(["generate", "--model", str(folder), "--prompt", "a red ball", "--num-frames", "21",
                 "--trained-frames", "9", "--height", "32", "--width", "32", "--steps", "1", "--plan", "uniform",
                 "--device", "cpu", "--dtype", "float32", "--compare", "direct,freeloc", "--out", str(out)]) == 0
    assert is_mp4(out)
    video = iio.imread(out)
    assert video.shape == (21, 2 * 32 + 16, 96 + 32, 3)  # two panels and a gap, each after a 96-pixel label
    labels, direct, freeloc_panel = video[:, :, :96], video[:, :32, 96:], video[:, 48:, 96:]
    assert (labels > 200).mean() > 0.9 and (labels < 100).any()  # dark text on white
    assert abs(direct.astype(float) - freeloc_panel.astype(float)).mean() > 1  # the methods differ
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["methods"] == ["direct", "freeloc"] and side["video"] == str(out)
    single = tmp_path / "single.mp4"
    assert main(["generate", "--model", str(folder), "--prompt", "a red ball", "--num-frames", "21",
                 "--trained-frames", "9", "--height", "32", "--width", "32", "--steps", "1", "--method", "direct",
                 "--device", "cpu", "--dtype", "float32", "--out", str(single)]) == 0
    alone = json.loads(single.with_suffix(".json").read_text())
    for method, report in side["reports"].items():
        assert set(report) == set(alone) and report["settings"].keys() == alone["settings"].keys()
        assert report["settings"]["method"] == method and report["settings"]["seed"] == 0
    assert [layer["max_abs_distance"] for layer in side["reports"]["direct"]["layers"]] == \
        [layer["max_abs_distance"] for layer in alone["layers"]] == [5] * 4  # 21 frames: 6 latent, |r| up to 5
    assert all(layer["max_abs_distance"] <= 2 for layer in side["reports"]["freeloc"]["layers"])  # trained: 3
    assert side["reports"]["freeloc"]["settings"]["plan"] == "uniform"
    assert side["reports"]["direct"]["settings"]["plan"] is None


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--compare", "direct,fast"], "argument --compare: unknown method 'fast' in 'direct,fast'; accepted: freeloc, "
                                       "direct,"),
        (["--compare", "direct"], "expected two or more methods separated by commas (e.g. direct,freeloc), got "
                                  "'direct'"),
        (["--compare", "direct,pi,direct"], "method 'direct' is listed twice in 'direct,pi,direct'"),
        (["--compare", "direct,freeloc", "--method", "pi"], "--compare and --method exclude each other"),
        (["--compare", "direct,pi", "--plan", "plan.json"], "--plan is the freeloc method's, and --compare direct,pi "
                                                            "does not list freeloc"),
        (["--method", "riflex", "--params", "riflex"], "expected METHOD:JSON with METHOD one of"),
        (["--method", "riflex", "--params", "freeloc:{}"], "(a plan's layers take their parameters in the plan file)"),
        (["--method", "riflex", "--params", "riflex:{k: 4}"], "riflex: the parameters are not JSON"),
        (["--method", "riflex", "--params", "riflex:[4]"], "riflex: expected a JSON object of parameters"),
        (["--method", "tsa", "--params", 'tsa:{"d9": 1}'], "method 'tsa' got unknown parameter(s) ['d9']"),
        (["--method", "riflex", "--params", 'pi:{"scale": 2}'], "--params pi:... is for a method that does not run "
                                                                "(running: riflex)"),
        (["--compare", "direct,riflex", "--params", 'riflex:{"k": 1}', "--params", 'riflex:{"k": 2}'],
         "--params gives 'riflex' twice"),
    ],
    ids=["unknown", "one", "twice", "with-method", "plan-without-freeloc", "params-no-json", "params-freeloc",
         "params-not-json", "params-not-object", "params-unknown-param", "params-not-running", "params-twice"],
)
def test_generate_compare_and_params_bad_input_is_a_usage_error_before_loading(argv: list[str], message: str,
                                                                     capsys: pytest.CaptureFixture[str],
                                                                     pipeline_loader: Callable[..., type]) -> None:
    loader = pipeline_loader(tiny_wan_pipeline, _encode_random_prompt)
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--model", "org/model", "--prompt", "p", "--num-frames", "81", "--out", "v.mp4", *argv])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    print(err)
    assert exc.value.code == 2 and message in err
    assert loader.calls == []


def test_generate_params_reach_the_method(tmp_path: Path, pipeline_loader: Callable[..., type],
                                         is_mp4: Callable[[Path], bool]) -> None:
    """``--method riflex --params 'riflex:{"k": 1}'``: RIFLEx runs with that k, recorded in the sidecar."""
    pipeline_loader(tiny_wan_pipeline, _encode_random_prompt)
    out = tmp_path / "riflex.mp4"
    assert main(["generate", "--model", "org/model", "--prompt", "p", "--num-frames", "21", "--trained-frames", "9",
                 "--height", "32", "--width", "32", "--steps", "1", "--device", "cpu", "--dtype", "float32",
                 "--method", "riflex", "--params", 'riflex:{"k": 1}', "--out", str(out)]) == 0
    side = json.loads(out.with_suffix(".json").read_text())
    assert is_mp4(out) and side["settings"]["method_params"] == {"k": 1}
    assert [layer["params"] for layer in side["plan"]["layers"]] == [{"k": 1}] * 4
    assert all(layer["calls"] == 2 for layer in side["layers"])  # 1 step x (cond, uncond)
    both = tmp_path / "both.mp4"
    assert main(["generate", "--model", "org/model", "--prompt", "p", "--num-frames", "21", "--trained-frames", "9",
                 "--height", "32", "--width", "32", "--steps", "1", "--device", "cpu", "--dtype", "float32",
                 "--compare", "direct,riflex", "--params", 'riflex:{"k": 1}', "--out", str(both)]) == 0
    reports = json.loads(both.with_suffix(".json").read_text())["reports"]
    assert reports["riflex"]["settings"]["method_params"] == {"k": 1}
    assert reports["direct"]["settings"]["method_params"] == {}

    def untimed(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in layer.items() if k != "seconds"} for layer in layers]

    assert untimed(reports["riflex"]["layers"]) == untimed(side["layers"])  # the same RIFLEx run as --method riflex


def test_generate_compare_checks_every_method_before_generating(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                pipeline_loader: Callable[..., type]) -> None:
    """A method that cannot run on the pipeline (RIFLEx without its frequency index) stops the comparison before
    the first video is generated: one line, exit code 1, nothing written."""
    pipeline_loader(tiny_wan_pipeline, _encode_random_prompt)
    out = tmp_path / "v.mp4"
    assert main(["generate", "--model", "org/model", "--prompt", "p", "--num-frames", "21", "--height", "32",
                 "--width", "32", "--steps", "1", "--device", "cpu", "--dtype", "float32", "--compare",
                 "direct,riflex", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "generating" not in captured.out
    assert captured.err.count("\n") == 1 and "riflex" in captured.err
    assert list(tmp_path.iterdir()) == []
