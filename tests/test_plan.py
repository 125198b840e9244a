"""Tests of freeloc.plan: LayerPlan as validated, versioned JSON data, and resolving it per layer."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from freeloc import PI, TSA, VRPR, LayerPlan, RIFLEx, SlidingWindow
from freeloc.methods import METHODS

WAN = "wan2.1-t2v-1.3b"
WAN_TSA = [0, 1, 4, 6, 7, 9, 10, 11, 13, 14, 15, 16, 18, 22, 23, 24, 25]
WAN_VRPR = [2, 3, 5, 8, 12, 17, 19, 20, 21, 26, 27, 28, 29]
ALL_METHODS = ["direct", *sorted(METHODS)]
#: Explicit parameters valid for each method (RIFLEx's num_frames is filled in at run time).
EXPLICIT: dict[str, dict[str, Any]] = {
    "direct": {},
    "vrpr": {"w1": 10, "w2": 14, "g1": 2, "g2": 8, "cap": 20},
    "tsa": {"d1": 4, "d2": 12},
    "pi": {"scale": 2.5},
    "ntk": {"scale": 3.0},
    "yarn": {"scale": 4.0, "trained_frames": 21},
    "riflex": {"k": 3},
    "sliding-window": {"window": 5, "sink": False},
    "key-shift": {"shift": -4},
    "ultravico": {"alpha": 0.8, "window": 6},
    "tsa+vrpr": {"pattern": {"d1": 4, "d2": 12, "stripe": 0.125, "sink_group": 8, "sink_window": 12, "cap": 20},
                 "positions": {"w1": 10, "w2": 14, "g1": 2, "g2": 8, "cap": 20}},
    "window+vrpr": {"pattern": {"window": 5, "sink": True},
                    "positions": {"w1": 10, "w2": 14, "g1": 2, "g2": 8, "cap": 20}},
}


def rich_plan() -> LayerPlan:
    """A plan that uses every field: one layer per method, explicit params, scores, model, meta."""
    methods = ALL_METHODS
    return LayerPlan(
        methods=list(methods),
        params=[dict(EXPLICIT[m]) if i % 2 else {} for i, m in enumerate(methods)],
        scores={"position": [0.1 * i for i in range(len(methods))], "context": [1.5] * len(methods)},
        model={"name": "toy", "class": "ToyDiT", "num_layers": len(methods)},
        trained_frames=21,
        meta={"source": "test", "probe": {"shifts": [20, 40], "prompts": ["a cat"]}},
    )


def valid_dict() -> dict[str, Any]:
    return LayerPlan.from_lists([0], [1], num_layers=2, trained_frames=21).to_dict()


# ---------------------------------------------------------------------------------------- JSON
def test_json_round_trip_keeps_every_field() -> None:
    plan = rich_plan()
    text = plan.to_json()
    again = LayerPlan.from_json(text)
    assert again == plan
    assert again.to_json() == text
    data = json.loads(text)
    assert data["schema"] == "freeloc.layer_plan" and data["version"] == 1
    assert [layer["method"] for layer in data["layers"]] == ALL_METHODS


def test_dict_round_trip() -> None:
    plan = rich_plan()
    assert LayerPlan.from_dict(plan.to_dict()) == plan


def test_save_and_load(tmp_path: Path) -> None:
    plan = rich_plan()
    path = plan.save(tmp_path / "plan.json")
    assert path.read_text(encoding="utf-8").endswith("}\n")
    assert LayerPlan.load(path) == plan
    assert LayerPlan.load(str(path)) == plan


def test_load_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="broken.json.*not valid JSON"):
        LayerPlan.load(path)


@settings(max_examples=40, deadline=None)
@given(
    methods=st.lists(st.sampled_from(["direct", "vrpr", "tsa", "pi", "sliding-window"]),
                     min_size=1, max_size=12),
    trained=st.one_of(st.none(), st.integers(1, 64)),
    seed=st.floats(-1e3, 1e3, allow_nan=False),
)
def test_json_round_trip_property(methods: list[str], trained: int | None, seed: float) -> None:
    plan = LayerPlan(methods=methods, scores={"context": [seed] * len(methods)}, trained_frames=trained)
    assert LayerPlan.from_json(plan.to_json()) == plan


# ---------------------------------------------------------------------------------------- shipped
def test_shipped_lists_the_wan_plan() -> None:
    assert WAN in LayerPlan.shipped()


def test_published_wan_plan_matches_the_reference_lists() -> None:
    plan = LayerPlan.published(WAN)
    assert plan.num_layers == 30
    assert plan.layers_of("tsa") == WAN_TSA
    assert plan.layers_of("vrpr") == WAN_VRPR
    assert plan.layers_of("direct") == []
    assert plan.trained_frames == 21
    assert plan.params == [{}] * 30
    assert plan.model == {"name": "Wan2.1-T2V-1.3B", "class": "WanTransformer3DModel", "num_layers": 30,
                          "num_attention_heads": 12, "attention_head_dim": 128}
    assert plan.meta["source"] == "FreeLOC reference code (Wan2.1-T2V-1.3B)"
    assert plan.summary().startswith("30 layers: tsa 17 (0-1, 4, 6-7, 9-11, 13-16, 18, 22-25), "
                                     "vrpr 13 (2-3, 5, 8, 12, 17, 19-21, 26-29)")
    plan.check_layers(30)


def test_published_plan_equals_from_lists() -> None:
    plan = LayerPlan.published(WAN + ".json")
    rebuilt = LayerPlan.from_lists(WAN_TSA, WAN_VRPR, 30, trained_frames=21, model=plan.model, meta=plan.meta)
    assert rebuilt == plan


def test_published_unknown_name_lists_the_shipped_ones() -> None:
    with pytest.raises(ValueError, match=r"'wan9'.*wan2\.1-t2v-1\.3b"):
        LayerPlan.published("wan9")


# ---------------------------------------------------------------------------------------- constructors
def test_uniform_gives_every_layer_its_own_params() -> None:
    plan = LayerPlan.uniform("sliding-window", 4, window=3)
    assert plan.methods == ["sliding-window"] * 4
    assert plan.params == [{"window": 3}] * 4
    plan.params[0]["window"] = 9
    assert plan.params[1] == {"window": 3}
    assert plan.resolve(2, num_frames=40, trained_frames=21) == SlidingWindow(window=3)


def test_from_lists_fills_unlisted_layers_with_direct() -> None:
    plan = LayerPlan.from_lists([0, 3], [1], num_layers=5)
    assert plan.methods == ["tsa", "vrpr", "direct", "tsa", "direct"]
    assert plan.summary() == "5 layers: tsa 2 (0, 3), direct 2 (2, 4), vrpr 1 (1)"


# ---------------------------------------------------------------------------------------- validation
def _mutate(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    d = copy.deepcopy(valid_dict())
    target = d
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return d


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (_mutate(("schema",), "freeloc.plan"), r"schema.*'freeloc\.plan'.*'freeloc\.layer_plan'"),
        (_mutate(("version",), 2), r"unsupported layer plan version 2.*version 1"),
        (_mutate(("layers", 1, "method"), "vrpx"), r"layer 1: unknown method 'vrpx'.*'tsa'.*'vrpr'"),
        (_mutate(("layers", 0, "params"), {"d1": 30, "d2": 24}), r"layer 0 \('tsa'\).*d1=30, d2=24"),
        (_mutate(("layers", 0, "params"), {"d3": 1}), r"layer 0 \('tsa'\).*\['d3'\].*accepted"),
        (_mutate(("layers", 1, "params"), {"cap": 5}), r"layer 1 \('vrpr'\): bad params \{'cap': 5\}.*cap=5"),
        (_mutate(("layers", 1, "params"), "w1=10"),
         r"layer 1 \('vrpr'\): params must be a dict, got 'w1=10'"),
        (_mutate(("layers", 1, "params"), {"w1": 20, "w2": 10, "g1": 2, "g2": 8, "cap": 20}),
         r"w1=20, w2=10"),
        (_mutate(("layers", 0), {"method": "direct", "params": {"x": 1}}),
         r"layer 0 is 'direct'.*\{'x': 1\}"),
        (_mutate(("layers", 0, "extra"), 1), r"layer 0: unknown key\(s\) \['extra'\]"),
        (_mutate(("layers",), []), r"'layers' must be a non-empty list"),
        (_mutate(("scores",), {"context": [0.1, 0.2, 0.3]}), r"scores\['context'\] has 3 values.*2 layers"),
        (_mutate(("scores",), {"context": ["high", 0.2]}), r"scores\['context'\].*'high'"),
        (_mutate(("trained_frames",), 0), r"'trained_frames'.*got 0"),
        (_mutate(("model",), {"num_layers": 30}), r"num_layers'\] is 30 but the plan has 2 layers"),
        (_mutate(("layer_count",), 2), r"unknown key\(s\) \['layer_count'\]"),
    ],
)
def test_from_dict_rejects_invalid_plans(data: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LayerPlan.from_dict(data)


def test_from_json_rejects_a_non_object() -> None:
    with pytest.raises(ValueError, match="must be a JSON object, got list"):
        LayerPlan.from_json("[1, 2]")


def test_constructor_validates_too() -> None:
    with pytest.raises(ValueError, match=r"unknown method 'vprp'"):
        LayerPlan(methods=["tsa", "vprp"])
    with pytest.raises(ValueError, match=r"scores\['position'\] has 1 values but the plan has 2 layers"):
        LayerPlan(methods=["tsa", "vrpr"], scores={"position": [0.5]})
    with pytest.raises(ValueError, match=r"params must be a list with one dict per layer \(2 layers\), "
                                         r"got 1"):
        LayerPlan(methods=["tsa", "vrpr"], params=[{}])


@pytest.mark.parametrize(
    ("tsa", "vrpr", "match"),
    [
        ([0, 30], [1], r"layer index 30 in tsa_layers is out of range for num_layers=30.*0\.\.29"),
        ([0], [-1], r"layer index -1 in vrpr_layers is out of range"),
        ([0, 2], [2], r"layer 2 is listed in both tsa_layers and vrpr_layers"),
        ([4, 4], [], r"layer 4 is listed twice in tsa_layers"),
    ],
)
def test_from_lists_rejects_bad_indices(tsa: list[int], vrpr: list[int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LayerPlan.from_lists(tsa, vrpr, num_layers=30)


@pytest.mark.parametrize("layer", [30, -1, 100])
def test_resolve_rejects_layer_index_out_of_range(layer: int) -> None:
    plan = LayerPlan.published(WAN)
    with pytest.raises(ValueError, match=rf"layer index {layer} is out of range.*30 layers.*0\.\.29"):
        plan.resolve(layer, num_frames=81)


def test_check_layers_names_both_counts() -> None:
    plan = LayerPlan.published(WAN)
    with pytest.raises(ValueError, match=r"Wan2\.1-T2V-1\.3B.*has 30 layers but the model has 40"):
        plan.check_layers(40)


# ---------------------------------------------------------------------------------------- resolve
@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("explicit", [False, True], ids=["derived", "explicit"])
@pytest.mark.parametrize("num_frames", [1, 9, 20, 21])
def test_resolve_is_plain_attention_at_and_below_the_trained_length(
    method: str, explicit: bool, num_frames: int
) -> None:
    params = EXPLICIT[method] if explicit else {}
    plan = LayerPlan(methods=[method], params=[dict(params)], trained_frames=21)
    assert plan.resolve(0, num_frames=num_frames) is None
    assert plan.resolve(0, num_frames=num_frames + 5, trained_frames=num_frames + 5) is None


@pytest.mark.parametrize(("num_frames", "setting"), [(81, (10, 14, 2, 8)), (41, (12, 20, 2, 8))])
def test_resolve_published_vrpr_setting(num_frames: int, setting: tuple[int, int, int, int]) -> None:
    plan = LayerPlan.published(WAN)
    for layer in WAN_VRPR:
        v = plan.resolve(layer, num_frames=num_frames)
        assert isinstance(v, VRPR)
        assert (v.w1, v.w2, v.g1, v.g2, v.cap) == (*setting, 20)
    for layer in WAN_TSA:
        assert plan.resolve(layer, num_frames=num_frames) == TSA(cap=20)


def test_resolve_derives_settings_for_other_lengths() -> None:
    plan = LayerPlan.published(WAN)
    v = plan.resolve(2, num_frames=61)
    assert v == VRPR.for_length(61, 21)
    assert isinstance(v, VRPR) and v.violations(61) == []
    assert plan.resolve(2, num_frames=61, trained_frames=41) == VRPR.for_length(61, 41)


@pytest.mark.parametrize("method", [m for m in ALL_METHODS if m != "direct"])
def test_resolve_honours_explicit_params(method: str) -> None:
    plan = LayerPlan(methods=["direct", method], params=[{}, dict(EXPLICIT[method])], trained_frames=21)
    got = plan.resolve(1, num_frames=81)
    want = {"method": method, **EXPLICIT[method]}
    if method == "riflex":
        want["num_frames"] = 81  # the run-time length
    assert got is not None and got.to_dict() == {**got.to_dict(), **want}
    assert got == type(got)(**{k: v for k, v in want.items() if k != "method"})
    assert plan.resolve(0, num_frames=81) is None


@pytest.mark.parametrize(("method", "given"), [
    ("tsa", {"d1": 6}),
    ("ultravico", {"alpha": 0.8}),
    ("yarn", {"alpha": 1.5}),
    ("sliding-window", {"sink": False}),
    ("vrpr", {"g2": 6}),
    ("tsa+vrpr", {"pattern": {"d1": 6}}),
    ("window+vrpr", {"positions": {"g2": 6}}),
])
def test_resolve_keeps_derived_settings_the_params_leave_out(method: str, given: dict[str, Any]) -> None:
    # 33 trained frames (HunyuanVideo), where the derived settings differ from the classes' defaults
    plan = LayerPlan.uniform(method, 1, **given)
    got = plan.resolve(0, num_frames=132, trained_frames=33)
    derived = METHODS[method].for_length(132, 33)
    assert got is not None and derived is not None and got != derived
    want = derived.to_dict()
    for key, value in given.items():
        want[key] = {**want[key], **value} if isinstance(value, dict) else value
    assert got.to_dict() == want


def test_resolve_derived_baselines() -> None:
    plan = LayerPlan(methods=["pi", "sliding-window", "riflex"], params=[{}, {}, {"k": 2, "num_frames": 99}],
                     trained_frames=21)
    assert plan.resolve(0, num_frames=42) == PI(scale=2.0)
    assert plan.resolve(1, num_frames=42) == SlidingWindow(window=10)
    assert plan.resolve(2, num_frames=42) == RIFLEx(k=2, num_frames=99)


def test_resolve_riflex_without_k_says_k_is_needed() -> None:
    plan = LayerPlan.uniform("riflex", 2)
    plan.trained_frames = 21
    with pytest.raises(ValueError, match=r"layer 1 uses 'riflex', which needs its intrinsic frequency "
                                         r"index k"):
        plan.resolve(1, num_frames=81)


def test_resolve_needs_a_trained_length() -> None:
    plan = LayerPlan.uniform("vrpr", 3)
    with pytest.raises(ValueError, match=r"layer 0 \('vrpr'\) needs the model's trained length"):
        plan.resolve(0, num_frames=81)
    assert plan.resolve(0, num_frames=81, trained_frames=21) == VRPR.for_length(81, 21)


@pytest.mark.parametrize("num_frames", [0, -3])
def test_resolve_rejects_bad_num_frames(num_frames: int) -> None:
    plan = LayerPlan.published(WAN)
    with pytest.raises(ValueError, match=rf"num_frames must be a positive int.*got {num_frames}"):
        plan.resolve(0, num_frames=num_frames)


@pytest.mark.parametrize("depth", [200_000, 5_000])
def test_a_deeply_nested_file_is_refused_naming_the_file(tmp_path: Path, depth: int) -> None:
    """JSON nested past Python's recursion limit (in the file's top level, or inside a valid plan's meta):
    one ValueError that names the file, not a RecursionError."""
    path = tmp_path / "deep.json"
    if depth > 10_000:
        path.write_text("[" * depth + "]" * depth)
    else:
        plan = LayerPlan.uniform("vrpr", 2).to_dict()
        text = json.dumps(plan)
        path.write_text(text.replace('"meta": {}', '"meta": {"deep": ' + "[" * depth + "]" * depth + "}", 1))
    with pytest.raises(ValueError, match=rf"{path.name}: layer plan is nested too deeply"):
        LayerPlan.load(path)


# ---------------------------------------------------------------------------------------- length ranges
def ranged_plan() -> LayerPlan:
    from freeloc.plan import LengthRange

    return LayerPlan(["vrpr", "tsa", "direct"], trained_frames=21,
                     ranges=[LengthRange(3, ["tsa+vrpr", "tsa", "direct"]),
                             LengthRange(6.5, ["tsa", "sliding-window", "tsa"], [{}, {"window": 4}, {}])])


def test_length_ranges_choose_the_methods_by_the_length_ratio() -> None:
    plan = ranged_plan()
    assert [type(plan.resolve(0, f)).__name__ for f in (41, 62, 63, 136, 137, 400)] == [
        "VRPR", "VRPR", "TSAVRPR", "TSAVRPR", "TSA", "TSA"]  # 63 = 3 x 21; 137 > 6.5 x 21 = 136.5
    assert plan.resolve(1, 200) == SlidingWindow(4)
    assert plan.resolve(2, 100) is None and plan.resolve(2, 200) is not None
    assert plan.resolve(0, 21) is None  # not longer than trained: plain attention in every range
    assert plan.all_methods() == {"vrpr", "tsa", "direct", "tsa+vrpr", "sliding-window"}
    assert "from 3x: tsa+vrpr 1, tsa 1, direct 1" in plan.summary()


def test_length_ranges_round_trip_and_old_plans_are_written_as_before() -> None:
    plan = ranged_plan()
    again = LayerPlan.from_json(plan.to_json())
    assert again == plan and again.to_json() == plan.to_json()
    assert "ranges" not in json.loads(LayerPlan(["vrpr"]).to_json())


@pytest.mark.parametrize("ranges,match", [
    ([(1.0, ["tsa"] * 3)], "from_ratio must be a number > 1"),
    ([(4, ["tsa"] * 3), (3, ["tsa"] * 3)], "larger than the previous range's, got 3 after 4"),
    ([(4, ["tsa"] * 2)], r"need one entry per layer \(3 layers\)"),
    ([(4, ["tsa", "tsa", "freenoise"])], r"from 4x\): layer 2: unknown method 'freenoise'"),
])
def test_bad_length_ranges_are_refused(ranges: list, match: str) -> None:
    from freeloc.plan import LengthRange

    with pytest.raises(ValueError, match=match):
        LayerPlan(["vrpr", "tsa", "direct"], ranges=[LengthRange(r, m) for r, m in ranges])
    data = LayerPlan(["vrpr", "tsa", "direct"]).to_dict() | {"ranges": [{"from_ratio": 4, "layer": []}]}
    with pytest.raises(ValueError, match=r"exactly the keys \['from_ratio', 'layers'\]"):
        LayerPlan.from_dict(data)


def test_check_for_model_resolves_every_range() -> None:
    from freeloc.plan import LengthRange

    plan = LayerPlan(["vrpr", "tsa"], ranges=[LengthRange(5, ["riflex", "tsa"])])
    plan.check_for_model("X", 21, 81)  # 81 < 5 x 21: the range does not apply at this length
    with pytest.raises(ValueError, match="layer 0 uses 'riflex'"):
        plan.check_for_model("X", 21, None)


def test_params_valid_only_at_a_longer_trained_length_wait_for_the_model() -> None:
    """VRPR's near tier w1 = 25 needs a cap of at least 24: fine for a 33-frame model, not for Wan's 21."""
    params = {"w1": 25, "w2": 30}
    plan = LayerPlan(methods=["vrpr"], params=[params])  # no trained length: checked against the model
    plan.check_for_model("HunyuanVideoTransformer3DModel", 33, 66)
    with pytest.raises(ValueError, match=r"layer 0 \('vrpr'\).*w1=25, cap=20"):
        plan.check_for_model("WanTransformer3DModel", 21, 81)
    assert LayerPlan(methods=["vrpr"], params=[params], trained_frames=33).resolve(0, 66) == VRPR(25, 30, 2, 8, 32)
    with pytest.raises(ValueError, match=r"layer 0 \('vrpr'\): bad params .* at 21 trained frames: .*w1=25, cap=20"):
        LayerPlan(methods=["vrpr"], params=[params], trained_frames=21)
    with pytest.raises(ValueError, match=r"layer 0 \('tsa'\): bad params \{'d1': -1\}: TSA.d1 must be"):
        LayerPlan(methods=["tsa"], params=[{"d1": -1}])  # wrong at every trained length
