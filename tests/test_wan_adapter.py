"""The Wan adapter and the session API, on tiny randomly initialised Wan models (CPU)."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="the Wan adapter needs diffusers (extra 'diffusers')")

from freeloc.adapters.wan import FreeLOCWanAttnProcessor, rotary_layout  # noqa: E402

import freeloc  # noqa: E402
from freeloc.attention import attend, band_set_for  # noqa: E402

TRAINED_VIDEO = 21  # the tiny model's "trained length" in video frames: 6 latent frames (cap 5)
TRAINED_LATENT = 6


def tiny_wan(seed: int = 0, num_layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=num_layers, rope_max_seq_len=128,
    ).eval()


def run(model: torch.nn.Module, frames: int, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 16, frames, 8, 8, generator=g)
    enc = torch.randn(batch, 7, 32, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([500] * batch), enc, return_dict=False)[0]


def snapshot(model: torch.nn.Module) -> dict:
    """Everything a session may touch: processors (by identity), hooks, attributes, weights and buffers."""
    return {
        "processors": [m.processor for m in model.modules() if hasattr(m, "processor")],
        "pre_hooks": dict(model._forward_pre_hooks),
        "hooks": dict(model._forward_hooks),
        "dict_keys": sorted(model.__dict__),
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert len(before["processors"]) == len(after["processors"])
    assert all(a is b for a, b in zip(before["processors"], after["processors"], strict=True))
    assert before["pre_hooks"] == after["pre_hooks"] and before["hooks"] == after["hooks"]
    assert before["dict_keys"] == after["dict_keys"]
    for key in ("state", "buffers"):
        assert before[key].keys() == after[key].keys()
        assert all(torch.equal(before[key][k], after[key][k]) for k in before[key])


def test_rotary_layout_read_from_the_model() -> None:
    layout = rotary_layout(tiny_wan())
    assert (layout.t_dim, layout.h_dim, layout.w_dim, layout.theta) == (4, 4, 4, 10000.0)


@pytest.mark.parametrize("kwargs", [dict(method="direct"), dict(plan=freeloc.LayerPlan.uniform("direct", 2))],
                         ids=["direct", "identity-plan"])
def test_identity_equals_unhooked(kwargs: dict) -> None:
    model = tiny_wan()
    base = run(model, 24, batch=2)
    with freeloc.enable(model, trained_frames=TRAINED_VIDEO, **kwargs):
        out = run(model, 24, batch=2)
    torch.testing.assert_close(out, base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["freeloc", "vrpr", "tsa", "pi", "ntk", "sliding-window"])
def test_at_trained_length_nothing_changes(method: str) -> None:
    model = tiny_wan()
    base = run(model, TRAINED_LATENT)
    plan = "uniform" if method == "freeloc" else None
    with freeloc.enable(model, method=method, plan=plan, trained_frames=TRAINED_VIDEO):
        out = run(model, TRAINED_LATENT)
    assert torch.equal(out, base)


def test_long_video_stays_in_range_and_changes_output() -> None:
    model = tiny_wan(num_layers=2)
    f = 4 * TRAINED_LATENT
    direct = run(model, f)
    plan = freeloc.LayerPlan.from_lists(tsa_layers=[0], vrpr_layers=[1], num_layers=2)
    with freeloc.enable(model, plan=plan, trained_frames=TRAINED_VIDEO) as session:
        out = run(model, f)
    assert torch.isfinite(out).all()
    assert (out - direct).abs().max() > 1e-4
    tsa, vrpr = session.layers
    assert (tsa.method, vrpr.method) == ("tsa", "vrpr")
    assert vrpr.calls == 1 and vrpr.max_abs_distance <= TRAINED_LATENT - 1
    core = band_set_for(freeloc.TSA.for_length(f, TRAINED_LATENT), f, 16, rotary_layout(model))
    core_density = core.token_density(16)
    assert tsa.density == pytest.approx(core_density)
    assert "vrpr" in session.report() and "tsa" in session.report()


def test_hooked_layer_equals_core_attend() -> None:
    """The hooked self-attention of a long clip is the core's attend on that layer's own q/k/v."""
    model = tiny_wan()
    f = 4 * TRAINED_LATENT
    captured: dict = {}
    attn = model.blocks[0].attn1

    def keep(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        captured["x"], captured["out"] = args[0], output

    handle = attn.register_forward_hook(keep)
    try:
        with freeloc.enable(model, method="vrpr", trained_frames=TRAINED_VIDEO):
            run(model, f)
            processor = attn.processor
            assert isinstance(processor, FreeLOCWanAttnProcessor)
            method = processor.last_method
    finally:
        handle.remove()
    assert isinstance(method, freeloc.VRPR)
    x = captured["x"]
    with torch.no_grad():
        q = attn.norm_q(attn.to_q(x)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(x)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(x).unflatten(2, (attn.heads, -1))
        ref = attend(q, k, v, grid=(f, 4, 4), method=method, rotary=rotary_layout(model), backend="reference")
        ref = attn.to_out[1](attn.to_out[0](ref.flatten(2, 3)))
    torch.testing.assert_close(captured["out"], ref, atol=1e-5, rtol=1e-5)


def test_removal_is_exact_after_exit_exception_and_remove() -> None:
    model = tiny_wan()
    before = snapshot(model)
    base = run(model, 24)
    with freeloc.enable(model, method="tsa", trained_frames=TRAINED_VIDEO):
        run(model, 24)
    assert_same_state(before, snapshot(model))
    with pytest.raises(KeyError, match="inside the block"):
        with freeloc.enable(model, method="vrpr", trained_frames=TRAINED_VIDEO):
            run(model, 24)
            raise KeyError("inside the block")
    assert_same_state(before, snapshot(model))
    handle = freeloc.apply(model, method="vrpr", trained_frames=TRAINED_VIDEO)
    run(model, 24)
    handle.remove()
    handle.remove()  # harmless
    assert_same_state(before, snapshot(model))
    assert torch.equal(run(model, 24), base)


def test_double_apply_is_rejected_and_leaves_the_first_session_intact() -> None:
    model = tiny_wan()
    with freeloc.enable(model, method="vrpr", trained_frames=TRAINED_VIDEO) as first:
        processors = [m.processor for m in model.modules() if hasattr(m, "processor")]
        with pytest.raises(RuntimeError, match="already applied"):
            freeloc.enable(model, method="tsa", trained_frames=TRAINED_VIDEO)
        assert all(a is b for a, b in zip(processors, [m.processor for m in model.modules()
                                                       if hasattr(m, "processor")], strict=True))
        assert first.active


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(plan=freeloc.LayerPlan.uniform("vrpr", 3)), "3 layers.*2|2.*3"),
        (dict(), "run `freeloc probe`.*plan='uniform'"),
        (dict(method="fast"), "method must be one of"),
        (dict(method="vrpr", plan="uniform"), "only used with method='freeloc'"),
        (dict(plan="uniform", num_frames=0), "num_frames must be a positive int"),
    ],
)
def test_bad_input_is_rejected_with_the_model_untouched(kwargs: dict, match: str) -> None:
    model = tiny_wan()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        freeloc.enable(model, trained_frames=TRAINED_VIDEO, **kwargs)
    assert_same_state(before, snapshot(model))


def test_unknown_model_lists_supported_classes() -> None:
    with pytest.raises(ValueError, match="WanTransformer3DModel"):
        freeloc.enable(torch.nn.Linear(2, 2))


def test_num_frames_mismatch_is_reported() -> None:
    model = tiny_wan()
    with freeloc.enable(model, num_frames=81, plan="uniform", trained_frames=TRAINED_VIDEO):
        with pytest.raises(ValueError, match="21 latent frames, but the transformer got 24"):
            run(model, 24)


def test_two_models_do_not_share_state() -> None:
    a, b = tiny_wan(0), tiny_wan(1)
    with freeloc.enable(a, method="vrpr", trained_frames=TRAINED_VIDEO) as sa:
        with freeloc.enable(b, method="tsa", trained_frames=TRAINED_VIDEO) as sb:
            run(a, 24)
    assert sa.layers[0].calls == 1 and sb.layers[0].calls == 0


def test_full_tiny_pipeline() -> None:
    model = tiny_wan()
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True]).eval()
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=model,
                                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    embeds = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(2))

    def generate(frames: int) -> torch.Tensor:
        return pipe(prompt_embeds=embeds, negative_prompt_embeds=embeds, height=16, width=16, num_frames=frames,
                    num_inference_steps=2, guidance_scale=2.0, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).frames

    direct = generate(81)
    with freeloc.enable(pipe, num_frames=81, plan="uniform", trained_frames=TRAINED_VIDEO) as session:
        long = generate(81)
    assert long.shape == (1, 81, 3, 16, 16) and torch.isfinite(long).all()
    assert (long - direct).abs().max() > 1e-4
    assert all(s.calls == 4 for s in session.layers)  # 2 steps x (cond, uncond)
    assert max(s.max_abs_distance for s in session.layers) <= TRAINED_LATENT - 1
