"""The attention planner (``freeloc.attention._planning``) and its options: which parts a call runs on which
backend, which rotations it computes and where it writes them, how options enter every cache key, and
that no tuning setting lives in a module-level variable."""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from support import HEAD_DIM, ROTARY, SMALL_TSA, qkv

import freeloc
from freeloc.attention import AttentionOptions, attend, band_set_for
from freeloc.attention._passes import Stack
from freeloc.attention._planning import (
    ChunkedPart,
    DensePart,
    FlexPart,
    ReferencePart,
    TextPart,
    plan_attention,
)
from freeloc.methods import Method

GRID = (19, 5, 7)
DEFAULTS = AttentionOptions()


def plan_of(method: Method | None, backend: str, options: AttentionOptions = DEFAULTS, text: int = 0,
            dtype: torch.dtype = torch.float32) -> object:
    q = torch.zeros(1, 1, 1, HEAD_DIM, dtype=dtype)  # the plan reads device, dtype and head dim only
    return plan_attention(q, band_set_for(method, GRID[0], GRID[1] * GRID[2], ROTARY), GRID, text, 0, backend,
                          options)


def kinds(plan: object) -> list[str]:
    return [type(p).__name__ for p in plan.parts]  # type: ignore[attr-defined]


def test_parts_per_backend_and_mode() -> None:
    """Each backend and each ``unstriped`` mode binds the bands to the backends the docs say; text adds its
    part last; a method that changes nothing at this length is one dense call."""
    vrpr = freeloc.VRPR.for_length(19, 9)
    assert kinds(plan_of(None, "chunked")) == ["DensePart"]
    assert kinds(plan_of(None, "reference")) == ["ReferencePart"]
    assert kinds(plan_of(SMALL_TSA, "reference", text=4)) == ["ReferencePart"]  # the reference holds the text
    assert kinds(plan_of(SMALL_TSA, "chunked")) == ["ChunkedPart"]
    assert kinds(plan_of(SMALL_TSA, "chunked", text=4)) == ["ChunkedPart", "TextPart"]
    assert kinds(plan_of(SMALL_TSA, "flex", AttentionOptions(unstriped="flex"))) == ["FlexPart"]
    split = plan_of(SMALL_TSA, "flex", AttentionOptions(unstriped="chunked"))
    assert kinds(split) == ["ChunkedPart", "FlexPart"]
    assert [b.name for b in split.parts[1].bands.bands if not b.is_empty()] == ["striped"]  # type: ignore[attr-defined]
    assert kinds(plan_of(vrpr, "flex", AttentionOptions(unstriped="chunked"))) == ["ChunkedPart"]  # no stripe
    stacks = plan_of(SMALL_TSA, "flex", AttentionOptions(unstriped="stacks", stack_min_frames=4))
    assert kinds(stacks) == ["ChunkedPart", "FlexPart"]
    assert any(isinstance(p, Stack) for p in stacks.parts[0].passes)  # type: ignore[attr-defined]
    # on the CPU no fused kernel takes sliding windows: "auto" keeps every band on flex
    assert kinds(plan_of(SMALL_TSA, "flex")) == ["FlexPart"]
    print("parts:", kinds(split), kinds(stacks))
    assert isinstance(plan_of(None, "flex").parts[0], DensePart)  # type: ignore[attr-defined]
    assert isinstance(plan_of(SMALL_TSA, "reference").parts[0], ReferencePart)  # type: ignore[attr-defined]
    assert isinstance(plan_of(SMALL_TSA, "chunked", text=4).parts[-1], TextPart)  # type: ignore[attr-defined]


