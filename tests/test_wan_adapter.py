"""The Wan adapter and the session API, on tiny randomly initialised Wan models (CPU)."""

from __future__ import annotations

import inspect
from pathlib import Path

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
    session = freeloc.enable(model, method="vrpr", trained_frames=TRAINED_VIDEO)  # without a with-block
    run(model, 24)
    session.remove()
    session.remove()  # harmless
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


def test_attention_options_reach_every_attend_call(monkeypatch: pytest.MonkeyPatch) -> None:
    import freeloc.adapter

    seen: list = []
    original = freeloc.adapter.attend

    def record(*args: object, **kwargs: object) -> torch.Tensor:
        seen.append(kwargs["options"])
        return original(*args, **kwargs)

    monkeypatch.setattr(freeloc.adapter, "attend", record)
    model = tiny_wan()
    options = freeloc.AttentionOptions(layout="packed", batch_keys=256)
    with freeloc.enable(model, method="tsa", trained_frames=TRAINED_VIDEO, attention=options):
        out = run(model, 24)
    assert len(seen) == 2 and all(o is options for o in seen)  # one call per layer
    with freeloc.enable(model, method="tsa", trained_frames=TRAINED_VIDEO):
        torch.testing.assert_close(run(model, 24), out, atol=1e-6, rtol=0)
    assert seen[-1] is None  # the defaults


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(attention={"layout": "packed"}), TypeError, "must be a freeloc.AttentionOptions or None, got dict"),
        (dict(attention="flex"), TypeError, "must be a freeloc.AttentionOptions or None, got str"),
        (dict(backend="fast"), ValueError, r"backend must be one of \['auto', 'reference', 'chunked', 'flex'\]"),
    ],
)
def test_bad_attention_settings_are_rejected_with_the_model_untouched(kwargs: dict, error: type,
                                                                      match: str) -> None:
    model = tiny_wan()
    before = snapshot(model)
    # freeloc.enable as users call it: the test run wraps it in a type checker, which refuses a value of the
    # wrong type by its annotation before the function's own check
    enable = inspect.unwrap(freeloc.enable)
    with pytest.raises(error, match=match):
        enable(model, plan="uniform", trained_frames=TRAINED_VIDEO, **kwargs)
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


def tiny_pipeline(model: torch.nn.Module) -> object:
    """A Wan pipeline around ``model`` with a tiny VAE and no text encoder (pass ``prompt_embeds``)."""
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True]).eval()
    return diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=model,
                                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))


def test_full_tiny_pipeline() -> None:
    model = tiny_wan()
    pipe = tiny_pipeline(model)
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


@pytest.mark.parametrize("frames,latent", [(24, 7), (20, 6), (22, 6)])
def test_num_frames_not_of_the_vae_form_counts_as_the_pipeline_rounds_it(frames: int, latent: int) -> None:
    """Wan's pipelines round ``num_frames`` to ``4n + 1`` before the transformer sees it (24 -> 25, 22 -> 21):
    enable counts the same latent frames, and the pipeline runs with the same ``num_frames``."""
    model = tiny_wan()
    pipe = tiny_pipeline(model)
    embeds = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(2))
    with freeloc.enable(pipe, num_frames=frames, plan="uniform", trained_frames=TRAINED_VIDEO) as session:
        video = pipe(prompt_embeds=embeds, negative_prompt_embeds=embeds, height=16, width=16, num_frames=frames,
                     num_inference_steps=1, guidance_scale=2.0, output_type="pt").frames
    print(f"num_frames={frames}: {video.shape[1]} video frames, {latent} latent frames")
    assert video.shape[1] == (latent - 1) * 4 + 1 and all(s.calls == 2 for s in session.layers)


def test_fused_projections_give_the_same_hooked_output() -> None:
    f = 4 * TRAINED_LATENT
    model = tiny_wan()
    with freeloc.enable(model, method="tsa", trained_frames=TRAINED_VIDEO):
        separate = run(model, f)
    model.fuse_qkv_projections()
    assert model.blocks[0].attn1.fused_projections
    with freeloc.enable(model, method="tsa", trained_frames=TRAINED_VIDEO):
        fused = run(model, f)
    torch.testing.assert_close(fused, separate, atol=1e-5, rtol=1e-5)


def test_bf16_model() -> None:
    f = 4 * TRAINED_LATENT
    model = tiny_wan().to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, f, 8, 8, generator=g).bfloat16()
    enc = torch.randn(2, 7, 32, generator=g).bfloat16()
    with torch.no_grad():
        base = model(x, torch.tensor([500, 500]), enc, return_dict=False)[0]
        with freeloc.enable(model, method="direct", trained_frames=TRAINED_VIDEO):
            same = model(x, torch.tensor([500, 500]), enc, return_dict=False)[0]
        with freeloc.enable(model, plan="uniform", trained_frames=TRAINED_VIDEO) as session:
            long = model(x, torch.tensor([500, 500]), enc, return_dict=False)[0]
    assert torch.equal(same, base)
    assert long.dtype == torch.bfloat16 and torch.isfinite(long.float()).all()
    assert all(s.max_abs_distance <= TRAINED_LATENT - 1 for s in session.layers)


