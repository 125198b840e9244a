"""The layer probe on tiny Wan models whose layers are made position- or context-sensitive on purpose."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers", reason="the probe runs through an adapter (extra 'diffusers')")

import diffusers  # noqa: E402
from test_wan_adapter import assert_same_state, snapshot  # noqa: E402

import freeloc  # noqa: E402
from freeloc.plan import LengthRange  # noqa: E402
from freeloc.probing import length_ranges, probe, select  # noqa: E402

TRAINED_VIDEO = 21  # 6 latent frames
FRAMES = 24  # latent frames probed (4x)
POSITION_LAYER, CONTEXT_LAYER = 1, 3
SHARPNESS = 4.0


def prepared_model() -> torch.nn.Module:
    """4 layers whose q = k = a constant vector per layer, so that each logit depends only on the
    frame distance (and the spatial one): attention is local in time, sharpened by the norm weights.

    Layer 1 keeps only temporal channels in that vector (its logits are all temporal rotation: the most
    position-sensitive); layer 3 has q = 0, so every key weighs the same (the most context-sensitive).
    """
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=48, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=4, rope_max_seq_len=128,
    ).eval()
    head_dim, heads = 48, 2
    temporal = torch.cat([torch.arange(model.rope.t_dim) + h * head_dim for h in range(heads)])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            attn = block.attn1
            c = torch.randn(head_dim * heads, generator=g).abs() + 0.5
            if i == POSITION_LAYER:
                only_temporal = torch.zeros_like(c)
                only_temporal[temporal] = 1.0
                c = c * only_temporal
            attn.to_q.weight.zero_()
            attn.to_k.weight.zero_()
            attn.to_q.bias.copy_(c)
            attn.to_k.bias.copy_(c)
            attn.norm_q.weight.fill_(SHARPNESS)
            attn.norm_k.weight.fill_(SHARPNESS)
        model.blocks[CONTEXT_LAYER].attn1.norm_q.weight.zero_()
    return model


def inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 16, FRAMES, 8, 8, generator=g), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 7, 32, generator=g), return_dict=False)


def run_probe(model: torch.nn.Module, **kwargs: object) -> freeloc.LayerPlan:
    return probe(model, 4 * (FRAMES - 1) + 1, inputs=inputs(), trained_frames=TRAINED_VIDEO, progress=False,
                 max_queries=200, **kwargs)


def test_probe_finds_the_sensitive_layers_and_assigns_them() -> None:
    model = prepared_model()
    plan = run_probe(model)
    position, context = plan.scores["position"], plan.scores["context"]
    print("position", [round(x, 3) for x in position], "context", [round(x, 3) for x in context])
    assert max(range(4), key=lambda i: position[i]) == POSITION_LAYER
    assert max(range(4), key=lambda i: context[i]) == CONTEXT_LAYER
    assert plan.methods[POSITION_LAYER] == "vrpr" and plan.methods[CONTEXT_LAYER] == "tsa"
    assert set(plan.methods) <= {"tsa", "vrpr"} and len(plan.methods) == 4
    assert all(len(plan.scores[k]) == 4 for k in ("position", "context", "position_output", "context_output"))
    assert plan.meta["rule"]["name"] == "normalized dominance"
    assert plan.meta["probe"]["shifts"] == [6.0, -6.0, 12.0, -12.0]  # +-T, +-2T at T = 6
    assert plan.meta["cost"]["forwards"] == 2 + 4 * (4 + 1)
    assert plan.model["class"] == "WanTransformer3DModel" and plan.trained_frames == 6


def test_scores_do_not_depend_on_the_probing_order_and_the_model_is_restored() -> None:
    model = prepared_model()
    before = snapshot(model)
    full = run_probe(model)
    assert_same_state(before, snapshot(model))
    alone = run_probe(model, layers=[CONTEXT_LAYER, 0])
    for key in ("position", "context", "position_output", "context_output"):
        for layer in (0, CONTEXT_LAYER):
            assert alone.scores[key][layer] == pytest.approx(full.scores[key][layer], rel=1e-6)
    assert_same_state(before, snapshot(model))


def test_written_plan_loads_and_applies(tmp_path: Path) -> None:
    model = prepared_model()
    path = run_probe(model).save(tmp_path / "plan.json")
    loaded = freeloc.LayerPlan.load(path)
    assert loaded.scores["position"] and loaded.meta["probe"]["latent_frames"] == FRAMES
    with freeloc.enable(model, plan=str(path), trained_frames=TRAINED_VIDEO) as session:
        with torch.no_grad():
            out = model(**inputs())[0]
    assert torch.isfinite(out).all()
    assert [s.method for s in session.layers] == loaded.methods


def test_the_rule_compares_the_scores_named_by_score() -> None:
    """``score="output"`` selects with the output changes; both pairs of scores are recorded either way."""
    model = prepared_model()
    by_attention, by_output = run_probe(model), run_probe(model, score="output")
    for key in ("position", "context", "position_output", "context_output"):
        assert by_output.scores[key] == pytest.approx(by_attention.scores[key], rel=1e-6)
    scores = by_output.scores
    assert by_output.methods == select(scores["position_output"], scores["context_output"])
    assert by_attention.methods == select(scores["position"], scores["context"])
    assert by_output.methods[CONTEXT_LAYER] == "tsa" and by_output.methods[POSITION_LAYER] == "vrpr"
    assert (by_attention.meta["rule"]["score"], by_output.meta["rule"]["score"]) == ("attention", "output")
    with pytest.raises(ValueError, match=r"score must be one of \['attention', 'output'\], got 'entropy'"):
        run_probe(model, score="entropy")


def test_bound_from_gives_the_vrpr_layers_bounded_context_past_a_ratio() -> None:
    model = prepared_model()
    plan = run_probe(model, bound_from=6)
    assert plan.methods[POSITION_LAYER] == "vrpr" and plan.methods[CONTEXT_LAYER] == "tsa"
    (far,) = plan.ranges
    assert far.from_ratio == 6 and far.methods == ["tsa+vrpr" if m == "vrpr" else m for m in plan.methods]
    assert plan.meta["rule"]["bound_from"] == 6
    assert type(plan.resolve(POSITION_LAYER, 6 * 6, 6)).__name__ == "TSAVRPR"
    assert type(plan.resolve(POSITION_LAYER, 5 * 6, 6)).__name__ == "VRPR"
    with pytest.raises(ValueError, match="bound_from must be a length ratio > 1"):
        run_probe(model, bound_from=1)


def test_position_from_withholds_vrpr_below_a_ratio() -> None:
    """Below ``position_from`` the rule's VRPR layers run ``direct`` (or ``tsa`` once ``bound_from`` bounds
    them); the rule's TSA layers are TSA at every length."""
    model = prepared_model()
    plan = run_probe(model, bound_from=2, position_from=4)
    assert plan.methods[POSITION_LAYER] == "direct" and plan.methods[CONTEXT_LAYER] == "tsa"
    assert [r.from_ratio for r in plan.ranges] == [2, 4]
    assert plan.ranges[0].methods[POSITION_LAYER] == "tsa" and plan.ranges[1].methods[POSITION_LAYER] == "tsa+vrpr"
    assert all(r.methods[CONTEXT_LAYER] == "tsa" for r in plan.ranges)
    assert plan.meta["rule"]["position_from"] == 4
    assert type(plan.resolve(POSITION_LAYER, 3 * 6, 6)).__name__ == "TSA"
    assert type(plan.resolve(POSITION_LAYER, 4 * 6, 6)).__name__ == "TSAVRPR"
    alone = run_probe(model, position_from=3)
    assert alone.methods[POSITION_LAYER] == "direct" and [r.from_ratio for r in alone.ranges] == [3]
    assert alone.ranges[0].methods[POSITION_LAYER] == "vrpr"
    with pytest.raises(ValueError, match=r"position_from must be a length ratio > 1 \(or None\), got 0.5"):
        run_probe(model, position_from=0.5)


