"""The HunyuanVideo adapters on tiny randomly initialised models (CPU): HunyuanVideo 1.0 and 1.5."""

from __future__ import annotations

from typing import Any

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="the HunyuanVideo adapter needs diffusers (extra 'diffusers')")

from freeloc.adapters.hunyuan import (  # noqa: E402
    FreeLOCHunyuanVideo15AttnProcessor,
    FreeLOCHunyuanVideoAttnProcessor,
    key_text_mask,
    rotary_layout,
)

import freeloc  # noqa: E402
from freeloc.adapter import GridState, LayerContext  # noqa: E402
from freeloc.session import LayerStats  # noqa: E402

TRAINED_VIDEO = 9  # the tiny model's "trained length" in video frames: 3 latent frames (cap 2)
TRAINED_LATENT = 3
LONG = 4 * TRAINED_LATENT
TEXT = 6


def tiny_hunyuan(seed: int = 0, **config: Any) -> torch.nn.Module:
    torch.manual_seed(seed)
    base = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
                num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
                pooled_projection_dim=8, rope_axes_dim=(2, 4, 4))
    return diffusers.HunyuanVideoTransformer3DModel(**(base | config)).eval()


def tiny_hunyuan15(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return diffusers.HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
        image_embed_dim=12, rope_axes_dim=(2, 4, 4),
    ).eval()


def prompt_mask(batch: int = 2, padded: int = 3) -> torch.Tensor:
    """All text tokens valid, except the last ``padded`` of the last sample."""
    mask = torch.ones(batch, TEXT, dtype=torch.bool)
    mask[-1, TEXT - padded:] = False
    return mask


def inputs(frames: int, batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(batch, 4, frames, 4, 4, generator=g),
                timestep=torch.tensor([500, 300][:batch]),
                encoder_hidden_states=torch.randn(batch, TEXT, 16, generator=g),
                encoder_attention_mask=prompt_mask(batch),
                pooled_projections=torch.randn(batch, 8, generator=g),
                guidance=torch.full((batch,), 6000.0))


def run(model: torch.nn.Module, **kw: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(**kw, return_dict=False)[0]


def processors(model: torch.nn.Module) -> list[Any]:
    return [m.processor for m in model.modules() if hasattr(m, "processor")]


def snapshot(model: torch.nn.Module) -> dict[str, Any]:
    return {"processors": processors(model), "hooks": (dict(model._forward_pre_hooks), dict(model._forward_hooks)),
            "dict_keys": sorted(model.__dict__), "state": {k: v.clone() for k, v in model.state_dict().items()}}


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert all(a is b for a, b in zip(before["processors"], after["processors"], strict=True))
    assert before["hooks"] == after["hooks"] and before["dict_keys"] == after["dict_keys"]
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])


# ---------------------------------------------------------------------------------------------- model facts
def test_rotary_layout_is_read_from_the_model() -> None:
    model = tiny_hunyuan()
    assert rotary_layout(model) == freeloc.RotaryLayout.hunyuan((2, 4, 4), theta=256.0)
    model.rope.theta = 1000.0  # read from the rope module, not assumed
    assert rotary_layout(model).theta == 1000.0
    del model.rope.theta  # a rope without the attribute: the config's rope_theta
    assert rotary_layout(model).theta == 256.0


def test_layers_in_plan_order_and_the_token_refiner_is_left_alone() -> None:
    model = tiny_hunyuan(num_layers=2, num_single_layers=3)
    refiner = [m.processor for n, m in model.named_modules() if n.startswith("context_embedder") and
               hasattr(m, "processor")]
    assert refiner
    with freeloc.enable(model, plan="uniform", trained_frames=TRAINED_VIDEO) as session:
        hooked = [n for n, m in model.named_modules()
                  if isinstance(getattr(m, "processor", None), FreeLOCHunyuanVideoAttnProcessor)]
        assert hooked == [f"transformer_blocks.{i}.attn" for i in range(2)] + [
            f"single_transformer_blocks.{i}.attn" for i in range(3)]
        assert [m.processor for n, m in model.named_modules() if n.startswith("context_embedder") and
                hasattr(m, "processor")] == refiner
        run(model, **inputs(LONG))
    assert len(session.layers) == 5 and all(s.calls == 1 for s in session.layers)
    assert all(s.max_abs_distance <= TRAINED_LATENT - 1 for s in session.layers)


