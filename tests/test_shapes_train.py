"""Training the shapes model: seeded and resumable, schedules that continue a saved run, and the export."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers", reason="the shapes model is a diffusers WanTransformer3DModel (extra 'shapes')")

import freeloc.shapes.model as shapes_model  # noqa: E402
from freeloc.shapes.model import LR_FLOOR, ShapesConfig, load  # noqa: E402
from freeloc.shapes.train import (  # noqa: E402
    _card,
    export,
    main,
    train,
    trained_length_scores,
    trained_steps,
    widen_ffn,
)


def assert_same_weights(run_a: Path, run_b: Path) -> None:
    """The two training runs' weight averages are bit-identical."""
    for (name, a), b in zip(load(run_a)[0].state_dict().items(), load(run_b)[0].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_training_is_seeded_and_resumable(tiny_shapes: ShapesConfig, tmp_path: Path) -> None:
    straight = train(tiny_shapes, 4, tmp_path / "a", save_every=2, progress=False)
    train(tiny_shapes, 2, tmp_path / "b", save_every=2, progress=False)
    resumed = train(tiny_shapes, 4, tmp_path / "b", save_every=2, progress=False)
    assert straight["step"] == resumed["step"] == 4
    assert resumed["loss"] == pytest.approx(straight["loss"], rel=1e-5)
    a, _ = load(tmp_path / "a")
    b, _ = load(tmp_path / "b")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    with pytest.raises(ValueError, match="was trained with"):
        train(replace(tiny_shapes, lr=1e-3), 5, tmp_path / "a", progress=False)


def test_too_narrow_a_model_is_refused(tiny_shapes: ShapesConfig, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="narrower than a token"):
        train(replace(tiny_shapes, head_dim=12), 1, tmp_path, progress=False)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_training_on_an_explicit_cpu_device_is_the_default_training(tiny_shapes: ShapesConfig, tmp_path: Path) -> None:
    train(tiny_shapes, 2, tmp_path / "a", save_every=2, progress=False)
    train(tiny_shapes, 2, tmp_path / "b", save_every=2, progress=False, device="cpu")
    assert_same_weights(tmp_path / "a", tmp_path / "b")
    with pytest.raises((RuntimeError, ValueError), match="device|Device"):
        train(tiny_shapes, 1, tmp_path / "c", progress=False, device="nonsense")


def test_condition_dropout_is_seeded_resumable_and_changes_training(tiny_shapes: ShapesConfig, tmp_path: Path) -> None:
    drop = replace(tiny_shapes, cond_drop=0.5)
    straight = train(drop, 4, tmp_path / "a", save_every=2, progress=False)
    train(drop, 2, tmp_path / "b", save_every=2, progress=False)
    assert train(drop, 4, tmp_path / "b", save_every=2, progress=False)["loss"] == pytest.approx(straight["loss"],
                                                                                                  rel=1e-5)
    plain = train(tiny_shapes, 4, tmp_path / "c", save_every=2, progress=False)
    assert plain["loss"] != straight["loss"]
    with pytest.raises(ValueError, match=r"cond_drop must be in \[0, 1\), got 1.5"):
        train(replace(tiny_shapes, cond_drop=1.5), 1, tmp_path / "d", progress=False)


def test_condition_dropout_from_a_step_continues_a_run_saved_before_it(tiny_shapes: ShapesConfig,
                                                                       tmp_path: Path) -> None:
    """A run without dropout, continued with ``cond_drop_start`` = its steps, is that config trained from scratch."""
    later = replace(tiny_shapes, cond_drop=0.5, cond_drop_start=2)
    train(tiny_shapes, 2, tmp_path / "a", save_every=2, progress=False)
    continued = train(later, 4, tmp_path / "a", save_every=2, progress=False)
    scratch = train(later, 4, tmp_path / "b", save_every=2, progress=False)
    assert continued["loss"] == pytest.approx(scratch["loss"], rel=1e-6)
    assert_same_weights(tmp_path / "a", tmp_path / "b")
    assert train(tiny_shapes, 4, tmp_path / "c", save_every=2, progress=False)["loss"] != scratch["loss"]
    # a run already past the start (here: 2 steps without dropout, asked to drop from step 1) is refused
    train(tiny_shapes, 2, tmp_path / "d", save_every=2, progress=False)
    with pytest.raises(ValueError, match="for 2 steps, which is not the same training"):
        train(replace(later, cond_drop_start=1), 4, tmp_path / "d", progress=False)
    with pytest.raises(ValueError, match="cond_drop_start must be a step >= 0, got -1"):
        train(replace(later, cond_drop_start=-1), 1, tmp_path / "e", progress=False)
    assert later.cond_drop_at(1) == 0.0 and later.cond_drop_at(2) == 0.5


def test_learning_rate_decay_from_a_step_continues_a_run_saved_before_it(tiny_shapes: ShapesConfig,
                                                                         tmp_path: Path) -> None:
    """A constant-lr run continued with a decay starting at its step is that config trained from scratch."""
    decayed = replace(tiny_shapes, warmup=1, lr_decay_start=2, lr_decay_end=4)
    lr = tiny_shapes.lr
    assert [decayed.lr_at(s) for s in range(6)] == pytest.approx(
        [lr, lr, lr, lr * (1 - (1 - LR_FLOOR) / 2), lr * LR_FLOOR, lr * LR_FLOOR])
    constant = replace(tiny_shapes, warmup=1)
    train(constant, 2, tmp_path / "a", save_every=2, progress=False)
    continued = train(decayed, 5, tmp_path / "a", save_every=5, progress=False)
    scratch = train(decayed, 5, tmp_path / "b", save_every=5, progress=False)
    assert continued["loss"] == pytest.approx(scratch["loss"], rel=1e-6)
    assert_same_weights(tmp_path / "a", tmp_path / "b")
    assert train(constant, 5, tmp_path / "c", save_every=5, progress=False)["loss"] != scratch["loss"]
    # a run already past the decay's start is refused, and so are negative steps
    train(constant, 4, tmp_path / "d", save_every=4, progress=False)  # step 3 had lr, not the decayed lr
    with pytest.raises(ValueError, match="for 4 steps, which is not the same training"):
        train(decayed, 5, tmp_path / "d", progress=False)
    with pytest.raises(ValueError, match="lr_decay_start and lr_decay_end must be steps >= 0, got -1 and 4"):
        train(replace(decayed, lr_decay_start=-1), 1, tmp_path / "e", progress=False)
    meta = {"config": decayed.__dict__, "parameters": 1, "weights": "w", "steps": 5, "loss_window": 1,
            "final_loss": 0.1, "commit": "abc"}
    assert "decayed linearly from step 2 to 0.05 x lr at step 4" in _card(meta, "")
    assert "decayed" not in _card({**meta, "config": constant.__dict__}, "")


def test_export_writes_a_loadable_checkpoint_with_card_plan_and_loss_curve(tiny_shapes: ShapesConfig, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    train(tiny_shapes, 3, tmp_path / "run", progress=False)
    dest = export(tmp_path / "run", tmp_path / "ship", commit="abc1234")
    meta = json.loads((dest / "model.json").read_text())
    assert meta["steps"] == 3 and meta["commit"] == "abc1234" and meta["config"]["head_dim"] == 96
    assert "abc1234" in (dest / "MODEL_CARD.md").read_text()
    assert (dest / "loss.png").read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setattr(shapes_model, "SHIPPED", dest)
    model, cfg = shapes_model.load_shipped()
    reference, _ = load(tmp_path / "run")
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b.half().float(), rtol=0, atol=0, msg=name)  # float16 storage
    assert shapes_model.shipped_plan().num_layers == cfg.num_layers
    with pytest.raises(FileNotFoundError, match="reinstall freeloc"):
        monkeypatch.setattr(shapes_model, "SHIPPED", tmp_path / "nowhere")
        shapes_model.load_shipped()


def test_training_can_start_from_an_exported_model(tiny_shapes: ShapesConfig, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """``init``: the run starts from the exported weights (lr 0 keeps them), records where they came from,
    resumes without being told again, and exports its steps on top of theirs; another network, another
    init on resume and a folder that is no export are refused before anything is written."""
    train(tiny_shapes, 3, tmp_path / "first", progress=False)
    ship = export(tmp_path / "first", tmp_path / "ship", commit="abc1234", evaluate=None)
    frozen = replace(tiny_shapes, lr=0.0, seed=1)
    train(frozen, 2, tmp_path / "next", progress=False, init=ship)
    exported = shapes_model.load_exported(ship)[0].state_dict()
    for name, value in load(tmp_path / "next")[0].state_dict().items():
        torch.testing.assert_close(value, exported[name], rtol=0, atol=0, msg=name)
    state = torch.load(tmp_path / "next" / "checkpoint.pt", weights_only=False)
    digest = hashlib.sha256((ship / "model.safetensors").read_bytes()).hexdigest()
    assert state["init"] == dict(source=str(ship), steps=3, commit="abc1234", sha256=digest)
    assert train(frozen, 3, tmp_path / "next", progress=False)["step"] == 3  # resumed, init kept
    shutil.copytree(ship, tmp_path / "same")  # the same weights named by another path
    assert train(frozen, 3, tmp_path / "next", progress=False, init=tmp_path / "same")["step"] == 3
    assert torch.load(tmp_path / "next" / "checkpoint.pt", weights_only=False)["init"]["steps"] == 3
    meta = json.loads((export(tmp_path / "next", tmp_path / "ship2", evaluate=None) / "model.json").read_text())
    assert (meta["steps"], meta["init"]["steps"], trained_steps(meta)) == (3, 3, 6)
    assert "3 steps starting from the weights of a model trained for 3 steps" in (
        tmp_path / "ship2" / "MODEL_CARD.md").read_text()
    assert "6 steps in all" in (tmp_path / "ship2" / "MODEL_CARD.md").read_text()
    assert "trained from scratch" in (ship / "MODEL_CARD.md").read_text()
    assert "from scratch" not in (tmp_path / "ship2" / "MODEL_CARD.md").read_text()
    with pytest.raises(ValueError, match="started from"):
        train(frozen, 4, tmp_path / "next", progress=False, init=tmp_path / "ship2")
    with pytest.raises(ValueError, match="only a wider ffn_dim may differ.*ffn_dim 32 vs 16"):
        train(replace(tiny_shapes, ffn_dim=16), 1, tmp_path / "wide", progress=False, init=ship)
    with pytest.raises(FileNotFoundError, match="not an exported shapes model"):
        train(tiny_shapes, 1, tmp_path / "none", progress=False, init=tmp_path / "first")
    assert not (tmp_path / "wide").exists() and not (tmp_path / "none").exists()
    with pytest.raises(SystemExit):
        main(["--steps", "1", "--out", str(tmp_path / "cli"), "--layers", "2", "--init-from", str(ship)])
    assert "num_layers 1 vs 2" in capsys.readouterr().err and not (tmp_path / "cli").exists()


def test_an_init_can_be_widened_without_changing_what_it_computes(tiny_shapes: ShapesConfig, tmp_path: Path) -> None:
    """A run with a wider ``ffn_dim`` than its init starts from the init's function (the new units' outputs
    are zero, their inputs random), trains all of it, records the width it grew from, and says so on the
    card; a weight that cannot be widened is refused by name."""
    train(tiny_shapes, 2, tmp_path / "first", progress=False)
    ship = export(tmp_path / "first", tmp_path / "ship", evaluate=None)
    narrow, _ = shapes_model.load_exported(ship)
    wide_cfg = replace(tiny_shapes, ffn_dim=48, seed=3)
    train(replace(wide_cfg, lr=0.0), 1, tmp_path / "same", progress=False, init=ship)
    wide, _ = load(tmp_path / "same")
    x = torch.randn(2, wide_cfg.channels, wide_cfg.trained_frames, 4, 4, generator=torch.Generator().manual_seed(0))
    tokens = shapes_model.condition_tokens(wide_cfg, torch.rand(2, 37, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        before = narrow(x, torch.tensor([250.0, 750.0]), tokens, return_dict=False)[0]
        after = wide(x, torch.tensor([250.0, 750.0]), tokens, return_dict=False)[0]
    assert before.abs().amax() > 0.1
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    grown = wide.state_dict()["blocks.0.ffn.net.2.weight"]
    assert grown.shape == (192, 48) and torch.equal(grown[:, 32:], torch.zeros(192, 16))
    assert grown[:, :32].abs().amax() > 0 and wide.state_dict()["blocks.0.ffn.net.0.proj.weight"][32:].abs().amax() > 0
    state = torch.load(tmp_path / "same" / "checkpoint.pt", weights_only=False)
    assert state["init"]["ffn_dim"] == 32

    train(wide_cfg, 2, tmp_path / "trained", progress=False, init=ship)
    moved = load(tmp_path / "trained", average=False)[0].state_dict()["blocks.0.ffn.net.2.weight"]
    assert moved[:, 32:].abs().amax() > 0  # the new units learn
    export(tmp_path / "trained", tmp_path / "ship2", evaluate=None)
    assert "feed-forward layers widened from 32 to 48 units" in (tmp_path / "ship2" / "MODEL_CARD.md").read_text()

    weights = narrow.state_dict()
    fresh = shapes_model.build_model(replace(tiny_shapes, head_dim=128)).state_dict()
    with pytest.raises(ValueError, match="only the feed-forward layers may be widened"):
        widen_ffn(weights, fresh)


def test_export_records_the_guidance_scale_and_refuses_it_without_dropout(tiny_shapes: ShapesConfig, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    train(tiny_shapes, 1, tmp_path / "plain", progress=False)
    with pytest.raises(ValueError, match="guidance=3.0 needs a model trained with cond_drop > 0"):
        export(tmp_path / "plain", tmp_path / "x", guidance=3.0)
    train(replace(tiny_shapes, cond_drop=0.2, cond_drop_start=1), 2, tmp_path / "drop", progress=False)
    dest = export(tmp_path / "drop", tmp_path / "ship", commit="abc1234", guidance=3.0)
    card = (dest / "MODEL_CARD.md").read_text()
    assert "classifier-free guidance 3" in card and "20% of the conditions replaced by zeros" in card
    assert "from step 1 on" in card
    monkeypatch.setattr(shapes_model, "SHIPPED", dest)
    assert shapes_model.shipped_guidance() == 3.0
    monkeypatch.setattr(shapes_model, "SHIPPED", tmp_path / "plain-ship")
    export(tmp_path / "plain", tmp_path / "plain-ship")
    assert shapes_model.shipped_guidance() == 1.0


def test_export_stores_the_sampler_shift_in_the_config(tiny_shapes: ShapesConfig, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    train(tiny_shapes, 1, tmp_path / "run", progress=False)
    for bad in (0, -2.0, float("inf")):
        with pytest.raises(ValueError, match=f"sample_shift must be a finite number > 0 or None .*got {bad!r}"):
            export(tmp_path / "run", tmp_path / "bad", sample_shift=bad)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "run"), "--export", str(tmp_path / "bad"), "--sample-shift", "0"])
    assert not (tmp_path / "bad").exists()
    dest = export(tmp_path / "run", tmp_path / "ship", sample_shift=4)
    assert json.loads((dest / "model.json").read_text())["config"]["sample_shift"] == 4.0
    card = (dest / "MODEL_CARD.md").read_text()
    assert "Euler flow sampling with timestep shift 4 (`sample_shift` in the config)" in card
    monkeypatch.setattr(shapes_model, "SHIPPED", dest)
    _, cfg = shapes_model.load_shipped()
    assert cfg.sampling_shift == 4.0 and cfg.shift == tiny_shapes.shift  # training shift unchanged
    assert json.loads((tmp_path / "run" / "config.json").read_text())["sample_shift"] is None
    main(["--out", str(tmp_path / "run"), "--export", str(tmp_path / "cli"), "--sample-shift", "3",
          "--evaluate", "none"])
    assert json.loads((tmp_path / "cli" / "model.json").read_text())["config"]["sample_shift"] == 3.0


def test_export_stores_the_sampler_noise_in_the_config(tiny_shapes: ShapesConfig, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    train(tiny_shapes, 1, tmp_path / "run", progress=False)
    for bad in (-0.5, 1.01, float("nan")):
        with pytest.raises(ValueError, match=f"sample_noise must be a number in \\[0, 1\\] .*got {bad!r}"):
            export(tmp_path / "run", tmp_path / "bad", sample_noise=bad)
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "run"), "--export", str(tmp_path / "bad"), "--sample-noise", "3"])
    assert not (tmp_path / "bad").exists()
    dest = export(tmp_path / "run", tmp_path / "ship", sample_noise=0.8)
    assert json.loads((dest / "model.json").read_text())["config"]["sample_noise"] == 0.8
    assert "re-noised with a share 0.8 of fresh noise (`sample_noise` in the config)" in (
        dest / "MODEL_CARD.md").read_text()
    monkeypatch.setattr(shapes_model, "SHIPPED", dest)
    assert shapes_model.load_shipped()[1].sample_noise == 0.8
    main(["--out", str(tmp_path / "run"), "--export", str(tmp_path / "cli"), "--evaluate", "none"])
    assert json.loads((tmp_path / "cli" / "model.json").read_text())["config"]["sample_noise"] == 0.0
    assert "fresh noise" not in (tmp_path / "cli" / "MODEL_CARD.md").read_text()


def test_export_scores_the_model_at_its_trained_length_in_the_card(tiny_shapes: ShapesConfig, tmp_path: Path) -> None:
    train(replace(tiny_shapes, cond_drop=0.2), 1, tmp_path / "run", progress=False)
    dest = export(tmp_path / "run", tmp_path / "ship", guidance=3.0, evaluate=[1.0, 3.0], evaluate_clips=2)
    card = (dest / "MODEL_CARD.md").read_text()
    assert "| guidance | shapes drawn / asked | right count | right colours |" in card
    assert "| 1 (none) |" in card and "| 3 (shipped default) |" in card and "seeds 20000-20001" in card
    stored = json.loads((dest / "model.json").read_text())["trained_length_scores"]
    assert stored["clips"] == 2 and set(stored["by_guidance"]) == {"1", "3"}
    model, cfg = load(tmp_path / "run")
    model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})  # the exported weights
    again = trained_length_scores(model, cfg, [3.0], clips=2, progress=False)[3.0]
    assert again == pytest.approx(stored["by_guidance"]["3"], nan_ok=True)  # the card's numbers are reproducible
    for bad in ([], [-1.0], [float("nan")]):
        with pytest.raises(ValueError, match="guidances must be finite numbers >= 0"):
            trained_length_scores(model, cfg, bad, progress=False)
    with pytest.raises(ValueError, match="clips must be between 1 and 64, got 0"):
        trained_length_scores(model, cfg, [1.0], clips=0, progress=False)
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "run"), "--export", str(tmp_path / "x"), "--evaluate", "1,abc"])
    main(["--out", str(tmp_path / "run"), "--export", str(tmp_path / "plain"), "--evaluate", "none"])
    assert "| guidance |" not in (tmp_path / "plain" / "MODEL_CARD.md").read_text()


