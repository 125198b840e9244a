"""The CogVideoX adapter on tiny randomly initialised CogVideoX 1.0 / 1.5 / 2b-style models (CPU)."""

from __future__ import annotations

import types

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="the CogVideoX adapter needs diffusers (extra 'diffusers')")

from freeloc.adapters.cogvideox import FreeLOCCogVideoXAttnProcessor, PositionCheck, rotary_layout  # noqa: E402

import freeloc  # noqa: E402
from freeloc.plan import LengthRange  # noqa: E402

TRAINED_VIDEO = 21  # 6 latent frames (1.0), 3 temporal tokens (1.5)
TRAINED_LATENT = 6


def tiny_cogvideox(**config: object) -> torch.nn.Module:
    base = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
                text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=49, patch_size=2,
                max_text_seq_length=12, use_rotary_positional_embeddings=True)
    torch.manual_seed(0)
    return diffusers.CogVideoXTransformer3DModel(**(base | config)).eval()


def pipeline_rotary_emb(model: torch.nn.Module, latent_frames: int, latent_h: int,
                        latent_w: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``image_rotary_emb`` exactly as ``CogVideoXPipeline`` computes it (None for a model without RoPE)."""
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline

    if not model.config.use_rotary_positional_embeddings:
        return None
    pipe = types.SimpleNamespace(vae_scale_factor_spatial=8, transformer=model)
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(pipe, latent_h * 8, latent_w * 8, latent_frames,
                                                                   torch.device("cpu"))


def cog10(**config: object) -> torch.nn.Module:
    return tiny_cogvideox(**config)


def cog15(**config: object) -> torch.nn.Module:
    return tiny_cogvideox(patch_size_t=2, patch_bias=False, **config)


def cog2b(**config: object) -> torch.nn.Module:
    return tiny_cogvideox(use_rotary_positional_embeddings=False, **config)


def inputs(model: torch.nn.Module, latent_frames: int, h: int = 8, w: int = 8, text: int = 12,
           dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, latent_frames, model.config.in_channels, h, w, generator=g).to(dtype)
    enc = torch.randn(2, text, model.config.text_embed_dim, generator=g).to(dtype)
    return x, enc


def run(model: torch.nn.Module, latent_frames: int, h: int = 8, w: int = 8, text: int = 12, rope: bool = True,
        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One forward with the pipeline's own ``image_rotary_emb`` (``rope=False``: none passed)."""
    x, enc = inputs(model, latent_frames, h, w, text, dtype)
    emb = pipeline_rotary_emb(model, latent_frames, h, w) if rope else None
    with torch.no_grad():
        return model(x, enc, torch.tensor([500, 300]), image_rotary_emb=emb, return_dict=False)[0]


def snapshot(model: torch.nn.Module) -> dict:
    return {
        "processors": [m.processor for m in model.modules() if hasattr(m, "processor")],
        "hooks": (dict(model._forward_pre_hooks), dict(model._forward_hooks)),
        "dict_keys": sorted(model.__dict__),
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert all(a is b for a, b in zip(before["processors"], after["processors"], strict=True))
    assert before["hooks"] == after["hooks"] and before["dict_keys"] == after["dict_keys"]
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])


def hooked_processor(model: torch.nn.Module) -> FreeLOCCogVideoXAttnProcessor:
    return next(m.processor for m in model.modules()
                if isinstance(getattr(m, "processor", None), FreeLOCCogVideoXAttnProcessor))


# ---------------------------------------------------------------------------------------------- no RoPE (2b)
def test_no_rope_model_uniform_plan_is_tsa() -> None:
    model = cog2b()
    with pytest.raises(ValueError, match=r"plan='uniform' \(tsa on every layer\)"):
        freeloc.enable(model, trained_frames=TRAINED_VIDEO)
    with freeloc.enable(model, plan="uniform", trained_frames=TRAINED_VIDEO) as session:
        out = run(model, 4 * TRAINED_LATENT)
    assert torch.isfinite(out).all()
    assert [s.method for s in session.layers] == ["tsa", "tsa"] and all(s.density < 1 for s in session.layers)


@pytest.mark.parametrize(
    "kwargs,refused",
    [
        (dict(plan=freeloc.LayerPlan.from_lists(tsa_layers=[0], vrpr_layers=[1], num_layers=2)), "vrpr"),
        (dict(method="vrpr"), "vrpr"),
        (dict(method="pi"), "pi"),
        (dict(method="ntk"), "ntk"),
        (dict(method="yarn"), "yarn"),
        (dict(method="riflex", method_params={"k": 2}), "riflex"),
    ],
)
def test_no_rope_model_refuses_position_methods_with_the_model_untouched(kwargs: dict, refused: str) -> None:
    model = cog2b()
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        freeloc.enable(model, trained_frames=TRAINED_VIDEO, **kwargs)
    message = str(err.value)
    assert "CogVideoXTransformer3DModel" in message and "no rotary position embedding" in message
    assert refused in message
    assert "method='tsa'" in message and "method='sliding-window'" in message and "method='direct'" in message
    assert_same_state(before, snapshot(model))