# ---------------------------------------------------------------------------------------------- text mask
def test_key_text_mask_conversion() -> None:
    s, n_text = 4, 3
    key = torch.tensor([[True] * s + [True, True, True], [True] * s + [True, False, False]])
    ok, tm = key_text_mask(key[:, None, None, :], 2, s, n_text)
    assert ok and tm is not None and torch.equal(tm, key[:, s:])
    assert key_text_mask(None, 2, s, n_text) == (True, None)
    dense = key[:, None, None, :].expand(2, 1, s + n_text, s + n_text)  # the same key mask on every query row
    ok, tm = key_text_mask(dense, 2, s, n_text)
    assert ok and tm is not None and torch.equal(tm, key[:, s:])
    per_query = dense.clone()
    per_query[0, 0, 1, 2] = False
    assert not key_text_mask(per_query, 2, s, n_text)[0]
    video_masked = key.clone()
    video_masked[1, 0] = False
    assert not key_text_mask(video_masked[:, None, None, :], 2, s, n_text)[0]
    assert not key_text_mask(key[:, None, None, :].float(), 2, s, n_text)[0]  # additive masks: not expressed


def test_padded_text_is_honoured() -> None:
    """A padded text token cannot change the hooked output; the same change does reach it without the mask."""
    model = tiny_hunyuan()
    kw = inputs(LONG)
    changed = dict(kw, encoder_hidden_states=kw["encoder_hidden_states"].clone())
    changed["encoder_hidden_states"][1, -1] += 5.0  # the second sample's last (padded) text token
    base, base_changed = run(model, **kw), run(model, **changed)
    torch.testing.assert_close(base_changed, base, atol=1e-6, rtol=0)  # the model itself ignores it
    with freeloc.enable(model, method="tsa", trained_frames=TRAINED_VIDEO) as session:
        out, out_changed = run(model, **kw), run(model, **changed)
    assert all(s.calls == 2 and s.density < 1.0 for s in session.layers)  # the hooked path ran, not the original
    assert (out - base).abs().max() > 1e-5
    torch.testing.assert_close(out_changed, out, atol=1e-6, rtol=0)

    # the same runs with the adapter's text mask dropped: the padded token now leaks into sample 1
    original_attend = LayerContext.attend

    def without_mask(ctx: LayerContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, method: Any,
                     **kwargs: Any) -> torch.Tensor:
        assert kwargs.get("text_mask") is not None
        return original_attend(ctx, q, k, v, method, **(kwargs | {"text_mask": None}))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LayerContext, "attend", without_mask)
        with freeloc.enable(model, method="tsa", trained_frames=TRAINED_VIDEO):
            leak, leak_changed = run(model, **kw), run(model, **changed)
    torch.testing.assert_close(leak[0], out[0], atol=1e-6, rtol=0)  # sample 0 has no padding
    assert (leak_changed[1] - leak[1]).abs().max() > 1e-4


def test_text_mask_passed_to_attend_is_the_prompt_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []
    original_attend = LayerContext.attend

    def record(ctx: LayerContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, method: Any,
               **kwargs: Any) -> torch.Tensor:
        seen.append(dict(kwargs, seq=q.shape[1]))
        return original_attend(ctx, q, k, v, method, **kwargs)

    monkeypatch.setattr(LayerContext, "attend", record)
    model = tiny_hunyuan()
    with freeloc.enable(model, plan="uniform", trained_frames=TRAINED_VIDEO):
        run(model, **inputs(LONG))
    assert len(seen) == 2  # dual block, single block
    for kw in seen:
        assert kw["text_after"] == TEXT and kw.get("text_before", 0) == 0 and kw["seq"] == LONG * 16 + TEXT
        assert torch.equal(kw["text_mask"], prompt_mask())


# ---------------------------------------------------------------------------------------------- processors
def forced_plain_context(model: torch.nn.Module, grid: tuple[int, int, int]) -> LayerContext:
    """A layer context whose method is a single plain VRPR band: attention equals the original."""
    state = GridState(None)
    state.set(grid)
    f = grid[0]
    plan = freeloc.LayerPlan.uniform("vrpr", 1, w1=f, w2=f + 1, g1=1, g2=1, cap=f - 1)
    return LayerContext(state, rotary_layout(model), plan, 0, TRAINED_LATENT, LayerStats("transformer", 0, "vrpr"),
                        "chunked")


def layer_inputs(model: torch.nn.Module, frames: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, frames, 4, 4, generator=g)
    hidden = torch.randn(2, frames * 16, 20, generator=g)
    text = torch.randn(2, TEXT, 20, generator=g)
    return hidden, text, model.rope(x)


