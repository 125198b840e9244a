"""The adapter registry: which adapter handles which transformer class.

The core finds adapters only here, from two sources:

* **entry points** of the group ``freeloc.adapters``, loaded (imported) the first time an adapter is
  looked up. A package adds a model by declaring its adapter class in its own ``pyproject.toml``::

      [project.entry-points."freeloc.adapters"]
      mymodel = "mypkg.adapter:MyAdapter"

  freeloc's own adapters (``freeloc.adapters.*``) are declared the same way in freeloc's;
* classes registered in the running process with ``register_adapter`` (a script, a notebook,
  a test), which needs no installed package.

An adapter is a ``TransformerAdapter`` subclass; the transformer classes it
handles are the names in its ``model_data`` (``ModelData``), matched against
``type(transformer).__name__``. Errors name what is wrong: an entry point that fails to load (with its
error), two adapters claiming one class (both), a class without an adapter (the supported ones, and
how to add one).

Examples:
    >>> from freeloc.registry import supported_classes
    >>> "WanTransformer3DModel" in supported_classes()
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import Any, TypeVar

import torch

from .adapter import ModelData, ShippedPlan, TransformerAdapter

__all__ = [
    "ENTRY_POINT_GROUP",
    "AdapterConflictError",
    "AdapterLoadError",
    "AdapterRegistry",
    "REGISTRY",
    "Registration",
    "TRANSFORMER_ATTRIBUTES",
    "adapter_for_class",
    "adapters_for",
    "register_adapter",
    "registrations",
    "shipped_plans",
    "supported_classes",
]

#: The entry-point group adapters are declared in.
ENTRY_POINT_GROUP = "freeloc.adapters"
#: Transformer attributes of a pipeline that are patched (Wan 2.2 A14B holds two).
TRANSFORMER_ATTRIBUTES = ("transformer", "transformer_2")
#: Where an error tells people to read how to add an adapter.
HOW_TO_ADD = ("write a freeloc.adapter.TransformerAdapter subclass and declare it as an entry point of the group "
              f"'{ENTRY_POINT_GROUP}' in your package (or decorate it with freeloc.registry.register_adapter); see "
              "the guide 'Write an adapter'")

A = TypeVar("A", bound=type)


class AdapterLoadError(RuntimeError):
    """An entry point of the group ``freeloc.adapters`` could not be loaded, or is not an adapter class."""


class AdapterConflictError(RuntimeError):
    """Two adapters claim one transformer class, or ship a plan of the same name."""


@dataclass(frozen=True)
class Registration:
    """One registered adapter and where it came from.

    Attributes:
        adapter: the adapter class.
        entry_point: the entry point that declared it (``None``: registered by ``register_adapter``).
    """

    adapter: type[TransformerAdapter]
    entry_point: metadata.EntryPoint | None = None

    @property
    def origin(self) -> str:
        """Where the adapter came from, for messages."""
        name = f"{self.adapter.__module__}.{self.adapter.__qualname__}"
        ep = self.entry_point
        if ep is None:
            return f"{name} (registered with register_adapter)"
        dist = getattr(ep, "dist", None)
        package = f" of the distribution {dist.metadata['Name']} {dist.version}" if dist is not None else ""
        return f"{name} (entry point '{ep.name} = {ep.value}'{package})"


def _check_adapter(obj: object, where: str) -> type[TransformerAdapter]:
    """``obj`` if it is a usable adapter class, else a clear error naming ``where`` it came from."""
    if not (isinstance(obj, type) and issubclass(obj, TransformerAdapter)):
        raise TypeError(f"{where}: expected a subclass of freeloc.adapter.TransformerAdapter, got {obj!r}")
    data = getattr(obj, "model_data", None)
    if not isinstance(data, ModelData):
        raise TypeError(f"{where}: {obj.__qualname__}.model_data must be a freeloc.adapter.ModelData (the classes "
                        f"it handles, their trained lengths, temporal factor and shipped plans), got {data!r}")
    return obj


def _default_entry_points(group: str) -> tuple[metadata.EntryPoint, ...]:
    return tuple(metadata.entry_points(group=group))


class AdapterRegistry:
    """Adapters from entry points (loaded once, on first use) and from ``register``.

    Args:
        group: the entry-point group to read.
        entry_points: returns the entry points of ``group`` (default: ``importlib.metadata.entry_points``).
    """

    def __init__(self, group: str = ENTRY_POINT_GROUP,
                 entry_points: Callable[[str], Iterable[metadata.EntryPoint]] = _default_entry_points) -> None:
        self.group = group
        self._entry_points = entry_points
        self._loaded: list[Registration] | None = None
        self._registered: list[Registration] = []

    # ------------------------------------------------------------------ sources
    def register(self, adapter: A) -> A:
        """Register an adapter class in this process; usable as a class decorator.

        Registering the same class again does nothing; a class of the same module and name (the
        definition run again, as in a notebook) replaces the earlier one.
        """
        cls = _check_adapter(adapter, "register_adapter")
        key = (cls.__module__, cls.__qualname__)
        self._registered = [r for r in self._registered
                            if r.adapter is not cls and (r.adapter.__module__, r.adapter.__qualname__) != key]
        self._registered.append(Registration(cls))
        return adapter

    def unregister(self, adapter: type) -> None:
        """Forget an adapter registered with ``register`` (entry points stay)."""
        before = len(self._registered)
        self._registered = [r for r in self._registered if r.adapter is not adapter]
        if len(self._registered) == before:
            raise ValueError(f"{adapter!r} was not registered with register_adapter")

    def reload(self) -> None:
        """Read the entry points again on next use (after installing a package into the running process)."""
        self._loaded = None

    def _load_entry_points(self) -> list[Registration]:
        if self._loaded is None:
            loaded = []
            for ep in sorted(self._entry_points(self.group), key=lambda e: (e.name, e.value)):
                dist = getattr(ep, "dist", None)
                where = (f"entry point '{ep.name} = {ep.value}' of the group '{self.group}'"
                         + (f" (distribution {dist.metadata['Name']} {dist.version})" if dist is not None else ""))
                try:
                    obj = ep.load()
                except Exception as e:
                    raise AdapterLoadError(f"{where} failed to load: {type(e).__name__}: {e}. Fix or uninstall the "
                                           f"package that declares it (freeloc reads every adapter entry point to "
                                           f"find which one handles a model)") from e
                try:
                    cls = _check_adapter(obj, where)
                except TypeError as e:
                    raise AdapterLoadError(str(e)) from None
                if all(r.adapter is not cls for r in loaded):  # a distribution seen twice on the path
                    loaded.append(Registration(cls, ep))
            self._loaded = loaded
        return self._loaded

    def registrations(self) -> list[Registration]:
        """Every adapter: those of entry points (by entry-point name), then those registered in this process."""
        out = list(self._load_entry_points())
        out += [r for r in self._registered if all(r.adapter is not o.adapter for o in out)]
        return out

    # ------------------------------------------------------------------ lookups
    def claims(self) -> dict[str, list[Registration]]:
        """Class name -> the registrations that claim it (more than one: a conflict)."""
        out: dict[str, list[Registration]] = {}
        for r in self.registrations():
            for name in r.adapter.model_data.class_names:
                out.setdefault(name, []).append(r)
        return out

    def supported_classes(self) -> list[str]:
        """Class names of the transformers an adapter exists for."""
        return sorted(self.claims())

    def registration_for_class(self, class_name: str) -> Registration:
        """The registration of the adapter for transformers of the class ``class_name``."""
        claims = self.claims()
        found = claims.get(class_name, [])
        if not found:
            raise ValueError(f"no freeloc adapter for {class_name}; supported classes: {sorted(claims)}. To add one, "
                             f"{HOW_TO_ADD}; or pass adapter=... to freeloc.enable")
        if len(found) > 1:
            raise AdapterConflictError(
                f"{len(found)} adapters claim {class_name}: " + "; ".join(r.origin for r in found)
                + ". Uninstall or unregister all but one, or choose one with freeloc.enable(..., adapter=...)")
        return found[0]

    def adapter_for_class(self, class_name: str) -> type[TransformerAdapter]:
        """The adapter class for transformers of the class ``class_name`` (see ``registration_for_class``)."""
        return self.registration_for_class(class_name).adapter

    def shipped_plans(self) -> dict[str, ShippedPlan]:
        """Every plan shipped by a registered adapter, by name."""
        out: dict[str, ShippedPlan] = {}
        owner: dict[str, Registration] = {}
        for r in self.registrations():
            for plan in r.adapter.model_data.plans:
                if plan.name in out and out[plan.name] != plan:
                    raise AdapterConflictError(f"two adapters ship a plan named {plan.name!r}: "
                                               f"{owner[plan.name].origin} and {r.origin}")
                out[plan.name], owner[plan.name] = plan, r
        return out

    def adapters_for(self, target: Any, adapter: type | None = None
                     ) -> list[tuple[str, torch.nn.Module, type[TransformerAdapter]]]:
        """``(name, transformer, adapter class)`` for every transformer of a pipeline or for a module.

        ``adapter``: use this adapter class for every transformer instead of looking one up.
        """
        if adapter is not None:
            _check_adapter(adapter, "adapter=")
        if isinstance(target, torch.nn.Module):
            modules = [("transformer", target)]
        else:
            modules = [(attr, getattr(target, attr)) for attr in TRANSFORMER_ATTRIBUTES
                       if isinstance(getattr(target, attr, None), torch.nn.Module)]
            if not modules:
                raise ValueError(f"found no transformer in {type(target).__name__}: expected a torch module or a "
                                 f"pipeline with a .transformer; supported transformer classes: "
                                 f"{self.supported_classes()}")
        return [(name, module, adapter or self.adapter_for_class(type(module).__name__)) for name, module in modules]


#: The registry the core uses.
REGISTRY = AdapterRegistry()


def register_adapter(adapter: A) -> A:
    """Class decorator: register an adapter in this process (see ``AdapterRegistry.register``).

    Example::

        @freeloc.registry.register_adapter
        class MyAdapter(freeloc.adapter.TransformerAdapter):
            model_data = ModelData(classes=(ModelClass("MyVideoTransformer", trained_video_frames=81),),
                                   temporal_factor=4)
            ...
    """
    return REGISTRY.register(adapter)


def registrations() -> list[Registration]:
    """Every adapter of ``REGISTRY``, with where it came from."""
    return REGISTRY.registrations()


def supported_classes() -> list[str]:
    """Class names of the transformers an adapter exists for."""
    return REGISTRY.supported_classes()


def adapter_for_class(class_name: str) -> type[TransformerAdapter]:
    """The adapter class for transformers of the class ``class_name``."""
    return REGISTRY.adapter_for_class(class_name)


def shipped_plans() -> dict[str, ShippedPlan]:
    """Every plan shipped by an installed or registered adapter, by name."""
    return REGISTRY.shipped_plans()


def adapters_for(target: Any, adapter: type | None = None
                 ) -> list[tuple[str, torch.nn.Module, type[TransformerAdapter]]]:
    """``(name, transformer, adapter class)`` for every transformer of a pipeline or for a module."""
    return REGISTRY.adapters_for(target, adapter)