def test_no_rope_model_accepts_attention_only_plans() -> None:
    model = cog2b()
    plan = freeloc.LayerPlan(["tsa", "direct"])
    with freeloc.enable(model, plan=plan, trained_frames=TRAINED_VIDEO) as session:
        out = run(model, 4 * TRAINED_LATENT)
    assert torch.isfinite(out).all()
    assert [s.method for s in session.layers] == ["tsa", "direct"]


def test_no_rope_model_takes_ultravico() -> None:
    """UltraViCo changes logits, not positions: a model without RoPE takes it (no harmonic band to choose);
    with alpha = 1 it is the model itself."""
    model = cog2b()
    f = 4 * TRAINED_LATENT
    base = run(model, f)
    with freeloc.enable(model, method="ultravico", method_params={"alpha": 1.0}, trained_frames=TRAINED_VIDEO) as s:
        same = run(model, f)
    assert all(layer.calls == 1 for layer in s.layers)
    torch.testing.assert_close(same, base, atol=2e-5, rtol=1e-4)
    with freeloc.enable(model, method="ultravico", trained_frames=TRAINED_VIDEO):
        decayed = run(model, f)
    assert (decayed - base).abs().max() > 1e-4


def test_no_rope_dense_window_equals_unhooked() -> None:
    """A sliding window covering every frame, through the unrotated path, is the model itself."""
    model = cog2b()
    f = 4 * TRAINED_LATENT
    base = run(model, f)
    with freeloc.enable(model, method="sliding-window", method_params={"window": f},
                        trained_frames=TRAINED_VIDEO) as session:
        out = run(model, f)
    assert all(s.calls == 1 for s in session.layers)
    torch.testing.assert_close(out, base, atol=2e-5, rtol=1e-4)


def _layer0_inputs(model: torch.nn.Module, latent_frames: int, rope: bool) -> dict:
    captured: dict = {}
    attn = model.transformer_blocks[0].attn1

    def keep(module: torch.nn.Module, args: tuple, kwargs: dict, output: tuple) -> None:
        captured.update(kwargs, out=output)

    handle = attn.register_forward_hook(keep, with_kwargs=True)
    try:
        run(model, latent_frames, rope=rope)
    finally:
        handle.remove()
    return captured