def test_length_ranges_cover_every_order_of_the_two_ratios() -> None:
    rule = ["vrpr", "tsa"]
    assert length_ranges(rule, None, None) == (rule, [])
    assert length_ranges(rule, 2, None) == (rule, [LengthRange(2, ["tsa+vrpr", "tsa"])])
    assert length_ranges(rule, None, 2) == (["direct", "tsa"], [LengthRange(2, rule)])
    assert length_ranges(rule, 2, 4) == (["direct", "tsa"], [LengthRange(2, ["tsa", "tsa"]),
                                                              LengthRange(4, ["tsa+vrpr", "tsa"])])
    assert length_ranges(rule, 4, 2) == (["direct", "tsa"], [LengthRange(2, rule), LengthRange(4, ["tsa+vrpr", "tsa"])])
    assert length_ranges(rule, 3, 3) == (["direct", "tsa"], [LengthRange(3, ["tsa+vrpr", "tsa"])])
    assert length_ranges(rule, 2, 4, "window+vrpr") == (["direct", "tsa"], [LengthRange(2, ["tsa", "tsa"]),
                                                                            LengthRange(4, ["window+vrpr", "tsa"])])


def test_bounded_vrpr_bounds_the_vrpr_layers_with_a_window() -> None:
    model = prepared_model()
    plan = run_probe(model, bound_from=2, bounded_vrpr="window+vrpr")
    (far,) = plan.ranges
    assert far.methods[POSITION_LAYER] == "window+vrpr" and far.methods[CONTEXT_LAYER] == "tsa"
    assert plan.meta["rule"]["bounded_vrpr"] == "window+vrpr"
    assert type(plan.resolve(POSITION_LAYER, 3 * 6, 6)).__name__ == "WindowVRPR"
    with pytest.raises(ValueError, match=r"bounded_vrpr must be one of \['tsa\+vrpr', 'window\+vrpr'\], got 'tsa'"):
        run_probe(model, bound_from=2, bounded_vrpr="tsa")


