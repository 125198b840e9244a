"""The single attention pass with its LSE (``freeloc.attention._kernels``): the plain float32 path in row
chunks, and the choice of a fused kernel by checking each candidate on a small problem first.

The CUDA candidates themselves run in ``tests/test_cuda.py``; here, CPU stand-ins (right, wrong, failing)
exercise the choice.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

import pytest
import torch

from freeloc.attention import AttentionOptions
from freeloc.attention import _kernels as kernels
from freeloc.attention._kernels import FusedKernel, attention_with_lse, choose_kernel, prepare_mask

CPU = torch.device("cpu")


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v.double(), lse


def cpu_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias,
                                                                          scale=scale)
    return out, lse


def ignores_bias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return cpu_flash(q, k, v, None, scale)


def base2_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = cpu_flash(q, k, v, bias, scale)
    return out, lse / math.log(2)  # log2 instead of the natural log: some kernels keep it that way


def contiguous_only(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    if k.shape[0] > 1 and k.stride(0) < k.shape[2] * k.stride(2):
        raise RuntimeError("overlapping batch strides are not supported")
    return cpu_flash(q, k, v, bias, scale)


def broken(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    raise RuntimeError("no kernel image is available for execution on the device")


FLOATS = (torch.float32, torch.bfloat16)


def kernel(name: str, run: object, masked: bool = True) -> FusedKernel:
    return FusedKernel(name, run, FLOATS, masked=masked, max_head_dim=256)  # type: ignore[arg-type]


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
@pytest.mark.parametrize("overlapping", [False, True], ids=["separate", "overlapping"])
def test_the_first_candidate_that_passes_its_check_is_chosen(masked: bool, overlapping: bool) -> None:
    candidates = (kernel("broken", broken), kernel("base2", base2_lse), kernel("no-bias", ignores_bias),
                  kernel("contiguous", contiguous_only), kernel("right", cpu_flash))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = choose_kernel(candidates, CPU, torch.float32, 48, masked, overlapping)
    # the candidates that raised are named in a warning; the ones that answered wrong are skipped quietly
    raised = {m.group(1) for w in caught if (m := re.search(r"kernel '([\w-]+)' unavailable", str(w.message)))}
    assert raised == ({"broken", "contiguous"} if overlapping and masked else {"broken"})
    assert chosen is not None
    # the base-2 LSE always fails; ignoring the bias fails only when there is one; refusing
    # overlapping windows fails (raises) only for them
    want = {(False, False): "no-bias", (True, False): "contiguous", (False, True): "no-bias",
            (True, True): "right"}[masked, overlapping]
    print(f"masked={masked}, overlapping={overlapping}: chose {chosen.name}")
    assert chosen.name == want


def test_no_candidate_passing_gives_none_and_unmasked_kernels_are_not_asked_for_masks() -> None:
    assert choose_kernel((kernel("base2", base2_lse),), CPU, torch.bfloat16, 32, False, False) is None
    calls: list[str] = []

    def spy(*args: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append("called")
        return cpu_flash(*args)  # type: ignore[arg-type]

    assert choose_kernel((kernel("plain-only", spy, masked=False),), CPU, torch.float32, 32, True, False) is None
    assert calls == []
    # a head dim above the kernel's limit, or a dtype it does not take, is not tried either
    assert choose_kernel((kernel("small", spy),), CPU, torch.float32, 512, False, False) is None
    assert choose_kernel((kernel("small", spy),), CPU, torch.float64, 32, False, False) is None
    assert calls == []
    assert choose_kernel((kernel("spy", spy),), CPU, torch.float32, 32, False, False) is not None
    assert calls == ["called"]


def test_float_path_in_row_chunks_matches_dense() -> None:
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, n, 20, generator=g, dtype=torch.float64) for n in (41, 29, 29))
    mask = torch.rand(2, 1, 41, 29, generator=g) < 0.6
    mask[1, 0, 5] = False  # a row without keys: zero output, LSE -inf
    want_o, want_l = dense(q, k, v, mask, 0.3)
    whole = attention_with_lse(q, k, v, mask, 0.3)
    four_rows = AttentionOptions(float_logits=2 * 3 * 29 * 4)  # four query rows per chunk
    chunked = attention_with_lse(q, k, v, mask, 0.3, options=four_rows)
    for out, lse in (whole, chunked):
        torch.testing.assert_close(out, want_o.to(out.dtype), atol=1e-5, rtol=1e-5)  # computed in float32
        torch.testing.assert_close(lse, want_l.float(), atol=1e-6, rtol=1e-6)
    assert bool(torch.isneginf(chunked[1][1, :, 5]).all()) and bool((chunked[0][1, :, 5] == 0).all())


def test_prepare_mask_reports_rows_without_keys() -> None:
    mask = torch.tensor([[True, False], [False, False]])
    bias, has_key = prepare_mask(mask, torch.bfloat16)
    assert bias.dtype == torch.bfloat16 and bias[0, 0] == 0 and bool(torch.isneginf(bias[0, 1]))
    assert has_key is not None and has_key.tolist() == [True, False]
    assert prepare_mask(torch.ones(3, 4, dtype=torch.bool), torch.float32)[1] is None


def test_fused_kernels_are_for_cuda_only() -> None:
    q = torch.randn(1, 2, 5, 16)
    assert kernels.fused_kernel_for(q) is None
    assert kernels.uses_fused_kernel(q) and not kernels.uses_fused_kernel(q.double())


def test_a_kernel_that_fails_on_a_real_call_gives_way() -> None:
    """A kernel that passed its check but raises on a later call is replaced by the next candidate that
    passes (or the float32 path) for that kind of call, with a warning, and the call still returns the
    right numbers."""
    def small_only(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        if q.shape[2] > 100:
            raise RuntimeError("sequence too long for this kernel")
        return dense_kernel(q, k, v, bias, scale)

    used: list[str] = []

    def dense_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        used.append("dense")
        s = (q @ k.transpose(-1, -2)) * scale + (0 if bias is None else bias)
        return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)

    f64 = (torch.float64,)
    options = AttentionOptions(fused_devices=("cuda", "cpu"),
                               fused_kernels=(FusedKernel("small", small_only, f64, True, 64),
                                              FusedKernel("dense", dense_kernel, f64, True, 64)))
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g, dtype=torch.float64) for n in (150, 70, 70))
    assert kernels.fused_kernel_for(q, options=options).name == "small"  # passed its check (a small problem)
    used.clear()
    with pytest.warns(UserWarning, match=r"'small' failed on a call of shape q \(2, 3, 150, 16\).*using 'dense'"):
        out, lse = attention_with_lse(q, k, v, None, 0.25, options=options)
    assert kernels.fused_kernel_for(q, options=options).name == "dense" and "dense" in used
    want_o, want_l = dense(q, k, v, None, 0.25)
    torch.testing.assert_close(out, want_o, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, want_l.float(), atol=1e-6, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["chunked", "flex-stacks", "flex-split", "flex-auto", "text-mask", "compiled"])
def test_backends_through_a_fused_kernel_outside_the_cpu_path(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The code path the GPU takes (a checked fused kernel for stacks, passes and the text pass, with
    overlapping key windows, biases of both shapes and rows without keys), run on the CPU in float64
    through a stand-in kernel, against the reference. ``compiled``: also the GPU's compiled steps
    (rotations written straight into head-major buffers, merges of passes), compiled for the CPU."""
    import freeloc
    from freeloc.attention import _fused as compiled_steps
    from freeloc.attention import _planning, attend

    calls: list[tuple[int, bool, bool]] = []  # (batch entries, biased, overlapping windows)

    def naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append((q.shape[0], bias is not None, kernels._overlapping(k)))
        s = (q @ k.transpose(-1, -2)) * scale + (0 if bias is None else bias)
        return torch.softmax(s, -1), torch.logsumexp(s, -1)  # NaN rows where a bias masks every key

    def fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        p, lse = naive(q, k, v, bias, scale)
        return p @ v, lse

    options = AttentionOptions(fused_devices=("cuda", "cpu"),
                               fused_kernels=(FusedKernel("stand-in", fused, (torch.float64,), True, 64),))
    if case in ("flex-stacks", "flex-split"):
        options = options.replace(unstriped="stacks" if case == "flex-stacks" else "chunked")
    rotary = freeloc.RotaryLayout.wan(24)
    grid, tb, ta = (19, 5, 7), 5, 3
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, tb + 19 * 35 + ta, 3, 24, generator=g, dtype=torch.float64) for _ in range(3))
    text_mask = None
    if case == "text-mask":  # prompt padding: the second sample attends no text token
        text_mask = torch.ones(2, tb + ta, dtype=torch.bool)
        text_mask[1] = False
    backend = "flex" if case.startswith("flex") or case == "compiled" else "chunked"
    if case == "flex-auto":  # the default: stacks, since a fused kernel passes its check for them
        assert options.unstriped == "auto" and _planning._resolve_unstriped(q, options) == "stacks"
    compiled: list[str] = []
    if case == "compiled":  # what on_device compiles on CUDA, compiled here (and seen to be)
        options = options.replace(compile_steps=True)
        real = compiled_steps._compiled

        def spy(fn: object, dynamic: bool | None = False) -> object:
            compiled.append(getattr(fn, "__qualname__", str(fn)))
            return real(fn, dynamic)

        monkeypatch.setattr(compiled_steps, "_compiled", spy)
        import freeloc.attention as attention_module

        real_chunked = attention_module.run_chunked
        head_major: list[bool] = []

        def chunked_spy(plan: object, qs: Any, ks: Any, *args: object) -> object:
            # the rotations arrive written head-major: (batch, heads, tokens, dim) with contiguous tokens
            head_major.extend(x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] for x in [*qs[:], *ks[:]])
            return real_chunked(plan, qs, ks, *args)

        monkeypatch.setattr(attention_module, "run_chunked", chunked_spy)
    for method in (freeloc.TSA(d1=3, d2=9, stripe=0.25, sink_group=4, sink_window=6, cap=12),
                   freeloc.VRPR.for_length(19, 9)):
        kw = dict(grid=grid, method=method, rotary=rotary, text_before=tb, text_after=ta, text_mask=text_mask,
                  options=options)
        calls.clear()
        out = attend(q, k, v, backend=backend, **kw)
        ref = attend(q, k, v, backend="reference", **kw)
        if case == "compiled":  # video alone too: the parts' merge then writes q's dtype directly
            video = slice(tb, tb + 19 * 35)
            kw_v = dict(grid=grid, method=method, rotary=rotary, options=options)
            torch.testing.assert_close(attend(q[:, video], k[:, video], v[:, video], backend=backend, **kw_v),
                                       attend(q[:, video], k[:, video], v[:, video], backend="reference", **kw_v),
                                       atol=1e-5, rtol=0)
        print(f"{case} {type(method).__name__}: {len(calls)} fused calls, "
              f"{sum(o for _, _, o in calls)} over overlapping windows, {sum(b for _, b, _ in calls)} biased")
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)  # the merge runs in float32
        assert calls and any(o for _, _, o in calls)  # stacks read overlapping windows through the kernel
        if case == "text-mask":
            assert any(b for _, b, _ in calls)  # the text pass, with its per-sample bias
    assert kernels.checked_kernels()  # the stand-in passed its checks
    if case == "compiled":
        print("compiled:", sorted(set(compiled)))
        assert {"write_into", "merge_pass_into_", "merge_lse", "merge_outputs"} <= set(compiled)
        assert not compiled_steps._EAGER
        assert head_major and all(head_major)


def test_unstriped_auto_is_flex_without_a_fused_kernel() -> None:
    """``unstriped="auto"`` runs the stacks on a fused kernel only where one passes its check: on the CPU
    (no fused kernel with an LSE for overlapping windows here) every band stays on flex."""
    from freeloc.attention import _planning

    q = torch.randn(1, 30, 2, 16)
    assert AttentionOptions().unstriped == "auto"
    assert _planning._resolve_unstriped(q, AttentionOptions()) == "flex"
    assert _planning._resolve_unstriped(q, AttentionOptions(unstriped="stacks")) == "stacks"
