"""The shapes model: its patchifier, its condition, sampling at any length and the shipped checkpoint."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers", reason="the shapes model is a diffusers WanTransformer3DModel (extra 'shapes')")

from freeloc.shapes.clips import BACKGROUND, CONDITION_DIM, SLOT_DIM, condition, random_spec, render  # noqa: E402
from freeloc.shapes.metrics import evaluate, fit_spec  # noqa: E402
from freeloc.shapes.model import (  # noqa: E402
    LOSS_CLIPS,
    LOSS_RATIOS,
    LOSS_TIMES,
    SHIPPED,
    ShapesConfig,
    _shifted,
    check_plan_rule,
    condition_tokens,
    decode,
    encode,
    load,
    load_shipped,
    loss_batches,
    model_condition,
    probe_plan,
    sample,
    shipped_plan,
)
from freeloc.shapes.train import train  # noqa: E402


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


def test_condition_leaves_the_layout_to_the_model() -> None:
    spec = random_spec(3)
    full, given = condition(spec), model_condition(spec)
    assert not torch.equal(full, given)
    moved = type(spec)(spec.num_shapes, spec.colors, spec.shape_kinds, spec.velocities,
                       tuple((y + 1, x - 1) for y, x in spec.positions))
    assert torch.equal(model_condition(moved), given)


def test_configs_saved_before_cond_drop_existed_still_load() -> None:
    saved = {"frame_size": 32, "trained_frames": 16, "num_layers": 4, "num_heads": 4, "head_dim": 64, "ffn_dim": 512,
             "batch": 8, "lr": 0.0005, "warmup": 200, "ema": 0.999, "shift": 2.0, "seed": 0}
    cfg = ShapesConfig(**saved)
    assert cfg.cond_drop == 0.0 and cfg.cond_drop_start == 0 and cfg == ShapesConfig()


def test_sampling_at_several_lengths(tiny_shapes: ShapesConfig, tmp_path: Path) -> None:
    train(tiny_shapes, 1, tmp_path, progress=False)
    model, cfg = load(tmp_path)
    cond = torch.stack([condition(random_spec(7)), condition(random_spec(8))])
    for frames in (cfg.trained_frames, 4 * cfg.trained_frames):
        video = sample(model, cfg, cond, frames, steps=2)
        assert video.shape == (2, frames, 3, 32, 32) and torch.isfinite(video).all()
        assert 0 <= float(video.min()) and float(video.max()) <= 1


def test_guidance_one_is_plain_sampling_and_other_values_guide(tiny_shapes: ShapesConfig, tmp_path: Path) -> None:
    train(replace(tiny_shapes, cond_drop=0.5), 2, tmp_path, progress=False)
    model, cfg = load(tmp_path)
    cond = torch.stack([condition(random_spec(7)), condition(random_spec(8))])
    plain = sample(model, cfg, cond, 4, steps=2)
    assert torch.equal(sample(model, cfg, cond, 4, steps=2, guidance=1.0), plain)
    guided = sample(model, cfg, cond, 4, steps=2, guidance=3.0)
    assert torch.isfinite(guided).all() and not torch.equal(guided, plain)


def test_guided_sampling_is_the_guidance_formula_on_both_velocities(tiny_shapes: ShapesConfig, tmp_path: Path) -> None:
    train(replace(tiny_shapes, cond_drop=0.5), 2, tmp_path, progress=False)
    model, cfg = load(tmp_path)
    cond = torch.stack([condition(random_spec(7)), condition(random_spec(8))])
    guided = sample(model, cfg, cond, 4, steps=1, guidance=4.0, seed=3)
    x = torch.randn(2, cfg.channels, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = float(_shifted(torch.tensor(1.0), cfg.shift))
    with torch.no_grad():
        v1 = model(x, torch.full((2,), t * 1000), cond[:, None], return_dict=False)[0]
        v0 = model(x, torch.full((2,), t * 1000), torch.zeros_like(cond)[:, None], return_dict=False)[0]
    torch.testing.assert_close(guided, decode(x - t * (v0 + 4.0 * (v1 - v0))), rtol=1e-5, atol=1e-5)


def test_the_sampler_shift_is_the_config_s_or_the_argument(tiny_shapes: ShapesConfig, tmp_path: Path) -> None:
    """Two Euler steps: from t = 1 to the shifted midpoint, then to 0; only the shift moves the midpoint."""
    train(tiny_shapes, 1, tmp_path, progress=False)
    model, cfg = load(tmp_path)
    assert cfg.sample_shift is None and cfg.sampling_shift == cfg.shift
    cond = torch.stack([condition(random_spec(7)), condition(random_spec(8))])
    x = torch.randn(2, cfg.channels, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    for shift in (1.0, 4.0):
        mid = float(_shifted(torch.tensor(0.5), shift))
        with torch.no_grad():
            x1 = x + (mid - 1.0) * model(x, torch.full((2,), 1000.0), cond[:, None], return_dict=False)[0]
            x2 = x1 - mid * model(x1, torch.full((2,), mid * 1000), cond[:, None], return_dict=False)[0]
        by_argument = sample(model, cfg, cond, 4, steps=2, seed=3, shift=shift)
        torch.testing.assert_close(by_argument, decode(x2), rtol=1e-5, atol=1e-5)
        assert torch.equal(sample(model, replace(cfg, sample_shift=shift), cond, 4, steps=2, seed=3), by_argument)
    assert not torch.equal(sample(model, cfg, cond, 4, steps=2, seed=3, shift=4.0),
                           sample(model, cfg, cond, 4, steps=2, seed=3))
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match=f"shift must be a finite number > 0 \\(1: no shift\\), got {bad!r}"):
            sample(model, cfg, cond, 4, steps=1, shift=bad)


def test_the_sampler_noise_renoises_each_clean_estimate(tiny_shapes: ShapesConfig, tmp_path: Path) -> None:
    """Two steps with fresh noise, written out by hand: the first step re-noises its clean estimate with
    ``sqrt(1 - eta^2)`` of its own noise estimate and ``eta`` of new noise from the seeded generator; the
    last step (to t = 0) is the Euler step. ``noise=0`` is exactly the Euler sampler; the config's
    ``sample_noise`` is the default; values outside [0, 1] are refused."""
    train(tiny_shapes, 1, tmp_path, progress=False)
    model, cfg = load(tmp_path)
    assert cfg.sample_noise == 0.0
    cond = torch.stack([condition(random_spec(7)), condition(random_spec(8))])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, cfg.channels, 4, 8, 8, generator=g)
    mid = float(_shifted(torch.tensor(0.5), cfg.sampling_shift))
    eta = 0.6
    with torch.no_grad():
        v = model(x, torch.full((2,), 1000.0), cond[:, None], return_dict=False)[0]
        clean, eps = x - v, x
        x1 = (1 - mid) * clean + mid * ((1 - eta**2) ** 0.5 * eps + eta * torch.randn(x.shape, generator=g))
        x2 = x1 - mid * model(x1, torch.full((2,), mid * 1000), cond[:, None], return_dict=False)[0]
    noisy = sample(model, cfg, cond, 4, steps=2, seed=3, noise=eta)
    torch.testing.assert_close(noisy, decode(x2), rtol=1e-5, atol=1e-5)
    assert (noisy - sample(model, cfg, cond, 4, steps=2, seed=3)).abs().amax() > 1e-3
    assert torch.equal(sample(model, replace(cfg, sample_noise=eta), cond, 4, steps=2, seed=3), noisy)
    assert torch.equal(sample(model, replace(cfg, sample_noise=eta), cond, 4, steps=2, seed=3, noise=0),
                       sample(model, cfg, cond, 4, steps=2, seed=3))
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match=f"noise must be a number in \\[0, 1\\].*got {bad!r}"):
            sample(model, cfg, cond, 4, steps=1, noise=bad)


def test_slot_tokens_give_one_condition_token_per_shape(tiny_shapes: ShapesConfig, tmp_path: Path) -> None:
    cond = torch.stack([condition(random_spec(7)), condition(random_spec(8))])
    assert torch.equal(condition_tokens(tiny_shapes, cond), cond[:, None, :])
    slots = replace(tiny_shapes, slot_tokens=True)
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


def test_the_shipped_model_loads_offline_and_makes_the_shapes_it_is_asked_for() -> None:
    """The checkpoint in the package: loads without any download; at its trained length it draws shapes."""
    assert (SHIPPED / "model.safetensors").stat().st_size <= 20 * 2**20
    model, cfg = load_shipped()
    assert cfg.trained_frames == 16 and shipped_plan().num_layers == cfg.num_layers
    specs = [random_spec(30_000 + i) for i in range(2)]
    videos = sample(model, cfg, torch.stack([model_condition(s) for s in specs]), cfg.trained_frames, steps=12)
    scores = [evaluate(v, fit_spec(v, s)) for v, s in zip(videos, specs, strict=True)]
    print(scores)
    assert all(s["palette_fidelity"] > 0.9 for s in scores)  # a random or untrained model: about 0.2


def test_sampling_reports_progress_per_step(tiny_shapes: ShapesConfig, capsys: pytest.CaptureFixture[str]) -> None:
    """``sample(progress=...)``: a callable gets ``(done, total)`` steps, ``True`` a status line on stderr, and the
    default is silent; the video is the same either way."""
    from freeloc.shapes.model import build_model

    model, cond = build_model(tiny_shapes).eval(), condition(random_spec(7))[None]
    calls: list[tuple[int, int]] = []
    seen = sample(model, tiny_shapes, cond, 8, steps=3, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 3), (1, 3), (2, 3), (3, 3)]
    quiet = sample(model, tiny_shapes, cond, 8, steps=3)
    assert capsys.readouterr().err == ""
    sample(model, tiny_shapes, cond, 8, steps=3, progress=True)
    err = capsys.readouterr().err
    assert [part.split(",")[0] for part in err.split("\r")[1:]] == [f"sampling steps: {i}/3" for i in range(4)]
    assert torch.equal(seen, quiet)


def test_the_shipped_plan_is_what_its_recorded_rule_writes() -> None:
    """``plan.json`` and ``model.json`` name the same rule, and the probe with that rule on the shipped weights
    writes the same methods and length ranges again."""
    model, cfg = load_shipped()
    shipped = shipped_plan()
    rule = shipped.meta["rule"]
    recorded = json.loads((SHIPPED / "model.json").read_text())["plan"]
    keys = ("score", "bound_from", "position_from", "bounded_vrpr")
    assert {k: recorded.get(k) for k in keys} == {k: rule.get(k) for k in keys}
    assert recorded.get("min_z", 0.0) == rule.get("min_z", 0.0)
    again = probe_plan(model, cfg, score=rule["score"], bound_from=rule["bound_from"],
                       position_from=rule["position_from"], bounded_vrpr=rule["bounded_vrpr"],
                       min_z=rule.get("min_z", 0.0), progress=False)
    print(again.methods, [(r.from_ratio, r.methods) for r in again.ranges])
    assert (again.methods, again.ranges) == (shipped.methods, shipped.ranges)


def test_loss_batches_are_noised_rendered_clips_with_their_flow_matching_target(tiny_shapes: ShapesConfig) -> None:
    """Each example at ratio r: clips r times the trained length noised to one of the times, with target
    ``noise - x0``: ``x_t - t * target`` is the clean latent ``x0`` (the same for every time)."""
    batches = loss_batches(tiny_shapes, (2, 3), clips=2, times=(0.25, 0.75), seed=900)
    assert sorted(batches) == [2, 3] and all(len(items) == 2 for items in batches.values())
    for ratio, items in batches.items():
        frames = ratio * tiny_shapes.trained_frames
        x0 = encode(torch.stack([render(random_spec(900 + i), frames) for i in range(2)]))
        for (kwargs, target), t in zip(items, (0.25, 0.75), strict=True):
            assert kwargs["hidden_states"].shape == target.shape == x0.shape
            assert torch.equal(kwargs["timestep"], torch.full((2,), 1000.0 * t))
            torch.testing.assert_close(kwargs["hidden_states"] - t * target, x0, atol=1e-5, rtol=0)
    assert (LOSS_RATIOS, LOSS_CLIPS, LOSS_TIMES) == ((2, 4, 8), 8, (0.25, 0.5, 0.75))


def test_the_loss_rule_chooses_per_ratio_and_refuses_the_other_rules_settings(tiny_shapes: ShapesConfig,
                                                                             tmp_path: Path) -> None:
    train(tiny_shapes, 1, tmp_path, progress=False)
    model, cfg = load(tmp_path)
    plan = probe_plan(model, cfg, score="loss", progress=False)
    print(plan.summary(), plan.scores)
    assert plan.methods == ["direct"] and [r.from_ratio for r in plan.ranges] == [2.0, 4.0, 8.0]
    for r in plan.ranges:
        gain = plan.scores[f"loss_gain_{r.from_ratio:g}x"][0]
        assert r.methods == ["tsa+vrpr" if gain > 0 else "tsa"]
    assert plan.meta["rule"]["score"] == "loss" and plan.meta["rule"]["bounded_vrpr"] == "tsa+vrpr"
    for kwargs, match in ((dict(bound_from=2), "bound_from, position_from and tsa_count do not apply"),
                          (dict(bounded_vrpr="vrpr"), r"bounded_vrpr must be one of \['tsa\+vrpr', 'window\+vrpr'\], "
                                                      "got 'vrpr'")):
        with pytest.raises(ValueError, match=match):
            check_plan_rule("loss", **kwargs)
        with pytest.raises(ValueError, match=match):
            probe_plan(model, cfg, score="loss", progress=False, **kwargs)
    with pytest.raises(ValueError, match=r"score must be one of \['attention', 'output'\], got 'losses'"):
        check_plan_rule("losses")
    with pytest.raises(ValueError, match=r"min_z is the loss rule's \(score='loss'\), got 2.0 with score 'output'"):
        check_plan_rule("output", min_z=2.0)