@pytest.mark.parametrize("block", ["transformer_blocks", "single_transformer_blocks"])
def test_processor_reproduces_the_original_outputs(block: str) -> None:
    """Both outputs (video, text) of each block type, with padded text, equal the original processor's."""
    model = tiny_hunyuan()
    attn = getattr(model, block)[0].attn
    hidden, text, rope = layer_inputs(model, LONG)
    mask = torch.cat([torch.ones(2, LONG * 16, dtype=torch.bool), prompt_mask()], dim=1)[:, None, None, :]
    ctx = forced_plain_context(model, (LONG, 4, 4))
    ours = FreeLOCHunyuanVideoAttnProcessor(attn.processor, ctx)
    with torch.no_grad():
        want = attn.processor(attn, hidden, text, mask, rope)
        got = ours(attn, hidden, text, mask, rope)
    assert type(got) is type(want) is tuple and len(got) == 2
    assert ctx.stats.max_abs_distance <= LONG - 1 and ctx.stats.calls == 1
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_a_mask_on_video_keys_falls_back_to_the_original() -> None:
    model = tiny_hunyuan()
    attn = model.transformer_blocks[0].attn
    hidden, text, rope = layer_inputs(model, LONG)
    mask = torch.ones(2, 1, 1, LONG * 16 + TEXT, dtype=torch.bool)
    mask[0, 0, 0, 5] = False  # a video key: not a text-padding mask
    ctx = forced_plain_context(model, (LONG, 4, 4))
    with torch.no_grad():
        want = attn.processor(attn, hidden, text, mask, rope)
        got = FreeLOCHunyuanVideoAttnProcessor(attn.processor, ctx)(attn, hidden, text, mask, rope)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert ctx.stats.max_abs_distance == LONG - 1  # reported as the original's distances


# ---------------------------------------------------------------------------------------------- data
def meta_model(cls_name: str = "HunyuanVideoTransformer3DModel", **config: Any) -> torch.nn.Module:
    """A full-size transformer on the meta device: config and modules, no memory, no forward."""
    with torch.device("meta"):
        return getattr(diffusers, cls_name)(**config)


def hooked(model: torch.nn.Module) -> list[Any]:
    return [p for p in processors(model)
            if isinstance(p, (FreeLOCHunyuanVideoAttnProcessor, FreeLOCHunyuanVideo15AttnProcessor))]


def test_trained_length_from_data() -> None:
    model = meta_model()  # HunyuanVideo: 20 dual + 40 single blocks, head 128 = (16, 56, 56)
    with freeloc.enable(model, num_frames=509, plan="uniform") as session:
        procs = hooked(model)
        assert len(procs) == len(session.layers) == 60
        assert procs[0].trained_frames == 33  # 129 video frames
        assert procs[0].rotary == freeloc.RotaryLayout.hunyuan((16, 56, 56), theta=256.0)
    with freeloc.enable(model, num_frames=253, plan="uniform", trained_frames=65):
        assert hooked(model)[0].trained_frames == 17
    with pytest.raises(ValueError, match="no shipped layer plan matches HunyuanVideoTransformer3DModel"):
        freeloc.enable(model, num_frames=253)
    skyreels = meta_model(in_channels=32, num_layers=1, num_single_layers=1)
    with pytest.raises(ValueError, match="trained length of HunyuanVideoTransformer3DModel is not known"):
        freeloc.enable(skyreels, plan="uniform")
    v15 = meta_model("HunyuanVideo15Transformer3DModel", num_layers=2)
    with pytest.raises(ValueError, match="trained length of HunyuanVideo15Transformer3DModel is not known"):
        freeloc.enable(v15, plan="uniform")
    with freeloc.enable(v15, plan="uniform", trained_frames=121):
        assert hooked(v15)[0].trained_frames == 31  # 121 video frames


# ---------------------------------------------------------------------------------------------- variants
def test_bf16_model() -> None:
    model = tiny_hunyuan().to(torch.bfloat16)
    kw = {k: (v.bfloat16() if v.is_floating_point() and k != "encoder_attention_mask" else v)
          for k, v in inputs(LONG).items()}
    base = run(model, **kw)
    with freeloc.enable(model, method="direct", trained_frames=TRAINED_VIDEO):
        same = run(model, **kw)
    with freeloc.enable(model, plan="uniform", trained_frames=TRAINED_VIDEO) as session:
        long = run(model, **kw)
    assert torch.equal(same, base)
    assert long.dtype == torch.bfloat16 and torch.isfinite(long.float()).all()
    assert all(s.calls == 1 and s.max_abs_distance <= TRAINED_LATENT - 1 for s in session.layers)