def _masked_unrotated_attention(attn: torch.nn.Module, x: torch.Tensor, enc: torch.Tensor,
                                video_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The CogVideoX processor without RoPE, with a video-video pair mask (text rows and columns dense)."""
    text = enc.shape[1]
    hs = torch.cat([enc, x], dim=1)
    b, n, _ = hs.shape
    q = attn.norm_q(attn.to_q(hs).view(b, n, attn.heads, -1).transpose(1, 2))
    k = attn.norm_k(attn.to_k(hs).view(b, n, attn.heads, -1).transpose(1, 2))
    v = attn.to_v(hs).view(b, n, attn.heads, -1).transpose(1, 2)
    mask = torch.ones(n, n, dtype=torch.bool)
    mask[text:, text:] = video_mask
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(b, n, -1)))
    return out[:, text:], out[:, :text]


def test_unrotated_tsa_with_a_far_sink_is_exact() -> None:
    """TSA (its far sink band included) on a model without RoPE equals masked attention on the unrotated q/k."""
    model = cog2b()
    f = 4 * TRAINED_LATENT
    tsa = freeloc.TSA(d1=2, d2=5, stripe=0.25, cap=TRAINED_LATENT - 1)
    assert [b.name for b in tsa.band_set(f, 16).bands] == ["local", "striped", "sink"]
    params = {k: v for k, v in tsa.to_dict().items() if k != "method"}
    with freeloc.enable(model, method="tsa", method_params=params, trained_frames=TRAINED_VIDEO) as session:
        hooked = _layer0_inputs(model, f, rope=False)
    assert session.layers[0].calls == 1 and session.layers[0].density < 1.0
    attn = model.transformer_blocks[0].attn1
    with torch.no_grad():
        video, text = _masked_unrotated_attention(attn, hooked["hidden_states"], hooked["encoder_hidden_states"],
                                                  tsa.token_mask(f, 16))
    torch.testing.assert_close(hooked["out"][0], video, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(hooked["out"][1], text, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["vrpr", "tsa"])
def test_rope_model_called_without_tables_runs_the_original_processor(method: str) -> None:
    model = cog10()
    f = 4 * TRAINED_LATENT
    base = run(model, f, rope=False)
    with freeloc.enable(model, method=method, trained_frames=TRAINED_VIDEO) as session:
        out = run(model, f, rope=False)
    assert torch.equal(out, base) and all(s.calls == 1 for s in session.layers)


def test_no_rope_bf16() -> None:
    model = cog2b().to(torch.bfloat16)
    f = 4 * TRAINED_LATENT
    base = run(model, f, dtype=torch.bfloat16)
    with freeloc.enable(model, method="sliding-window", method_params={"window": f}, trained_frames=TRAINED_VIDEO):
        dense = run(model, f, dtype=torch.bfloat16)
    with freeloc.enable(model, method="tsa", trained_frames=TRAINED_VIDEO):
        tsa = run(model, f, dtype=torch.bfloat16)
    assert dense.dtype == tsa.dtype == torch.bfloat16 and torch.isfinite(tsa.float()).all()
    torch.testing.assert_close(dense.float(), base.float(), atol=1e-2, rtol=1e-2)  # 1 bf16 ulp


# ---------------------------------------------------------------------------------------------- positions
def test_rotary_layout_matches_diffusers_split() -> None:
    layout = rotary_layout(cog10())
    assert (layout.t_dim, layout.h_dim, layout.w_dim, layout.theta) == (4, 6, 6, 10000.0)
    for head_dim in (12, 8):  # diffusers splits 8 as (2, 3, 3): odd, not whole channel pairs
        with pytest.raises(ValueError, match=rf"attention_head_dim={head_dim}: .*multiple of 16"):
            rotary_layout(cog10(attention_head_dim=head_dim))


def test_a_head_dim_freeloc_cannot_rotate_still_takes_the_identity() -> None:
    """diffusers' own CogVideoX 1.5 test config (``attention_head_dim=8``): enabling with nothing to change
    (``method="direct"``, a plan of direct layers, the trained length) never raises and leaves the model
    bit-identical; a method that needs the rotation is refused at ``enable``, naming the head dim. (Its
    pipeline could not build ``image_rotary_emb`` at that head dim either: run as diffusers' test runs it.)"""
    model = cog15(attention_head_dim=8, time_embed_dim=2, text_embed_dim=8, max_text_seq_length=8, sample_frames=8)
    before = snapshot(model)
    base = run(model, 12, text=8, rope=False)
    with freeloc.enable(model, method="direct", trained_frames=TRAINED_VIDEO):
        assert torch.equal(run(model, 12, text=8, rope=False), base)
    with freeloc.enable(model, plan=freeloc.LayerPlan.uniform("direct", 2), trained_frames=TRAINED_VIDEO):
        assert torch.equal(run(model, 12, text=8, rope=False), base)
    assert_same_state(before, snapshot(model))
    for kwargs in (dict(method="vrpr"), dict(method="tsa"), dict(plan="uniform")):
        with pytest.raises(ValueError, match=r"attention_head_dim=8: .*only method='direct'"):
            freeloc.enable(model, trained_frames=TRAINED_VIDEO, **kwargs)
        assert_same_state(before, snapshot(model))


def _pipeline_tables(config: dict, height: int, width: int, latent_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline

    pipe = types.SimpleNamespace(vae_scale_factor_spatial=8,
                                 transformer=types.SimpleNamespace(config=types.SimpleNamespace(**config)))
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(pipe, height, width, latent_frames, "cpu")


COG5B = dict(attention_head_dim=64, patch_size=2, patch_size_t=None, sample_height=60, sample_width=90)
COG15 = dict(attention_head_dim=64, patch_size=2, patch_size_t=2, sample_height=300, sample_width=300)


@pytest.mark.parametrize(
    "config,height,width,latent,grid,ok",
    [
        (COG5B, 480, 720, 52, (52, 30, 45), True),  # CogVideoX 1.0 at its resolution, 4x its length
        (COG5B, 768, 1360, 13, (13, 48, 85), False),  # 1.0 elsewhere: cropped, rescaled spatial positions
        (COG15, 768, 1360, 44, (22, 48, 85), True),  # 1.5 ("slice"): integer positions at any size
    ],
    ids=["1.0-480x720", "1.0-768x1360", "1.5-768x1360"],
)
def test_position_check_on_real_pipeline_tables(config: dict, height: int, width: int, latent: int,
                                                grid: tuple[int, int, int], ok: bool) -> None:
    tables = _pipeline_tables(config, height, width, latent)
    check = PositionCheck(freeloc.RotaryLayout.cogvideox(64), "CogVideoX")
    if ok:
        check.verify(tables, grid)
        check.verify(tuple(t.bfloat16() for t in tables), grid)  # tables cast to bf16 still match
    else:
        with pytest.raises(ValueError, match="integer positions.*trained resolution"):
            check.verify(tables, grid)


def test_non_integer_positions_raise_only_when_a_method_runs() -> None:
    """CogVideoX 1.0 at a grid other than its base grid: the pipeline's positions are not 0..H'-1."""
    model = cog10()
    base = run(model, TRAINED_LATENT, h=4, w=8)  # 2 x 4 tokens in a 4 x 4 base grid
    with freeloc.enable(model, plan="uniform", trained_frames=TRAINED_VIDEO):
        same = run(model, TRAINED_LATENT, h=4, w=8)  # at the trained length the original processor runs
        with pytest.raises(ValueError, match="does not hold the integer positions"):
            run(model, 4 * TRAINED_LATENT, h=4, w=8)
    assert torch.equal(same, base)


def test_cogvideox15_any_grid_runs() -> None:
    model = cog15()
    f = 4 * (TRAINED_LATENT // 2)
    with freeloc.enable(model, plan="uniform", trained_frames=TRAINED_VIDEO) as session:
        out = run(model, 2 * f, h=4, w=8)
    assert torch.isfinite(out).all()
    assert all(s.calls == 1 and s.max_abs_distance <= TRAINED_LATENT // 2 - 1 for s in session.layers)


# ---------------------------------------------------------------------------------------------- data, install
@pytest.mark.parametrize("make,trained", [(cog10, 13), (cog15, 11), (cog2b, 13)], ids=["1.0", "1.5", "2b"])
def test_trained_length_from_data(make: object, trained: int) -> None:
    """1.0 / 2b: 49 frames = 13 latent; 1.5: 81 frames = 21 latent, padded to 22 = 11 temporal tokens."""
    model = make()
    method = "tsa" if make is cog2b else "freeloc"
    plan = "uniform" if method == "freeloc" else None
    with freeloc.enable(model, method=method, plan=plan):
        assert hooked_processor(model).trained_frames == trained
    with freeloc.enable(model, method=method, plan=plan, trained_frames=TRAINED_VIDEO):
        assert hooked_processor(model).trained_frames == (3 if make is cog15 else TRAINED_LATENT)


def test_no_shipped_plan() -> None:
    with pytest.raises(ValueError, match="run `freeloc probe`.*plan='uniform'"):
        freeloc.enable(cog10())


def test_cogvideox15_num_frames_counts_the_padding() -> None:
    model = cog15()
    with freeloc.enable(model, num_frames=81, plan="uniform"):
        run(model, 22)  # 81 frames: 21 latent frames, padded by the pipeline to 22 = 11 temporal tokens
        with pytest.raises(ValueError, match="11 latent frames, but the transformer got 10"):
            run(model, 20)


def test_unexpected_processor_is_refused_and_the_model_restored() -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = cog10()
    model.transformer_blocks[1].attn1.set_processor(AttnProcessor2_0())
    before = snapshot(model)
    with pytest.raises(ValueError, match="layer 1 has the attention processor AttnProcessor2_0"):
        freeloc.enable(model, plan="uniform", trained_frames=TRAINED_VIDEO)
    assert_same_state(before, snapshot(model))


def test_fused_projections_give_the_same_hooked_output() -> None:
    f = 4 * TRAINED_LATENT
    model = cog10()
    with freeloc.enable(model, method="tsa", trained_frames=TRAINED_VIDEO):
        separate = run(model, f)
    model.fuse_qkv_projections()
    with freeloc.enable(model, method="tsa", trained_frames=TRAINED_VIDEO):
        fused = run(model, f)
    torch.testing.assert_close(fused, separate, atol=1e-5, rtol=1e-5)


def test_text_length_is_read_from_the_call() -> None:
    model = cog10()
    f = 4 * TRAINED_LATENT
    with freeloc.enable(model, plan="uniform", trained_frames=TRAINED_VIDEO):
        for text in (3, 12, 20):
            assert torch.isfinite(run(model, f, text=text)).all()


# ---------------------------------------------------------------------------------------------- pipelines
def tiny_pipeline(transformer: torch.nn.Module) -> diffusers.CogVideoXPipeline:
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=0, norm_num_groups=2, temporal_compression_ratio=4,
    ).eval()
    return diffusers.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                       scheduler=diffusers.CogVideoXDDIMScheduler())


def generate(pipe: diffusers.CogVideoXPipeline, frames: int, output_type: str, text: int = 7) -> torch.Tensor:
    embeds = torch.randn(1, text, 16, generator=torch.Generator().manual_seed(2))
    return pipe(prompt_embeds=embeds, negative_prompt_embeds=embeds, height=32, width=32, num_frames=frames,
                num_inference_steps=2, guidance_scale=2.0, output_type=output_type,
                generator=torch.Generator().manual_seed(0)).frames


# 9 video frames = 3 latent frames (1.0; 2 temporal tokens for 1.5); 45 frames = 12 latent frames, 4x
PIPE_TRAINED, PIPE_LONG = 9, 45


def test_full_tiny_pipeline() -> None:
    # sample 4 x 4 latent: the 32 x 32 video's grid is the base grid, so the pipeline's positions are integers
    pipe = tiny_pipeline(cog10(sample_height=4, sample_width=4))
    direct = generate(pipe, PIPE_LONG, "latent")
    with freeloc.enable(pipe, num_frames=PIPE_LONG, plan="uniform", trained_frames=PIPE_TRAINED) as session:
        latents = generate(pipe, PIPE_LONG, "latent")
        video = generate(pipe, PIPE_LONG, "pt")
    assert video.ndim == 5 and video.shape[0] == 1 and video.shape[2:] == (3, 32, 32)
    assert torch.isfinite(video).all() and torch.isfinite(latents).all()
    assert (latents - direct).abs().max() > 1e-4
    assert all(s.calls == 4 for s in session.layers)  # 2 runs x 2 steps (cond and uncond in one batch)
    assert max(s.max_abs_distance for s in session.layers) <= 3 - 1


def test_tiny_cogvideox15_pipeline_pads_the_latent_frames() -> None:
    """41 frames: 11 latent frames, padded to 12 = 6 temporal tokens; the session expects exactly that."""
    pipe = tiny_pipeline(cog15(sample_height=4, sample_width=4))
    direct = generate(pipe, 41, "latent")
    with freeloc.enable(pipe, num_frames=41, plan="uniform", trained_frames=PIPE_TRAINED) as session:
        latents = generate(pipe, 41, "latent")
    assert latents.shape == direct.shape and torch.isfinite(latents).all()
    assert (latents - direct).abs().max() > 1e-4
    assert all(s.calls == 2 and s.max_abs_distance <= 2 - 1 for s in session.layers)


def test_tiny_no_rope_pipeline_with_tsa() -> None:
    """CogVideoX-2b style (no RoPE: the pipeline passes no image_rotary_emb); its text must fill max_text_seq_length."""
    pipe = tiny_pipeline(cog2b(sample_height=4, sample_width=4))
    direct = generate(pipe, PIPE_LONG, "latent", text=12)
    with pytest.raises(ValueError, match="no rotary position embedding"):
        freeloc.enable(pipe, num_frames=PIPE_LONG, method="vrpr", trained_frames=PIPE_TRAINED)
    with freeloc.enable(pipe, num_frames=PIPE_LONG, method="tsa", trained_frames=PIPE_TRAINED) as session:
        latents = generate(pipe, PIPE_LONG, "latent", text=12)
    assert torch.isfinite(latents).all() and (latents - direct).abs().max() > 1e-4
    assert all(s.calls == 2 and s.density < 1.0 for s in session.layers)


@pytest.mark.parametrize("how", ["method", "plan range"])
def test_ultravico_needs_a_chosen_harmonic_band_with_the_model_untouched(how: str) -> None:
    model = cog10()
    before = snapshot(model)
    kwargs: dict = dict(method="ultravico") if how == "method" else dict(plan=freeloc.LayerPlan(
        ["tsa"] * 2, ranges=[LengthRange(2, ["ultravico", "tsa"])]))
    with pytest.raises(ValueError) as err:
        freeloc.enable(model, trained_frames=TRAINED_VIDEO, **kwargs)
    message = str(err.value)
    assert "UltraViCo on CogVideoXTransformer3DModel (transformer)" in message
    assert "no such setting is published" in message and "method_params={'beta': None}" in message
    assert "shortest temporal RoPE period longer than the trained 6 temporal positions is " in message
    assert_same_state(before, snapshot(model))
    with freeloc.enable(model, method="ultravico", method_params={"beta": None}, trained_frames=TRAINED_VIDEO) as s:
        out = run(model, 24)
    assert s.plan.resolve(0, 24, 6) == freeloc.UltraViCo(window=3)
    assert all(layer.calls == 1 for layer in s.layers) and torch.isfinite(out).all()
    assert_same_state(before, snapshot(model))