def test_the_command_line_sets_the_depth_and_width(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--layers`` and ``--ffn-dim`` reach the config the run is saved with; values below 1 are refused
    before any training."""
    assert main(["--steps", "1", "--out", str(tmp_path / "run"), "--layers", "2", "--ffn-dim", "64"]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["num_layers"], saved["ffn_dim"]) == (2, 64)
    model, cfg = load(tmp_path / "run")
    assert len(model.blocks) == 2 and cfg.num_layers == 2
    for flag in ("--layers", "--ffn-dim"):
        with pytest.raises(SystemExit):
            main(["--steps", "1", "--out", str(tmp_path / "bad"), flag, "0"])
        assert "--layers and --ffn-dim must be >= 1, got" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_export_writes_the_plan_with_the_probe_settings_it_is_given(tiny_shapes: ShapesConfig, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``--probe-score`` and ``--bound-from`` reach the shipped plan: its rule names them, and from the
    bound ratio on the plan's VRPR layers become ``tsa+vrpr`` while TSA layers stay."""
    train(tiny_shapes, 1, tmp_path / "run", progress=False)
    assert main(["--out", str(tmp_path / "run"), "--export", str(tmp_path / "ship"), "--evaluate", "none",
                 "--probe-score", "output", "--bound-from", "3"]) == 0
    monkeypatch.setattr(shapes_model, "SHIPPED", tmp_path / "ship")
    plan = shapes_model.shipped_plan()
    assert plan.meta["rule"]["score"] == "output" and plan.meta["rule"]["bound_from"] == 3.0
    card = (tmp_path / "ship" / "MODEL_CARD.md").read_text()
    assert "with its `output` scores; from 3x on, its VRPR layers take `tsa+vrpr`" in card
    assert [r.from_ratio for r in plan.ranges] == [3.0]
    assert plan.ranges[0].methods == ["tsa+vrpr" if m == "vrpr" else m for m in plan.methods]
    t = tiny_shapes.trained_frames
    assert plan.methods_at(2 * t, t)[0] == plan.methods and plan.methods_at(4 * t, t)[0] == plan.ranges[0].methods
    export(tmp_path / "run", tmp_path / "default", evaluate=None)
    monkeypatch.setattr(shapes_model, "SHIPPED", tmp_path / "default")
    default = shapes_model.shipped_plan()
    assert default.ranges == [] and default.meta["rule"]["bound_from"] is None
    assert default.meta["rule"]["score"] == "attention"
    assert "with its `attention` scores.\n" in (tmp_path / "default" / "MODEL_CARD.md").read_text()
    export(tmp_path / "run", tmp_path / "both", evaluate=None, bound_from=2, position_from=4,
           bounded_vrpr="window+vrpr")
    monkeypatch.setattr(shapes_model, "SHIPPED", tmp_path / "both")
    both = shapes_model.shipped_plan()
    assert both.meta["rule"]["position_from"] == 4 and [r.from_ratio for r in both.ranges] == [2, 4]
    assert both.meta["rule"]["bounded_vrpr"] == "window+vrpr" and "tsa+vrpr" not in both.ranges[1].methods
    assert set(both.ranges[0].methods) == {"tsa"} and "vrpr" not in both.methods
    assert ("from 2x on, its VRPR layers take `tsa` (`bound_from`), and from 4x on `window+vrpr` (`position_from`)"
            in (tmp_path / "both" / "MODEL_CARD.md").read_text())
