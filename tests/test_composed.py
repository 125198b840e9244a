"""Composed methods (``tsa+vrpr``, ``window+vrpr``): the pattern's pairs at VRPR's positions.

Exactness of ``attend`` with them on every backend is in ``test_attend.py`` (they are in ``support.methods``);
here: what their bands are, for any length (hypothesis), serialization, plans, errors and a hooked model.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support import tiny_wan_and_run

import freeloc
from freeloc.composed import ComposedMethod, compose_bands
from freeloc.methods import method_from_dict


def relative(bands: freeloc.bands.BandSet) -> tuple[torch.Tensor, torch.Tensor]:
    """[F, F] effective relative distance of each attended frame pair, and which pairs are attended."""
    f = bands.num_frames
    r = torch.full((f, f), float("nan"), dtype=torch.float64)
    seen = torch.zeros(f, f, dtype=torch.bool)
    for b in bands.bands:
        r = torch.where(b.pairs, b.relative_distance(), r)
        seen |= b.pairs
    return r, seen


@st.composite
def settings_at_length(draw: st.DrawFn) -> tuple[type[ComposedMethod], int, int, int]:
    trained = draw(st.integers(3, 30))
    frames = draw(st.integers(trained + 1, 6 * trained))
    cls = draw(st.sampled_from([freeloc.TSAVRPR, freeloc.WindowVRPR]))
    tokens = draw(st.integers(1, 9))
    return cls, frames, trained, tokens


@settings(max_examples=80, deadline=None)
@given(settings_at_length())
def test_the_pairs_are_the_patterns_and_the_positions_vrprs(case: tuple[type[ComposedMethod], int, int, int]) -> None:
    cls, frames, trained, tokens = case
    method = cls.for_length(frames, trained)
    assert method is not None
    bands = method.band_set(frames, tokens, None)
    pattern = method.pattern.band_set(frames, tokens, None)
    # the same token pairs as the pattern (stripes included)
    assert torch.equal(bands.token_mask(tokens), pattern.token_mask(tokens))
    # at VRPR's relative distances, which stay in the trained range and are exact near the diagonal
    r, seen = relative(bands)
    r_vrpr, _ = relative(method.positions.band_set(frames, tokens, None))
    assert torch.equal(r[seen], r_vrpr[seen])
    cap = trained - 1
    assert float(r[seen].abs().max()) <= cap
    i, j = torch.meshgrid(torch.arange(frames), torch.arange(frames), indexing="ij")
    near = seen & ((i - j).abs() < method.positions.w1)
    assert torch.equal(r[near], (i - j)[near].double())
    both = seen & seen.T  # antisymmetric where both directions are attended
    assert torch.equal(r[both], -r.T[both])


@pytest.mark.parametrize("cls", [freeloc.TSAVRPR, freeloc.WindowVRPR])
def test_identity_at_or_below_the_trained_length(cls: type[ComposedMethod]) -> None:
    assert cls.for_length(21, 21) is None and cls.for_length(8, 21) is None
    assert cls.for_length(22, 21) is not None


def test_tsa_vrpr_brings_the_striped_tier_and_the_sink_into_the_trained_range() -> None:
    """At Wan's 4x the striped tier reaches distance 24 and the sink 80 with TSA alone; composed, at most 20."""
    tsa, composed = freeloc.TSA(cap=20), freeloc.TSAVRPR.for_length(81, 21)
    assert composed is not None
    r_tsa, seen_tsa = relative(tsa.band_set(81, 8))
    r_both, seen_both = relative(composed.band_set(81, 8))
    assert float(r_tsa[seen_tsa].abs().max()) == 24 and float(r_both[seen_both].abs().max()) == 20
    assert composed.band_set(81, 8).token_density(8) == tsa.token_density(81, 8)


@pytest.mark.parametrize("cls", [freeloc.TSAVRPR, freeloc.WindowVRPR])
def test_round_trips_through_dicts_and_plans(cls: type[ComposedMethod], tmp_path: object) -> None:
    method = cls.for_length(81, 21)
    assert method is not None
    assert method_from_dict(method.to_dict()) == method
    params = {k: v for k, v in method.to_dict().items() if k != "method"}
    plan = freeloc.LayerPlan([cls.name, "vrpr"], params=[params, {}], trained_frames=21)
    again = freeloc.LayerPlan.from_json(plan.to_json())
    assert again.resolve(0, 81) == method
    assert freeloc.LayerPlan([cls.name, "tsa"]).resolve(0, 81, 21) == method  # derived from the length


def test_bad_parts_are_refused_with_what_is_accepted() -> None:
    with pytest.raises(ValueError, match=r"TSAVRPR.pattern: .*'window'.*accepted parameters: \['d1', 'd2'"):
        method_from_dict({"method": "tsa+vrpr", "pattern": {"window": 3}, "positions": {}})
    with pytest.raises(ValueError, match=r"WindowVRPR.positions: .*accepted parameters: "
                                         r"\['w1', 'w2', 'g1', 'g2', 'cap'\]"):
        freeloc.WindowVRPR({"window": 4}, {"w1": 3, "spread": 2})
    with pytest.raises(ValueError, match="the pattern has 10 frames, the positions 12"):
        compose_bands(freeloc.TSA().band_set(10, 2), freeloc.VRPR.for_length(12, 5).band_set(12, 2), "x")


def test_a_hooked_model_runs_the_composed_methods() -> None:
    pytest.importorskip("diffusers", reason="the hooked model is a diffusers Wan (extra 'diffusers')")
    model, run = tiny_wan_and_run()
    plain = run()
    outs, farthest = {}, {}
    for name in ("tsa+vrpr", "window+vrpr", "tsa"):
        with freeloc.enable(model, method=name, trained_frames=9) as session:  # 3 latent frames: 4x
            outs[name] = run()
        assert [s.calls for s in session.layers] == [1, 1] and torch.isfinite(outs[name]).all()
        farthest[name] = max(s.max_abs_distance for s in session.layers)
    # the trained distances reach 2; TSA alone sees the first frame at original positions, up to 11 away
    assert farthest == {"tsa+vrpr": 2, "window+vrpr": 2, "tsa": 11}
    assert not torch.equal(outs["tsa+vrpr"], plain) and not torch.equal(outs["tsa+vrpr"], outs["tsa"])
    assert torch.equal(run(), plain)  # removed without a trace


def test_layer_statistics_name_the_method_of_the_length_range_in_effect() -> None:
    """A plan whose length range applies at this length: the hooked layers run the range's methods, and
    their statistics name those, not the plan's own entries."""
    pytest.importorskip("diffusers", reason="the hooked model is a diffusers Wan (extra 'diffusers')")
    from freeloc.plan import LengthRange

    model, run = tiny_wan_and_run()
    plan = freeloc.LayerPlan(["vrpr", "tsa"], ranges=[LengthRange(3, ["tsa+vrpr", "direct"])])
    with freeloc.enable(model, plan=plan, trained_frames=9) as session:  # 12 latent frames = 4 x 3: the range
        run()
        assert [s.method for s in session.layers] == ["tsa+vrpr", "direct"]
        assert [type(b.attn1.processor.last_method).__name__ for b in model.blocks] == ["TSAVRPR", "NoneType"]
    later = freeloc.LayerPlan(["vrpr", "tsa"], ranges=[LengthRange(5, ["tsa+vrpr", "direct"])])
    with freeloc.enable(model, plan=later, trained_frames=9) as session:  # 4x: below the range's 5x
        run()
        assert [s.method for s in session.layers] == ["vrpr", "tsa"]
