"""The flex backend: its calls' block masks and token masks (``freeloc.attention._flex_groups``), both token
layouts and key blocks against the reference, the parts it leaves to the dense kernel, and the executor's
fallbacks (``freeloc.attention._flex``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support import ROTARY, SMALL_TSA, TOL, methods, qkv

import freeloc
from freeloc.attention import AttentionOptions, attend, band_set_for
from freeloc.attention import _flex as flex
from freeloc.attention import _flex_groups as groups_module
from freeloc.attention._flex_groups import BLOCK_SIZE, FlexGroup, flex_groups, padded_frame
from freeloc.attention._planning import ChunkedPart, FlexPart, plan_attention
from freeloc.methods import Method

ALIGNED = AttentionOptions(layout="aligned")


@pytest.mark.parametrize("method", [freeloc.TSA(d1=2, d2=6, stripe=0.2, cap=12), freeloc.VRPR(2, 4, 2, 3, 8)],
                         ids=["tsa", "vrpr"])
@pytest.mark.parametrize("grid", [(12, 5, 7), (6, 16, 16), (13, 1, 3)])
def test_flex_block_masks_match_token_masks(grid: tuple[int, int, int], method: Method) -> None:
    """Each flex call's BlockMask (partial + full blocks) is exactly the tiling of its token mask, and its
    mask_mod is that token mask."""
    f, h, w = grid
    s = h * w
    bs = band_set_for(method, f, s, ROTARY).aligned()
    n = f * s
    groups = flex_groups(bs, s)
    assert len(groups) < len(bs.bands)  # some bands share a call
    covered = torch.zeros(n, n, dtype=torch.long)
    for group in groups:
        # expected token mask of the call: query token x key token of the concatenated segments
        blocks = []
        for rep, frames, members in group.segments:
            cols = torch.arange(n) if frames is None else (frames[:, None] * s + torch.arange(s)).flatten()
            seg = torch.zeros(n, len(cols), dtype=torch.bool)
            for i in members:
                used = bs.bands[i].pairs.any(0)
                assert torch.equal(bs.bands[i].k_pos[used], bs.bands[rep].k_pos[used])
                assert torch.equal(bs.bands[i].q_pos, bs.bands[group.bands[0]].q_pos)
                seg |= bs.bands[i].token_pairs(s)[:, cols]
            blocks.append(seg)
            covered[:, cols] += seg.long()
        tok = torch.cat(blocks, dim=1)
        nk = tok.shape[1]
        bm = group.block_mask(s, torch.device("cpu"))
        q_idx, kv_idx = torch.arange(n)[:, None], torch.arange(nk)[None, :]
        assert torch.equal(bm.mask_mod(0, 0, q_idx, kv_idx), tok)
        qb, kb = -(-n // BLOCK_SIZE), -(-nk // BLOCK_SIZE)
        padded = torch.zeros(qb * BLOCK_SIZE, kb * BLOCK_SIZE, dtype=torch.bool)
        padded[:n, :nk] = tok
        tiles = padded.view(qb, BLOCK_SIZE, kb, BLOCK_SIZE)
        any_t, full_t = group.block_table(s)
        assert torch.equal(any_t, tiles.any(3).any(1))
        assert torch.equal(full_t, tiles.all(3).all(1))
        assert torch.equal(bm.to_dense()[0, 0].bool()[:qb, :kb], any_t)
    assert torch.equal(covered.bool(), bs.token_mask(s)) and int(covered.max()) == 1  # each pair once


@pytest.mark.parametrize("method", [freeloc.TSA(d1=2, d2=6, stripe=0.2, cap=12), freeloc.TSA(d1=1, d2=3, cap=4),
                                    freeloc.VRPR(2, 4, 2, 3, 8), freeloc.SlidingWindow(2)],
                         ids=["tsa", "tsa-wide-stripe", "vrpr", "sliding"])
@pytest.mark.parametrize("grid", [(9, 5, 7), (5, 11, 11), (4, 16, 16), (3, 13, 11), (4, 10, 13)])
@pytest.mark.parametrize("key_block", [128, 64])
def test_flex_frame_aligned_tables_and_masks(grid: tuple[int, int, int], method: Method, key_block: int) -> None:
    """Frame-aligned layout (each frame padded to whole 128-token blocks; striped calls with key blocks of
    ``key_block`` and their keys shifted by the call's tiling): every call's block table is the
    tiling of its token mask over the real queries, padding keys are never attended, the eager mask_mod
    is the token mask, and the compiled kernel's mask_mod (stripe and padding test, no frame table) agrees
    with it on every partial block, the only blocks where the compiled kernel evaluates it."""
    f, h, w = grid
    s = h * w
    p = padded_frame(s)
    bs = band_set_for(method, f, s, ROTARY).aligned()
    groups = flex_groups(bs, s, by_stripe=True)
    covered = torch.zeros(f * s, f * s, dtype=torch.long)
    real_q = (torch.arange(f * p) % p) < s
    for group in groups:
        assert len({bs.bands[i].stripe for i in group.bands}) == 1  # one stripe width per call
        kb, shift = group.tiling(s, key_block)
        striped = group.stripe_width(s) < s
        assert kb == (key_block if striped else BLOCK_SIZE) and 0 <= shift <= p - s and (shift == 0 or kb < 128)
        c = group.num_key_frames
        key_frames = torch.cat([torch.arange(f) if fr is None else fr for _, fr, _ in group.segments])
        tok = torch.zeros(f, p, c, p, dtype=torch.bool)  # expected mask, padded coordinates
        at = 0
        for _rep, frames, members in group.segments:
            cols = torch.arange(f) if frames is None else frames
            for i in members:
                band = bs.bands[i].token_pairs(s).view(f, s, f, s)[:, :, cols]
                tok[:, :s, at:at + len(cols), shift:shift + s] |= band
            at += len(cols)
        tok = tok.view(f * p, c * p)
        tok[~real_q] = False  # padding queries: output dropped, their mask does not matter
        real_tok = tok.view(f, p, c, p)[:, :s, :, shift:shift + s]
        cov = covered.view(f, s, f, s)
        cov.index_add_(2, key_frames, real_tok.long())
        tiles = tok.view(f * p // BLOCK_SIZE, BLOCK_SIZE, c * p // kb, kb)
        rows = real_q.view(f * p // BLOCK_SIZE, BLOCK_SIZE)[:, :, None, None]
        any_t, full_t = group.block_table(s, aligned=True, key_block=key_block)
        assert torch.equal(any_t, tiles.any(3).any(1))
        assert torch.equal(full_t, (tiles | ~rows).all(3).all(1))
        q_idx, kv_idx = torch.arange(f * p)[:, None], torch.arange(c * p)[None, :]
        eager = group.mask_mod(s, torch.device("cpu"), aligned=True, key_block=key_block)(0, 0, q_idx, kv_idx)
        assert torch.equal(eager & real_q[:, None], tok)
        key_raster = kv_idx[0] % p - shift
        assert not eager[:, (key_raster < 0) | (key_raster >= s)].any()  # padding keys never attended
        cheap = group.mask_mod(s, torch.device("cpu"), aligned=True, frame_table=False, key_block=key_block)(
            0, 0, q_idx, kv_idx)
        partial = (any_t & ~full_t).repeat_interleave(BLOCK_SIZE, 0).repeat_interleave(kb, 1)
        assert torch.equal((cheap & partial)[real_q], (tok & partial)[real_q])
        assert bool(partial.any()) == (bool(tok.any()) and (s % BLOCK_SIZE != 0 or striped))
    assert torch.equal(covered.bool(), bs.token_mask(s)) and int(covered.max()) == 1  # each pair once


@pytest.mark.parametrize("text", [(0, 0), (6, 0)], ids=["video", "text-before"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_flex_stripe_key_blocks_of_64_match_reference(text: tuple[int, int], dtype: torch.dtype,
                                                      spy: Callable[..., list],
                                                      matches_reference: Callable[..., torch.Tensor]) -> None:
    """``stripe_key_block=64``: the striped calls' keys shifted inside their padded frames (by 25 tokens
    here, 130 tokens per frame) give the same numbers."""
    grid, tb = (9, 10, 13), text[0]
    method = freeloc.TSA(d1=2, d2=5, stripe=0.2, sink_group=2, sink_window=3, cap=6)
    bs = band_set_for(method, 9, 130, ROTARY).aligned()
    assert [g.tiling(130, 64) for g in flex_groups(bs, 130, by_stripe=True) if g.stripe_width(130) < 130] == [(64, 25)]
    pads = spy(flex, "_pad_into")
    q, k, v = qkv(tb + 9 * 130 + text[1], dtype, seed=11)
    matches_reference(q, k, v, backend="flex", grid=grid, method=method, rotary=ROTARY, text_before=tb,
                      text_after=text[1], options=AttentionOptions(layout="aligned", stripe_key_block=64))
    assert 25 in [args[4] for args, _ in pads if len(args) > 4]  # the striped call's keys and values, shifted


def test_stripe_tiling_at_the_wan_frame_size() -> None:
    """At 1560 tokens per frame and the TSA stripe (195): key blocks of 64 with the keys shifted by 2
    tokens, so that each 128-query block away from the frame edges touches 9 key blocks, 4 of them whole
    (with blocks of 128: 5, 1 whole); no other shift touches fewer blocks."""
    from freeloc.bands import gap_and_span

    stripe_tiling = groups_module.stripe_tiling
    assert stripe_tiling(1560, 195, 64) == (64, 2) and stripe_tiling(1560, 195, 128) == (128, 0)
    assert stripe_tiling(1560, 1560, 64) == (128, 0)  # no stripe: whole frames, blocks of 128

    def counts(kb: int, shift: int) -> tuple[list[int], list[int]]:
        qlo, qhi = groups_module._query_pieces(1560)
        klo, khi, whole = groups_module._key_pieces(1560, kb, shift)
        gap, span = gap_and_span(qlo, qhi, klo, khi)
        return ((195 > gap) & (klo <= khi)[None, :]).sum(1).tolist(), ((195 > span) & whole[None, :]).sum(1).tolist()

    touched, full = counts(64, 2)
    assert touched[2:10] == [9] * 8 and full[2:10] == [4] * 8
    assert counts(128, 0)[0][2:10] == [5] * 8 and counts(128, 0)[1][2:10] == [1] * 8
    assert all(sum(counts(64, d)[0]) >= sum(touched) for d in range(padded_frame(1560) - 1560 + 1))
    with pytest.raises(ValueError, match="key block must be 128 or 64, got 32"):
        stripe_tiling(1560, 195, 32)


def test_stripe_key_block_auto_rule() -> None:
    """``stripe_key_block="auto"`` (the default): key blocks of 64 for 2-byte floats with head dim 128 (where
    the flex kernel's own key tile is 64), 128 otherwise; an explicit 128 or 64 wins; anything else is refused."""
    auto = AttentionOptions()
    key_block = groups_module.stripe_key_block
    assert auto.stripe_key_block == "auto"
    assert key_block(auto, torch.bfloat16, 128) == 64 and key_block(auto, torch.float16, 128) == 64
    assert key_block(auto, torch.float32, 128) == 128 and key_block(auto, torch.bfloat16, 64) == 128
    assert key_block(AttentionOptions(stripe_key_block=64), torch.float32, 64) == 64
    assert key_block(AttentionOptions(stripe_key_block=128), torch.bfloat16, 128) == 128
    for bad in (32, "64", True):
        with pytest.raises(ValueError, match=f"stripe_key_block must be 'auto', 128 or 64, got {bad!r}"):
            AttentionOptions(stripe_key_block=bad)  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize("name,method", methods()[:6], ids=[m[0] for m in methods()[:6]])
@pytest.mark.parametrize("text", [(0, 0), (6, 0), (0, 5)], ids=["video", "text-before", "text-after"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_flex_frame_aligned_layout_matches_reference(name: str, method: Method | None,
                                                     text: tuple[int, int], dtype: torch.dtype,
                                                     matches_reference: Callable[..., torch.Tensor]) -> None:
    """The frame-aligned layout (padded frames, calls split by stripe width) computes the same numbers."""
    grid = (13, 5, 7)  # 35 tokens per frame, padded to 128
    tb, ta = text
    q, k, v = qkv(tb + 13 * 35 + ta, dtype, seed=len(name) + 7)
    matches_reference(q, k, v, backend="flex", grid=grid, method=method, rotary=ROTARY, text_before=tb,
                      text_after=ta, options=ALIGNED)


def test_flex_frame_aligned_pads_each_query_rotation_once(spy: Callable[..., list],
                                                          matches_reference: Callable[..., torch.Tensor]) -> None:
    """TSA's local and striped calls share one query rotation, so they share one padded copy of it."""
    pads = spy(flex, "_pad_into")
    q, k, v = qkv(19 * 15, torch.float32, seed=4)
    matches_reference(q, k, v, grid=(19, 3, 5), method=SMALL_TSA, rotary=ROTARY, backend="flex",
                      options=ALIGNED.replace(head_group=q.shape[2]))  # one group: each group pads its own heads
    assert len(pads) == 2 + 3 * 2  # queries: local = striped, sink; keys and values of the three calls


@pytest.mark.slow
@pytest.mark.parametrize("name,method", methods()[:6], ids=[m[0] for m in methods()[:6]])
@pytest.mark.parametrize("text", [(0, 0), (6, 0), (0, 5)], ids=["video", "text-before", "text-after"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["packed", "aligned"])
@pytest.mark.parametrize("mode", ["chunked", "stacks"])
def test_flex_with_a_part_on_chunked_matches_reference(
        name: str, method: Method | None, text: tuple[int, int], dtype: torch.dtype, layout: str,
        mode: str, matches_reference: Callable[..., torch.Tensor]) -> None:
    """``unstriped="chunked"``: the bands without a stripe run as the chunked backend runs them, the striped
    ones on flex; ``"stacks"``: the sliding windows of the unstriped bands run as stacks, the rest on flex.
    Merged by LSE: the same numbers."""
    options = AttentionOptions(unstriped=mode, layout=layout)
    grid = (19, 5, 7)
    tb, ta = text
    q, k, v = qkv(tb + 19 * 35 + ta, dtype, seed=len(name) + 11)
    plan = plan_attention(q, band_set_for(method, 19, 35, ROTARY), grid, tb, ta, "flex", options)
    on_chunked = {plan.bands.bands[p.band].name for part in plan.parts if isinstance(part, ChunkedPart)
                  for p in part.passes}
    on_flex = {b.name for part in plan.parts if isinstance(part, FlexPart) for b in part.bands.bands
               if not b.is_empty()}
    print(f"{name}: on chunked {sorted(on_chunked)}, on flex {sorted(on_flex)}")
    striped = {b.name for b in plan.bands.bands if b.stripe is not None and b.stripe < 35 and not b.is_empty()}
    if mode == "chunked":
        assert on_flex == striped and not striped & on_chunked
    else:  # the chunked part is the stacks' plan; flex gets what they leave, striped bands included
        assert striped <= on_flex
    if method is not None:
        assert on_chunked  # every method here has bands without a stripe, and sliding windows
    matches_reference(q, k, v, backend="flex", grid=grid, method=method, rotary=ROTARY, text_before=tb,
                      text_after=ta, options=options)


@pytest.mark.parametrize("text", [(0, 0), (6, 0)], ids=["video", "text-before"])
def test_flex_parts_are_merged_once_by_frame(text: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """With the dense part on the chunked backend, the flex calls' outputs are not merged on their own: the
    chunked part (float32), each flex call (bf16, views of the padded output by frame) and the text part
    go into one merge, which writes q's dtype when there is no text; the same numbers as the reference."""
    import freeloc.attention as attention_module

    merged: list[list[tuple[torch.dtype, int, bool]]] = []
    for name in ("merge_outputs", "merge_lse"):
        original = getattr(attention_module, name)

        def spy(outs: list[torch.Tensor], lses: list[torch.Tensor], *rest: object, _original: object = original,
                _name: str = name) -> object:
            merged.append([(o.dtype, o.ndim, o.is_contiguous()) for o in outs] + [_name])  # type: ignore[list-item]
            return _original(outs, lses, *rest)  # type: ignore[operator]

        monkeypatch.setattr(attention_module, name, spy)
    method = freeloc.TSA(d1=2, d2=5, stripe=0.2, sink_group=2, sink_window=3, cap=6)
    tb, ta = text
    q, k, v = qkv(tb + 9 * 130 + ta, torch.bfloat16, seed=21)
    kw = dict(grid=(9, 10, 13), method=method, rotary=ROTARY, text_before=tb, text_after=ta)
    # all heads in one group: one merge per call
    out = attend(q, k, v, backend="flex", options=AttentionOptions(unstriped="stacks", layout="aligned",
                                                                   head_group=q.shape[2]), **kw)
    parts = [(torch.float32, 5, True), (torch.bfloat16, 5, False)]  # the stacks, the striped flex call
    if tb + ta == 0:
        assert merged == [[*parts, "merge_outputs"]]
    else:
        (*flex_parts, text_part, name), = merged  # and the text keys' part, in q's dtype
        assert flex_parts == parts and text_part[:2] == (torch.bfloat16, 5) and name == "merge_lse"
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), attend(q, k, v, backend="reference", **kw).float(), rtol=0,
                               atol=TOL[torch.bfloat16])


def test_split_striped_keeps_band_indices() -> None:
    bs = band_set_for(SMALL_TSA, 19, 35, ROTARY)
    unstriped, striped = groups_module.split_striped(bs, 35)
    assert unstriped is not None and striped is not None
    assert len(unstriped.bands) == len(striped.bands) == len(bs.bands)
    for whole, a, b in zip(bs.bands, unstriped.bands, striped.bands, strict=True):
        assert torch.equal(a.pairs | b.pairs, whole.pairs) and not bool((a.pairs & b.pairs).any())
        assert torch.equal(a.q_pos, whole.q_pos) and torch.equal(b.k_pos, whole.k_pos)
    assert [b.name for b in striped.bands if not b.is_empty()] == ["striped"]
    vrpr = band_set_for(freeloc.VRPR.for_length(30, 13), 30, 35, ROTARY)
    assert groups_module.split_striped(vrpr, 35)[1] is None  # no stripe: all on chunked


def test_flex_layout_choice() -> None:
    """auto: frame-aligned on CUDA for striped band sets (TSA) whose padding is small; packed otherwise."""
    use_aligned = groups_module.use_aligned
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    tsa, vrpr = (band_set_for(m, 81, 1560, ROTARY) for m in (freeloc.TSA(cap=20), freeloc.VRPR.for_length(81, 21)))
    assert use_aligned(tsa, 1560, cuda)  # pads 104 of 1560 tokens
    assert not use_aligned(vrpr, 1560, cuda)  # no stripe: packed
    assert not use_aligned(band_set_for(freeloc.TSA(cap=20), 81, 100, ROTARY), 100, cuda)  # pads 28 of 100
    assert not use_aligned(tsa, 1560, cpu)  # eager on CPU
    assert use_aligned(vrpr, 100, cpu, "aligned") and not use_aligned(tsa, 1560, cuda, "packed")
    with pytest.raises(ValueError, match=r"layout must be one of \('auto', 'aligned', 'packed'\), got 'tiled'"):
        AttentionOptions(layout="tiled")


def test_flex_falls_back_to_the_plain_kernel_where_tma_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch or GPU that refuses kernel_options={'USE_TMA': True}: one warning, the plain kernel from then on."""
    monkeypatch.setattr(flex, "_NO_TMA", set())  # what failed so far: nothing
    calls: list[object] = []

    def fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(kw.get("kernel_options"))
        if "kernel_options" in kw:
            raise RuntimeError("USE_TMA is not supported here")
        return q, q[..., 0]

    q = torch.randn(1, 2, 8, 4)
    as_on_hopper = AttentionOptions(flex_compiled=True, use_tma=True)
    with pytest.warns(UserWarning, match=r"failed \(RuntimeError: USE_TMA is not supported here\); using the "
                                         r"kernel without TMA on cpu"):
        out, _ = flex._run(fake, q, q, q, None, 1.0, 128, as_on_hopper)
    assert torch.equal(out, q) and calls == [{"USE_TMA": True}, None] and flex._NO_TMA == {"cpu"}
    flex._run(fake, q, q, q, None, 1.0, 128, as_on_hopper)  # no second try with TMA
    assert calls == [{"USE_TMA": True}, None, None]


def test_flex_auto_key_blocks_at_head_dim_128_in_bf16(spy: Callable[..., list]) -> None:
    """With ``stripe_key_block="auto"``, bf16 q, k, v of head dim 128 run the striped call with key blocks of
    64 (keys shifted in their padded frames) and float32 ones with 128; both give the reference's numbers."""
    runs = spy(flex, "_run")
    rotary = freeloc.RotaryLayout.wan(128)
    method = freeloc.TSA(d1=2, d2=5, stripe=0.2, sink_group=2, sink_window=3, cap=6)
    kw = dict(grid=(9, 10, 13), method=method, rotary=rotary, options=ALIGNED)
    g = torch.Generator().manual_seed(5)
    base = [torch.randn(1, 9 * 130, 2, 128, generator=g) for _ in range(3)]
    for dtype, striped_block in ((torch.bfloat16, 64), (torch.float32, 128)):
        runs.clear()
        q, k, v = (x.to(dtype) for x in base)
        out = attend(q, k, v, backend="flex", **kw)
        blocks = {args[6] for args, _ in runs}  # _run(fn, q, k, v, block_mask, scale, key_block, options)
        assert striped_block in blocks and blocks <= {128, striped_block}
        torch.testing.assert_close(out.float(), attend(q, k, v, backend="reference", **kw).float(), rtol=0,
                                   atol=TOL[dtype])


def test_flex_falls_back_to_key_blocks_of_128_where_64_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiled striped call with key blocks of 64 that fails (a torch or GPU that refuses them): one
    warning, the same numbers from key blocks of 128, and 128 from then on; out of memory is not retried."""
    monkeypatch.setattr(flex, "_NO_SMALL_KEY_BLOCKS", set())  # what failed so far: nothing
    runs: list[int] = []
    original = flex._run

    def run(fn: object, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bm: object, scale: float,
            key_block: int, options: AttentionOptions) -> tuple[torch.Tensor, torch.Tensor]:
        runs.append(key_block)
        if key_block == 64:
            raise RuntimeError("BLOCK_N 64 is not supported here")
        return original(fn, q, k, v, bm, scale, key_block, options)

    monkeypatch.setattr(flex, "_run", run)
    method = freeloc.TSA(d1=2, d2=5, stripe=0.2, sink_group=2, sink_window=3, cap=6)
    # as on CUDA: compiled calls (their fallbacks apply), with key blocks of 64; eager here all the same
    options = AttentionOptions(layout="aligned", stripe_key_block=64, flex_compiled=True)
    kw = dict(grid=(9, 10, 13), method=method, rotary=ROTARY)
    q, k, v = qkv(9 * 130, torch.float32, seed=12)
    with pytest.warns(UserWarning, match=r"key blocks of 64 failed \(RuntimeError: BLOCK_N 64 is not supported "
                                         r"here\); using key blocks of 128 on cpu"):
        out = attend(q, k, v, backend="flex", options=options, **kw)
    assert 64 in runs and flex._NO_SMALL_KEY_BLOCKS == {"cpu"}
    torch.testing.assert_close(out, attend(q, k, v, backend="reference", **kw), rtol=0, atol=TOL[torch.float32])
    runs.clear()
    attend(q, k, v, backend="flex", options=options, **kw)  # no second try with 64
    assert runs and 64 not in runs
    flex._NO_SMALL_KEY_BLOCKS.clear()
    monkeypatch.setattr(flex, "_run", lambda *a, **kw: (_ for _ in ()).throw(torch.OutOfMemoryError("no memory")))
    with pytest.raises(torch.OutOfMemoryError):
        attend(q, k, v, backend="flex", options=options, **kw)
    assert not flex._NO_SMALL_KEY_BLOCKS


def test_flex_key_blocks_of_64_ask_the_kernel_for_key_tiles_of_64(monkeypatch: pytest.MonkeyPatch) -> None:
    """A block mask with key blocks of 64 needs the kernel's key tile to divide it: compiled calls ask for
    ``BLOCK_N = 64`` (with TMA where it works, without where it failed); ``flex_kernel_options`` go on top."""
    monkeypatch.setattr(flex, "_NO_TMA", set())  # what failed so far: nothing
    calls: list[object] = []

    def fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(kw.get("kernel_options"))
        return q, q[..., 0]

    q = torch.randn(1, 2, 8, 4)
    with_tma = AttentionOptions(flex_compiled=True, use_tma=True)  # as on a Hopper GPU
    flex._run(fake, q, q, q, None, 1.0, 64, with_tma)
    flex._run(fake, q, q, q, None, 1.0, 128, with_tma)
    without = AttentionOptions(flex_compiled=True, use_tma=False)
    flex._run(fake, q, q, q, None, 1.0, 64, without)
    flex._run(fake, q, q, q, None, 1.0, 128, without)
    flex._run(fake, q, q, q, None, 1.0, 64, without.replace(flex_kernel_options={"num_warps": 8, "BLOCK_N": 32}))
    flex._run(fake, q, q, q, None, 1.0, 64, AttentionOptions(flex_compiled=False, use_tma=True))  # eager: none
    assert calls == [{"USE_TMA": True, "BLOCK_N": 64}, {"USE_TMA": True}, {"BLOCK_N": 64}, None,
                     {"num_warps": 8, "BLOCK_N": 32}, None]


@pytest.mark.slow
@pytest.mark.parametrize("name,method", [("vrpr", freeloc.VRPR(1, 2, 2, 2, 4)), ("tsa", freeloc.TSA(d1=1, d2=3, cap=4)),
                                         ("sliding", freeloc.SlidingWindow(2, sink=False))],
                         ids=["vrpr", "tsa", "sliding"])
def test_flex_matches_reference_with_frames_larger_than_a_block(name: str, method: Method) -> None:
    """256 tokens per frame (two 128-token blocks): segments and tiles align with frames, unlike the small grids."""
    grid = (7, 16, 16)
    q, k, v = qkv(7 * 256 + 4, torch.float32, seed=21)
    kw = dict(grid=grid, method=method, rotary=ROTARY, text_before=4)
    out = attend(q, k, v, backend="flex", **kw)
    ref = attend(q, k, v, backend="reference", **kw)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(attend(q, k, v, backend="flex", options=ALIGNED, **kw), ref, atol=2e-5, rtol=1e-4)


@given(st.integers(1, 6), st.integers(1, 7), st.integers(2, 9), st.data())
@settings(max_examples=60, deadline=None)
def test_flex_packed_mask_intervals_equal_the_width_table(f: int, c: int, s: int, data: st.DataObject) -> None:
    """The packed layout's mask_mod (a few intervals per query frame) is exactly ``width[qf, kc] > |raster
    distance|`` for any table of stripe widths, padding rows and columns included."""
    cells = data.draw(st.lists(st.sampled_from([0, 0, 1, 2, s - 1, s, s + 3]), min_size=f * c, max_size=f * c))
    width = torch.zeros(f + 1, c + 1, dtype=torch.int32)
    width[:f, :c] = torch.tensor(cells, dtype=torch.int32).view(f, c)
    group = FlexGroup((0,), ((0, None, (0,)),), width)
    nq, nk = f * s + 5, c * s + 7  # with padding tokens past the last frame and column
    q_idx, kv_idx = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
    got = group.mask_mod(s, torch.device("cpu"))(0, 0, q_idx, kv_idx)
    qf, kc = (q_idx // s).clamp(max=f), (kv_idx // s).clamp(max=c)
    assert torch.equal(got, width[qf, kc] > (q_idx % s - kv_idx % s).abs())
