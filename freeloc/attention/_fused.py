"""Small elementwise steps compiled into one kernel each on CUDA (eagerly elsewhere).

Eager PyTorch runs a rotation or a merge of attention passes as about ten elementwise kernels over
float32 temporaries; at video sizes (a hundred thousand tokens x 12 heads x 128 channels) each pass
is a fraction of a millisecond, and together they add up next to the attention kernels. Where
``compiles_on`` holds (CUDA, unless ``AttentionOptions.compile_steps`` says otherwise),
``on_device`` returns the function compiled with ``torch.compile`` (one kernel, inputs read
once); where compiling fails it warns once and the eager function runs from then on.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from .options import AttentionOptions

__all__ = ["compiles_on", "on_device", "recompile_limit_at_least", "write_into"]

F = TypeVar("F", bound=Callable[..., Any])

_EAGER: set[str] = set()  # functions whose compiled version failed once in this process


def recompile_limit_at_least(n: int) -> Any:
    """Context in which Dynamo compiles a function for up to ``n`` shapes (or its own larger limit)
    before it falls back to running it eagerly (for flex: a kernel that materialises the scores)."""
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    return dynamo_config.patch(**{name: max(n, getattr(dynamo_config, name))})


def compiles_on(device: torch.device, options: AttentionOptions) -> bool:
    """Whether ``on_device`` compiles for this device: ``options.compile_steps``, or on CUDA when
    that is None."""
    return options.compile_steps if options.compile_steps is not None else device.type == "cuda"


def write_into(fn: Callable[..., Tensor], out: Tensor, *args: Any) -> Tensor:
    """``out.copy_(fn(*args))``; returns ``out``. Compiled through ``on_device`` the result is stored
    straight into ``out`` (any strides: a transposed view of a head-major buffer), with no temporary."""
    return out.copy_(fn(*args))


@functools.cache
def _compiled(fn: Callable[..., Any], dynamic: bool | None = False) -> Callable[..., Any]:
    # the undecorated function: a run-time type-checking wrapper (jaxtyping's import hook) is not traceable
    return torch.compile(inspect.unwrap(fn), dynamic=dynamic)


def on_device(fn: F, device: torch.device, options: AttentionOptions, dynamic: bool | None = False) -> F:
    """``fn`` compiled where ``compiles_on`` holds, ``fn`` itself elsewhere or where compiling it
    failed before.

    ``dynamic``: as ``torch.compile``'s. False (the default): one kernel per input shape, for steps run
    at a few shapes; None: a second shape compiles one kernel for any size, for steps run at many
    (the merges of passes of different lengths)."""
    name = fn.__qualname__
    if not compiles_on(device, options) or name in _EAGER:
        return fn

    def run(*args: Any) -> Any:
        if name in _EAGER:
            return fn(*args)
        try:
            with recompile_limit_at_least(64):
                return _compiled(fn, dynamic)(*args)
        except Exception as err:  # no working compiler here: the eager function, from now on
            _EAGER.add(name)
            warnings.warn(f"compiling {name} failed ({type(err).__name__}: {err}); running it eagerly",
                          stacklevel=2)
            return fn(*args)

    return run  # type: ignore[return-value]
