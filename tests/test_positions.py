"""Property tests of the temporal position methods (docs/method.md §2 and §6).

VRPR is checked directly against the properties of docs/method.md §2.6 (not through ``VRPR.violations``), against
hand-computed values of its tier formulas, and against its own fast checker ``_properties_hold``.
The baselines (PI, NTK, YaRN, RIFLEx) are checked against their textbook formulas.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jaxtyping import TypeCheckError

from freeloc.bands import BandSet
from freeloc.composed import TSAVRPR, WindowVRPR
from freeloc.logit_decay import UltraViCo
from freeloc.methods import METHODS, Method, method_from_dict
from freeloc.patterns import TSA, SlidingWindow
from freeloc.positions import NTK, PI, PUBLISHED_VRPR, VRPR, KeyShift, RIFLEx, YaRN, _properties_hold
from freeloc.rotary import RotaryLayout

TRAINED = (5, 13, 16, 21, 31, 33)


# ------------------------------------------------------------------------------------- helpers
def frame_delta(num_frames: int) -> torch.Tensor:
    """``i - j`` (query frame minus key frame) as a LongTensor [F, F]."""
    ar = torch.arange(num_frames)
    return ar[:, None] - ar[None, :]


def assert_vrpr_properties(v: VRPR, num_frames: int, trained_frames: int) -> None:
    """docs/method.md §2's properties, checked directly on ``relative_distance``."""
    f = num_frames
    r = v.relative_distance(f)
    d = frame_delta(f)
    assert r.dtype == torch.long and r.shape == (f, f)
    assert torch.equal(r.diagonal(), torch.zeros(f, dtype=torch.long))
    near = d.abs() < v.w1
    assert torch.equal(r[near], d[near]), "near tier must keep the exact distance"
    assert int(r.abs().max()) <= v.cap
    assert torch.equal(r, -r.T), "r must be antisymmetric"
    for i in range(f):
        # key moving farther into the past: j = i, i-1, ..., 0 -> r non-decreasing
        past = r[i, : i + 1].flip(0)
        assert bool((past[1:] >= past[:-1]).all()), f"row {i}: r decreases as a past key moves away"
        # key moving farther into the future: j = i, i+1, ..., F-1 -> r non-increasing
        future = r[i, i:]
        assert bool((future[1:] <= future[:-1]).all()), f"row {i}: r increases as a future key moves away"
    if f <= trained_frames:
        assert torch.equal(r, d), "for F <= T VRPR must be the identity"
        assert v.band_set(f).is_plain()
    else:
        assert v.cap == trained_frames - 1
    assert v.violations(f) == []


@st.composite
def lengths(draw: st.DrawFn) -> tuple[int, int]:
    """(F, T) with T a trained length and 1 <= F <= 8 T."""
    t = draw(st.sampled_from(TRAINED))
    f = draw(st.integers(min_value=1, max_value=8 * t))
    return f, t


@st.composite
def vrpr_params(draw: st.DrawFn) -> tuple[int, int, int, int, int, int]:
    """Any valid (w1, w2, g1, g2, cap) and a length F."""
    cap = draw(st.integers(1, 24))
    w1 = draw(st.integers(1, cap + 1))
    w2 = draw(st.integers(w1 + 1, w1 + 30))
    g1 = draw(st.integers(1, 6))
    g2 = draw(st.integers(g1, g1 + 24))
    f = draw(st.integers(1, 90))
    return w1, w2, g1, g2, cap, f


# ------------------------------------------------------------------------------------- VRPR properties
@settings(max_examples=120, deadline=None)
@given(lengths())
@example((41, 21))
@example((81, 21))
def test_for_length_properties(ft: tuple[int, int]) -> None:
    f, t = ft
    v = VRPR.for_length(f, t)
    assert_vrpr_properties(v, f, t)
    if f > t and (f, t) not in PUBLISHED_VRPR:
        # VRPR.derive's documented rule: the far tier ends exactly at the cap, the near tier keeps
        # at least half the trained range, g1 = 2, g2 a power of two >= 8
        assert (f - 1) // v.g2 + v.c2 == v.cap
        assert int(v.relative_distance(f).abs().max()) == v.cap
        assert v.w1 >= math.ceil(v.cap / 2)
        assert v.g1 == 2 and v.g2 >= 8 and v.g2 & (v.g2 - 1) == 0


