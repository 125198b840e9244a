"""What each process of the context-parallel tests runs (``tests/test_context_parallel.py``).

Every case of a group runs inside one process group (spawning one costs seconds of imports); each rank
saves its results, and the test compares them in the parent process.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

TRAINED_VIDEO = 21  # 6 latent frames: 12 latent frames is 2x


def _tiny_wan(heads: int) -> torch.nn.Module:
    import diffusers

    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=128,
    ).eval()


def _wan_cases(world: int, heads: int, uneven: bool) -> dict[str, Any]:
    """Single process, and ``world`` ranks in both orders of enabling, then after removal."""
    from diffusers import ContextParallelConfig

    import freeloc

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 12, 8, 8, generator=g)  # batch 2
    enc = torch.randn(2, 7, 32, generator=g)

    def run(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(x, torch.tensor([500, 700]), enc, return_dict=False)[0]

    def parallel(model: torch.nn.Module, **config: Any) -> torch.nn.Module:
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world, ulysses_anything=uneven,
                                                              **config))
        return model

    plans: dict[str, dict[str, Any]] = {
        "direct": dict(method="direct"), "vrpr": dict(method="vrpr"), "tsa": dict(method="tsa"),
        "sliding-window": dict(method="sliding-window"),
        "mixed": dict(plan=freeloc.LayerPlan(["tsa", "vrpr"])),
    }
    out: dict[str, Any] = {"unhooked_single": run(_tiny_wan(heads)),
                           "unhooked_parallel": run(parallel(_tiny_wan(heads)))}
    for name, kwargs in plans.items():
        model = _tiny_wan(heads)
        with freeloc.enable(model, trained_frames=TRAINED_VIDEO, **kwargs):
            out[f"{name}/single"] = run(model)
        model = _tiny_wan(heads)
        session = freeloc.enable(model, trained_frames=TRAINED_VIDEO, **kwargs)
        parallel(model)
        out[f"{name}/freeloc_first"] = run(model)
        session.remove()
        out[f"{name}/freeloc_first_removed"] = run(model)
        model = parallel(_tiny_wan(heads))
        session = freeloc.enable(model, trained_frames=TRAINED_VIDEO, **kwargs)
        out[f"{name}/parallel_first"] = run(model)
        session.remove()
        out[f"{name}/parallel_first_removed"] = run(model)
    model = _tiny_wan(heads)
    freeloc.enable(model, method="tsa", trained_frames=TRAINED_VIDEO)
    try:
        parallel(model, ring_degree=1)
        out["processors_keep_config"] = all(
            b.attn1.processor.original._parallel_config is b.attn1.processor._parallel_config is not None
            for b in model.blocks)
    finally:
        freeloc.Session.of(model).remove()
    return out


def _tiny_hunyuan(heads: int) -> torch.nn.Module:
    import diffusers

    torch.manual_seed(0)
    return diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 4, 4)).eval()


def _tiny_hunyuan15(heads: int) -> torch.nn.Module:
    import diffusers

    torch.manual_seed(0)
    return diffusers.HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=10, num_layers=2,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
        image_embed_dim=12, rope_axes_dim=(2, 4, 4)).eval()


def _tiny_cogvideox(heads: int) -> torch.nn.Module:
    import diffusers

    torch.manual_seed(0)
    return diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=49, patch_size=2,
        max_text_seq_length=12, use_rotary_positional_embeddings=True).eval()


def _text_mask(batch: int, tokens: int) -> torch.Tensor:
    """Every text token attended but the last two of the last sample (padding)."""
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[-1, -2:] = False
    return mask


def _inputs(model_name: str) -> dict[str, Any]:
    """A batch of 2 at 12 latent frames (2x the test's trained length) x 4 x 4 tokens: 192 video tokens."""
    g = torch.Generator().manual_seed(1)
    if model_name == "hunyuan":
        return dict(hidden_states=torch.randn(2, 4, 12, 4, 4, generator=g), timestep=torch.tensor([500, 300]),
                    encoder_hidden_states=torch.randn(2, 6, 16, generator=g), encoder_attention_mask=_text_mask(2, 6),
                    pooled_projections=torch.randn(2, 8, generator=g), guidance=torch.full((2,), 6000.0))
    if model_name == "hunyuan15":
        mask_2 = torch.ones(2, 3, dtype=torch.bool)
        mask_2[0, -1] = False
        return dict(hidden_states=torch.randn(2, 4, 12, 4, 4, generator=g), timestep=torch.tensor([500.0, 300.0]),
                    encoder_hidden_states=torch.randn(2, 6, 16, generator=g), encoder_attention_mask=_text_mask(2, 6),
                    encoder_hidden_states_2=torch.randn(2, 3, 8, generator=g), encoder_attention_mask_2=mask_2,
                    image_embeds=torch.zeros(2, 2, 12))
    from types import SimpleNamespace

    from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline

    pipe = SimpleNamespace(vae_scale_factor_spatial=8, transformer=_tiny_cogvideox(2))
    rope = CogVideoXPipeline._prepare_rotary_positional_embeddings(pipe, 64, 64, 12, torch.device("cpu"))
    return dict(hidden_states=torch.randn(2, 12, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(2, 12, 16, generator=g), timestep=torch.tensor([500, 300]),
                image_rotary_emb=rope)


def _plan_cases(world: int, model_name: str, heads: int, uneven: bool) -> dict[str, Any]:
    """A model diffusers has no context-parallel plan for, under ``freeloc.parallel.enable_parallelism``:
    one process, ``world`` ranks in both orders of enabling, then after removal."""
    from diffusers import ContextParallelConfig

    import freeloc
    from freeloc.parallel import enable_parallelism

    build = {"hunyuan": _tiny_hunyuan, "hunyuan15": _tiny_hunyuan15, "cogvideox": _tiny_cogvideox}[model_name]
    kw = _inputs(model_name)

    def run(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(**kw, return_dict=False)[0]

    def parallel(model: torch.nn.Module) -> torch.nn.Module:
        enable_parallelism(model, ContextParallelConfig(ulysses_degree=world, ulysses_anything=uneven))
        return model

    plans: dict[str, dict[str, Any]] = {
        "direct": dict(method="direct"), "vrpr": dict(method="vrpr"), "tsa": dict(method="tsa"),
        "sliding-window": dict(method="sliding-window"),
        "mixed": dict(plan=freeloc.LayerPlan(["tsa", "vrpr"])),
    }
    out: dict[str, Any] = {"unhooked_single": run(build(heads))}
    model = parallel(build(heads))
    shards: list[int] = []  # video tokens each self-attention call of this rank receives
    for attn in _adapter_layers(model):
        attn.register_forward_pre_hook(lambda m, args, kwargs: shards.append(kwargs["hidden_states"].shape[1]),
                                       with_kwargs=True)
    out["unhooked_parallel"] = run(model)
    out["shards"] = shards
    for name, kwargs in plans.items():
        model = build(heads)
        with freeloc.enable(model, trained_frames=TRAINED_VIDEO, **kwargs):
            out[f"{name}/single"] = run(model)
        model = build(heads)
        session = freeloc.enable(model, trained_frames=TRAINED_VIDEO, **kwargs)
        parallel(model)
        out[f"{name}/freeloc_first"] = run(model)
        session.remove()
        out[f"{name}/freeloc_first_removed"] = run(model)
        model = parallel(build(heads))
        session = freeloc.enable(model, trained_frames=TRAINED_VIDEO, **kwargs)
        out[f"{name}/parallel_first"] = run(model)
        session.remove()
        out[f"{name}/parallel_first_removed"] = run(model)
    return out


def _adapter_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from freeloc.registry import adapters_for

    (name, module, adapter), = adapters_for(model)
    return adapter(module, name=name).attention_layers()


def _errors(world: int) -> dict[str, Any]:
    """The messages of what cannot run: ring attention; heads that do not divide without uneven mode."""
    from diffusers import ContextParallelConfig

    import freeloc

    x = torch.randn(1, 16, 12, 8, 8)
    enc = torch.randn(1, 7, 32)
    found: dict[str, Any] = {}
    for name, heads, config in (("ring", 2 * world, dict(ring_degree=world)),
                                ("heads", world + 1, dict(ulysses_degree=world))):
        model = _tiny_wan(heads)
        model.enable_parallelism(config=ContextParallelConfig(**config))
        with freeloc.enable(model, method="vrpr", trained_frames=TRAINED_VIDEO), torch.no_grad():
            try:
                model(x, torch.tensor([500]), enc, return_dict=False)
            except ValueError as e:
                found[name] = str(e)
    return found


def _probe(world: int) -> dict[str, Any]:
    """The probe's plan and scores on one process and on ``world`` ranks."""
    from diffusers import ContextParallelConfig

    import freeloc

    found: dict[str, Any] = {}
    for name, parallel in (("single", False), ("parallel", True)):
        model = _tiny_wan(2)
        if parallel:
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        plan = freeloc.probe(model, num_frames=45, trained_frames=TRAINED_VIDEO, latent_size=(8, 8), max_queries=64,
                             progress=False)
        found[name] = dict(methods=plan.methods, scores=plan.scores)
    return found


def _core(world: int) -> dict[str, Any]:
    """``Ulysses.attend`` on its own: uneven shards of tokens and heads, text before and after, a text mask."""
    from freeloc import VRPR, RotaryLayout, attend
    from freeloc.parallel import Ulysses, split_sizes

    grid = (7, 3, 3)  # 63 video tokens: uneven shards over 2 ranks; over 3, the world + 2 = 5 heads are uneven
    n = grid[0] * grid[1] * grid[2]
    g = torch.Generator().manual_seed(3)
    out: dict[str, Any] = {}
    for text_before, text_after in ((0, 0), (3, 0), (0, 5)):
        heads = world + 2
        q, k, v = (torch.randn(2, text_before + n + text_after, heads, 16, generator=g) for _ in range(3))
        mask = torch.ones(2, text_before + text_after, dtype=torch.bool)
        if text_before + text_after:
            mask[1, -1] = False
        kwargs = dict(grid=grid, method=VRPR.for_length(7, 3), rotary=RotaryLayout.wan(16),
                      text_before=text_before, text_after=text_after,
                      text_mask=mask if text_before + text_after else None)
        single = attend(q, k, v, **kwargs)
        ulysses = Ulysses(dist.group.WORLD, world, dist.get_rank(), uneven=True)
        shards = split_sizes(n, world)
        start = text_before + sum(shards[:ulysses.rank])
        local = slice(start, start + shards[ulysses.rank])

        def mine(x: torch.Tensor, local: slice = local, text_before: int = text_before,
                 text_after: int = text_after) -> torch.Tensor:
            return torch.cat([x[:, :text_before], x[:, local], x[:, x.shape[1] - text_after:]], dim=1)

        got = ulysses.attend(lambda q, k, v, kwargs=kwargs: attend(q, k, v, **kwargs), mine(q), mine(k), mine(v),
                             n, text_before, text_after)
        out[f"core/{text_before}-{text_after}"] = (got, mine(single))
    return out


def main(rank: int, world: int, init: str, results: str, groups: list[str]) -> None:
    torch.accelerator.device_count = lambda: 1  # diffusers maps ranks to devices by rank % device_count
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    found: dict[str, Any] = {}
    runs: dict[str, Callable[[], dict[str, Any]]] = {
        "wan": lambda: _wan_cases(world, 2 if world == 2 else 5, uneven=world != 2),
        "hunyuan": lambda: _plan_cases(world, "hunyuan", 2 if world == 2 else 5, uneven=world != 2),
        "hunyuan15": lambda: _plan_cases(world, "hunyuan15", 2 if world == 2 else 5, uneven=world != 2),
        "cogvideox": lambda: _plan_cases(world, "cogvideox", 2 if world == 2 else 5, uneven=world != 2),
        "errors": lambda: _errors(world),
        "core": lambda: _core(world),
        "probe": lambda: _probe(world),
    }
    try:
        for group in groups:
            found.update({f"{group}:{k}": v for k, v in runs[group]().items()})
    except Exception:
        found["error"] = traceback.format_exc()
    torch.save(found, Path(results) / f"rank{rank}.pt")
    dist.destroy_process_group()