def test_token_replace_image_to_video_variant() -> None:
    model = tiny_hunyuan(image_condition_type="token_replace")
    kw = inputs(LONG)
    base = run(model, **kw)
    with freeloc.enable(model, plan="uniform", trained_frames=TRAINED_VIDEO) as session:
        out = run(model, **kw)
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-5
    assert all(s.calls == 1 and s.max_abs_distance <= TRAINED_LATENT - 1 for s in session.layers)


def test_removal_is_exact() -> None:
    model = tiny_hunyuan()
    before = snapshot(model)
    base = run(model, **inputs(LONG))
    with pytest.raises(KeyError):
        with freeloc.enable(model, method="vrpr", trained_frames=TRAINED_VIDEO):
            run(model, **inputs(LONG))
            raise KeyError("inside")
    assert_same_state(before, snapshot(model))
    assert torch.equal(run(model, **inputs(LONG)), base)


# ---------------------------------------------------------------------------------------------- 1.5
def run15(model: torch.nn.Module, frames: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    mask_2 = torch.ones(2, 3, dtype=torch.bool)
    mask_2[0, -1] = False
    with torch.no_grad():
        return model(torch.randn(2, 4, frames, 4, 4, generator=g), torch.tensor([500.0, 300.0]),
                     torch.randn(2, TEXT, 16, generator=g), prompt_mask(),
                     encoder_hidden_states_2=torch.randn(2, 3, 8, generator=g), encoder_attention_mask_2=mask_2,
                     image_embeds=torch.zeros(2, 2, 12), return_dict=False)[0]


def test_hunyuan15_processor_reproduces_the_original_outputs() -> None:
    """Video and text outputs equal the original, padded text queries included (zero rows)."""
    model = tiny_hunyuan15()
    attn = model.transformer_blocks[0].attn
    hidden, text, rope = layer_inputs(model, LONG)
    ctx = forced_plain_context(model, (LONG, 4, 4))
    with torch.no_grad():
        want = attn.processor(attn, hidden, text, prompt_mask(), rope)
        got = FreeLOCHunyuanVideo15AttnProcessor(attn.processor, ctx)(attn, hidden, text, prompt_mask(), rope)
    assert type(got) is tuple and len(got) == 2 and ctx.stats.max_abs_distance <= LONG - 1
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_hunyuan15_never_builds_a_dense_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """No attention call of a hooked HunyuanVideo 1.5 forward gets an [N, N] mask over video and text."""
    import torch.nn.functional as F  # noqa: N812

    shapes: list[tuple[int, ...]] = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args: Any, attn_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if attn_mask is not None:
            shapes.append(tuple(attn_mask.shape))
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    model = tiny_hunyuan15()
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    run15(model, LONG)
    n = LONG * 16 + TEXT + 3 + 2
    assert (2, 1, n, n) in shapes  # the original processor does build it
    shapes.clear()
    with freeloc.enable(model, method="tsa", trained_frames=TRAINED_VIDEO) as session:
        out = run15(model, LONG)
    assert torch.isfinite(out).all() and all(s.calls == 1 and s.density < 1.0 for s in session.layers)
    assert not [s for s in shapes if s[-2:] == (n, n)]


# ---------------------------------------------------------------------------------------------- pipeline
def test_full_tiny_pipeline() -> None:
    vae = diffusers.AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                              norm_num_groups=4).eval()
    pipe = diffusers.HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=tiny_hunyuan(), vae=vae,
                                          scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0),
                                          text_encoder_2=None, tokenizer_2=None)
    g = torch.Generator().manual_seed(2)
    embeds, negative = torch.randn(1, TEXT, 16, generator=g), torch.randn(1, TEXT, 16, generator=g)
    pooled, negative_pooled = torch.randn(1, 8, generator=g), torch.randn(1, 8, generator=g)
    mask = prompt_mask(1, padded=2).long()

    def generate(frames: int) -> torch.Tensor:
        return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, prompt_attention_mask=mask,
                    negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled,
                    negative_prompt_attention_mask=torch.ones_like(mask), true_cfg_scale=2.0, height=16, width=16,
                    num_frames=frames, num_inference_steps=2, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).frames

    frames = 4 * (LONG - 1) + 1  # 45 video frames = 12 latent frames, 4x the trained 3
    direct = generate(frames)
    with freeloc.enable(pipe, num_frames=frames, plan="uniform", trained_frames=TRAINED_VIDEO) as session:
        long = generate(frames)
    assert long.shape == (1, frames, 3, 16, 16) and torch.isfinite(long).all()
    assert (long - direct).abs().max() > 1e-4
    assert all(s.calls == 4 for s in session.layers)  # 2 steps x (cond, uncond), both layers
    assert max(s.max_abs_distance for s in session.layers) <= TRAINED_LATENT - 1


