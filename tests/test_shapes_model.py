"""The small Wan model for synthetic clips: patchifier, seeded resumable training, sampling at any length."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers", reason="the shapes model is a diffusers WanTransformer3DModel")

from freeloc.shapes_model import ShapesConfig, decode, encode, load, sample, train  # noqa: E402
from freeloc.synthetic import BACKGROUND, condition, random_spec, render  # noqa: E402

TINY = ShapesConfig(num_layers=1, num_heads=2, head_dim=96, ffn_dim=32, batch=2, trained_frames=4)


def assert_same_weights(run_a: Path, run_b: Path) -> None:
    """The two training runs' weight averages are bit-identical."""
    for (name, a), b in zip(load(run_a)[0].state_dict().items(), load(run_b)[0].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_patchifier_round_trip() -> None:
    video = torch.stack([render(random_spec(s), 5) for s in range(2)])
    latent = encode(video)
    assert latent.shape == (2, 48, 5, 8, 8)
    torch.testing.assert_close(decode(latent), video, atol=1e-6, rtol=0)
    # a latent cell is nonzero exactly where its 4 x 4 pixel block holds a shape pixel
    drawn = (video != torch.tensor(BACKGROUND).view(1, 1, 3, 1, 1)).any(dim=2).float()  # (B, T, H, W)
    blocks = torch.nn.functional.max_pool2d(drawn.flatten(0, 1)[:, None], 4)[:, 0].view(2, 5, 8, 8) > 0
    assert torch.equal(latent.abs().amax(dim=1) > 0, blocks) and bool(blocks.any())
    assert torch.equal(encode(torch.tensor(BACKGROUND).view(1, 1, 3, 1, 1).expand(1, 2, 3, 32, 32)),
                       torch.zeros(1, 48, 2, 8, 8))  # the background is the zero latent


def test_training_is_seeded_and_resumable(tmp_path: Path) -> None:
    straight = train(TINY, 4, tmp_path / "a", save_every=2, progress=False)
    train(TINY, 2, tmp_path / "b", save_every=2, progress=False)
    resumed = train(TINY, 4, tmp_path / "b", save_every=2, progress=False)
    assert straight["step"] == resumed["step"] == 4
    assert resumed["loss"] == pytest.approx(straight["loss"], rel=1e-5)
    a, _ = load(tmp_path / "a")
    b, _ = load(tmp_path / "b")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    with pytest.raises(ValueError, match="was trained with"):
        train(replace(TINY, lr=1e-3), 5, tmp_path / "a", progress=False)


def test_sampling_at_several_lengths(tmp_path: Path) -> None:
    train(TINY, 1, tmp_path, progress=False)
    model, cfg = load(tmp_path)
    cond = torch.stack([condition(random_spec(7)), condition(random_spec(8))])
    for frames in (cfg.trained_frames, 4 * cfg.trained_frames):
        video = sample(model, cfg, cond, frames, steps=2)
        assert video.shape == (2, frames, 3, 32, 32) and torch.isfinite(video).all()
        assert 0 <= float(video.min()) and float(video.max()) <= 1


def test_too_narrow_a_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="narrower than a token"):
        train(replace(TINY, head_dim=12), 1, tmp_path, progress=False)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_condition_leaves_the_layout_to_the_model() -> None:
    from freeloc.shapes_model import model_condition

    spec = random_spec(3)
    full, given = condition(spec), model_condition(spec)
    assert not torch.equal(full, given)
    moved = type(spec)(spec.num_shapes, spec.colors, spec.shape_kinds, spec.velocities,
                       tuple((y + 1, x - 1) for y, x in spec.positions))
    assert torch.equal(model_condition(moved), given)


def test_export_writes_a_loadable_checkpoint_with_card_plan_and_loss_curve(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    import freeloc.shapes_model as sm

    train(TINY, 3, tmp_path / "run", progress=False)
    dest = sm.export(tmp_path / "run", tmp_path / "ship", commit="abc1234")
    meta = json.loads((dest / "model.json").read_text())
    assert meta["steps"] == 3 and meta["commit"] == "abc1234" and meta["config"]["head_dim"] == 96
    assert "abc1234" in (dest / "MODEL_CARD.md").read_text()
    assert (dest / "loss.png").read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setattr(sm, "SHIPPED", dest)
    model, cfg = sm.load_shipped()
    reference, _ = load(tmp_path / "run")
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b.half().float(), rtol=0, atol=0, msg=name)  # float16 storage
    assert sm.shipped_plan().num_layers == cfg.num_layers
    with pytest.raises(FileNotFoundError, match="reinstall freeloc"):
        monkeypatch.setattr(sm, "SHIPPED", tmp_path / "nowhere")
        sm.load_shipped()


