"""freeloc.testing itself: it catches a broken adapter, reports checks that do not apply, and builds pytest tests."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from freeloc.adapter import ModelClass, ModelData
from freeloc.registry import REGISTRY
from freeloc.rotary import RotaryLayout
from freeloc.testing import (
    CHECKS,
    ConformanceCase,
    ConformanceError,
    check_forced_plain_bands_equal_unhooked,
    conformance_tests,
    run_conformance,
)

diffusers = pytest.importorskip("diffusers", reason="the adapter made wrong here is the Wan one (extra 'diffusers')")

from freeloc.adapters.wan import WanAdapter  # noqa: E402


class WrongThetaWan(diffusers.WanTransformer3DModel):
    """A Wan transformer under another class name, so that the adapter below is the one found for it."""


class WrongThetaAdapter(WanAdapter):
    """The Wan adapter with a rotary layout not read from the model (theta 500 instead of 10000)."""

    model_data = ModelData(classes=(ModelClass("WrongThetaWan", trained_video_frames=21),), temporal_factor=4)

    def rotary_layout(self) -> RotaryLayout:
        return dataclasses.replace(super().rotary_layout(), theta=500.0)


def make() -> torch.nn.Module:
    torch.manual_seed(0)
    return WrongThetaWan(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                         out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2).eval()


def run(model: torch.nn.Module, frames: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return model(torch.randn(1, 16, frames, 4, 4, generator=g), torch.tensor([500]),
                     torch.randn(1, 3, 32, generator=g), return_dict=False)[0]


CASE = ConformanceCase("wrong-theta", make, run, trained_video_frames=21, trained_latent=6)


def test_a_wrong_rotary_layout_fails_the_forced_plain_band_check_only() -> None:
    REGISTRY.register(WrongThetaAdapter)
    try:
        results = run_conformance(CASE, raise_on_failure=False)
        with pytest.raises(ConformanceError, match=r"1 of 1 conformance checks failed:\n\nwrong-theta / "
                                                   r"forced_plain_bands_equal_unhooked: failed \(AssertionError: "
                                                   r"wrong-theta: attention forced through attend"):
            run_conformance(CASE, checks=[check_forced_plain_bands_equal_unhooked])
    finally:
        REGISTRY.unregister(WrongThetaAdapter)
    assert [(r.check, r.outcome) for r in results if r.outcome != "passed"] == [
        ("forced_plain_bands_equal_unhooked", "failed")]
    assert len(results) == len(CHECKS) == 11


def test_checks_that_do_not_apply_are_skipped_with_the_reason() -> None:
    no_rope = dataclasses.replace(CASE, name="no-rope", position_methods=False)
    result = run_conformance(no_rope, checks=[check_forced_plain_bands_equal_unhooked])
    assert [(r.outcome, r.detail) for r in result] == [("skipped", "no-rope has no RoPE: a VRPR band cannot be "
                                                                   "forced on it")]
    absent = dataclasses.replace(CASE, name="absent", skip_reason="its model code is not here")
    results = run_conformance(absent)
    assert {(r.outcome, r.detail) for r in results} == {("skipped", "its model code is not here")}
    assert str(results[0]) == "absent / direct_equals_unhooked: skipped (its model code is not here)"


def test_conformance_tests_makes_one_pytest_test_per_case_and_check() -> None:
    test = conformance_tests([CASE, dataclasses.replace(CASE, name="other")])
    (mark,) = test.pytestmark
    assert mark.name == "parametrize" and mark.args[0] == ("case", "check")
    ids = [p.id for p in mark.args[1]]
    assert len(ids) == 2 * len(CHECKS) and ids[0] == "wrong-theta-direct_equals_unhooked"
    assert ids[-1] == "other-copies_and_pickles"
    with pytest.raises(ValueError, match="expected a ConformanceCase or a non-empty sequence of them"):
        conformance_tests([])