def test_image_to_video_model_patches_self_attention_only() -> None:
    """Wan I2V: image tokens enter through attn2 (cross-attention), which is left alone."""
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=128, image_dim=8,
        added_kv_proj_dim=24,
    ).eval()
    cross = [b.attn2.processor for b in model.blocks]
    g = torch.Generator().manual_seed(1)

    def forward(frames: int) -> torch.Tensor:
        x = torch.randn(1, 36, frames, 8, 8, generator=torch.Generator().manual_seed(3))
        enc = torch.randn(1, 512, 32, generator=g)  # Wan I2V splits text context at 512 tokens
        img = torch.randn(1, 5, 8, generator=g)
        with torch.no_grad():
            return model(x, torch.tensor([500]), enc, encoder_hidden_states_image=img, return_dict=False)[0]

    with freeloc.enable(model, plan="uniform", trained_frames=TRAINED_VIDEO) as session:
        assert all(b.attn2.processor is p for b, p in zip(model.blocks, cross, strict=True))
        out = forward(4 * TRAINED_LATENT)
    assert torch.isfinite(out).all()
    assert all(s.calls == 1 and s.max_abs_distance <= TRAINED_LATENT - 1 for s in session.layers)


def test_per_token_timesteps_ti2v_style() -> None:
    """Wan 2.2 TI2V passes one timestep per token (timestep of shape (batch, tokens))."""
    model = tiny_wan()
    f = 4 * TRAINED_LATENT
    x = torch.randn(1, 16, f, 8, 8, generator=torch.Generator().manual_seed(4))
    enc = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(5))
    ts = torch.full((1, f * 16), 500)
    ts[:, :16] = 0  # the first (conditioning) frame is clean
    with torch.no_grad(), freeloc.enable(model, method="vrpr", trained_frames=TRAINED_VIDEO) as session:
        out = model(x, ts, enc, return_dict=False)[0]
    assert torch.isfinite(out).all() and session.layers[0].calls == 1


def test_wan22_pipeline_patches_both_transformers() -> None:
    high, low = tiny_wan(0), tiny_wan(1)
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True]).eval()
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=high, transformer_2=low,
                                 boundary_ratio=0.5, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    embeds = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(2))

    def generate() -> torch.Tensor:
        return pipe(prompt_embeds=embeds, negative_prompt_embeds=embeds, height=16, width=16, num_frames=81,
                    num_inference_steps=4, guidance_scale=2.0, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).frames

    generate()  # the pipeline attaches its own hook registries on first use; snapshot after that
    before = [snapshot(high), snapshot(low)]
    with freeloc.enable(pipe, num_frames=81, plan="uniform", trained_frames=TRAINED_VIDEO) as session:
        video = generate()
    assert torch.isfinite(video).all()
    names = {s.model for s in session.layers}
    assert names == {"transformer", "transformer_2"}
    calls = {name: sum(s.calls for s in session.layers if s.model == name) for name in names}
    assert calls["transformer"] > 0 and calls["transformer_2"] > 0  # both experts denoised, both hooked
    assert_same_state(before[0], snapshot(high))
    assert_same_state(before[1], snapshot(low))


def test_composes_with_a_diffusers_cache() -> None:
    """diffusers' first-block cache (its hook registry) and a freeloc session work together and apart."""
    from diffusers.hooks import FirstBlockCacheConfig

    model = tiny_wan()
    model.enable_cache(FirstBlockCacheConfig(threshold=0.05))
    try:
        with model.cache_context("cond"):
            run(model, 24)
        before = snapshot(model)
        with freeloc.enable(model, plan="uniform", trained_frames=TRAINED_VIDEO) as session:
            with model.cache_context("cond"):
                out = run(model, 24)
        assert torch.isfinite(out).all()
        assert session.layers[0].calls == 1  # the first block always runs; later ones may be served by the cache
        assert_same_state(before, snapshot(model))
    finally:
        model.disable_cache()


def test_riflex_and_window_parameters_through_method_params() -> None:
    model = tiny_wan()
    f = 4 * TRAINED_LATENT
    direct = run(model, f)
    with freeloc.enable(model, method="riflex", method_params={"k": 1}, trained_frames=TRAINED_VIDEO) as session:
        riflex = run(model, f)
    assert session.plan is not None and session.plan.params[0] == {"k": 1}
    assert (riflex - direct).abs().max() > 1e-5
    with freeloc.enable(model, method="sliding-window", method_params={"window": 2},
                        trained_frames=TRAINED_VIDEO) as session:
        run(model, f)
    assert session.layers[0].max_abs_distance == f - 1  # the sink frame keeps its original distance
    with pytest.raises(ValueError, match="method_params=\\{'k': K\\}"):
        freeloc.enable(model, method="riflex", trained_frames=TRAINED_VIDEO)