def test_selection_rule() -> None:
    assert select([1.0, 0.1, 0.5], [0.1, 1.0, 0.5]) == ["vrpr", "tsa", "vrpr"]
    assert select([1.0, 0.1, 0.5], [0.1, 1.0, 0.6], margin=0.5) == ["vrpr", "tsa", "vrpr"]
    assert select([1.0, 0.1, 0.5], [0.1, 1.0, 0.6], tsa_count=2) == ["vrpr", "tsa", "tsa"]
    with pytest.raises(ValueError, match="tsa_count must be between 0 and 3"):
        select([1.0, 0.1, 0.5], [0.1, 1.0, 0.6], tsa_count=4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_frames=21), "longer than trained"),
        (dict(layers=[7]), "layers must be in 0..3"),
    ],
)
def test_probe_bad_input(kwargs: dict, match: str) -> None:
    model = prepared_model()
    args = dict(num_frames=4 * (FRAMES - 1) + 1) | kwargs
    with pytest.raises(ValueError, match=match):
        probe(model, inputs=inputs(), trained_frames=TRAINED_VIDEO, progress=False, **args)


def test_public_entry_point() -> None:
    import freeloc.probing as module

    assert callable(freeloc.probe) and freeloc.probe is module.probe


def test_probe_with_a_pipeline_call() -> None:
    """With a pipeline, inputs= are its own call arguments; the transformer's first call is probed."""
    from freeloc.app.video import tiny_wan_pipeline

    pipe = tiny_wan_pipeline(num_layers=2)
    embeds = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(3))
    call = dict(prompt_embeds=embeds, negative_prompt_embeds=embeds, height=32, width=32, num_inference_steps=2,
                generator=torch.Generator().manual_seed(0))
    pipe(num_frames=9, **call)  # the pipeline attaches its own hook registries on first use
    before = snapshot(pipe.transformer)
    plan = probe(pipe, 81, inputs=call, trained_frames=21, progress=False)
    assert len(plan.methods) == 2 and plan.meta["probe"]["latent_frames"] == 21
    assert all(x > 0 for x in plan.scores["position"]) and all(x > 0 for x in plan.scores["context"])
    assert_same_state(before, snapshot(pipe.transformer))


