"""What ``freeloc.enable`` checks before it installs anything: plans and methods that would fail, or go
wrong, only at the first forward are refused (or warned about) at ``enable``, with the model untouched."""

from __future__ import annotations

import time
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="the session is tried on a tiny Wan: diffusers (extra 'diffusers')")

import freeloc  # noqa: E402

TRAINED_VIDEO = 21  # 6 latent frames


def tiny_wan() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=128,
    ).eval()


def processors(model: torch.nn.Module) -> list[object]:
    return [b.attn1.processor for b in model.blocks]


@pytest.mark.parametrize("kwargs,match", [
    (dict(plan=freeloc.LayerPlan(["riflex", "vrpr"]), trained_frames=TRAINED_VIDEO),
     r"layer 0 uses 'riflex', which needs its intrinsic frequency index k"),
    (dict(method="vrpr", trained_frames=1), r"layer 0 \('vrpr'\): VRPR needs trained_frames >= 2"),
    (dict(plan="uniform", trained_frames=1, num_frames=81), r"layer 0 \('vrpr'\): VRPR needs trained_frames >= 2"),
])
def test_methods_that_cannot_be_built_are_refused_at_enable(kwargs: dict, match: str) -> None:
    model = tiny_wan()
    before = processors(model)
    with pytest.raises(ValueError, match=match) as err:
        freeloc.enable(model, **kwargs)
    print(err.value)
    assert all(a is b for a, b in zip(before, processors(model), strict=True))
    assert not model._forward_pre_hooks