def test_rotations_are_shared_and_written_where_the_chunked_backend_reads_them() -> None:
    """TSA: local and striped tiers share the query and key rotations, the sink keys (temporal position 0)
    take the spatial rotation alone; head-major only where a chunked part reads them; VRPR's far tiers'
    keys in one buffer, named by the plan."""
    tsa = plan_of(SMALL_TSA, "chunked").rotations  # type: ignore[attr-defined]
    assert [b.name for b in plan_of(SMALL_TSA, "chunked").bands.bands] == ["local", "striped", "sink"]  # type: ignore
    assert tsa.q_source == (0, 0, 2) and tsa.k_source == (0, 0, 2)
    assert tsa.k_temporal == (True, True, False) and tsa.head_major and not tsa.original
    assert not plan_of(SMALL_TSA, "flex").rotations.head_major  # type: ignore[attr-defined]
    assert plan_of(SMALL_TSA, "chunked", text=3).rotations.original  # type: ignore[attr-defined]
    vrpr = plan_of(freeloc.VRPR.for_length(19, 9), "chunked")
    names = [tuple(vrpr.bands.bands[i].name for i in g) for g in vrpr.rotations.key_buffers]  # type: ignore
    print("VRPR key buffers:", names)
    assert ("far-future", "far-past") in names
    for part in vrpr.parts:  # type: ignore[attr-defined]
        for p in part.passes:
            if len(getattr(p, "key_bands", ())) > 1:
                assert p.key_bands in vrpr.rotations.key_buffers  # type: ignore[attr-defined]


def test_plans_are_cached_per_options() -> None:
    """The same inputs give the same plan object; any option that differs gives its own plan (options are
    part of the key: no stale decision is ever shared)."""
    a = plan_of(SMALL_TSA, "chunked", AttentionOptions(call_cost=500_000))
    assert plan_of(SMALL_TSA, "chunked", AttentionOptions(call_cost=500_000)) is a
    b = plan_of(SMALL_TSA, "chunked", AttentionOptions(call_cost=2_000_000))
    assert b is not a and a.parts[0].passes is not b.parts[0].passes  # type: ignore[attr-defined]
    assert plan_of(SMALL_TSA, "chunked", dtype=torch.bfloat16) is plan_of(SMALL_TSA, "chunked")  # dtype-free


def test_cost_model_options_change_the_plan_not_the_numbers(matches_reference: Callable[..., torch.Tensor]) -> None:
    """A call that costs a hundred times more makes the planner take fewer, larger passes; the numbers stay
    the reference's."""
    cheap, dear = AttentionOptions(call_cost=10_000), AttentionOptions(call_cost=1_000_000_000)
    n_cheap = len(plan_of(SMALL_TSA, "chunked", cheap).parts[0].passes)  # type: ignore[attr-defined]
    n_dear = len(plan_of(SMALL_TSA, "chunked", dear).parts[0].passes)  # type: ignore[attr-defined]
    print(f"calls: {n_cheap} with cheap calls, {n_dear} with dear ones")
    assert n_dear < n_cheap
    q, k, v = qkv(19 * 35, torch.float32, seed=2)
    for options in (cheap, dear):
        matches_reference(q, k, v, backend="chunked", grid=GRID, method=SMALL_TSA, rotary=ROTARY, options=options)


def test_flex_parts_carry_their_fallback_for_key_blocks_of_64() -> None:
    """A frame-aligned flex part with key blocks of 64 carries the same calls with 128, for a device that
    refuses 64; other parts carry none."""
    part = plan_of(SMALL_TSA, "flex", AttentionOptions(layout="aligned", stripe_key_block=64)).parts[0]  # type: ignore
    assert isinstance(part, FlexPart) and part.key_block == 64
    assert part.fallback is not None and part.fallback.key_block == 128 and part.fallback.groups == part.groups
    assert plan_of(SMALL_TSA, "flex", AttentionOptions(layout="aligned")).parts[0].fallback is None  # type: ignore
    assert isinstance(plan_of(SMALL_TSA, "chunked").parts[0], ChunkedPart)  # type: ignore[attr-defined]


