"""The small elementwise steps compiled into one kernel each (``freeloc.attention._fused``)."""

from __future__ import annotations

import pytest
import torch
from support import HEAD_DIM, ROTARY

import freeloc
from freeloc.attention import AttentionOptions
from freeloc.attention import _fused as fused


def test_fused_steps_fall_back_to_eager_where_compiling_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the steps compile (CUDA, or ``compile_steps=True``) but compiling fails: one warning, then the
    eager function, not tried again."""
    tries: list[str] = []

    def broken(fn: object, dynamic: bool | None = False) -> object:
        def run(*args: object) -> torch.Tensor:
            tries.append(fn.__name__)  # type: ignore[attr-defined]
            raise RuntimeError("no C compiler")
        return run

    monkeypatch.setattr(fused, "_compiled", broken)  # a compiler that fails
    monkeypatch.setattr(fused, "_EAGER", set())  # what failed so far: nothing
    options = AttentionOptions(compile_steps=True)
    x = torch.randn(2, 6, 3, HEAD_DIM)
    cos, sin = ROTARY.cos_sin(torch.arange(6.0), torch.zeros(6), torch.arange(6.0))
    rotate = fused.on_device(freeloc.RotaryLayout.apply, x.device, options)
    with pytest.warns(UserWarning, match=r"compiling RotaryLayout.apply failed \(RuntimeError: no C compiler\); "
                                         r"running it eagerly"):
        out = rotate(ROTARY, x, cos, sin)
    assert torch.equal(out, ROTARY.apply(x, cos, sin))
    rotate(ROTARY, x, cos, sin)
    fused.on_device(freeloc.RotaryLayout.apply, x.device, options)(ROTARY, x, cos, sin)
    assert tries == ["apply"]  # not tried again


def test_steps_compile_where_the_options_say() -> None:
    """``compile_steps``: None compiles on CUDA only; True and False decide everywhere."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = AttentionOptions()
    assert not fused.compiles_on(cpu, auto) and fused.compiles_on(cuda, auto)
    assert fused.compiles_on(cpu, AttentionOptions(compile_steps=True))
    assert not fused.compiles_on(cuda, AttentionOptions(compile_steps=False))
    assert fused.on_device(freeloc.RotaryLayout.apply, cpu, auto) is freeloc.RotaryLayout.apply
