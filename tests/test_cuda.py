"""On a CUDA device: the compiled ``flex`` backend (the default there) against the dense reference.

The CPU run of the suite checks the eager flex implementation only; these tests check the compiled
kernel, its block tables and the LSE it returns, on the GPU.
"""

from __future__ import annotations

import pytest
import torch

import freeloc
from freeloc.attention import AttentionOptions, attend
from freeloc.methods import Method

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device here: the compiled flex backend runs on CUDA only (eager flex is tested on CPU)",
)

TOL = {torch.float32: 1e-4, torch.bfloat16: 4e-2}
# (frames, height, width): tokens per frame 15 and 21, neither a multiple of 8 nor of 128
GRIDS = [(30, 3, 5), (17, 7, 3)]


def methods() -> list[tuple[str, Method | None]]:
    return [
        ("none", None),
        ("vrpr", freeloc.VRPR.for_length(30, 13)),
        ("tsa", freeloc.TSA(d1=3, d2=9, stripe=0.25, sink_group=4, sink_window=6, cap=12)),
        ("tsa-default", freeloc.TSA(cap=12)),
        ("sliding", freeloc.SlidingWindow(4)),
        ("riflex", freeloc.RIFLEx(k=2, num_frames=30)),
    ]


@pytest.fixture(autouse=True)
def many_shapes() -> object:
    # one compiled kernel per shape: allow the test's many shapes without Dynamo's eager fallback
    from freeloc.attention._fused import recompile_limit_at_least

    with recompile_limit_at_least(256):
        yield


def qkv(n: int, dim: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, n, 3, dim, generator=g).to("cuda", dtype) for _ in range(3))


