"""Attention-pattern methods (TSA, sliding window) and the band tables behind them.

TSA is checked pair by pair against a brute-force reading of docs/method.md §3; ``BandSet``'s block
tables and densities against brute-force tilings of the token mask.
"""

from __future__ import annotations

import math

import pytest
import torch
from jaxtyping import TypeCheckError

from freeloc.bands import Band, BandSet
from freeloc.patterns import TSA, SlidingWindow
from freeloc.positions import PI, VRPR
from freeloc.rotary import RotaryLayout

# ------------------------------------------------------------------------------------- TSA density
PUBLISHED_DENSITY = {21: 0.79, 41: 0.56, 81: 0.33}


@pytest.mark.parametrize("f", sorted(PUBLISHED_DENSITY))
def test_tsa_block_density_wan_480p(f: int) -> None:
    density = TSA().block_density(f, 1560, block_size=128)
    print(f"TSA block density at F={f}, S=1560, 128-token blocks: {density:.4f} "
          f"(docs/method.md §3.3: {PUBLISHED_DENSITY[f]})")
    assert abs(density - PUBLISHED_DENSITY[f]) <= 0.03


def test_tsa_density_falls_with_length() -> None:
    tsa = TSA()
    blocks = [tsa.block_density(f, 1560) for f in (21, 41, 81)]
    tokens = [tsa.token_density(f, 1560) for f in (21, 41, 81)]
    assert blocks[0] > blocks[1] > blocks[2]
    assert tokens[0] > tokens[1] > tokens[2]
    # a tile holding any attended pair is computed whole
    assert all(t <= b for t, b in zip(tokens, blocks, strict=True))


# ------------------------------------------------------------------------------------- TSA brute force
def brute_force_tsa(
    num_frames: int, tokens_per_frame: int, d1: int, d2: int, stripe: float
) -> dict[str, list[list[bool]]]:
    """docs/method.md §3 token pair by token pair: which band (if any) holds each (query, key) token pair."""
    s = tokens_per_frame
    ds = math.floor(stripe * s)
    n = num_frames * s
    out = {name: [[False] * n for _ in range(n)] for name in ("local", "striped", "sink")}
    for q in range(n):
        i, sq = divmod(q, s)
        for k in range(n):
            j, sk = divmod(k, s)
            delta = abs(i - j)
            if j == 0 and i > d2:
                out["sink"][q][k] = True  # far queries see frame 0 through grouped positions
            elif delta <= d1 or j == 0:
                out["local"][q][k] = True  # dense tier, and frame 0 (every token) for queries within d2
            elif delta <= d2 and abs(sq - sk) < ds:
                out["striped"][q][k] = True
    return out


def as_tensor(table: list[list[bool]]) -> torch.Tensor:
    return torch.tensor(table, dtype=torch.bool)


@pytest.mark.parametrize(("f", "s"), [(30, 12), (30, 7), (13, 5)])
def test_tsa_token_mask_brute_force(f: int, s: int) -> None:
    d1, d2, stripe, cap = 3, 9, 0.25, 20
    tsa = TSA(d1=d1, d2=d2, stripe=stripe, cap=cap)
    expected = {name: as_tensor(t) for name, t in brute_force_tsa(f, s, d1, d2, stripe).items()}
    bs = tsa.band_set(f, s)
    got = {b.name: b.token_pairs(s) for b in bs.bands}
    assert set(got) == {name for name, m in expected.items() if bool(m.any())}
    for name, mask in got.items():
        assert torch.equal(mask, expected[name]), name
    union = expected["local"] | expected["striped"] | expected["sink"]
    assert torch.equal(tsa.token_mask(f, s), union)
    assert torch.equal(bs.token_mask(s), union)
    # each attended token pair is in exactly one band
    count = sum(m.long() for m in got.values())
    assert int(count.max()) == 1


