"""``attend`` as one opaque operator, for graphs traced by ``torch.compile`` and ``torch.export``.

``attend`` plans its call in Python from the grid and the method (band sets, masks, checks that read
tensor values), which a tracer cannot follow. Inside a traced graph a hooked layer therefore calls the
custom operator ``torch.ops.freeloc.attend`` instead: the tracer sees one node with the output's shape,
and the operator runs ``attend`` eagerly when the graph runs. Its backward is a second operator that
recomputes the call with gradients (``torch.ops.freeloc.attend_backward``).

Everything that is not a tensor (grid, method, rotary layout, backend, text counts, options) is
registered once per distinct call in this process and named by a string key, the one non-tensor
argument of the operator. A graph is therefore valid in the process that traced it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..methods import Method
from ..rotary import RotaryLayout
from .options import AttentionOptions

__all__ = ["AttendCall", "call_key", "opaque_attend"]


@dataclass(frozen=True)
class AttendCall:
    """Every argument of an ``attend`` call except the tensors."""

    grid: tuple[int, int, int]
    method: Method | None
    rotary: RotaryLayout | None
    backend: str
    text_before: int
    text_after: int
    options: AttentionOptions | None

    def run(self, q: Tensor, k: Tensor, v: Tensor, text_mask: Tensor | None) -> Tensor:
        from . import attend  # the package imports this module

        return attend(q, k, v, grid=self.grid, method=self.method, rotary=self.rotary, backend=self.backend,
                      text_before=self.text_before, text_after=self.text_after, text_mask=text_mask,
                      options=self.options)


_CALLS: dict[str, AttendCall] = {}
_KEYS: dict[AttendCall, str] = {}
_LOCK = threading.Lock()


def call_key(call: AttendCall) -> str:
    """The key naming ``call`` in this process (the same call always gets the same key)."""
    with _LOCK:
        key = _KEYS.get(call)
        if key is None:
            key = _KEYS[call] = f"attend-{len(_KEYS)}"
            _CALLS[key] = call
        return key


def _call(key: str) -> AttendCall:
    try:
        return _CALLS[key]
    except KeyError:
        raise RuntimeError(f"freeloc.attend call {key!r} is not known in this process: a graph traced with "
                           f"freeloc's hooks runs in the process that traced it") from None


@torch.library.custom_op("freeloc::attend", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, Tensor? text_mask, str key) -> Tensor")
def _attend_op(q: Tensor, k: Tensor, v: Tensor, text_mask: Tensor | None, key: str) -> Tensor:
    # a fresh contiguous tensor: an operator's output may not alias its inputs, and its strides must be
    # the ones the fake implementation promises
    return _call(key).run(q, k, v, text_mask).contiguous()


@_attend_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, text_mask: Tensor | None, key: str) -> Tensor:
    return q.new_empty(q.shape)


@torch.library.custom_op("freeloc::attend_backward", mutates_args=(),
                         schema="(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor? text_mask, str key) "
                                "-> (Tensor, Tensor, Tensor)")
def _attend_backward_op(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, text_mask: Tensor | None,
                        key: str) -> tuple[Tensor, Tensor, Tensor]:
    # an operator's kernel runs below autograd: let autograd record the recomputed call again
    below_autograd = torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.AutogradFunctionality, False)
    with below_autograd, torch.enable_grad():
        inputs = [x.detach().requires_grad_(True) for x in (q, k, v)]
        out = _call(key).run(*inputs, text_mask)
        dq, dk, dv = torch.autograd.grad(out, inputs, grad)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_attend_backward_op.register_fake
def _(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, text_mask: Tensor | None,
      key: str) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
    q, k, v, text_mask, key = inputs
    ctx.save_for_backward(q, k, v, text_mask)
    ctx.key = key


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    q, k, v, text_mask = ctx.saved_tensors
    dq, dk, dv = _attend_backward_op(grad, q, k, v, text_mask, ctx.key)
    return dq, dk, dv, None, None


_attend_op.register_autograd(_backward, setup_context=_setup_context)


def opaque_attend(
    q: Float[Tensor, "batch seq heads dim"],
    k: Float[Tensor, "batch seq heads dim"],
    v: Float[Tensor, "batch seq heads dim"],
    text_mask: Bool[Tensor, "batch text"] | None,
    key: str,
) -> Float[Tensor, "batch seq heads dim"]:
    """``attend`` of the registered call ``key`` as the operator ``torch.ops.freeloc.attend``."""
    return torch.ops.freeloc.attend(q, k, v, text_mask, key)
