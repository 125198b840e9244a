"""Every tuning setting of ``attend``, in one frozen object.

Settings never live in module-level variables: an ``AttentionOptions`` is passed down the call
(``attend(..., options=...)``, ``freeloc.enable(..., attention=...)``) and is part of every cache key
(plans, masks, kernel choices), so two calls with different options never share a stale decision.
The defaults are what the library ships; none of them changes a result beyond floating-point
rounding, only which kernels run, in what pieces, and how much memory a call holds at once.

Examples:
    >>> import freeloc
    >>> options = freeloc.AttentionOptions(unstriped="flex", stripe_key_block=128)
    >>> options.unstriped, options.layout
    ('flex', 'auto')
    >>> options.replace(layout="packed").layout
    'packed'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .kernels import FusedKernel

__all__ = ["AttentionOptions", "BACKENDS", "DEFAULT_OPTIONS", "LAYOUTS", "UNSTRIPED_MODES"]

#: Values of ``attend(backend=...)``.
BACKENDS = ("auto", "reference", "chunked", "flex")
#: Values of ``AttentionOptions.unstriped``.
UNSTRIPED_MODES = ("auto", "flex", "stacks", "chunked")
#: Values of ``AttentionOptions.layout``.
LAYOUTS = ("auto", "aligned", "packed")

_POSITIVE_INTS = ("stack_min_frames", "call_cost", "batch_keys", "stack_logits", "float_logits", "max_dense_tokens")
_NON_NEGATIVE_INTS = ("small_blocks", "mask_cost", "gather_cost", "mask_cache_bytes")


@dataclass(frozen=True)
class AttentionOptions:
    """How ``attend`` runs: kernel choices, pieces, memory bounds.

    Attributes:
        unstriped: on the ``flex`` backend, what runs on the fused dense kernel instead of flex:
            ``"flex"`` nothing; ``"stacks"`` the sliding key windows of the bands without a stripe (one
            call per window, its query frames as the batch, no mask) and the blocks that finish those
            bands; ``"chunked"`` every band without a stripe, as the chunked backend plans it;
            ``"auto"`` ``"stacks"`` where a fused dense kernel passes its check (CUDA), else ``"flex"``.
        layout: token layout of the flex calls: ``"aligned"`` pads each frame to whole 128-token blocks
            so the block table alone carries the frame pattern; ``"packed"`` keeps the model's layout;
            ``"auto"`` aligned on CUDA for band sets with a stripe when padding adds at most 1/8 to a
            frame, packed otherwise.
        stripe_key_block: key block of the frame-aligned flex calls with a stripe, ``128`` or ``64``;
            ``"auto"``: 64 for 2-byte floats at head dim 128 (where the flex kernel's own key tile is
            64), 128 otherwise.
        flex_kernel_options: extra Triton options for every compiled ``flex_attention`` call (tile
            sizes, warps, stages), over the library's own; a mapping or ``(name, value)`` pairs.
        use_tma: ask the compiled flex kernel to load tiles with the tensor memory accelerator;
            ``None``: on Hopper and later GPUs, where it works.
        flex_compiled: treat the flex calls as compiled calls: the compiled kernel on CUDA, with its kernel
            options and fallbacks; ``None``: on CUDA. Off CUDA the eager kernel runs either way (compiled
            flex on CPU cannot return the LSE); it materialises the scores, for checking semantics on
            small shapes.
        stack_min_frames: with ``unstriped="stacks"``, the fewest query frames of a stack or block on
            the dense kernel (shorter ones stay with flex, unless ``small_blocks`` finish a band).
        small_blocks: with ``unstriped="stacks"``, at most this many blocks shorter than
            ``stack_min_frames`` finish the bands without a stripe, so flex runs only striped bands.
        call_cost: the chunked planner's fixed cost of one call (launch, slicing, merge), in units of
            one (query, key, channel) multiply-add.
        mask_cost: the chunked planner's extra cost per masked (query, key) pair.
        gather_cost: the chunked planner's cost of copying one token's channel into a call.
        batch_keys: a chunked call over several spatial sub-blocks of a striped band copies at most
            this many key tokens (per sample and head).
        stacking: let the chunked planner run sliding key windows as stacks (one fused call each).
        stack_logits: off the fused kernels (which tile), the most logits one stacked call holds.
        float_logits: the most logits the plain float32 attention path, and the chunked backend for methods
            that scale logits (UltraViCo), materialise at once (per call: its batch and heads).
        mask_cache_bytes: bytes of prepared masks a chunked plan keeps between calls.
        max_dense_tokens: the longest sequence the ``reference`` backend and eager ``flex`` accept
            (they materialise batch x heads x N x N scores); beyond it the ``reference`` backend computes
            methods that scale logits (UltraViCo) in chunks of ``max_dense_tokens ** 2 // N`` query rows.
        fused_devices: device types on which the fused CUDA kernels (``fused_kernels``) are tried.
        fused_kernels: the fused kernels that return the LSE, in order of preference; ``None``: cuDNN's,
            FlashAttention's, then the memory-efficient kernel.
        compile_steps: compile the small elementwise steps (rotations, merges) into one kernel each;
            ``None``: on CUDA.
        head_group: how many heads one band-split call processes at once (every band is per head: the
            rotations, value copies, accumulators and pass buffers then exist for one group at a time,
            on every backend); ``"auto"``: the most heads whose estimated peak stays within 1.5 x dense
            attention's (``freeloc.attention.memory.head_group_size``); an int >= 1: that many (the last
            group may be smaller; 1 holds the least memory, with one call of each pass per head).
    """

    unstriped: str = "auto"
    layout: str = "auto"
    stripe_key_block: int | str = "auto"
    flex_kernel_options: tuple[tuple[str, Any], ...] | Mapping[str, Any] = ()
    use_tma: bool | None = None
    flex_compiled: bool | None = None
    stack_min_frames: int = 8
    small_blocks: int = 64
    call_cost: int = 1_000_000
    mask_cost: int = 4
    gather_cost: int = 12
    batch_keys: int = 16384
    stacking: bool = True
    stack_logits: int = 2**26
    float_logits: int = 2**26
    mask_cache_bytes: int = 64 * 2**20
    max_dense_tokens: int = 8192
    fused_devices: tuple[str, ...] | list[str] = ("cuda",)
    fused_kernels: tuple[FusedKernel, ...] | list[FusedKernel] | None = None
    compile_steps: bool | None = None
    head_group: int | str = "auto"

    def __post_init__(self) -> None:
        def bad(name: str, accepted: str) -> ValueError:
            return ValueError(f"AttentionOptions.{name} must be {accepted}, got {getattr(self, name)!r}")

        if self.unstriped not in UNSTRIPED_MODES:
            raise bad("unstriped", f"one of {UNSTRIPED_MODES}")
        if self.layout not in LAYOUTS:
            raise bad("layout", f"one of {LAYOUTS}")
        kb = self.stripe_key_block
        if isinstance(kb, bool) or kb not in ("auto", 128, 64):
            raise bad("stripe_key_block", "'auto', 128 or 64")
        extra = self.flex_kernel_options
        if isinstance(extra, Mapping):
            extra = tuple(sorted(extra.items()))
        if not isinstance(extra, tuple) or not all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str)
                                                   for p in extra):
            raise bad("flex_kernel_options", "a mapping of Triton option names to values")
        object.__setattr__(self, "flex_kernel_options", extra)
        for name in ("use_tma", "flex_compiled", "compile_steps"):
            if getattr(self, name) not in (None, True, False):
                raise bad(name, "True, False or None (automatic)")
        if not isinstance(self.stacking, bool):
            raise bad("stacking", "True or False")
        for name in _POSITIVE_INTS + _NON_NEGATIVE_INTS:
            value = getattr(self, name)
            low = 1 if name in _POSITIVE_INTS else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise bad(name, f"an int >= {low}")
        devices = self.fused_devices
        if isinstance(devices, str) or not isinstance(devices, (tuple, list)) or not all(
                isinstance(d, str) for d in devices):
            raise bad("fused_devices", "a tuple of device types such as ('cuda',)")
        object.__setattr__(self, "fused_devices", tuple(devices))
        hg = self.head_group
        if hg != "auto" and (not isinstance(hg, int) or isinstance(hg, bool) or hg < 1):
            raise bad("head_group", "'auto' or an int >= 1 (heads per group)")
        if self.fused_kernels is not None:
            object.__setattr__(self, "fused_kernels", tuple(self.fused_kernels))

    def replace(self, **changes: Any) -> AttentionOptions:
        """A copy with ``changes`` (validated like the constructor's arguments)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown AttentionOptions field(s) {unknown}; accepted: "
                             f"{[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)

    @property
    def kernel_options(self) -> dict[str, Any]:
        """``flex_kernel_options`` as a dict (stored as sorted ``(name, value)`` pairs, hashable)."""
        return dict(self.flex_kernel_options)


#: The options ``attend`` uses when given none.
DEFAULT_OPTIONS = AttentionOptions()