def test_the_shipped_model_loads_offline_and_makes_the_shapes_it_is_asked_for() -> None:
    """The checkpoint in the package: loads without any download; at its trained length it draws shapes."""
    from freeloc.shapes_model import SHIPPED, load_shipped, model_condition, shipped_plan
    from freeloc.synthetic import evaluate, fit_spec

    assert (SHIPPED / "model.safetensors").stat().st_size <= 20 * 2**20
    model, cfg = load_shipped()
    assert cfg.trained_frames == 16 and shipped_plan().num_layers == cfg.num_layers
    specs = [random_spec(30_000 + i) for i in range(2)]
    videos = sample(model, cfg, torch.stack([model_condition(s) for s in specs]), cfg.trained_frames, steps=12)
    scores = [evaluate(v, fit_spec(v, s)) for v, s in zip(videos, specs, strict=True)]
    print(scores)
    assert all(s["palette_fidelity"] > 0.9 for s in scores)  # a random or untrained model: about 0.2


def test_condition_dropout_is_seeded_resumable_and_changes_training(tmp_path: Path) -> None:
    drop = replace(TINY, cond_drop=0.5)
    straight = train(drop, 4, tmp_path / "a", save_every=2, progress=False)
    train(drop, 2, tmp_path / "b", save_every=2, progress=False)
    assert train(drop, 4, tmp_path / "b", save_every=2, progress=False)["loss"] == pytest.approx(straight["loss"],
                                                                                                  rel=1e-5)
    plain = train(TINY, 4, tmp_path / "c", save_every=2, progress=False)
    assert plain["loss"] != straight["loss"]
    with pytest.raises(ValueError, match=r"cond_drop must be in \[0, 1\), got 1.5"):
        train(replace(TINY, cond_drop=1.5), 1, tmp_path / "d", progress=False)


def test_guidance_one_is_plain_sampling_and_other_values_guide(tmp_path: Path) -> None:
    train(replace(TINY, cond_drop=0.5), 2, tmp_path, progress=False)
    model, cfg = load(tmp_path)
    cond = torch.stack([condition(random_spec(7)), condition(random_spec(8))])
    plain = sample(model, cfg, cond, 4, steps=2)
    assert torch.equal(sample(model, cfg, cond, 4, steps=2, guidance=1.0), plain)
    guided = sample(model, cfg, cond, 4, steps=2, guidance=3.0)
    assert torch.isfinite(guided).all() and not torch.equal(guided, plain)


def test_configs_saved_before_cond_drop_existed_still_load() -> None:
    saved = {"frame_size": 32, "trained_frames": 16, "num_layers": 4, "num_heads": 4, "head_dim": 64, "ffn_dim": 512,
             "batch": 8, "lr": 0.0005, "warmup": 200, "ema": 0.999, "shift": 2.0, "seed": 0}
    cfg = ShapesConfig(**saved)
    assert cfg.cond_drop == 0.0 and cfg.cond_drop_start == 0 and cfg == ShapesConfig()


def test_condition_dropout_from_a_step_continues_a_run_saved_before_it(tmp_path: Path) -> None:
    """A run without dropout, continued with ``cond_drop_start`` = its steps, is that config trained from scratch."""
    later = replace(TINY, cond_drop=0.5, cond_drop_start=2)
    train(TINY, 2, tmp_path / "a", save_every=2, progress=False)
    continued = train(later, 4, tmp_path / "a", save_every=2, progress=False)
    scratch = train(later, 4, tmp_path / "b", save_every=2, progress=False)
    assert continued["loss"] == pytest.approx(scratch["loss"], rel=1e-6)
    assert_same_weights(tmp_path / "a", tmp_path / "b")
    assert train(TINY, 4, tmp_path / "c", save_every=2, progress=False)["loss"] != scratch["loss"]
    # a run already past the start (here: 2 steps without dropout, asked to drop from step 1) is refused
    train(TINY, 2, tmp_path / "d", save_every=2, progress=False)
    with pytest.raises(ValueError, match="for 2 steps, which is not the same training"):
        train(replace(later, cond_drop_start=1), 4, tmp_path / "d", progress=False)
    with pytest.raises(ValueError, match="cond_drop_start must be a step >= 0, got -1"):
        train(replace(later, cond_drop_start=-1), 1, tmp_path / "e", progress=False)
    assert later.cond_drop_at(1) == 0.0 and later.cond_drop_at(2) == 0.5


