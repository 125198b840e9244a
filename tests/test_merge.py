"""The exact merge of attention passes over disjoint key sets by their log-sum-exp (docs/method.md §7)."""

from __future__ import annotations

import torch

from freeloc.attention._merge import EMPTY_LSE, merge_into_, merge_lse, merge_outputs, merge_pass_into_


def test_merge_is_exact_and_empty_band_weighs_zero() -> None:
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(7, 8, generator=g), torch.randn(20, 8, generator=g), torch.randn(20, 8, generator=g)
    s = q @ k.T
    cuts = [(0, 6), (6, 6), (6, 13), (13, 20)]  # (6, 6) is an empty band
    outs, lses = [], []
    for a, b in cuts:
        if a == b:
            outs.append(torch.full((7, 8), float("nan")))
            lses.append(torch.full((7,), float("-inf")))
        else:
            outs.append(torch.softmax(s[:, a:b], -1) @ v[a:b])
            lses.append(torch.logsumexp(s[:, a:b], -1))
    outs[1][2] = 1.0  # a row with keys in no pass
    lses = [torch.cat([x[:2], torch.tensor([float("-inf")]), x[3:]]) for x in lses]
    out, lse = merge_lse(outs, lses)
    keep = torch.arange(7) != 2
    torch.testing.assert_close(out[keep], (torch.softmax(s, -1) @ v)[keep], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse[keep], torch.logsumexp(s, -1)[keep])
    assert torch.equal(out[2], torch.zeros(8)) and lse[2] == float("-inf")


def test_running_merge_equals_merge_lse_with_rows_without_keys() -> None:
    """merge_into_ (the chunked backend's running merge) against merge_lse, pass by pass, with rows that
    have no key in some passes (lse -inf, output 0) and rows that had none yet (EMPTY_LSE)."""
    g = torch.Generator().manual_seed(9)
    rows, dim, passes = 11, 5, 4
    outs = [torch.randn(rows, dim, generator=g) for _ in range(passes)]
    lses = [torch.randn(rows, generator=g) * 4 for _ in range(passes)]
    for i, empty in enumerate([[0, 3], [3, 5], [], [3, 7]]):  # row 3 has keys only in pass 2
        outs[i][empty] = 0.0
        lses[i][empty] = float("-inf")
    acc_o, acc_l = torch.zeros(rows, dim), torch.full((rows,), EMPTY_LSE)
    for o, lse_ in zip(outs, lses, strict=True):
        merge_into_(acc_o, acc_l, o, lse_)
    want_o, want_l = merge_lse(outs, lses)
    torch.testing.assert_close(acc_o, want_o, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(acc_l, want_l)
    torch.testing.assert_close(acc_o[3], outs[2][3], atol=0, rtol=0)  # one pass: its output, bit for bit


def test_merge_in_fp32_for_bf16_parts() -> None:
    g = torch.Generator().manual_seed(6)
    outs = [torch.randn(4, 3, generator=g).bfloat16() for _ in range(2)]
    lses = [torch.randn(4, generator=g) for _ in range(2)]
    out, _ = merge_lse(outs, lses)
    assert out.dtype == torch.float32
    w = torch.softmax(torch.stack(lses), 0)
    torch.testing.assert_close(out, w[0, :, None] * outs[0].float() + w[1, :, None] * outs[1].float())


def test_merge_outputs_is_the_merged_output_in_the_given_dtype() -> None:
    """``merge_outputs`` (the last merge of flex with a dense part, no text): merge_lse's output, converted."""
    g = torch.Generator().manual_seed(8)
    outs = [torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g).bfloat16()]
    lses = [torch.randn(6, generator=g), torch.randn(6, generator=g)]
    lses[1][2] = float("-inf")
    got = merge_outputs(outs, lses, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, merge_lse(outs, lses)[0].bfloat16())
    acc_o, acc_l = outs[0].clone(), lses[0].clone()  # the running merge of a bf16 pass: converted first
    merge_pass_into_(acc_o, acc_l, outs[1], lses[1])
    want_o, want_l = merge_lse(outs, lses)
    torch.testing.assert_close(acc_o, want_o, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(acc_l, want_l)


def test_a_non_finite_lse_stays_non_finite() -> None:
    """A row whose pass has a NaN or +inf LSE (a NaN or +inf logit) gets a NaN output, not 0; a pass with
    no key for a row (LSE -inf) still weighs zero whatever its output."""
    outs = [torch.ones(4, 3), torch.full((4, 3), 2.0)]
    lses = [torch.tensor([0.0, float("nan"), float("inf"), 0.0]), torch.tensor([0.0, 0.0, 0.0, float("-inf")])]
    outs[1][3] = float("nan")  # arbitrary output of a pass without keys for that row
    out, _ = merge_lse(outs, lses)
    assert torch.isnan(out[1]).all() and torch.isnan(out[2]).all()
    torch.testing.assert_close(out[0], torch.full((3,), 1.5))
    torch.testing.assert_close(out[3], torch.ones(3))