def meta_wan(**config: object) -> torch.nn.Module:
    """A full-size Wan transformer on the meta device: config and modules, no memory, no forward."""
    base = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=30)
    with torch.device("meta"):
        return diffusers.WanTransformer3DModel(**(base | config))


def test_shipped_plan_for_wan21_t2v_13b() -> None:
    model = meta_wan()
    with freeloc.enable(model, num_frames=321) as session:
        assert session.plan is not None
        assert session.plan.methods == freeloc.LayerPlan.published("wan2.1-t2v-1.3b").methods
        assert sum(isinstance(m.processor, FreeLOCWanAttnProcessor) for m in model.modules()
                   if hasattr(m, "processor")) == 30
    other = meta_wan(num_layers=40, num_attention_heads=40)
    with pytest.raises(ValueError, match="no shipped layer plan matches WanTransformer3DModel"):
        freeloc.enable(other, num_frames=321)


def hooked_processor(model: torch.nn.Module) -> FreeLOCWanAttnProcessor:
    return next(m.processor for m in model.modules()
                if isinstance(getattr(m, "processor", None), FreeLOCWanAttnProcessor))


def test_trained_length_from_data_and_override() -> None:
    t2v = meta_wan()
    with freeloc.enable(t2v, num_frames=321):
        assert hooked_processor(t2v).trained_frames == 21  # 81 video frames
        assert hooked_processor(t2v).rotary == freeloc.RotaryLayout.wan(128)
    ti2v = meta_wan(in_channels=48, num_layers=2)
    with freeloc.enable(ti2v, num_frames=481, plan="uniform"):
        assert hooked_processor(ti2v).trained_frames == 31  # TI2V-5B: 121 video frames
    with freeloc.enable(ti2v, plan="uniform", trained_frames=41):
        assert hooked_processor(ti2v).trained_frames == 11


def test_plan_from_a_json_path(tmp_path: Path) -> None:
    model = tiny_wan()
    path = freeloc.LayerPlan.from_lists(tsa_layers=[1], vrpr_layers=[0], num_layers=2).save(tmp_path / "plan.json")
    with freeloc.enable(model, plan=str(path), trained_frames=TRAINED_VIDEO) as session:
        run(model, 24)
    assert [s.method for s in session.layers] == ["vrpr", "tsa"]


def test_skyreels_v2_reuses_the_wan_adapter() -> None:
    torch.manual_seed(0)
    model = diffusers.SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=128,
    ).eval()
    with pytest.raises(ValueError, match="trained length of SkyReelsV2Transformer3DModel is not known"):
        freeloc.enable(model, plan="uniform")
    base = run(model, TRAINED_LATENT)
    with freeloc.enable(model, plan="uniform", trained_frames=TRAINED_VIDEO):
        same = run(model, TRAINED_LATENT)
    with freeloc.enable(model, plan="uniform", trained_frames=TRAINED_VIDEO) as session:
        long = run(model, 4 * TRAINED_LATENT)
    assert torch.equal(same, base) and torch.isfinite(long).all()
    assert all(s.calls == 1 and s.max_abs_distance <= TRAINED_LATENT - 1 for s in session.layers)


def test_temporal_factor_override() -> None:
    """A model without temporal compression counts one latent frame per video frame."""
    model = tiny_wan()
    with freeloc.enable(model, plan="uniform", trained_frames=6, temporal_factor=1, num_frames=24):
        assert hooked_processor(model).trained_frames == 6
        out = run(model, 24)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="temporal_factor must be a positive int"):
        freeloc.enable(model, plan="uniform", trained_frames=6, temporal_factor=0)


def test_set_attention_backend_reaches_the_original_processors() -> None:
    """diffusers' ``set_attention_backend`` on a hooked model sets the backend of every wrapped original
    processor (the layers that pass through use it), and ``reset_attention_backend`` clears it; after
    removal the originals keep what the user set, and the output equals the unhooked model's."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    model = tiny_wan()
    base = run(model, 24)
    with freeloc.enable(model, method="direct", trained_frames=TRAINED_VIDEO):
        model.set_attention_backend("native")
        originals = [b.attn1.processor.original for b in model.blocks]
        assert all(p._attention_backend == AttentionBackendName.NATIVE for p in originals)
        assert torch.equal(run(model, 24), base)
        model.reset_attention_backend()
        assert all(p._attention_backend is None for p in originals)
        model.set_attention_backend("native")
    assert all(b.attn1.processor._attention_backend == AttentionBackendName.NATIVE for b in model.blocks)
    assert torch.equal(run(model, 24), base)