@pytest.mark.parametrize("t", TRAINED)
@pytest.mark.parametrize("mult", [1, 2, 4, 8])
def test_for_length_properties_at_multiples(t: int, mult: int) -> None:
    f = mult * t
    v = VRPR.for_length(f, t)
    assert_vrpr_properties(v, f, t)
    if mult > 1 and (f, t) not in PUBLISHED_VRPR:
        # derived settings end the far tier at the cap: the whole trained range is used
        assert int(v.relative_distance(f).abs().max()) == t - 1


@pytest.mark.parametrize("f", [1, 2, 7, 20, 21])
def test_short_lengths_are_identity(f: int) -> None:
    v = VRPR.for_length(f, 21)
    assert v.is_identity_for(f)
    assert torch.equal(v.relative_distance(f), frame_delta(f))
    assert v.band_set(f).is_plain()


# ------------------------------------------------------------------------------------- published settings
@pytest.mark.parametrize(
    ("f", "expected"),
    [(41, (12, 20, 2, 8, 20)), (81, (10, 14, 2, 8, 20))],
)
def test_published_settings(f: int, expected: tuple[int, int, int, int, int]) -> None:
    v = VRPR.for_length(f, 21)
    assert (v.w1, v.w2, v.g1, v.g2, v.cap) == expected
    w1, w2, g1, g2, _ = expected
    assert v.c1 == w1 - math.ceil(w1 / g1) == math.trunc(w1 - w1 / g1)
    assert v.c2 == w2 - math.floor(w2 / g2) - math.floor((w2 - w1) / g1)


def test_published_constants_by_hand() -> None:
    v41, v81 = VRPR.for_length(41, 21), VRPR.for_length(81, 21)
    assert (v41.c1, v41.c2) == (6, 14)  # 12 - 6; 20 - 2 - 4
    assert (v81.c1, v81.c2) == (5, 11)  # 10 - 5; 14 - 1 - 2


# F = 81, (w1, w2, g1, g2, cap) = (10, 14, 2, 8, 20), c1 = 5, c2 = 11; values from the formulas of docs/method.md §2.2.
SPOT_81 = [
    # near, |d| < 10: r = i - j
    (40, 35, 5), (3, 12, -9), (50, 41, 9),
    # mid-past, 10 <= d < 14: (i // 2 + 5) - j // 2
    (40, 30, 10),   # 25 - 15
    (41, 28, 11),   # 25 - 14
    (51, 40, 10),   # 30 - 20
    (30, 17, 12),   # 20 - 8
    # mid-future, 10 <= -d < 14: i // 2 - (j // 2 + 5)
    (30, 40, -10), (28, 41, -11), (17, 30, -12),
    # far-past, d >= 14: min(i // 8 + 11, 20) - j // 8
    (80, 0, 20),    # min(21, 20) - 0: clipped at the cap
    (40, 20, 14),   # 16 - 2
    (30, 16, 12),   # 14 - 2
    (63, 8, 17),    # 18 - 1
    (79, 60, 13),   # min(20, 20) - 7
    # far-future, -d >= 14: i // 8 - min(j // 8 + 11, 20)
    (0, 80, -20), (20, 40, -14), (8, 63, -17),
]


def test_spot_values_at_81() -> None:
    r = VRPR.for_length(81, 21).relative_distance(81)
    for i, j, expected in SPOT_81:
        assert int(r[i, j]) == expected, (i, j)


def test_spot_values_at_41() -> None:
    # (12, 20, 2, 8, 20), c1 = 6, c2 = 14
    r = VRPR.for_length(41, 21).relative_distance(41)
    assert int(r[20, 9]) == 11  # near
    assert int(r[30, 18]) == (15 + 6) - 9  # mid-past d = 12
    assert int(r[18, 30]) == 9 - (15 + 6)  # mid-future
    assert int(r[40, 0]) == min(5 + 14, 20) - 0  # far-past: 19, the published 2x setting stops short of the cap
    assert int(r[0, 40]) == -19
    assert int(r[39, 19]) == min(4 + 14, 20) - 2  # far-past d = 20