@pytest.mark.parametrize("name,method", methods(), ids=[m[0] for m in methods()])
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: "x".join(map(str, g)))
@pytest.mark.parametrize("text", [(0, 0), (6, 0), (0, 5)], ids=["video", "text-before", "text-after"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_flex_matches_reference(name: str, method: Method | None, grid: tuple[int, int, int],
                                         text: tuple[int, int], dtype: torch.dtype) -> None:
    f, h, w = grid
    tb, ta = text
    q, k, v = qkv(tb + f * h * w + ta, 64, dtype, seed=len(name) * 31 + f)
    kw = dict(grid=grid, method=method, rotary=freeloc.RotaryLayout.wan(64), text_before=tb, text_after=ta)
    ref = attend(q, k, v, backend="reference", **kw)
    out = attend(q, k, v, **kw)  # auto: flex on CUDA, its unstriped windows on the fused dense kernel
    assert out.dtype == dtype and out.shape == q.shape
    err = (out.float() - ref.float()).abs().max().item()
    print(f"{name} {grid} text={text} {dtype}: max error {err:.2e}")
    assert err <= TOL[dtype], err


def error_at_121_tokens_per_frame(frames: int, method: Method, text: tuple[int, int], dtype: torch.dtype,
                                  seed: int, options: AttentionOptions | None = None) -> float:
    """Max |attend (default backend, ``options``) - reference| at ``frames`` x 11 x 11 tokens, head dim 64."""
    tb, ta = text
    q, k, v = qkv(tb + frames * 121 + ta, 64, dtype, seed=seed)
    kw = dict(grid=(frames, 11, 11), method=method, rotary=freeloc.RotaryLayout.wan(64), text_before=tb,
              text_after=ta)
    out = attend(q, k, v, options=options, **kw)
    return (out.float() - attend(q, k, v, backend="reference", **kw).float()).abs().max().item()


@pytest.mark.parametrize("name,method", [m for m in methods() if m[0] in ("vrpr", "tsa", "tsa-default", "sliding")],
                         ids=["vrpr", "tsa", "tsa-default", "sliding"])
@pytest.mark.parametrize("text", [(0, 0), (6, 0)], ids=["video", "text-before"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_flex_frame_aligned_layout(name: str, method: Method, text: tuple[int, int],
                                            dtype: torch.dtype) -> None:
    # 121 tokens per frame, padded to one 128-token block: the frame-aligned layout (auto picks it for TSA
    # here), whose compiled mask_mod tests only the stripe and the padding; every band on flex
    err = error_at_121_tokens_per_frame(9, method, text, dtype, seed=len(name) * 7,
                                        options=AttentionOptions(layout="aligned", unstriped="flex"))
    print(f"aligned {name} text={text} {dtype}: max error {err:.2e}")
    assert err <= TOL[dtype], err


@pytest.mark.parametrize("text", [(0, 0), (6, 0)], ids=["video", "text-before"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_flex_stripe_key_blocks_of_64(text: tuple[int, int], dtype: torch.dtype) -> None:
    # stripe_key_block=64: the striped call's keys shifted by 25 tokens in their padded frames (130
    # tokens per frame), key blocks of 64, the kernel's key tile 64; every band on flex
    options = AttentionOptions(layout="aligned", unstriped="flex", stripe_key_block=64)
    tb, ta = text
    q, k, v = qkv(tb + 9 * 130 + ta, 64, dtype, seed=13)
    kw = dict(grid=(9, 10, 13), method=freeloc.TSA(d1=2, d2=5, stripe=0.2, sink_group=2, sink_window=3, cap=6),
              rotary=freeloc.RotaryLayout.wan(64), text_before=tb, text_after=ta)
    out = attend(q, k, v, options=options, **kw)
    err = (out.float() - attend(q, k, v, backend="reference", **kw).float()).abs().max().item()
    print(f"stripe key blocks of 64, text={text} {dtype}: max error {err:.2e}")
    assert err <= TOL[dtype], err


@pytest.mark.parametrize("text", [(0, 0), (6, 0)], ids=["video", "text-before"])
def test_compiled_flex_default_stripe_key_blocks_at_head_dim_128(text: tuple[int, int]) -> None:
    # the default path in bf16 at head dim 128 (stripe_key_block "auto": key blocks of 64 in the striped call)
    from freeloc.attention._flex_groups import stripe_key_block

    options = AttentionOptions(layout="aligned")
    assert stripe_key_block(options, torch.bfloat16, 128) == 64
    tb, ta = text
    q, k, v = qkv(tb + 9 * 130 + ta, 128, torch.bfloat16, seed=17)
    kw = dict(grid=(9, 10, 13), method=freeloc.TSA(d1=2, d2=5, stripe=0.2, sink_group=2, sink_window=3, cap=6),
              rotary=freeloc.RotaryLayout.wan(128), text_before=tb, text_after=ta)
    out = attend(q, k, v, options=options, **kw)
    err = (out.float() - attend(q, k, v, backend="reference", **kw).float()).abs().max().item()
    print(f"default stripe key blocks at head dim 128, text={text}: max error {err:.2e}")
    assert err <= TOL[torch.bfloat16], err


@pytest.mark.parametrize("dim", [24, 80], ids=lambda d: f"head{d}")
def test_compiled_flex_head_dims_not_a_power_of_two(dim: int) -> None:
    # tiny test models use head_dim 24; some real ones use 80 or 96
    grid = (17, 7, 3)
    q, k, v = qkv(17 * 21, dim, torch.bfloat16, seed=dim)
    kw = dict(grid=grid, method=freeloc.TSA(cap=12), rotary=freeloc.RotaryLayout.wan(dim))
    err = (attend(q, k, v, **kw).float() - attend(q, k, v, backend="reference", **kw).float()).abs().max().item()
    print(f"head_dim {dim}: max error {err:.2e}")
    assert err <= TOL[torch.bfloat16], err


@pytest.mark.parametrize("name,method", [m for m in methods() if m[0] in ("vrpr", "tsa", "sliding")],
                         ids=["vrpr", "tsa", "sliding"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_stacks_on_cuda_match_reference(name: str, method: Method, dtype: torch.dtype) -> None:
    """The chunked backend on the GPU (the benchmark's exact reference there): its stacks, overlapping
    strided windows, through the checked fused kernel (bf16) or the float32 path in bounded groups of
    frames (fp32, where no fused kernel passes its check)."""
    from freeloc.attention import _kernels as kernels
    from freeloc.attention._passes import Stack, plan_passes

    grid = (30, 6, 10)
    q, k, v = qkv(30 * 60, 64, dtype, seed=41)
    kw = dict(grid=grid, method=method, rotary=freeloc.RotaryLayout.wan(64))
    bands = freeloc.attention.band_set_for(method, 30, 60, freeloc.RotaryLayout.wan(64)).aligned()
    assert any(isinstance(p, Stack) for p in plan_passes(bands, 60, 64))
    ref = attend(q, k, v, backend="reference", **kw)
    out = attend(q, k, v, backend="chunked", **kw)
    err = (out.float() - ref.float()).abs().max().item()
    print(f"chunked {name} {dtype}: max error {err:.2e}; kernels chosen: {kernels.checked_kernels()}")
    assert err <= TOL[dtype], err


CASES = [(dt, m, o) for dt in (torch.bfloat16, torch.float16, torch.float32)
         for m in (False, True) for o in (False, True)]


@pytest.mark.parametrize("dtype,masked,overlapping", CASES,
                         ids=[f"{str(d)[6:]}-{'masked' if m else 'plain'}-{'overlap' if o else 'separate'}"
                              for d, m, o in CASES])
def test_fused_kernels_with_lse_on_this_gpu(dtype: torch.dtype, masked: bool, overlapping: bool) -> None:
    """``attention_with_lse`` on CUDA: the kernel that passed its check (cuDNN, flash or memory-efficient)
    against a plain float64 computation on a larger odd-sized problem, with a row without keys."""
    from freeloc.attention import _kernels as kernels

    g = torch.Generator().manual_seed(7)
    b, h, nq, nk, d = 3, 5, 301, 517, 128

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to("cuda", dtype)

    q = rand(b, h, nq, d)
    if overlapping:  # a stack's sliding key windows: batch entry i reads tokens [40 i, 40 i + nk)
        base_k, base_v = rand(1, h, nk + 80, d), rand(1, h, nk + 80, d)
        k = base_k.as_strided((b, h, nk, d), (40 * d, base_k.stride(1), d, 1))
        v = base_v.as_strided((b, h, nk, d), (40 * d, base_v.stride(1), d, 1))
    else:
        k, v = rand(b, h, nk, d), rand(b, h, nk, d)
    mask = None
    if masked:
        mask = torch.rand(b, 1, nq, nk, generator=g).to("cuda") < 0.5
        mask[2, 0, 17] = False  # no key for this row: output 0, LSE -inf
    out, lse = kernels.attention_with_lse(q, k, v, mask, d**-0.5)
    chosen = kernels.fused_kernel_for(q, masked, overlapping)
    s = (q.double() @ k.double().transpose(-1, -2)) * d**-0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    want_lse = torch.logsumexp(s, -1)
    want = (torch.softmax(s, -1).nan_to_num(0.0) @ v.double())
    err_o = (out.double() - want).abs().max().item()
    finite = torch.isfinite(want_lse)
    err_l = (lse.double() - want_lse)[finite].abs().max().item()
    print(f"{dtype} masked={masked} overlapping={overlapping}: kernel {None if chosen is None else chosen.name}, "
          f"max error out {err_o:.2e}, lse {err_l:.2e}")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert err_o <= tol and err_l <= tol
    assert torch.equal(torch.isneginf(lse), ~finite)
    if masked:
        assert bool((out[2, :, 17] == 0).all())
    if dtype != torch.float32 and not masked and not overlapping:
        assert chosen is not None, "no fused kernel with LSE passed its check on this GPU"


@pytest.mark.parametrize("name,method", [m for m in methods() if m[0] in ("vrpr", "tsa", "tsa-default", "sliding")],
                         ids=["vrpr", "tsa", "tsa-default", "sliding"])
@pytest.mark.parametrize("text", [(0, 0), (6, 0)], ids=["video", "text-before"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["stacks", "chunked", "flex"])
def test_flex_with_a_part_on_chunked(name: str, method: Method, text: tuple[int, int], dtype: torch.dtype,
                                     mode: str) -> None:
    # unstriped: the sliding windows ("stacks", the default here) or all the unstriped bands ("chunked") on
    # the chunked backend's fused dense calls, the rest on compiled flex (frame-aligned for TSA at 121
    # tokens per frame), merged by LSE; or every band on flex ("flex")
    err = error_at_121_tokens_per_frame(30, method, text, dtype, seed=len(name) * 5,
                                        options=AttentionOptions(unstriped=mode))
    print(f"flex + chunked ({mode}) {name} text={text} {dtype}: max error {err:.2e}")
    assert err <= TOL[dtype], err


def test_repeated_calls_do_not_recompile() -> None:
    # the mask reads captured tensors only: later calls at the same shapes reuse the compiled kernels
    import torch._dynamo.utils as du

    grid = (24, 5, 7)
    q, k, v = qkv(24 * 35, 64, torch.bfloat16, seed=5)
    rot = freeloc.RotaryLayout.wan(64)
    methods = (freeloc.TSA(cap=10), freeloc.VRPR.for_length(24, 11), freeloc.SlidingWindow(5, sink=False))
    for method in methods:
        attend(q, k, v, grid=grid, method=method, rotary=rot)
    before = du.counters["stats"]["unique_graphs"]
    for method in methods:
        attend(q, k, v, grid=grid, method=method, rotary=rot)
    assert du.counters["stats"]["unique_graphs"] == before, "flex recompiled for a shape it had seen"


def test_shapes_model_trains_on_cuda_and_moves_between_devices(tmp_path: object) -> None:
    # a run trained on the GPU resumes on the CPU, and the same weights sample the same videos on both
    from pathlib import Path

    pytest.importorskip("diffusers", reason="the shapes model is a diffusers Wan transformer: diffusers is not "
                                            "installed here")
    from freeloc.shapes.model import ShapesConfig, load, sample
    from freeloc.shapes.train import train

    tiny = ShapesConfig(num_layers=1, num_heads=2, head_dim=96, ffn_dim=32, batch=2, trained_frames=4)
    run = Path(str(tmp_path)) / "run"
    train(tiny, 2, run, save_every=2, progress=False, device="cuda")
    assert train(tiny, 3, run, save_every=3, progress=False)["step"] == 3  # resumed on the CPU
    model, cfg = load(run)
    cond = torch.zeros(1, 37)
    on_cpu = sample(model, cfg, cond, num_frames=8, steps=2)
    on_gpu = sample(model.cuda(), cfg, cond, num_frames=8, steps=2)
    assert on_gpu.device.type == "cpu" and on_gpu.shape == on_cpu.shape == (1, 8, 3, 32, 32)
    print(f"max |gpu - cpu| {(on_gpu - on_cpu).abs().max().item():.2e}")
    assert torch.allclose(on_gpu, on_cpu, atol=1e-3)


@pytest.mark.parametrize("name,method", methods(), ids=[m[0] for m in methods()])
@pytest.mark.parametrize("options", [None, AttentionOptions(unstriped="flex")], ids=["auto", "all-flex"])
@pytest.mark.parametrize("backend", ["auto", "chunked"])
def test_gradients_on_cuda_match_reference(name: str, method: Method | None, options: AttentionOptions | None,
                                           backend: str) -> None:
    """float32 gradients w.r.t. q, k and v on CUDA (the compiled flex backward with its LSE's gradient, the
    fused dense kernels' passes with theirs) equal the reference's, with text before the video."""
    q, k, v = qkv(4 + 30 * 15, 64, torch.float32, seed=len(name) + 5)
    cot = torch.randn(q.shape, generator=torch.Generator().manual_seed(6)).to("cuda")
    kw = dict(grid=(30, 3, 5), method=method, rotary=freeloc.RotaryLayout.wan(64), text_before=4)
    grads = {}
    for be in ("reference", backend):
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        ((attend(*xs, backend=be, options=options, **kw) * cot).sum()).backward()
        grads[be] = [x.grad for x in xs]
    for g, g_ref in zip(grads[backend], grads["reference"], strict=True):
        err = (g - g_ref).abs().max().item()
        print(f"{name} {backend}: max |grad error| {err:.2e} of {g_ref.abs().max().item():.2f}")
        assert err <= 1e-3 * max(1.0, g_ref.abs().max().item()), err


@pytest.mark.parametrize("text", [(0, 0), (6, 5)], ids=["video", "text-both"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ultravico_in_one_compiled_flex_call_matches_reference(text: tuple[int, int], dtype: torch.dtype) -> None:
    """UltraViCo (with a harmonic band) on CUDA: ``auto`` runs the compiled flex call whose ``score_mod``
    scales positive logits; forward against the reference, and float32 gradients."""
    tb, ta = text
    method = freeloc.UltraViCo(alpha=0.8, window=6, beta=0.6, period=13, halfwidth=2)
    q, k, v = qkv(tb + 30 * 15 + ta, 64, dtype, seed=41)
    kw = dict(grid=(30, 3, 5), method=method, rotary=freeloc.RotaryLayout.wan(64), text_before=tb, text_after=ta)
    ref = attend(q, k, v, backend="reference", **kw)
    out = attend(q, k, v, **kw)
    err = (out.float() - ref.float()).abs().max().item()
    print(f"ultravico text={text} {dtype}: max error {err:.2e}")
    assert err <= TOL[dtype], err
    if dtype == torch.float32:
        cot = torch.randn(q.shape, generator=torch.Generator().manual_seed(6)).to("cuda")
        grads = {}
        for be in ("reference", "auto"):
            xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
            ((attend(*xs, backend=be, **kw) * cot).sum()).backward()
            grads[be] = [x.grad for x in xs]
        for g, g_ref in zip(grads["auto"], grads["reference"], strict=True):
            assert (g - g_ref).abs().max().item() <= 1e-3 * max(1.0, g_ref.abs().max().item())