def test_guided_sampling_is_the_guidance_formula_on_both_velocities(tmp_path: Path) -> None:
    from freeloc.shapes_model import _shifted

    train(replace(TINY, cond_drop=0.5), 2, tmp_path, progress=False)
    model, cfg = load(tmp_path)
    cond = torch.stack([condition(random_spec(7)), condition(random_spec(8))])
    guided = sample(model, cfg, cond, 4, steps=1, guidance=4.0, seed=3)
    x = torch.randn(2, cfg.channels, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = float(_shifted(torch.tensor(1.0), cfg.shift))
    with torch.no_grad():
        v1 = model(x, torch.full((2,), t * 1000), cond[:, None], return_dict=False)[0]
        v0 = model(x, torch.full((2,), t * 1000), torch.zeros_like(cond)[:, None], return_dict=False)[0]
    torch.testing.assert_close(guided, decode(x - t * (v0 + 4.0 * (v1 - v0))), rtol=1e-5, atol=1e-5)


def test_export_records_the_guidance_scale_and_refuses_it_without_dropout(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import freeloc.shapes_model as sm

    train(TINY, 1, tmp_path / "plain", progress=False)
    with pytest.raises(ValueError, match="guidance=3.0 needs a model trained with cond_drop > 0"):
        sm.export(tmp_path / "plain", tmp_path / "x", guidance=3.0)
    train(replace(TINY, cond_drop=0.2, cond_drop_start=1), 2, tmp_path / "drop", progress=False)
    dest = sm.export(tmp_path / "drop", tmp_path / "ship", commit="abc1234", guidance=3.0)
    card = (dest / "MODEL_CARD.md").read_text()
    assert "classifier-free guidance 3" in card and "20% of the conditions replaced by zeros" in card
    assert "from step 1 on" in card
    monkeypatch.setattr(sm, "SHIPPED", dest)
    assert sm.shipped_guidance() == 3.0
    monkeypatch.setattr(sm, "SHIPPED", tmp_path / "plain-ship")
    sm.export(tmp_path / "plain", tmp_path / "plain-ship")
    assert sm.shipped_guidance() == 1.0


def test_slot_tokens_give_one_condition_token_per_shape(tmp_path: Path) -> None:
    from freeloc.shapes_model import condition_tokens
    from freeloc.synthetic import CONDITION_DIM, SLOT_DIM

    cond = torch.stack([condition(random_spec(7)), condition(random_spec(8))])
    assert torch.equal(condition_tokens(TINY, cond), cond[:, None, :])
    slots = replace(TINY, slot_tokens=True)
    tokens = condition_tokens(slots, cond)
    assert tokens.shape == (2, 3, SLOT_DIM + 1) and CONDITION_DIM == 3 * SLOT_DIM + 1
    for i in range(3):
        assert torch.equal(tokens[:, i, :SLOT_DIM], cond[:, i * SLOT_DIM:(i + 1) * SLOT_DIM])
        assert torch.equal(tokens[:, i, -1], cond[:, -1])
    train(replace(slots, cond_drop=0.5), 2, tmp_path, progress=False)
    model, cfg = load(tmp_path)
    assert cfg.slot_tokens and model.config.text_dim == SLOT_DIM + 1
    video = sample(model, cfg, cond, 5, steps=2, guidance=2.0)
    assert video.shape == (2, 5, 3, 32, 32) and torch.isfinite(video).all()


def test_learning_rate_decay_from_a_step_continues_a_run_saved_before_it(tmp_path: Path) -> None:
    """A constant-lr run continued with a decay starting at its step is that config trained from scratch."""
    from freeloc.shapes_model import LR_FLOOR, _card

    decayed = replace(TINY, warmup=1, lr_decay_start=2, lr_decay_end=4)
    assert [decayed.lr_at(s) for s in range(6)] == pytest.approx(
        [TINY.lr, TINY.lr, TINY.lr, TINY.lr * (1 - (1 - LR_FLOOR) / 2), TINY.lr * LR_FLOOR, TINY.lr * LR_FLOOR])
    constant = replace(TINY, warmup=1)
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


def test_export_scores_the_model_at_its_trained_length_in_the_card(tmp_path: Path) -> None:
    import json

    from freeloc.shapes_model import export, main, trained_length_scores

    train(replace(TINY, cond_drop=0.2), 1, tmp_path / "run", progress=False)
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


def test_training_on_an_explicit_cpu_device_is_the_default_training(tmp_path: Path) -> None:
    train(TINY, 2, tmp_path / "a", save_every=2, progress=False)
    train(TINY, 2, tmp_path / "b", save_every=2, progress=False, device="cpu")
    assert_same_weights(tmp_path / "a", tmp_path / "b")
    with pytest.raises((RuntimeError, ValueError), match="device|Device"):
        train(TINY, 1, tmp_path / "c", progress=False, device="nonsense")