# ------------------------------------------------------------------------------------- fast checker
@settings(max_examples=300, deadline=None)
@given(vrpr_params())
@example((1, 8, 3, 8, 3, 17))  # future rows are not mirrored past rows: needs the future check
@example((6, 8, 3, 4, 8, 17))
def test_properties_hold_matches_violations(p: tuple[int, int, int, int, int, int]) -> None:
    w1, w2, g1, g2, cap, f = p
    assert _properties_hold(w1, w2, g1, g2, cap, f) == (not VRPR(w1, w2, g1, g2, cap).violations(f))


# ------------------------------------------------------------------------------------- bands
@settings(max_examples=60, deadline=None)
@given(lengths())
@example((41, 21))
@example((81, 21))
def test_vrpr_bands_partition_and_positions(ft: tuple[int, int]) -> None:
    f, t = ft
    v = VRPR.for_length(f, t)
    bs = v.band_set(f)
    count = torch.stack([b.pairs.long() for b in bs.bands]).sum(0)
    assert torch.equal(count, torch.ones(f, f, dtype=torch.long)), "bands must be disjoint and cover all pairs"
    r = v.relative_distance(f)
    from_bands = torch.zeros(f, f, dtype=torch.float64)
    for b in bs.bands:
        from_bands = torch.where(b.pairs, b.q_pos[:, None] - b.k_pos[None, :], from_bands)
    assert torch.equal(from_bands.long(), r)
    assert bool((from_bands == from_bands.round()).all()), "VRPR positions are integers"


def test_vrpr_band_names_at_81() -> None:
    bs = VRPR.for_length(81, 21).band_set(81)
    assert [b.name for b in bs.bands] == ["near", "mid-past", "mid-future", "far-past", "far-future"]


# ------------------------------------------------------------------------------------- invalid arguments
@pytest.mark.parametrize(
    ("kwargs", "fields"),
    [
        ({"w1": 12, "w2": 12, "g1": 2, "g2": 8, "cap": 20}, ("w1", "w2")),
        ({"w1": 14, "w2": 12, "g1": 2, "g2": 8, "cap": 20}, ("w1", "w2")),
        ({"w1": 12, "w2": 20, "g1": 4, "g2": 2, "cap": 20}, ("g1", "g2")),
        ({"w1": 0, "w2": 20, "g1": 2, "g2": 8, "cap": 20}, ("w1",)),
        ({"w1": 12, "w2": 20, "g1": 0, "g2": 8, "cap": 20}, ("g1",)),
        ({"w1": 12, "w2": 20, "g1": 2, "g2": -8, "cap": 20}, ("g2",)),
        ({"w1": 12, "w2": 20, "g1": 2, "g2": 8, "cap": 0}, ("cap",)),
        ({"w1": 12, "w2": -3, "g1": 2, "g2": 8, "cap": 20}, ("w2",)),
        ({"w1": 12.0, "w2": 20, "g1": 2, "g2": 8, "cap": 20}, ("w1",)),
        ({"w1": 12, "w2": 20, "g1": 2, "g2": "8", "cap": 20}, ("g2",)),
        ({"w1": 12, "w2": 20, "g1": 2, "g2": 8, "cap": True}, ("cap",)),
        ({"w1": 22, "w2": 30, "g1": 2, "g2": 8, "cap": 20}, ("w1", "cap")),
    ],
)
def test_vrpr_invalid_arguments(kwargs: dict[str, object], fields: tuple[str, ...]) -> None:
    # A wrongly typed value (12.0, "8") is refused by the pytest run's jaxtyping/beartype hook
    # (TypeCheckError, a TypeError) before VRPR.__post_init__ can raise its ValueError; both name the field.
    with pytest.raises((ValueError, TypeCheckError)) as info:
        VRPR(**kwargs)
    for name in fields:
        assert name in str(info.value)
    # Through method_from_dict (how plans are loaded) it is always a ValueError.
    with pytest.raises(ValueError) as info:
        method_from_dict({"method": "vrpr", **kwargs})
    for name in fields:
        assert name in str(info.value)


@pytest.mark.parametrize("num_frames", [0, -5, 41.0, True])
@pytest.mark.parametrize("factory", [VRPR.for_length, VRPR.derive])
def test_for_length_invalid_num_frames(num_frames: object, factory: object) -> None:
    with pytest.raises((ValueError, TypeCheckError), match="num_frames"):
        factory(num_frames, 21)  # type: ignore[operator]


