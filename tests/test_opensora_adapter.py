"""The Open-Sora 2.0 adapter beyond the conformance suite (stand-in model; real class when installed)."""

from __future__ import annotations

import importlib.util

import opensora_standin as standin  # noqa: I001  (tests/ is on sys.path: see conftest.py)
import pytest
import torch
from freeloc.adapters.opensora import OpenSoraAdapter

import freeloc


def model(liger: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    return standin.MMDiTModel(standin.MMDiTConfig(use_liger_rope=liger)).eval()


def test_found_by_class_name_with_the_data_trained_length() -> None:
    m = model()
    with freeloc.enable(m, num_frames=129 * 4 - 3, plan="uniform") as session:
        ctx = m.double_blocks[0].processor.ctx
        assert ctx.trained_frames == 33  # 129 video frames, HunyuanVideo VAE
        assert ctx.grid.expected_frames == 129
    assert [s.model for s in session.layers] == ["transformer", "transformer"]


@pytest.mark.parametrize("liger,expected", [(False, True), (True, False)])
def test_rotary_layout_follows_the_rope_kernel(liger: bool, expected: bool) -> None:
    layout = OpenSoraAdapter(model(liger)).rotary_layout()
    assert (layout.t_dim, layout.h_dim, layout.w_dim, layout.interleaved) == (8, 8, 8, expected)


def test_img_ids_out_of_order_are_rejected() -> None:
    m = model()
    ids = standin.make_ids(1, 24, 3, 4).flip(1)
    img = torch.randn(1, ids.shape[1], 8)
    with freeloc.enable(m, plan="uniform", trained_frames=21):
        with pytest.raises(ValueError, match="frame-major order"):
            m(img, ids, torch.randn(1, 5, 16), torch.zeros(1, 5, 3), torch.tensor([0.5]), torch.randn(1, 8))


@pytest.mark.skipif(importlib.util.find_spec("opensora") is None,
                    reason="the real opensora package is not installed (it needs flash-attn, liger-kernel, "
                           "colossalai); the adapter is checked on the stand-in in tests/opensora_standin.py")
def test_real_opensora_class_is_supported() -> None:
    from opensora.models.mmdit.model import MMDiTModel  # type: ignore[import-not-found]

    assert MMDiTModel.__name__ in OpenSoraAdapter.model_classes
    assert all(hasattr(MMDiTModel, name) for name in ("forward_ckpt", "prepare_block_inputs"))