@pytest.mark.parametrize(("f", "s"), [(30, 12), (30, 7)])
def test_tsa_band_positions(f: int, s: int) -> None:
    d1, d2, cap = 3, 9, 20
    tsa = TSA(d1=d1, d2=d2, stripe=0.25, cap=cap)
    bands = {b.name: b for b in tsa.band_set(f, s).bands}
    original = torch.arange(f, dtype=torch.float64)
    for name in ("local", "striped"):
        assert torch.equal(bands[name].q_pos.double(), original)
        assert torch.equal(bands[name].k_pos.double(), original)
    assert bands["striped"].stripe == math.floor(0.25 * s)
    assert bands["local"].stripe is None and bands["sink"].stripe is None
    sink = bands["sink"]
    assert sink.pairs.nonzero().tolist() == [[i, 0] for i in range(d2 + 1, f)]
    for i in range(d2 + 1, f):
        assert float(sink.q_pos[i]) == min(i // 8 + 12 - math.ceil(12 / 8), cap)
        assert float(sink.k_pos[0]) == 0.0
    # sink distances stay in the trained range
    rel = sink.relative_distance()[sink.pairs]
    assert float(rel.max()) <= cap


def test_tsa_default_sink_positions_at_81() -> None:
    sink = {b.name: b for b in TSA().band_set(81, 4).bands}["sink"]
    assert float(sink.q_pos[25]) == 25 // 8 + 10 == 13
    assert float(sink.q_pos[80]) == 20  # floor(80 / 8) + 10 = 20, at the cap
    assert TSA().stripe_tokens(1560) == 195


def test_tsa_for_length() -> None:
    assert TSA.for_length(21, 21) is None
    assert TSA.for_length(81, 21) == TSA(cap=20)
    assert TSA.for_length(66, 33) == TSA(cap=32)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"d1": 10, "d2": 5}, "d1"),
        ({"d1": -1}, "d1"),
        ({"d2": 0}, "d2"),
        ({"stripe": 0.0}, "stripe"),
        ({"stripe": 1.5}, "stripe"),
        ({"sink_group": 0}, "sink_group"),
        ({"sink_window": 0}, "sink_window"),
        ({"cap": 0}, "cap"),
    ],
)
def test_tsa_invalid_arguments(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        TSA(**kwargs)  # type: ignore[arg-type]


def test_tsa_wrongly_typed_argument() -> None:
    # TSA's own ValueError, or first the test run's jaxtyping/beartype hook (TypeCheckError)
    with pytest.raises((ValueError, TypeCheckError), match="d1"):
        TSA(d1=2.5)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- block tables
def brute_force_blocks(mask: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(any, full) per block x block tile of a token mask; the last tiles may be partial."""
    n = mask.shape[0]
    nb = -(-n // block)
    any_t = torch.zeros(nb, nb, dtype=torch.bool)
    full_t = torch.zeros(nb, nb, dtype=torch.bool)
    for a in range(nb):
        for b in range(nb):
            tile = mask[a * block:(a + 1) * block, b * block:(b + 1) * block]
            any_t[a, b] = bool(tile.any())
            full_t[a, b] = bool(tile.all())
    return any_t, full_t


BAND_SETS = {
    "tsa": lambda f, s: TSA(d1=2, d2=6, stripe=0.3, cap=8).band_set(f, s),
    "tsa-default": lambda f, s: TSA().band_set(f, s),
    "sliding": lambda f, s: SlidingWindow(window=3).band_set(f, s),
    "vrpr": lambda f, s: VRPR.for_length(f, 5).band_set(f, s),
    "pi": lambda f, s: PI(scale=2.0).band_set(f, s),
}


@pytest.mark.parametrize("kind", sorted(BAND_SETS))
@pytest.mark.parametrize(
    ("f", "s", "block"),
    [
        (7, 12, 16),   # S and N = 84 not multiples of the block
        (11, 7, 5),    # odd S, N = 77 not a multiple of 5
        (30, 12, 128),  # one block holds many frames, N = 360
        (9, 16, 8),    # S a multiple of the block
        (12, 6, 12),   # block = 2 frames exactly
        (4, 5, 64),    # a single partial tile
    ],
)
def test_block_table_brute_force(kind: str, f: int, s: int, block: int) -> None:
    bs = BAND_SETS[kind](f, s)
    mask = bs.token_mask(s)
    any_t, full_t = bs.block_table(s, block)
    exp_any, exp_full = brute_force_blocks(mask, block)
    assert torch.equal(any_t, exp_any)
    assert torch.equal(full_t, exp_full)
    assert bool((full_t <= any_t).all())
    assert bs.block_density(s, block) == pytest.approx(float(exp_any.double().mean()))
    assert bs.token_density(s) == pytest.approx(float(mask.double().mean()), rel=1e-12)
    for band in bs.bands:  # each band alone, too
        b_any, b_full = band.block_table(s, block)
        e_any, e_full = brute_force_blocks(band.token_pairs(s), block)
        assert torch.equal(b_any, e_any) and torch.equal(b_full, e_full)
        assert band.token_count(s) == int(band.token_pairs(s).sum())


def test_tsa_token_density_matches_mask() -> None:
    tsa = TSA(d1=3, d2=9, stripe=0.25)
    for f, s in ((30, 12), (30, 7), (12, 9)):
        assert tsa.token_density(f, s) == pytest.approx(float(tsa.token_mask(f, s).double().mean()), rel=1e-12)


# ------------------------------------------------------------------------------------- sliding window
@pytest.mark.parametrize(("f", "w"), [(30, 4), (10, 0), (8, 10)])
@pytest.mark.parametrize("sink", [True, False])
def test_sliding_window_pairs(f: int, w: int, sink: bool) -> None:
    bs = SlidingWindow(window=w, sink=sink).band_set(f)
    assert len(bs.bands) == 1
    band = bs.bands[0]
    for i in range(f):
        for j in range(f):
            assert bool(band.pairs[i, j]) == (abs(i - j) <= w or (sink and j == 0)), (i, j)
    original = torch.arange(f, dtype=torch.float64)
    assert torch.equal(band.q_pos.double(), original) and torch.equal(band.k_pos.double(), original)
    assert band.stripe is None


def test_sliding_window_token_mask() -> None:
    f, s = 9, 3
    mask = SlidingWindow(window=2).band_set(f, s).token_mask(s)
    for q in range(f * s):
        for k in range(f * s):
            assert bool(mask[q, k]) == (abs(q // s - k // s) <= 2 or k // s == 0)


def test_sliding_window_for_length() -> None:
    assert SlidingWindow.for_length(21, 21) is None
    assert SlidingWindow.for_length(5, 21) is None
    assert SlidingWindow.for_length(81, 21) == SlidingWindow(window=10)


@pytest.mark.parametrize("kwargs", [{"window": -1}, {"window": 1.5}, {"window": True}, {"window": 3, "sink": 1}])
def test_sliding_window_invalid(kwargs: dict[str, object]) -> None:
    # the method's own ValueError, or first the test run's jaxtyping/beartype hook (TypeCheckError)
    with pytest.raises((ValueError, TypeCheckError), match="window|sink"):
        SlidingWindow(**kwargs)  # type: ignore[arg-type]


def test_sliding_window_negative_is_value_error() -> None:
    with pytest.raises(ValueError, match="SlidingWindow.window"):
        SlidingWindow(window=-1)


# ------------------------------------------------------------------------------------- bands
def test_overlapping_bands_raise() -> None:
    f = 6
    pos = torch.arange(f, dtype=torch.float64)
    i, j = torch.meshgrid(torch.arange(f), torch.arange(f), indexing="ij")
    a = Band("a", (i - j).abs() <= 2, pos, pos)
    b = Band("b", (i - j).abs() >= 2, pos, pos)  # shares |i - j| = 2 with a
    with pytest.raises(ValueError, match="overlaps"):
        BandSet(f, (a, b))
    c = Band("c", (i - j).abs() > 2, pos, pos)
    ok = BandSet(f, (a, c))
    assert bool(ok.frame_pairs().all())


def test_band_frame_count_mismatch_raises() -> None:
    pos = torch.arange(4, dtype=torch.float64)
    band = Band("all", torch.ones(4, 4, dtype=torch.bool), pos, pos)
    with pytest.raises(ValueError, match="frames"):
        BandSet(5, (band,))


def test_invalid_band_raises() -> None:
    pos = torch.arange(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="stripe"):
        Band("s", torch.ones(4, 4, dtype=torch.bool), pos, pos, stripe=0)


@pytest.mark.parametrize("f", [1, 5, 81])
def test_plain_band_set(f: int) -> None:
    plain = BandSet.plain(f)
    assert plain.is_plain()
    assert plain.token_density(3) == 1.0
    assert plain.block_density(3, 4) == 1.0
    assert not BandSet.plain(f, label="x").bands[0].is_empty()


def test_non_plain_band_sets() -> None:
    assert not SlidingWindow(window=2).band_set(10).is_plain()
    assert not TSA(d1=2, d2=4).band_set(10, 4).is_plain()
    assert not VRPR.for_length(41, 21).band_set(41).is_plain()


def test_empty_band_set_has_empty_block_table() -> None:
    any_t, full_t = BandSet(4, ()).block_table(tokens_per_frame=50, block_size=64)
    assert any_t.shape == (4, 4) and not bool(any_t.any()) and not bool(full_t.any())
    assert BandSet(4, ()).block_density(50, 64) == 0.0


def test_integer_parameters_are_accepted() -> None:
    """Whole numbers are fine where a fraction or a float is expected."""
    assert TSA(stripe=1).stripe_tokens(10) == 10
    layout = RotaryLayout.wan(12, theta=10000)
    x = torch.randn(1, 3, 1, 12, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(3)  # integer positions
    as_float = pos.double()
    torch.testing.assert_close(layout.rotate(x, pos, pos, pos), layout.rotate(x, as_float, as_float, as_float))


@pytest.mark.parametrize("method,queries", [
    (VRPR.for_length(81, 21), 3),  # near; mid-past + mid-future; far-past + far-future
    (VRPR(3, 5, 2, 4, 12), 4),  # the far tiers reach the cap 12: past and future differ by more than a shift
    (TSA(cap=20), 2),  # local + striped; sink
    (SlidingWindow(4), 1),
    (PI(2.0), 1),
], ids=["vrpr-81", "vrpr-small", "tsa", "sliding", "pi"])
def test_aligned_keeps_every_relative_distance_and_shares_queries(method: VRPR | TSA | PI | SlidingWindow,
                                                                  queries: int) -> None:
    bs = method.band_set(81, 15, RotaryLayout.wan(24))
    al = bs.aligned()
    assert len(al.bands) == len(bs.bands)
    for b, a in zip(bs.bands, al.bands, strict=True):
        assert a.name == b.name and a.stripe == b.stripe and torch.equal(a.pairs, b.pairs)
        assert torch.equal(a.relative_distance()[b.pairs], b.relative_distance()[b.pairs])
    distinct: list[torch.Tensor] = []
    for a in al.bands:
        if not any(torch.equal(a.q_pos, d) for d in distinct):
            distinct.append(a.q_pos)
    print(f"{type(method).__name__}: {len(bs.bands)} bands, {len(distinct)} query rotations after aligned()")
    assert len(distinct) == queries
