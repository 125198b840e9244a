"""The Open-Sora 2.0 adapter beyond the conformance suite, on the real ``MMDiTModel`` (vendored copy)."""

from __future__ import annotations

import opensora_vendored as vendored  # noqa: I001  (tests/ is on sys.path: see conftest.py)
import pytest
import torch
from freeloc.adapters.opensora import OpenSoraAdapter

import freeloc
from freeloc.registry import adapter_for_class

pytestmark = pytest.mark.skipif(vendored.MISSING is not None, reason=str(vendored.MISSING))


def run(model: torch.nn.Module, frames: int) -> torch.Tensor:
    with torch.no_grad():
        return model(**vendored.inputs(model, frames))


def test_found_by_class_name_with_the_declared_trained_length() -> None:
    m = vendored.build(vendored.RELEASE)
    with freeloc.enable(m, num_frames=129 * 4 - 3, plan="uniform") as session:
        ctx = m.double_blocks[0].processor.ctx
        assert ctx.trained_frames == 33  # 129 video frames, HunyuanVideo VAE
        assert ctx.grid.expected_frames == 129
    assert [s.model for s in session.layers] == ["transformer"] * 4  # 2 double-stream, then 2 single-stream blocks
    assert adapter_for_class(type(m).__name__) is OpenSoraAdapter


@pytest.mark.parametrize("variant,interleaved", [(vendored.FLUX_DEFAULTS, True), (vendored.RELEASE, False)])
def test_rotary_layout_follows_the_rope_kernel(variant: dict, interleaved: bool) -> None:
    layout = OpenSoraAdapter(vendored.build(variant)).rotary_layout()
    assert (layout.t_dim, layout.h_dim, layout.w_dim, layout.interleaved) == (8, 12, 12, interleaved)


def test_img_ids_out_of_order_are_rejected() -> None:
    m = vendored.build(vendored.FLUX_DEFAULTS)
    kw = vendored.inputs(m, 24, batch=1)
    kw["img_ids"] = kw["img_ids"].flip(1)
    with freeloc.enable(m, plan="uniform", trained_frames=21):
        with pytest.raises(ValueError, match="frame-major order"):
            m(**kw)


def test_selective_checkpointing_forward_is_hooked_the_same() -> None:
    """``grad_ckpt_settings`` makes the model's forward ``forward_selective_ckpt``: the same hooked numbers."""
    plain, ckpt = vendored.build(vendored.RELEASE), vendored.build(vendored.RELEASE, grad_ckpt_settings=(1, 1))
    assert ckpt.forward.__func__ is type(ckpt).forward_selective_ckpt
    outs = []
    for m in (plain, ckpt):
        with freeloc.enable(m, method="tsa", trained_frames=21) as session:
            outs.append(run(m, 24))
        assert all(s.calls == 1 for s in session.layers)
    assert torch.equal(outs[0], outs[1])


def test_ultravico_needs_a_chosen_harmonic_band() -> None:
    m = vendored.build(vendored.FLUX_DEFAULTS)
    processors = [b.processor for b in (*m.double_blocks, *m.single_blocks)]
    with pytest.raises(ValueError, match=r"UltraViCo on MMDiTModel \(transformer\).*no such setting is published"):
        freeloc.enable(m, method="ultravico")
    assert [b.processor for b in (*m.double_blocks, *m.single_blocks)] == processors
    with freeloc.enable(m, method="ultravico", method_params={"beta": 0.6, "period": 63}) as session:
        assert session.plan.resolve(0, 132, 33) == freeloc.UltraViCo(window=16, beta=0.6, period=63)
