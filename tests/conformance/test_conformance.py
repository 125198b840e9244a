"""Checks every adapter must pass, parametrized over the cases in ``cases_*.py`` of this folder.

To add a model: write ``cases_<model>.py`` with a ``CASES`` list of :class:`ConformanceCase`.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers", reason="the adapters need diffusers (extra 'diffusers')")

import freeloc  # noqa: E402
from freeloc.adapter import LayerContext  # noqa: E402
from freeloc.attention import attend  # noqa: E402

from .case import ConformanceCase  # noqa: E402


def _cases() -> list[ConformanceCase]:
    cases: list[ConformanceCase] = []
    here = Path(__file__).parent
    for info in sorted(pkgutil.iter_modules([str(here)]), key=lambda m: m.name):
        if info.name.startswith("cases_"):
            cases.extend(importlib.import_module(f"{__package__}.{info.name}").CASES)
    return cases


CASES = _cases()
pytestmark = pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])


def processors(model: torch.nn.Module) -> list[Any]:
    return [m.processor for m in model.modules() if hasattr(m, "processor")]


def snapshot(model: torch.nn.Module) -> dict[str, Any]:
    return {
        "processors": processors(model),
        "hooks": (dict(model._forward_pre_hooks), dict(model._forward_hooks)),
        "dict_keys": sorted(model.__dict__),
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def assert_restored(before: dict[str, Any], model: torch.nn.Module) -> None:
    after = snapshot(model)
    assert all(a is b for a, b in zip(before["processors"], after["processors"], strict=True))
    assert before["hooks"] == after["hooks"] and before["dict_keys"] == after["dict_keys"]
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])


def enable(case: ConformanceCase, model: torch.nn.Module, **kwargs: Any) -> freeloc.Session:
    return freeloc.enable(model, trained_frames=case.trained_video_frames, **kwargs)


def uniform(case: ConformanceCase) -> dict[str, Any]:
    """The uniform plan for the model: VRPR everywhere, or TSA where the model has no RoPE."""
    return dict(plan="uniform") if case.position_methods else dict(method="tsa")


def test_identity_equals_unhooked(case: ConformanceCase) -> None:
    model = case.make_model()
    base = case.run(model, case.long_frames)
    with enable(case, model, method="direct"):
        direct = case.run(model, case.long_frames)
    torch.testing.assert_close(direct, base, atol=1e-6, rtol=0)


def test_identity_plan_equals_unhooked(case: ConformanceCase) -> None:
    model = case.make_model()
    base = case.run(model, case.long_frames)
    with enable(case, model, method="direct") as probe:
        n = len(probe.layers)
    with enable(case, model, plan=freeloc.LayerPlan.uniform("direct", n)):
        out = case.run(model, case.long_frames)
    torch.testing.assert_close(out, base, atol=1e-6, rtol=0)


def test_at_trained_length_equals_unhooked(case: ConformanceCase) -> None:
    model = case.make_model()
    base = case.run(model, case.trained_latent)
    with enable(case, model, **uniform(case)):
        out = case.run(model, case.trained_latent)
    assert torch.equal(out, base)


def test_forced_plain_band_attention_equals_unhooked(case: ConformanceCase) -> None:
    """Every layer through the adapter's own q/k/v and ``attend`` with one plain band == the model."""
    if not case.position_methods:
        pytest.skip(f"{case.name} has no RoPE: a VRPR band cannot be forced on it")
    model = case.make_model()
    f = case.long_frames
    base = case.run(model, f)
    with enable(case, model, method="direct") as probe:
        n = len(probe.layers)
    plain = freeloc.LayerPlan.uniform("vrpr", n, w1=f, w2=f + 1, g1=1, g2=1, cap=f - 1)
    with enable(case, model, plan=plain) as session:
        out = case.run(model, f)
    assert all(s.calls >= 1 for s in session.layers)
    torch.testing.assert_close(out, base, atol=2e-5, rtol=1e-4)


def test_long_video_within_cap_and_finite(case: ConformanceCase) -> None:
    model = case.make_model()
    f = case.long_frames
    direct = case.run(model, f)
    with enable(case, model, **uniform(case)) as session:
        out = case.run(model, f)
    assert torch.isfinite(out).all()
    assert (out - direct).abs().max() > 1e-5
    hooked = [s for s in session.layers if s.calls]
    assert hooked, "no layer was called"
    if case.position_methods:
        assert all(s.max_abs_distance <= case.trained_latent - 1 for s in hooked)
    else:
        assert all(s.density < 1.0 for s in hooked)


def test_removal_is_exact_also_after_an_exception(case: ConformanceCase) -> None:
    model = case.make_model()
    before = snapshot(model)
    base = case.run(model, case.long_frames)
    with enable(case, model, **uniform(case)):
        case.run(model, case.long_frames)
    assert_restored(before, model)
    with pytest.raises(RuntimeError, match="boom"):
        with enable(case, model, **uniform(case)):
            case.run(model, case.long_frames)
            raise RuntimeError("boom")
    assert_restored(before, model)
    handle = freeloc.enable(model, trained_frames=case.trained_video_frames, method="tsa")
    handle.remove()
    assert_restored(before, model)
    assert torch.equal(case.run(model, case.long_frames), base)


class _Recorder:
    """Records the first ``LayerContext.attend`` call of layer 0: its inputs and its output."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def wrap(self, original: Any) -> Any:
        recorder = self

        def attend_and_record(ctx: LayerContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, method: Any,
                              **kwargs: Any) -> torch.Tensor:
            out = original(ctx, q, k, v, method, **kwargs)
            if ctx.layer == 0 and not recorder.calls:
                recorder.calls.append(dict(q=q, k=k, v=v, method=method, kwargs=kwargs, out=out,
                                           grid=ctx.grid.value, rotary=ctx.rotary))
            return out

        return attend_and_record


def test_hooked_layer_equals_core_attend_and_text_is_dense(case: ConformanceCase,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Layer 0's attention equals the core's reference ``attend`` on its own q/k/v; text rows are dense."""
    model = case.make_model()
    recorder = _Recorder()
    monkeypatch.setattr(LayerContext, "attend", recorder.wrap(LayerContext.attend))
    with enable(case, model, method="tsa"):
        case.run(model, case.long_frames)
    assert recorder.calls, "layer 0 never attended through freeloc"
    c = recorder.calls[0]
    kw = c["kwargs"]
    ref = attend(c["q"], c["k"], c["v"], grid=c["grid"], method=c["method"], rotary=c["rotary"],
                 backend="reference", **kw)
    torch.testing.assert_close(c["out"], ref, atol=2e-5, rtol=1e-4)
    text_before, text_after = kw.get("text_before", 0), kw.get("text_after", 0)
    assert text_before + text_after == case.text_tokens
    if case.text_tokens:
        plain = attend(c["q"], c["k"], c["v"], grid=c["grid"], method=None, rotary=c["rotary"],
                       backend="reference", **kw)
        n = c["q"].shape[1]
        text_rows = list(range(text_before)) + list(range(n - text_after, n))
        # text queries attend every token with the original positions, whatever the method
        torch.testing.assert_close(ref[:, text_rows], plain[:, text_rows], atol=1e-6, rtol=0)