def test_probe_counts_frames_with_the_given_temporal_factor() -> None:
    """A model without temporal compression (factor 1): video frames are latent frames."""
    model = prepared_model()
    plan = probe(model, FRAMES, inputs=inputs(), trained_frames=6, temporal_factor=1, progress=False,
                 max_queries=200)
    same = run_probe(model)  # the same latent lengths counted with the Wan VAE's factor 4
    assert plan.trained_frames == 6 and plan.meta["probe"]["latent_frames"] == FRAMES
    assert plan.meta["probe"]["temporal_factor"] == 1 and same.meta["probe"]["temporal_factor"] == 4
    assert plan.scores["position"] == pytest.approx(same.scores["position"], rel=1e-6)
    assert plan.methods == same.methods


def test_probe_progress_is_a_status_line_without_tqdm(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """progress=True needs nothing but the core: one line on stderr, rewritten per layer, then the cost."""
    model = prepared_model()  # diffusers needs tqdm: built before tqdm is taken away
    monkeypatch.setitem(sys.modules, "tqdm", None)  # importing tqdm now fails
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    probe(model, 4 * (FRAMES - 1) + 1, inputs=inputs(), trained_frames=TRAINED_VIDEO, max_queries=200)
    captured = capsys.readouterr()
    print(repr(captured.err))
    steps = captured.err.split("\r")[1:]
    assert [s.split(",")[0] for s in steps] == [f"probing layers: {i}/4" for i in range(5)]
    assert captured.err.endswith(" s\n") and captured.err.count("\n") == 1
    assert "probe: 4 layers" in captured.out


def test_probe_progress_callable_receives_done_and_total(capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[tuple[int, int]] = []
    probe(prepared_model(), 4 * (FRAMES - 1) + 1, inputs=inputs(), trained_frames=TRAINED_VIDEO, max_queries=200,
          layers=[CONTEXT_LAYER, 0], progress=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 2), (1, 2), (2, 2)]
    captured = capsys.readouterr()
    assert captured.err == "" and "probe: 2 layers" in captured.out


def test_progress_reporter_accepts_a_bool_or_a_callable(capsys: pytest.CaptureFixture[str]) -> None:
    from freeloc._progress import reporter

    reporter(False, "x")(1, 2)
    assert capsys.readouterr().err == ""
    seen: list[tuple[int, int]] = []
    reporter(lambda done, total: seen.append((done, total)), "x")(3, 4)
    assert seen == [(3, 4)]
    with pytest.raises(TypeError, match=r"(?s)progress.*'yes'"):  # the runtime type checker's error, or ours
        reporter("yes", "x")  # type: ignore[arg-type]


def _probe_cases() -> list:
    from conformance import cases_cogvideox, cases_hunyuan

    return [pytest.param(c, id=c.name) for c in [*cases_hunyuan.CASES, *cases_cogvideox.CASES]]


@pytest.mark.parametrize("case", _probe_cases())
def test_the_probe_runs_on_synthetic_inputs_of_every_diffusers_adapter(case: object) -> None:
    """HunyuanVideo (1.0, 1.5) and CogVideoX (1.0, 1.5, no RoPE) adapters give synthetic probe inputs: the
    probe runs on the tiny models without any inputs of the caller's and scores every layer."""
    model = case.make_model()
    latent = (4, 4) if "hunyuan" in case.name else None  # CogVideoX: its sample size
    frames = 4 * (2 * case.trained_latent * (2 if case.name == "cogvideox-1.5" else 1) - 1) + 1  # 2x, video frames
    plan = probe(model, num_frames=frames, trained_frames=case.trained_video_frames, latent_size=latent,
                 max_queries=32, progress=False)
    n = len(plan.methods)
    assert n >= 2 and all(m in ("vrpr", "tsa") for m in plan.methods)
    assert len(plan.scores["context"]) == n and any(s > 0 for s in plan.scores["context"])
    if case.position_methods:
        assert any(s > 0 for s in plan.scores["position"])


def test_given_text_on_hunyuan_video_gets_a_mask_of_its_length() -> None:
    from conformance import cases_hunyuan

    case = cases_hunyuan.CASES[0]
    text = torch.randn(1, 9, 16)  # another length than the synthetic inputs' 64 tokens
    plan = probe(case.make_model(), num_frames=21, trained_frames=case.trained_video_frames, latent_size=(4, 4),
                 max_queries=32, progress=False, text=text)
    assert len(plan.methods) == 2 and any(s > 0 for s in plan.scores["position"])
