"""Ulysses context parallelism with FreeLOC, on gloo with 2 and 3 CPU processes (``tests/parallel_worker.py``).

The parallel output equals the single-process output for every method, whether freeloc or diffusers'
``enable_parallelism`` comes first, and after removal the model is diffusers' own context-parallel model,
bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers", reason="context parallelism is diffusers' (extra 'diffusers')")
if not torch.distributed.is_available():
    pytest.skip("this torch has no torch.distributed", allow_module_level=True)

import parallel_worker  # noqa: E402

METHODS = ("direct", "vrpr", "tsa", "sliding-window", "mixed")
#: Models diffusers has no context-parallel plan for: they run under ``freeloc.parallel.enable_parallelism``.
PLANNED = ("hunyuan", "hunyuan15", "cogvideox")


def spawn(world: int, groups: list[str], tmp: Path) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    mp.spawn(parallel_worker.main, args=(world, f"file://{tmp / 'store'}", str(tmp), groups), nprocs=world)
    results = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for r, found in enumerate(results):
        assert "error" not in found, f"rank {r}:\n{found['error']}"
    return results


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn(2, ["wan", *PLANNED, "errors", "core", "probe"], tmp_path_factory.mktemp("cp2"))


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn(3, ["wan", *PLANNED, "core"], tmp_path_factory.mktemp("cp3"))


def check_model(results: list[dict[str, Any]], model: str) -> None:
    """Unhooked, on ``len(results)`` ranks = on one process; every method = its single-process output in both orders
    of enabling; after removal = the unhooked parallel model, bit for bit."""
    for r, found in enumerate(results):
        torch.testing.assert_close(found[f"{model}:unhooked_parallel"], found[f"{model}:unhooked_single"], atol=1e-5,
                                   rtol=0)
        for method in METHODS:
            single = found[f"{model}:{method}/single"]
            for order in ("freeloc_first", "parallel_first"):
                torch.testing.assert_close(found[f"{model}:{method}/{order}"], single, atol=1e-5, rtol=0,
                                           msg=lambda m, method=method, order=order, r=r: f"rank {r} {model} {method} "
                                                                                         f"{order}: {m}")
                assert torch.equal(found[f"{model}:{method}/{order}_removed"], found[f"{model}:unhooked_parallel"]), (
                    f"rank {r}, {model}, {method}, {order}: after removal the model is not the parallel model")
            if method != "direct":  # the method changes the output: the comparisons above are not of identities
                assert not torch.equal(single, found[f"{model}:unhooked_single"]), f"{model} {method}"


def check_wan(results: list[dict[str, Any]]) -> None:
    check_model(results, "wan")
    for found in results:
        assert found["wan:processors_keep_config"]


@pytest.mark.slow
def test_two_ranks_equal_one_process_in_both_orders_and_after_removal(two: list[dict[str, Any]]) -> None:
    check_wan(two)
    assert "wan:vrpr/single" in two[0] and not torch.equal(two[0]["wan:vrpr/single"], two[0]["wan:unhooked_single"])


@pytest.mark.slow
def test_three_ranks_with_uneven_groups_of_heads(three: list[dict[str, Any]]) -> None:
    check_wan(three)


@pytest.mark.slow
@pytest.mark.parametrize("model", PLANNED)
@pytest.mark.parametrize("world", [2, 3])
def test_models_without_a_diffusers_plan_run_under_freelocs_plan(model: str, world: int, two: list[dict[str, Any]],
                                                                 three: list[dict[str, Any]]) -> None:
    """HunyuanVideo, HunyuanVideo 1.5 and CogVideoX on 2 ranks, and on 3 with 5 heads (uneven groups of heads):
    exact against one process with and without FreeLOC, in both orders, and after removal."""
    results = two if world == 2 else three
    check_model(results, model)
    for found in results:  # every self-attention call got this rank's shard of the 12 x 4 x 4 video tokens
        assert found[f"{model}:shards"] and set(found[f"{model}:shards"]) == {192 // world}


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_ulysses_attend_with_uneven_shards_and_text(world: int, two: list[dict[str, Any]],
                                                    three: list[dict[str, Any]]) -> None:
    for r, found in enumerate(two if world == 2 else three):
        cases = {k: v for k, v in found.items() if k.startswith("core:")}
        assert len(cases) == 3
        for name, (got, want) in cases.items():
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5,
                                       msg=lambda m, r=r, name=name: f"rank {r} {name}: {m}")


@pytest.mark.slow
def test_what_cannot_run_is_refused_clearly(two: list[dict[str, Any]]) -> None:
    found = two[0]
    assert "ring_degree=2" in found["errors:ring"] and "Ulysses" in found["errors:ring"]
    assert "3 attention heads do not divide by ulysses_degree=2" in found["errors:heads"]
    assert "ulysses_anything=True" in found["errors:heads"]


@pytest.mark.slow
def test_the_probe_gives_the_same_plan_and_scores_on_two_ranks(two: list[dict[str, Any]]) -> None:
    for r, found in enumerate(two):
        single, parallel = found["probe:single"], found["probe:parallel"]
        assert parallel["methods"] == single["methods"], f"rank {r}"
        for key, values in single["scores"].items():
            assert parallel["scores"][key] == pytest.approx(values, rel=1e-4, abs=1e-6), f"rank {r}: {key}"
        assert any(v > 0 for v in single["scores"]["position"])  # the scores were computed


def test_a_diffusers_whose_config_differs_is_refused_with_what_is_missing() -> None:
    from types import SimpleNamespace

    from freeloc.parallel import Ulysses

    assert Ulysses.from_config(SimpleNamespace(context_parallel_config=None)) is None
    other = SimpleNamespace(context_parallel_config=SimpleNamespace(ulysses_degree=2))
    with pytest.raises(RuntimeError, match=r"tested with diffusers 0.42.*lacks \['ring_degree', '_ulysses_mesh'\]"):
        Ulysses.from_config(other)
    ring = SimpleNamespace(context_parallel_config=SimpleNamespace(ring_degree=2, ulysses_degree=1, _ulysses_mesh=None))
    with pytest.raises(ValueError, match="got ring_degree=2"):
        Ulysses.from_config(ring)
    one = SimpleNamespace(context_parallel_config=SimpleNamespace(ring_degree=1, ulysses_degree=1, _ulysses_mesh=None))
    assert Ulysses.from_config(one) is None


def test_split_sizes_are_those_of_tensor_split() -> None:
    from freeloc.parallel import split_sizes

    for n in range(0, 20):
        for parts in range(1, 6):
            assert split_sizes(n, parts) == [len(c) for c in torch.arange(n).tensor_split(parts)]


@pytest.mark.slow
def test_generate_with_context_parallel_under_torchrun_writes_the_single_process_video(tmp_path: Path) -> None:
    """``torchrun --nproc-per-node 2 -m freeloc generate ... --context-parallel 2`` on a saved tiny Wan pipeline
    (gloo): rank 0 alone writes the video and sidecar, and the video is the single-process one."""
    import json
    import subprocess
    import sys

    from support import saved_tiny_wan

    from freeloc.app.cli import main

    folder = saved_tiny_wan(tmp_path / "tiny-wan")
    argv = ["generate", "--model", str(folder), "--prompt", "a red ball", "--num-frames", "45", "--trained-frames",
            "21", "--height", "32", "--width", "32", "--steps", "2", "--device", "cpu", "--dtype", "float32",
            "--method", "vrpr"]
    single, parallel = tmp_path / "single.mp4", tmp_path / "out" / "parallel.mp4"
    parallel.parent.mkdir()
    assert main([*argv, "--out", str(single)]) == 0
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "freeloc",
                          *argv, "--context-parallel", "2", "--out", str(parallel)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote ") == 1  # rank 0 only
    assert parallel.read_bytes() == single.read_bytes()
    sidecar = json.loads(parallel.with_suffix(".json").read_text())
    assert sidecar["settings"]["context_parallel"] == 2 and sidecar["layers"][0]["calls"] > 0
    assert sorted(p.name for p in parallel.parent.iterdir()) == ["parallel.json", "parallel.mp4"]


def test_context_parallel_outside_torchrun_is_refused_before_loading(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from freeloc.app.cli import main

    folder = tmp_path / "model"
    folder.mkdir()
    code = main(["generate", "--model", str(folder), "--prompt", "p", "--num-frames", "45", "--device", "cpu",
                 "--context-parallel", "2", "--out", str(tmp_path / "v.mp4")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "start it with torchrun --nproc-per-node 2 -m freeloc generate" in err


def test_context_parallel_refuses_a_model_without_an_adapter() -> None:
    from types import SimpleNamespace

    from freeloc.app.parallel import ContextParallelRun

    pipeline = SimpleNamespace(transformer=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no freeloc adapter for Linear"):
        ContextParallelRun(2, 0, "cpu").parallelize(pipeline)
    ContextParallelRun(1, 0, "cpu").parallelize(pipeline)  # one process: nothing to set up


def _tiny(model: str, heads: int = 2, **config: Any) -> torch.nn.Module:
    build = {"hunyuan": parallel_worker._tiny_hunyuan, "hunyuan15": parallel_worker._tiny_hunyuan15,
             "cogvideox": parallel_worker._tiny_cogvideox, "wan": parallel_worker._tiny_wan}[model]
    return build(heads)


def _processors(model: torch.nn.Module) -> list[Any]:
    return [type(m.processor) for m in model.modules() if hasattr(m, "processor")]


@pytest.mark.parametrize("model", ["wan", *PLANNED])
def test_enable_parallelism_refuses_what_cannot_run_before_changing_the_model(model: str) -> None:
    """Ring attention, heads the degree does not divide, fewer heads than ranks, a config of another type: clear
    errors, raised before the model changes (no process group is needed to see them)."""
    from diffusers import ContextParallelConfig

    from freeloc.parallel import enable_parallelism

    transformer = _tiny(model, heads=3)
    before = _processors(transformer)
    with pytest.raises(ValueError, match="got ring_degree=2"):
        enable_parallelism(transformer, ContextParallelConfig(ring_degree=2))
    with pytest.raises(ValueError, match=r"3 attention heads do not divide by ulysses_degree=2.*ulysses_anything=True"):
        enable_parallelism(transformer, ContextParallelConfig(ulysses_degree=2))
    with pytest.raises(ValueError, match="3 heads cannot be shared by ulysses_degree=4 ranks"):
        enable_parallelism(transformer, ContextParallelConfig(ulysses_degree=4, ulysses_anything=True))
    with pytest.raises(TypeError, match="config must be a diffusers ContextParallelConfig.*got dict"):
        enable_parallelism(transformer, {"ulysses_degree": 2})
    assert _processors(transformer) == before
    assert transformer._parallel_config is None and not transformer._forward_pre_hooks


def test_enable_parallelism_refuses_hunyuan_token_replace() -> None:
    from diffusers import ContextParallelConfig

    from freeloc.parallel import enable_parallelism

    transformer = parallel_worker._tiny_hunyuan(2)
    transformer.register_to_config(image_condition_type="token_replace")
    with pytest.raises(ValueError, match="image_condition_type='token_replace'.*one process"):
        enable_parallelism(transformer, ContextParallelConfig(ulysses_degree=2))
    assert transformer._parallel_config is None


@pytest.mark.parametrize("model", PLANNED)
def test_context_parallel_processors_on_one_process_are_the_original(model: str) -> None:
    """Without a Ulysses degree (one process) the context-parallel processor runs the processor it replaced:
    the same output, bit for bit."""
    from freeloc.adapter import GridHook, GridState
    from freeloc.registry import adapters_for

    transformer = _tiny(model)
    kw = parallel_worker._inputs(model)
    with torch.no_grad():
        want = transformer(**kw, return_dict=False)[0]
    (name, module, adapter_cls), = adapters_for(transformer)
    adapter = adapter_cls(module, name=name)
    tokens = GridState(None)
    for attn in adapter.attention_layers():
        attn.set_processor(adapter.context_parallel_processor(attn.processor, tokens))
    transformer.register_forward_pre_hook(GridHook(adapter, tokens), with_kwargs=True)
    with torch.no_grad():
        got = transformer(**kw, return_dict=False)[0]
    assert torch.equal(got, want)
    assert tokens.value == (12, 4, 4)