def test_a_plan_for_another_model_or_a_cap_out_of_range_is_warned_about() -> None:
    """A plan probed on another model class (same layer count), and an explicit VRPR cap beyond the trained
    range: a warning each, naming both classes / the layer and the cap; the session still applies."""
    model = tiny_wan()
    other = freeloc.LayerPlan(["vrpr", "tsa"], model={"class": "HunyuanVideoTransformer3DModel", "name": "hv"})
    with pytest.warns(UserWarning, match=r"made for HunyuanVideoTransformer3DModel \(hv\), and is applied to a "
                                         r"WanTransformer3DModel"):
        freeloc.enable(model, plan=other, trained_frames=TRAINED_VIDEO).remove()
    wide = freeloc.LayerPlan(["vrpr", "vrpr"], params=[{"w1": 3, "w2": 5, "g1": 2, "g2": 4, "cap": 12}, {}])
    with pytest.warns(UserWarning, match=r"layer 0: VRPR cap=12 is beyond the model's trained range .* <= T - 1 = 5"):
        freeloc.enable(model, plan=wide, trained_frames=TRAINED_VIDEO).remove()
    own = freeloc.LayerPlan(["vrpr", "tsa"], model={"class": "WanTransformer3DModel"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the model's own plan: no warning
        freeloc.enable(model, plan=own, trained_frames=TRAINED_VIDEO).remove()


def test_two_threads_enabling_one_model_one_wins_and_removal_restores_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from freeloc.adapters.wan import WanAdapter

    layers = WanAdapter.attention_layers

    def slow_layers(self: WanAdapter) -> list[torch.nn.Module]:  # widens the window between check and install
        time.sleep(0.02)
        return layers(self)

    monkeypatch.setattr(WanAdapter, "attention_layers", slow_layers)
    for _ in range(3):
        model = tiny_wan()
        before = processors(model)
        start = threading.Barrier(4)
        results: list[object] = []

        def enable(model: torch.nn.Module = model, start: threading.Barrier = start,
                   results: list[object] = results) -> None:
            start.wait()
            try:
                results.append(freeloc.enable(model, method="tsa", trained_frames=TRAINED_VIDEO))
            except RuntimeError as refused:
                results.append(refused)

        threads = [threading.Thread(target=enable) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sessions = [r for r in results if isinstance(r, freeloc.Session)]
        refusals = [r for r in results if isinstance(r, RuntimeError)]
        assert len(sessions) == 1 and len(refusals) == 3, results
        assert all("already applied" in str(e) for e in refusals)
        sessions[0].remove()
        assert all(a is b for a, b in zip(processors(model), before, strict=True))
        assert not model._forward_pre_hooks and not hasattr(model, "_freeloc_installation")


def test_a_deepcopy_runs_with_its_own_grid_and_is_removable_apart_from_the_original() -> None:
    import copy

    model = tiny_wan()
    g = torch.Generator().manual_seed(1)
    x12, x10 = torch.randn(1, 16, 12, 8, 8, generator=g), torch.randn(1, 16, 10, 8, 8, generator=g)
    enc = torch.randn(1, 7, 32, generator=g)

    def run(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return m(x, torch.tensor([500]), enc, return_dict=False)[0]

    unhooked = run(model, x12)
    with freeloc.enable(model, method="vrpr", trained_frames=TRAINED_VIDEO) as session:
        hooked = run(model, x12)
        ema = copy.deepcopy(model)
        run(ema, x10)  # the copy's own grid: the original's stays at 12 frames
        original_grid = model.blocks[0].attn1.processor.ctx.grid.value
        assert original_grid is not None and original_grid[0] == 12
        assert torch.equal(run(ema, x12), hooked)
        copy_session = freeloc.Session.of(ema)
        # the copy's statistics go on from the original's at the copy (1 call), each counting its own calls
        assert copy_session.layers[0].calls == 1 + 2 and session.layers[0].calls == 1
    assert torch.equal(run(model, x12), unhooked)
    assert torch.equal(run(ema, x12), hooked)  # removing the original leaves the copy hooked
    copy_session.remove()
    assert torch.equal(run(ema, x12), unhooked)
    with pytest.raises(ValueError, match="freeloc is not applied to this WanTransformer3DModel"):
        freeloc.Session.of(ema)


def test_a_hooked_pipeline_is_found_by_session_of() -> None:
    class Pipe:
        def __init__(self, transformer: torch.nn.Module) -> None:
            self.transformer = transformer

    pipe = Pipe(tiny_wan())
    before = processors(pipe.transformer)
    freeloc.enable(pipe, method="tsa", trained_frames=TRAINED_VIDEO)
    found = freeloc.Session.of(pipe)
    assert [s.method for s in found.layers] == ["tsa", "tsa"]
    found.remove()
    assert all(a is b for a, b in zip(processors(pipe.transformer), before, strict=True))


def test_statistics_stay_off_a_compiled_graph() -> None:
    model = tiny_wan()
    x = torch.randn(1, 16, 12, 8, 8)
    enc = torch.randn(1, 7, 32)
    torch._dynamo.reset()
    from freeloc.testing import _without_runtime_type_checks  # the suite's checker is not traceable

    with freeloc.enable(model, method="vrpr", trained_frames=TRAINED_VIDEO) as session, torch.no_grad(), \
            _without_runtime_type_checks():
        eager = model(x, torch.tensor([500]), enc, return_dict=False)[0]
        compiled = torch.compile(model, fullgraph=True, backend="eager")(x, torch.tensor([500]), enc,
                                                                        return_dict=False)[0]
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=0)
    assert [s.calls for s in session.layers] == [1, 1]  # the eager call only


@pytest.mark.parametrize("method", ["vrpr", "tsa", "ultravico"])
def test_a_compiled_hooked_model_trains_like_the_eager_one(method: str) -> None:
    """Backward through the opaque ``freeloc::attend`` operator of a compiled graph (AOTAutograd traces the
    forward and the backward) gives the eager hooked model's gradients."""
    from freeloc.testing import _without_runtime_type_checks

    x = torch.randn(1, 16, 12, 8, 8, generator=torch.Generator().manual_seed(2))
    enc = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(3))
    grads = []
    for compiled in (False, True):
        model = tiny_wan()
        torch._dynamo.reset()
        with freeloc.enable(model, method=method, trained_frames=TRAINED_VIDEO), _without_runtime_type_checks():
            run = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
            run(x, torch.tensor([500]), enc, return_dict=False)[0].square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch._dynamo.reset()
    eager, compiled_grads = grads
    assert eager.keys() == compiled_grads.keys() and "blocks.0.attn1.to_q.weight" in eager
    for name in eager:
        torch.testing.assert_close(compiled_grads[name], eager[name], atol=1e-5, rtol=1e-4, msg=name)