@pytest.mark.parametrize("trained", [0, 21.0])
def test_for_length_invalid_trained_frames(trained: object) -> None:
    with pytest.raises((ValueError, TypeCheckError), match="trained_frames"):
        VRPR.for_length(41, trained)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- baselines
LAYOUTS = [RotaryLayout.wan(128), RotaryLayout.hunyuan(), RotaryLayout.cogvideox(64), RotaryLayout.wan(12)]


def assert_single_full_band(bs: BandSet, num_frames: int) -> None:
    assert len(bs.bands) == 1
    assert bs.bands[0].pairs.shape == (num_frames, num_frames)
    assert bool(bs.bands[0].pairs.all())
    assert bs.bands[0].stripe is None


@pytest.mark.parametrize(("f", "t"), [(41, 21), (81, 21), (50, 33), (22, 21)])
def test_pi_positions(f: int, t: int) -> None:
    pi = PI.for_length(f, t)
    assert pi is not None and pi.scale == pytest.approx(f / t)
    bs = pi.band_set(f)
    assert_single_full_band(bs, f)
    expected = torch.arange(f, dtype=torch.float64) * t / f
    torch.testing.assert_close(bs.bands[0].q_pos.double(), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(bs.bands[0].k_pos.double(), expected, rtol=0, atol=1e-12)
    assert float(bs.bands[0].q_pos.max()) < t  # all positions inside the trained range


@pytest.mark.parametrize("cls", [PI, NTK, YaRN])
@pytest.mark.parametrize("f", [1, 13, 21])
def test_scaling_baselines_none_when_not_longer(cls: type[Method], f: int) -> None:
    assert cls.for_length(f, 21) is None


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.describe())
@pytest.mark.parametrize("s", [1.5, 2.0, 81 / 21, 8.0])
def test_ntk_frequencies(layout: RotaryLayout, s: float) -> None:
    d = layout.t_dim
    ntk = NTK(scale=s).temporal_freqs(layout)
    m = torch.arange(d // 2, dtype=torch.float64)
    expected = 1.0 / (layout.theta * s ** (d / (d - 2))) ** (2 * m / d)
    torch.testing.assert_close(ntk, expected, rtol=1e-12, atol=0)
    base = layout.temporal_freqs()
    assert float(ntk[0]) == pytest.approx(float(base[0]), rel=1e-12)  # highest frequency unchanged
    assert float(ntk[-1]) == pytest.approx(float(base[-1]) / s, rel=1e-12)  # lowest interpolated by 1/s
    assert bool((ntk[1:] < base[1:]).all())


def test_ntk_matches_diffusers_ntk_factor() -> None:
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    layout, s = RotaryLayout.wan(128), 81 / 21
    d = layout.t_dim
    pos = torch.arange(81, dtype=torch.float64)
    cos_ref, sin_ref = get_1d_rotary_pos_embed(d, pos, layout.theta, use_real=True, ntk_factor=s ** (d / (d - 2)),
                                               freqs_dtype=torch.float64)
    cos, sin = layout.cos_sin(pos, torch.zeros(81), torch.zeros(81), t_freqs=NTK(scale=s).temporal_freqs(layout))
    torch.testing.assert_close(cos[:, : d // 2], cos_ref[:, 0::2], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[:, : d // 2], sin_ref[:, 0::2], rtol=0, atol=1e-6)


def test_ntk_needs_more_than_two_temporal_channels() -> None:
    with pytest.raises(ValueError, match="t_dim"):
        NTK(scale=2.0).temporal_freqs(RotaryLayout(2, 4, 4))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.describe())
@pytest.mark.parametrize(("s", "t", "alpha", "beta"), [(2.0, 21, 1.0, 32.0), (81 / 21, 21, 0.25, 2.0),
                                                       (4.0, 33, 0.5, 3.0), (3.0, 13, 1.0, 1.5)])
def test_yarn_frequencies(layout: RotaryLayout, s: float, t: int, alpha: float, beta: float) -> None:
    w = layout.temporal_freqs()
    y = YaRN(scale=s, trained_frames=t, alpha=alpha, beta=beta).temporal_freqs(layout)
    assert y.shape == w.shape
    assert bool((y <= w * (1 + 1e-12)).all()) and bool((y >= w / s * (1 - 1e-12)).all())
    rho = t * w / (2 * math.pi)
    extrapolated, interpolated = rho >= beta, rho <= alpha
    assert bool(interpolated.any()), "each case must exercise the interpolated end"
    torch.testing.assert_close(y[extrapolated], w[extrapolated], rtol=1e-12, atol=0)
    torch.testing.assert_close(y[interpolated], w[interpolated] / s, rtol=1e-12, atol=0)
    ramp = ~(extrapolated | interpolated)
    gamma = (rho[ramp] - alpha) / (beta - alpha)
    torch.testing.assert_close(y[ramp], (1 - gamma) * w[ramp] / s + gamma * w[ramp], rtol=1e-12, atol=0)


def test_yarn_cases_reach_the_extrapolated_end() -> None:
    layout = RotaryLayout.wan(128)
    w = layout.temporal_freqs()
    y = YaRN(scale=2.0, trained_frames=21, alpha=0.25, beta=2.0).temporal_freqs(layout)
    assert float(y[0]) == float(w[0])  # rho = 21 / (2 pi) > beta: kept
    assert float(y[-1]) == pytest.approx(float(w[-1]) / 2.0, rel=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.describe())
@pytest.mark.parametrize("f", [41, 81, 200])
def test_riflex_changes_one_frequency(layout: RotaryLayout, f: int) -> None:
    w = layout.temporal_freqs()
    for k in range(1, len(w) + 1):
        rf = RIFLEx(k=k, num_frames=f).temporal_freqs(layout)
        changed = (rf != w).nonzero().flatten().tolist()
        assert changed == [k - 1]
        assert float(rf[k - 1]) == pytest.approx(0.9 * 2 * math.pi / f, rel=1e-12)


def test_riflex_errors() -> None:
    layout = RotaryLayout.hunyuan()  # 8 temporal frequencies
    with pytest.raises(ValueError, match="k=9"):
        RIFLEx(k=9, num_frames=81).temporal_freqs(layout)
    with pytest.raises(ValueError, match="k=9"):
        RIFLEx(k=9, num_frames=81).band_set(81, rotary=layout)
    with pytest.raises(ValueError, match=r"\bk\b"):
        RIFLEx.for_length(81, 21)
    with pytest.raises(ValueError, match="RIFLEx.k"):
        RIFLEx(k=0, num_frames=81)
    rf = RIFLEx.for_length(81, 21, k=4)
    assert rf == RIFLEx(k=4, num_frames=81)
    assert RIFLEx.for_length(21, 21, k=4) is None


@pytest.mark.parametrize(
    "method",
    [NTK(scale=2.0), YaRN(scale=2.0, trained_frames=21), RIFLEx(k=2, num_frames=42)],
    ids=lambda m: m.name,
)
def test_frequency_baselines_band_set(method: Method) -> None:
    layout = RotaryLayout.wan(128)
    bs = method.band_set(42, rotary=layout)
    assert_single_full_band(bs, 42)
    assert bs.is_plain()  # original positions, only the frequencies change
    assert bs.t_freqs is not None
    torch.testing.assert_close(bs.t_freqs, method.temporal_freqs(layout))  # type: ignore[attr-defined]
    assert not torch.equal(bs.t_freqs, layout.temporal_freqs())
    with pytest.raises(ValueError, match="RotaryLayout"):
        method.band_set(42)


def test_pi_band_set_is_one_band_not_plain() -> None:
    bs = PI(scale=2.0).band_set(42)
    assert_single_full_band(bs, 42)
    assert not bs.is_plain()


@pytest.mark.parametrize(
    ("factory", "field"),
    [
        (lambda: PI(scale=0.0), "scale"),
        (lambda: NTK(scale=-1.0), "scale"),
        (lambda: YaRN(scale="2", trained_frames=21), "scale"),
        (lambda: YaRN(scale=2.0, trained_frames=0), "trained_frames"),
        (lambda: YaRN(scale=2.0, trained_frames=21, alpha=5.0, beta=2.0), "alpha"),
        (lambda: RIFLEx(k=2, num_frames=0), "num_frames"),
    ],
)
def test_baseline_invalid_arguments(factory: object, field: str) -> None:
    # a wrongly typed value trips the test run's jaxtyping/beartype hook first (TypeCheckError)
    with pytest.raises((ValueError, TypeCheckError), match=field):
        factory()  # type: ignore[operator]


# ------------------------------------------------------------------------------------- serialization
EXAMPLES: dict[str, list[Method]] = {
    "vrpr": [VRPR.for_length(81, 21), VRPR.for_length(100, 33), VRPR.identity(21)],
    "pi": [PI(scale=81 / 21)],
    "ntk": [NTK(scale=2.0)],
    "yarn": [YaRN(scale=3.0, trained_frames=33, alpha=0.5, beta=16.0)],
    "riflex": [RIFLEx(k=4, num_frames=63)],
    "tsa": [TSA(), TSA(d1=4, d2=10, stripe=0.25, sink_group=4, sink_window=6, cap=32)],
    "sliding-window": [SlidingWindow(window=10), SlidingWindow(window=3, sink=False)],
    "tsa+vrpr": [TSAVRPR(TSA(), VRPR(10, 14, 2, 8, 20)), TSAVRPR(TSA(d1=4, d2=10), VRPR(3, 5, 2, 4, 12))],
    "window+vrpr": [WindowVRPR(SlidingWindow(window=10), VRPR(10, 14, 2, 8, 20))],
    "ultravico": [UltraViCo(), UltraViCo(alpha=0.7, window=4),
                  UltraViCo(window=16, beta=0.6, period=50.3, halfwidth=3)],
    "key-shift": [KeyShift(shift=21), KeyShift(shift=-2.5)],
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_dict_round_trip(name: str) -> None:
    if name not in EXAMPLES:
        pytest.fail(f"method {name!r} is registered but has no round-trip example in this test")
    for m in EXAMPLES[name]:
        assert type(m) is METHODS[name]
        data = m.to_dict()
        assert data["method"] == name
        back = method_from_dict(json.loads(json.dumps(data)))
        assert type(back) is type(m) and back == m


def test_every_example_is_registered() -> None:
    assert set(EXAMPLES) <= set(METHODS)


def test_method_from_dict_unknown_name() -> None:
    with pytest.raises(ValueError) as info:
        method_from_dict({"method": "freenoise"})
    msg = str(info.value)
    assert "freenoise" in msg
    for name in METHODS:
        assert name in msg


@pytest.mark.parametrize("bad", [{"w1": 10}, {}])
def test_method_from_dict_malformed(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="'method' key"):
        method_from_dict(bad)


@pytest.mark.parametrize("bad", ["vrpr", None])
def test_method_from_dict_not_a_dict(bad: object) -> None:
    # refused by method_from_dict's own check, or first by the test run's jaxtyping/beartype hook
    with pytest.raises((ValueError, TypeCheckError), match="data|method"):
        method_from_dict(bad)  # type: ignore[arg-type]


def test_method_from_dict_unknown_parameter() -> None:
    data = {**VRPR.for_length(81, 21).to_dict(), "g3": 16}
    with pytest.raises(ValueError) as info:
        method_from_dict(data)
    msg = str(info.value)
    assert "g3" in msg and "accepted" in msg
    for field in ("w1", "w2", "g1", "g2", "cap"):
        assert field in msg


def test_method_from_dict_missing_or_invalid_parameter() -> None:
    with pytest.raises(ValueError, match="vrpr"):
        method_from_dict({"method": "vrpr", "w1": 10})
    with pytest.raises(ValueError, match="w2"):
        method_from_dict({"method": "vrpr", "w1": 10, "w2": 5, "g1": 2, "g2": 8, "cap": 20})


def test_baselines_accept_integer_scales() -> None:
    assert PI(scale=2).band_set(4).bands[0].q_pos.tolist() == [0.0, 0.5, 1.0, 1.5]
    assert NTK(scale=2).temporal_freqs(RotaryLayout.wan(12)).shape == (2,)
    assert YaRN(scale=2, trained_frames=4, alpha=1, beta=8).temporal_freqs(RotaryLayout.wan(12)).shape == (2,)


def test_key_shift_moves_every_key() -> None:
    r = KeyShift(shift=3).band_set(5).bands[0].relative_distance()
    i, j = torch.meshgrid(torch.arange(5.0), torch.arange(5.0), indexing="ij")
    assert torch.equal(r, (i - j - 3).double())
    with pytest.raises(ValueError, match="explicit shift"):
        KeyShift.for_length(10, 5)
