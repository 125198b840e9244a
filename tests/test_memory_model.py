"""Heads in groups (``AttentionOptions.head_group``) and the memory model of ``attend``
(``freeloc.attention.memory``): the group size is chosen from the shape and used, the output does not
depend on it, and the estimate matches the measured peak of a call."""

from __future__ import annotations

import doctest
import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch
from support import qkv

import freeloc
import freeloc.attention as attention_module
from freeloc.app.cli import main
from freeloc.attention import attend, band_set_for
from freeloc.attention import memory as memory_module
from freeloc.attention._planning import plan_attention
from freeloc.attention.memory import PEAK_RATIO, estimate_peak, head_group_size, working_set

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "attention.py"
ROTARY = freeloc.RotaryLayout.wan(64)
TSA = freeloc.TSA(cap=20)
VRPR = freeloc.VRPR.for_length(81, 21)


def _benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("attention_benchmark", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", [TSA, VRPR], ids=["tsa", "vrpr"])
def test_auto_group_is_the_most_heads_within_the_peak_ratio(method: freeloc.methods.Method) -> None:
    """``"auto"``: the most heads whose estimated peak (the output and the group's working set) stays
    within ``PEAK_RATIO`` x dense attention's, at least one; a group's working set grows with its heads."""
    groups = []
    for heads in (2, 12, 40):
        q = torch.empty(1, 81 * 60, heads, 64, device="meta")
        plan = plan_attention(q, band_set_for(method, 81, 60, ROTARY), (81, 6, 10), 0, 0, "chunked",
                              freeloc.AttentionOptions())
        g = head_group_size(plan, 1, heads, 64, torch.float32, freeloc.AttentionOptions())
        q_bytes = q.numel() * 4
        budget = PEAK_RATIO * (3 * q_bytes + heads * 81 * 60 * 4) - q_bytes
        sets = [working_set(plan, h, 64, torch.float32) for h in range(1, heads + 1)]
        assert sets == sorted(sets) and sets[0] < sets[-1]
        assert 1 <= g <= heads
        assert sets[g - 1] <= budget or g == 1
        assert g == heads or sets[g] > budget  # the most that fit
        groups.append(g)
    assert groups == sorted(groups), groups
    if method is VRPR:  # VRPR's rotations do not fit for every head at once
        assert groups[0] == 1 and 1 < groups[2] < 40, groups
    else:
        assert groups == [2, 12, 40], groups
    assert head_group_size(plan, 1, 40, 64, torch.float32, freeloc.AttentionOptions(head_group=7)) == 7


def test_attend_runs_the_heads_in_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunked backend sees one group's heads at a time (3 heads, groups of 2: 2 then 1), and the
    output equals the call with all heads at once."""
    seen: list[int] = []
    original = attention_module.run_chunked

    def spy(plan, qs, ks, key_buffers, v, *args):  # noqa: ANN001, ANN002, ANN202
        seen.append(v.shape[2])
        return original(plan, qs, ks, key_buffers, v, *args)

    q, k, v = qkv(17 * 15, torch.float32, seed=3, heads=3)
    kwargs = dict(grid=(17, 3, 5), method=freeloc.VRPR(3, 5, 2, 4, 8), rotary=freeloc.RotaryLayout.wan(q.shape[-1]),
                  backend="chunked")
    whole = attend(q, k, v, **kwargs, options=freeloc.AttentionOptions(head_group=3))
    monkeypatch.setattr(attention_module, "run_chunked", spy)
    grouped = attend(q, k, v, **kwargs, options=freeloc.AttentionOptions(head_group=2))
    assert seen == [2, 1]
    torch.testing.assert_close(grouped, whole, atol=1e-6, rtol=1e-5)
    seen.clear()
    attend(q, k, v, **kwargs)  # auto: one head at a time at this shape
    assert seen == [1, 1, 1]


@pytest.mark.parametrize("value", [0, -2, True, "all"])
def test_head_group_must_be_auto_or_a_positive_int(value: object) -> None:
    with pytest.raises(ValueError, match=r"head_group must be 'auto' or an int >= 1.*got"):
        freeloc.AttentionOptions(head_group=value)  # type: ignore[arg-type]


def test_doctests_of_the_memory_model() -> None:
    result = doctest.testmod(memory_module)
    assert result.attempted >= 5 and result.failed == 0, result


def test_estimate_rejects_a_bad_shape() -> None:
    with pytest.raises(ValueError, match="heads must be an int >= 1, got 0"):
        estimate_peak(heads=0, head_dim=64, dtype=torch.float32, height=2, width=3, frames=9, trained_frames=5)
    with pytest.raises(ValueError, match="dtype must be a floating-point"):
        estimate_peak(heads=2, head_dim=64, dtype=torch.int32, height=2, width=3, frames=9, trained_frames=5)


def test_estimate_at_wan_shapes_stays_within_the_ratio() -> None:
    """Wan 2.1 1.3B at 480p, 4x: TSA and VRPR within ``PEAK_RATIO`` x dense attention's peak, in groups of
    several heads."""
    peaks = estimate_peak(heads=12, head_dim=128, dtype=torch.bfloat16, height=30, width=52, frames=81,
                          trained_frames=21)
    dense = peaks["dense"].bytes
    assert dense == 3 * 81 * 1560 * 12 * 128 * 2 + 12 * 81 * 1560 * 4
    for m in ("tsa", "vrpr"):
        assert peaks[m].bytes <= PEAK_RATIO * dense, peaks
        assert 1 < peaks[m].head_group < 12 and peaks[m].groups == -(-12 // peaks[m].head_group), peaks


def test_explain_memory_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--memory", "--model", "wan2.1-1.3b", "--height", "6", "--width", "10"]) == 0
    text = capsys.readouterr().out
    assert "wan2.1-1.3b (shape changed): 12 heads x 128, 6 x 10 = 60 tokens per frame, bf16" in text
    assert "| 21 | 1x | 1,260 |" in text and "| 41 | 2x | 2,460 |" in text and "| 81 | 4x | 4,860 |" in text
    assert main(["explain", "--memory", "--heads", "2", "--head-dim", "64", "--height", "6", "--width", "10",
                 "--num-frames", "81", "--trained-frames", "21", "--latent", "--dtype", "fp32", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (row,) = data["rows"]
    assert row["frames"] == 81 and row["vrpr"]["head_group"] == 1
    expected = estimate_peak(heads=2, head_dim=64, dtype=torch.float32, height=6, width=10, frames=81,
                             trained_frames=21)
    assert {m: row[m]["bytes"] for m in ("dense", "tsa", "vrpr")} == {m: p.bytes for m, p in expected.items()}


def test_explain_without_memory_still_needs_the_lengths(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["explain", "--trained-frames", "81"])
    assert "--num-frames is required (without --memory)" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures VmHWM (Linux)")
def test_estimate_matches_the_measured_peak_and_the_bounds_hold() -> None:
    """At 81 frames x 6 x 10 tokens, 2 heads x 64, fp32 (the benchmark's small CPU shape): each method's
    measured peak (a fresh process, as ``benchmarks/attention.py`` measures it) within 20% of the estimate;
    TSA at most 1.5x dense, VRPR at most 2x dense."""
    bench = _benchmark()
    shape = dict(bench.CPU_SHAPE, height=6, width=10)
    measured = {m: bench.cpu_peak_mib(m, shape) * 2**20 for m in ("dense", "tsa", "vrpr")}
    estimate = estimate_peak(heads=2, head_dim=64, dtype=torch.float32, height=6, width=10, frames=81,
                             trained_frames=21)
    print({m: (round(measured[m] / 2**20, 2), round(estimate[m].mib, 2)) for m in measured})
    for m, got in measured.items():
        assert math.isfinite(got) and got > 0, measured
        assert abs(estimate[m].bytes - got) <= 0.2 * got, (m, got, estimate[m])
    assert measured["tsa"] <= 1.5 * measured["dense"], measured
    assert measured["vrpr"] <= 2.0 * measured["dense"], measured


def test_a_large_pass_runs_over_a_share_of_the_heads(monkeypatch: pytest.MonkeyPatch) -> None:
    """TSA at 81 x 6 x 10, 2 heads: the striped tier's widest passes gather more than one rotation of both
    heads, so they run one head at a time while the rest take both; output and gradients equal the run
    where every pass takes both heads."""
    import freeloc.attention._chunked as chunked

    q, k, v = qkv(81 * 60, torch.float32, seed=5, batch=1, heads=2, head_dim=64)
    kwargs = dict(grid=(81, 6, 10), method=TSA, rotary=ROTARY, backend="chunked",
                  options=freeloc.AttentionOptions(head_group=2))
    heads_seen: list[int] = []
    original = chunked.attention_with_lse

    def spy(q_, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        heads_seen.append(q_.shape[-3])
        return original(q_, *args, **kw)

    def run() -> tuple[torch.Tensor, ...]:
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
        out = attend(qg, kg, vg, **kwargs)
        out.square().sum().backward()
        return out.detach(), qg.grad, kg.grad, vg.grad

    monkeypatch.setattr(chunked, "attention_with_lse", spy)
    split = run()
    assert 1 in heads_seen and 2 in heads_seen, sorted(set(heads_seen))
    monkeypatch.setattr(chunked, "heads_per_call", lambda pass_bytes, rotation_bytes, heads: heads)
    heads_seen.clear()
    whole = run()
    assert set(heads_seen) == {2}
    for a, b in zip(split, whole, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        reference = attend(q, k, v, **dict(kwargs, backend="reference"))
    torch.testing.assert_close(split[0], reference, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method", [TSA, VRPR, freeloc.TSAVRPR(freeloc.TSA(cap=20), VRPR)],
                         ids=["tsa", "vrpr", "tsa+vrpr"])
def test_release_schedule_drops_each_rotation_once_after_its_last_read(method: freeloc.methods.Method) -> None:
    """Every band's rotation on each side is dropped exactly once, after the last pass that reads it and
    with every band that shares its storage (one rotation, or one key buffer)."""
    from freeloc.attention._passes import Stack, release_schedule

    q = torch.empty(1, 81 * 60, 2, 64, device="meta")
    plan = plan_attention(q, band_set_for(method, 81, 60, ROTARY), (81, 6, 10), 0, 0, "chunked",
                          freeloc.AttentionOptions())
    passes, rot = plan.parts[0].passes, plan.rotations
    schedule = release_schedule(passes, rot.q_source, rot.k_source, rot.key_buffers)
    for side, source in (("q", rot.q_source), ("k", rot.k_source)):
        units = {bands: i for i, entries in schedule.items() for s_, bands in entries if s_ == side}
        covered = sorted(b for bands in units for b in bands)
        assert covered == list(range(len(source))), (side, units)
        for bands, i in units.items():
            assert all(source[b] == source[c] or side == "k" for b in bands for c in bands)
            reads = [j for j, p in enumerate(passes)
                     if set(bands) & set((p.band,) if side == "q" or not isinstance(p, Stack) else p.key_bands)]
            assert reads and max(reads) == i, (side, bands, reads, i)


def test_explain_memory_takes_a_head_group(capsys: pytest.CaptureFixture[str]) -> None:
    """``--head-group 1``: every band-split row one head at a time, less memory than "auto"; a bad value
    is refused by name."""
    args = ["explain", "--memory", "--heads", "4", "--head-dim", "64", "--height", "6", "--width", "10", "--json"]
    assert main([*args, "--head-group", "1"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    auto = json.loads(capsys.readouterr().out)
    assert one["head_group"] == 1 and auto["head_group"] == "auto"
    for r1, ra in zip(one["rows"][1:], auto["rows"][1:], strict=True):  # 2x and 4x
        for m in ("tsa", "vrpr"):
            assert r1[m]["head_group"] == 1 and r1[m]["bytes"] <= ra[m]["bytes"], (r1, ra)
    assert any(r1["tsa"]["bytes"] < ra["tsa"]["bytes"] for r1, ra in zip(one["rows"], auto["rows"], strict=True))
    with pytest.raises(SystemExit):
        main([*args, "--head-group", "none"])
    assert "expected 'auto' or an int >= 1 (heads per group), got 'none'" in capsys.readouterr().err


def test_the_chunked_ultravico_logits_are_counted_up_to_float_logits() -> None:
    """A method that scales logits runs the chunked backend in chunks of query rows: the working set
    holds one chunk of logits and its scaled temporary (two float32 rows x video keys per row and head),
    as many rows as ``float_logits`` allows for the call's samples and heads; the group choice sees it."""
    frames, s, heads = 17, 15, 4
    nv = frames * s
    q = torch.empty(2, nv, heads, 64, device="meta")
    bands = band_set_for(freeloc.UltraViCo(alpha=0.8, window=4), frames, s, ROTARY)
    plan = plan_attention(q, bands, (frames, 3, 5), 0, 0, "chunked", freeloc.AttentionOptions())
    one_row = working_set(plan, heads, 64, torch.float32, batch=2, float_logits=1)
    every_row = working_set(plan, heads, 64, torch.float32, batch=2, float_logits=2 * heads * nv * nv)
    ten_rows = working_set(plan, heads, 64, torch.float32, batch=2, float_logits=2 * heads * nv * 10)
    assert every_row - one_row == 2 * heads * (nv - 1) * nv * 4
    assert ten_rows - one_row == 2 * heads * 9 * nv * 4
    small = freeloc.AttentionOptions(float_logits=nv)  # one row per call: every head fits the budget
    assert head_group_size(plan, 2, heads, 64, torch.float32, small) == heads
    wide = freeloc.AttentionOptions(float_logits=2 * heads * nv * nv)  # whole score matrices: fewer heads
    assert head_group_size(plan, 2, heads, 64, torch.float32, wide) < heads