@pytest.mark.parametrize("field,value,accepted", [
    ("unstriped", "cudnn", r"one of \('auto', 'flex', 'stacks', 'chunked'\)"),
    ("layout", "tiled", r"one of \('auto', 'aligned', 'packed'\)"),
    ("stripe_key_block", 32, "'auto', 128 or 64"),
    ("flex_kernel_options", ["num_warps"], "a mapping of Triton option names"),
    ("use_tma", "yes", r"True, False or None"),
    ("stacking", 1, "True or False"),
    ("call_cost", 0, "an int >= 1"),
    ("small_blocks", -1, "an int >= 0"),
    ("max_dense_tokens", 2.5, "an int >= 1"),
    ("fused_devices", "cuda", "a tuple of device types"),
])
def test_options_are_checked(field: str, value: object, accepted: str) -> None:
    """Every option is checked on construction, with the value got and what is accepted."""
    with pytest.raises(Exception) as err:  # noqa: B017
        AttentionOptions(**{field: value})  # type: ignore[arg-type]
    message = str(err.value)
    print(message.splitlines()[0])
    assert field in message
    if type(err.value) is ValueError:  # the library's own check (the test-time type checker may come first)
        assert repr(value) in message and re.search(accepted, message)


def test_options_are_frozen_hashable_and_replaceable() -> None:
    options = AttentionOptions(flex_kernel_options={"num_warps": 8, "BLOCK_M": 64})
    assert options.flex_kernel_options == (("BLOCK_M", 64), ("num_warps", 8))  # sorted pairs: hashable
    assert options.kernel_options == {"num_warps": 8, "BLOCK_M": 64}
    assert hash(options) == hash(AttentionOptions(flex_kernel_options={"BLOCK_M": 64, "num_warps": 8}))
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.layout = "packed"  # type: ignore[misc]
    assert options.replace(layout="packed").layout == "packed" and options.layout == "auto"
    with pytest.raises(ValueError, match=r"unknown AttentionOptions field\(s\) \['tile'\]"):
        options.replace(tile=3)


def test_enable_and_attend_accept_options_equal_to_the_default(matches_reference: Callable[..., torch.Tensor]) -> None:
    """``AttentionOptions()`` is what ``attend`` uses when given none: the same numbers, bit for bit."""
    q, k, v = qkv(19 * 35, torch.float32, seed=5)
    kw = dict(grid=GRID, method=SMALL_TSA, rotary=ROTARY)
    assert torch.equal(attend(q, k, v, **kw), attend(q, k, v, options=AttentionOptions(), **kw))


#: Names of the module-level tuning settings the attention code once read at call time; every one is an
#: AttentionOptions field now.
_FORMER_SETTINGS = {"UNSTRIPED": "unstriped", "LAYOUT": "layout", "STRIPE_KEY_BLOCK": "stripe_key_block",
                    "KERNEL_OPTIONS": "flex_kernel_options", "CALL_COST": "call_cost", "MASK_COST": "mask_cost",
                    "GATHER_COST": "gather_cost", "BATCH_KEYS": "batch_keys", "STACKING": "stacking",
                    "STACK_LOGITS": "stack_logits", "MASK_CACHE_BYTES": "mask_cache_bytes",
                    "SMALL_BLOCKS": "small_blocks", "FLOAT_LOGITS": "float_logits", "FUSED_DEVICES": "fused_devices",
                    "MAX_TOKENS": "max_dense_tokens"}


def test_no_tuning_setting_is_a_module_level_variable() -> None:
    """Every tuning setting is an option; the attention modules assign none of them at module level (the
    constants they keep are read-only facts: block sizes, the kernels' candidate list, an LSE stand-in)."""
    fields = {f.name for f in dataclasses.fields(AttentionOptions)}
    assert set(_FORMER_SETTINGS.values()) <= fields
    root = Path(freeloc.attention.__file__).parent
    assigned: dict[str, list[str]] = {}
    for path in sorted(root.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign) else []
            for t in targets:
                if isinstance(t, ast.Name) and t.id.isupper():
                    assigned.setdefault(path.name, []).append(t.id)
    print("module-level constants:", assigned)
    found = {name for names in assigned.values() for name in names} & set(_FORMER_SETTINGS)
    assert not found, f"module-level settings: {found}"
