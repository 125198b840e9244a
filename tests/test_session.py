"""What ``freeloc.enable`` checks before it installs anything: plans and methods that would fail, or go
wrong, only at the first forward are refused (or warned about) at ``enable``, with the model untouched."""

from __future__ import annotations

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
