"""The loss probe (``freeloc.probe_loss``) on a tiny random Wan: targets made by a known plan, so that the
layer whose switch lowers the loss is known."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers", reason="the loss probe runs through an adapter (extra 'diffusers')")

import diffusers  # noqa: E402
from test_wan_adapter import assert_same_state, snapshot  # noqa: E402

import freeloc  # noqa: E402
from freeloc.loss_probe import _z, loss_score_name, z_score_name  # noqa: E402

TRAINED_VIDEO = 21  # 6 latent frames
LAYERS = 3
BASE, CANDIDATE = "tsa", "tsa+vrpr"


def tiny_wan() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=16, num_layers=LAYERS, rope_max_seq_len=128,
    ).eval()


def call(latent_frames: int, seed: int = 0, batch: int = 3) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, latent_frames, 6, 6, generator=g),
                timestep=torch.tensor([400.0] * batch), encoder_hidden_states=torch.randn(batch, 5, 16, generator=g),
                return_dict=False)


def output(model: torch.nn.Module, kwargs: dict[str, Any], plan: freeloc.LayerPlan) -> torch.Tensor:
    with freeloc.enable(model, plan=plan, trained_frames=TRAINED_VIDEO), torch.no_grad():
        return model(**kwargs)[0]


def switched(layer: int) -> freeloc.LayerPlan:
    plan = freeloc.LayerPlan.uniform(BASE, LAYERS)
    plan.methods[layer] = CANDIDATE
    return plan


def test_the_layer_whose_switch_gives_the_target_is_chosen_at_its_ratio_only() -> None:
    """At 2x the target is the model's output with the candidate on layer 1 (that switch has loss 0, gain 1);
    at 3x it is the output with the base everywhere (every switch only adds error): layer 1 takes the
    candidate from 2x and the base again from 3x; below 2x every layer runs ``below``."""
    model = tiny_wan()
    before = snapshot(model)
    at2, at3 = call(12, seed=1), call(18, seed=2)
    batches = {2: [(at2, output(model, at2, switched(1)))],
               3: [(at3, output(model, at3, freeloc.LayerPlan.uniform(BASE, LAYERS)))]}
    plan = freeloc.probe_loss(model, batches, base=BASE, candidate=CANDIDATE, trained_frames=TRAINED_VIDEO,
                              progress=False)
    gains = plan.scores[loss_score_name(2)]
    print(plan.summary(), {k: [f"{g:.3g}" for g in v] for k, v in plan.scores.items()})
    assert gains[1] == pytest.approx(1.0, abs=1e-6)
    assert max(gains[0], gains[2]) < 1.0
    assert plan.methods == ["direct"] * LAYERS
    assert [r.from_ratio for r in plan.ranges] == [2.0, 3.0]
    assert plan.ranges[0].methods[1] == CANDIDATE
    assert plan.ranges[0].methods == [CANDIDATE if g > 0 else BASE for g in gains]
    assert plan.ranges[1].methods == [BASE] * LAYERS and all(g < 0 for g in plan.scores[loss_score_name(3)])
    assert plan.trained_frames == 6 and plan.meta["rule"]["name"] == "loss"
    assert plan.meta["cost"]["forwards"] == 2 * (1 + LAYERS)
    assert_same_state(before, snapshot(model))


def test_margin_and_layers_restrict_the_switches() -> None:
    model = tiny_wan()
    at2 = call(12, seed=1)
    batches = {2: [(at2, output(model, at2, switched(1)))]}
    only0 = freeloc.probe_loss(model, batches, layers=[0, 2], trained_frames=TRAINED_VIDEO, progress=False)
    assert only0.ranges[0].methods[1] == BASE and only0.scores[loss_score_name(2)][1] == 0.0
    strict = freeloc.probe_loss(model, batches, margin=1.0, trained_frames=TRAINED_VIDEO, progress=False)
    print(strict.scores)
    assert strict.ranges[0].methods == [BASE] * LAYERS  # no gain exceeds 1
    # the z-score: the mean paired difference of the rows' squared errors over its standard error; layer 1's
    # switch removes every row's error, so its z-score is positive and finite (the rows' errors differ)
    z = strict.scores[z_score_name(2)]
    assert 0 < z[1] < math.inf and strict.meta["rule"]["min_z"] == 0.0
    sure = freeloc.probe_loss(model, batches, min_z=z[1] + 1, trained_frames=TRAINED_VIDEO, progress=False)
    assert sure.ranges[0].methods[1] == BASE and sure.scores == strict.scores


def test_the_plan_saves_loads_and_applies(tmp_path: Any) -> None:
    model = tiny_wan()
    at2 = call(12, seed=1)
    plan = freeloc.probe_loss(model, {2: [(at2, output(model, at2, switched(2)))]}, trained_frames=TRAINED_VIDEO,
                              progress=False)
    plan.save(tmp_path / "plan.json")
    again = freeloc.LayerPlan.load(tmp_path / "plan.json")
    assert (again.methods, again.ranges, again.scores) == (plan.methods, plan.ranges, plan.scores)
    at_2x = freeloc.LayerPlan(methods=plan.ranges[0].methods, params=[{} for _ in range(LAYERS)])
    assert torch.equal(output(model, at2, again), output(model, at2, at_2x))


def test_progress_receives_every_forward() -> None:
    model = tiny_wan()
    at2 = call(12)
    seen: list[tuple[int, int]] = []
    freeloc.probe_loss(model, {2: [(at2, torch.zeros(3, 4, 12, 6, 6))] * 2}, trained_frames=TRAINED_VIDEO,
                       progress=lambda done, total: seen.append((done, total)))
    total = 2 * (1 + LAYERS)
    assert seen == [(i, total) for i in range(total + 1)]


def _bad() -> list[Any]:
    good = (call(12), torch.zeros(3, 4, 12, 6, 6))
    return [
        (dict(batches={}), r"batches must be a non-empty mapping"),
        (dict(batches={1: [good]}), r"each key of batches must be a length ratio > 1, got 1"),
        (dict(batches={math.nan: [good]}), r"length ratio > 1, got nan"),
        (dict(batches={2: []}), r"batches\[2\] must be a non-empty list"),
        (dict(base="bogus"), r"base: .*bogus"),
        (dict(candidate="tsa"), r"candidate must differ from base, got 'tsa'"),
        (dict(margin=math.inf), r"margin must be a finite number"),
        (dict(min_z=math.nan), r"min_z must be a number \(a z-score\), got nan"),
        (dict(layers=[3]), r"layers must be a non-empty list of layers in 0..2, got \[3\]"),
        (dict(batches={2: [(good[0], torch.zeros(3, 4, 11, 6, 6))]}),
         r"a target has shape \(3, 4, 11, 6, 6\), the model's output \(3, 4, 12, 6, 6\)"),
    ]


@pytest.mark.parametrize(("kwargs", "match"), _bad())
def test_bad_input_is_refused_and_the_model_kept(kwargs: dict[str, Any], match: str) -> None:
    model = tiny_wan()
    before = snapshot(model)
    args = dict(batches={2: [(call(12), torch.zeros(3, 4, 12, 6, 6))]}) | kwargs
    batches = args.pop("batches")
    with pytest.raises(ValueError, match=match):
        freeloc.probe_loss(model, batches, trained_frames=TRAINED_VIDEO, progress=False, **args)
    assert_same_state(before, snapshot(model))


def test_z_is_the_mean_over_its_standard_error() -> None:
    diff = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    assert _z(diff) == pytest.approx(3.0 / (float(diff.std()) / 2.0))
    assert _z(torch.zeros(4, dtype=torch.float64)) == 0.0
    assert _z(torch.full((4,), -0.5, dtype=torch.float64)) == -math.inf
    assert _z(torch.tensor([2.0], dtype=torch.float64)) == 0.0
