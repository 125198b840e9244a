"""Per-architecture adapters, installed as ``freeloc.adapters``.

An adapter knows one architecture: where its temporal RoPE lives, which modules are its
self-attention layers, where text tokens sit, its trained length. It installs processors and hooks
on a session (:class:`freeloc.session.Session`) and registers how to undo each change. It contains
no attention math: that is :func:`freeloc.attention.attend`.

Adapters are found by the class name of each transformer in the target (:func:`adapters_for`).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["MODULES", "adapters_for", "supported_classes"]


#: The adapter modules of this package (each defines subclasses of ``base.TransformerAdapter``).
MODULES = ("wan", "hunyuan", "cogvideox", "opensora")


def _registry() -> dict[str, type]:
    import importlib

    from .base import TransformerAdapter

    registry: dict[str, type] = {}
    for name in MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":  # not written yet
                continue
            raise
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, TransformerAdapter) and obj.model_classes:
                registry.update({cls_name: obj for cls_name in obj.model_classes})
    return registry


def supported_classes() -> list[str]:
    """Class names of the transformers an adapter exists for."""
    return sorted(_registry())


#: Transformer attributes of a pipeline that are patched (Wan 2.2 A14B holds two).
TRANSFORMER_ATTRIBUTES = ("transformer", "transformer_2")


def adapters_for(target: Any, adapter: type | None = None) -> list[tuple[str, torch.nn.Module, type]]:
    """``(name, transformer, adapter class)`` for every transformer of a pipeline or for a module."""
    registry = _registry()
    if isinstance(target, torch.nn.Module):
        modules = [("transformer", target)]
    else:
        modules = [(attr, getattr(target, attr)) for attr in TRANSFORMER_ATTRIBUTES
                   if isinstance(getattr(target, attr, None), torch.nn.Module)]
        if not modules:
            raise ValueError(f"found no transformer in {type(target).__name__}: expected a torch module or a "
                             f"pipeline with a .transformer; supported transformer classes: {supported_classes()}")
    out = []
    for name, module in modules:
        cls = adapter or registry.get(type(module).__name__)
        if cls is None:
            raise ValueError(f"no freeloc adapter for {type(module).__name__}; supported classes: "
                             f"{supported_classes()} (or pass adapter=...)")
        out.append((name, module, cls))
    return out