def test_full_tiny_hunyuan15_pipeline() -> None:
    torch.manual_seed(0)
    model = diffusers.HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
        image_embed_dim=12, rope_axes_dim=(2, 4, 4), target_size=32,
    ).eval()
    vae = diffusers.AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 8, 8, 8, 8),
                                                layers_per_block=1).eval()
    pipe = diffusers.HunyuanVideo15Pipeline(
        text_encoder=None, tokenizer=None, transformer=model, vae=vae, text_encoder_2=None, tokenizer_2=None,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0),
        guider=diffusers.ClassifierFreeGuidance(guidance_scale=2.0))
    g = torch.Generator().manual_seed(2)
    kw = dict(prompt_embeds=torch.randn(1, TEXT, 16, generator=g), prompt_embeds_mask=prompt_mask(1, 2).long(),
              prompt_embeds_2=torch.randn(1, 3, 8, generator=g), prompt_embeds_mask_2=torch.tensor([[1, 1, 0]]),
              negative_prompt_embeds=torch.randn(1, TEXT, 16, generator=g),
              negative_prompt_embeds_mask=torch.ones(1, TEXT, dtype=torch.long),
              negative_prompt_embeds_2=torch.randn(1, 3, 8, generator=g),
              negative_prompt_embeds_mask_2=torch.ones(1, 3, dtype=torch.long))
    frames = 4 * (LONG - 1) + 1

    def generate() -> torch.Tensor:
        return pipe(**kw, height=32, width=32, num_frames=frames, num_inference_steps=2, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).frames

    direct = generate()
    with freeloc.enable(pipe, num_frames=frames, plan="uniform", trained_frames=TRAINED_VIDEO) as session:
        long = generate()
    assert long.shape == (1, frames, 3, 32, 32) and torch.isfinite(long).all()
    assert (long - direct).abs().max() > 1e-4
    assert all(s.calls == 4 for s in session.layers)  # 2 steps x (cond, uncond)
    assert max(s.max_abs_distance for s in session.layers) <= TRAINED_LATENT - 1


def test_ultravico_takes_the_published_harmonic_band() -> None:
    model = tiny_hunyuan()
    kw = inputs(LONG)
    with freeloc.enable(model, method="ultravico", trained_frames=TRAINED_VIDEO) as session:
        published = run(model, **kw)
    assert session.plan.params == [{"beta": 0.6, "period": 50}] * 2
    assert session.plan.resolve(0, 132, 33) == freeloc.UltraViCo(window=16, beta=0.6, period=50)
    with freeloc.enable(model, method="ultravico", method_params={"beta": None},
                        trained_frames=TRAINED_VIDEO) as session:
        decay_alone = run(model, **kw)
    assert session.plan.resolve(0, 132, 33) == freeloc.UltraViCo(window=16)
    torch.testing.assert_close(published, decay_alone, atol=0, rtol=0)  # 12 frames: no distance near 50
    near = dict(beta=0.5, period=4, halfwidth=1, harmonics=2)  # distances 3-5 and 7-9 of the 12 frames
    with freeloc.enable(model, method="ultravico", method_params=near, trained_frames=TRAINED_VIDEO) as session:
        banded = run(model, **kw)
    assert session.plan.resolve(0, LONG, TRAINED_LATENT) == freeloc.UltraViCo(window=1, **near)
    assert (banded - decay_alone).abs().max() > 1e-4  # the band reaches the layers


def test_hunyuan15_ultravico_asks_for_a_band() -> None:
    model = tiny_hunyuan15()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"UltraViCo on HunyuanVideo15Transformer3DModel \(transformer\).*no such "
                                         r"setting is published.*method_params=\{'beta': None\}"):
        freeloc.enable(model, method="ultravico", trained_frames=TRAINED_VIDEO)
    assert_same_state(before, snapshot(model))
