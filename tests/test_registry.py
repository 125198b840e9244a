"""The adapter registry (entry points and register_adapter), the model data declared on adapters, and the
rule that the core finds adapters only through the registry."""

from __future__ import annotations

import ast
import doctest
import importlib
import pkgutil
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import torch

import freeloc
import freeloc.adapter
import freeloc.plan
import freeloc.registry
from freeloc.adapter import ConfigVariant, ModelClass, ModelData, ShippedPlan, TransformerAdapter
from freeloc.registry import (
    ENTRY_POINT_GROUP,
    REGISTRY,
    AdapterConflictError,
    AdapterLoadError,
    AdapterRegistry,
    register_adapter,
)

CORE = Path(freeloc.__file__).resolve().parent


class AdapterA(TransformerAdapter):
    model_data = ModelData(classes=(ModelClass("ModelA", trained_video_frames=9),), temporal_factor=4,
                           plans=(ShippedPlan("shared-name", "ModelA", {"layers": 1}, package="freeloc.adapters"),))


class AdapterB(TransformerAdapter):
    model_data = ModelData(classes=(ModelClass("ModelA", 9), ModelClass("ModelB", 9)), temporal_factor=4,
                           plans=(ShippedPlan("shared-name", "ModelB", {"layers": 2}, package="freeloc.adapters"),))


class NoData(TransformerAdapter):
    pass


class ModelA(torch.nn.Module):
    pass


def ep(name: str, value: str) -> metadata.EntryPoint:
    return metadata.EntryPoint(name, value if ":" in value else f"{__name__}:{value}", ENTRY_POINT_GROUP)


def registry(*entry_points: metadata.EntryPoint) -> AdapterRegistry:
    return AdapterRegistry(entry_points=lambda group: entry_points)


# ---------------------------------------------------------------------------------------------- freeloc's own
def test_freeloc_declares_each_of_its_adapters_as_an_entry_point() -> None:
    import freeloc.adapters

    defined = set()
    for info in pkgutil.iter_modules(freeloc.adapters.__path__):
        module = importlib.import_module(f"freeloc.adapters.{info.name}")
        defined |= {f"{module.__name__}:{obj.__name__}" for obj in vars(module).values()
                    if isinstance(obj, type) and issubclass(obj, TransformerAdapter)
                    and obj.__module__ == module.__name__ and "model_data" in vars(obj)}
    declared = {e.value for e in metadata.distribution("freeloc").entry_points if e.group == ENTRY_POINT_GROUP}
    assert declared == defined and len(declared) == 5


def test_freeloc_adapters_come_from_its_entry_points() -> None:
    origins = {r.adapter.__name__: r.origin for r in REGISTRY.registrations()}
    assert "entry point 'wan = freeloc.adapters.wan:WanAdapter' of the distribution freeloc" in origins["WanAdapter"]
    assert set(freeloc.registry.supported_classes()) >= {
        "WanTransformer3DModel", "SkyReelsV2Transformer3DModel", "HunyuanVideoTransformer3DModel",
        "HunyuanVideo15Transformer3DModel", "CogVideoXTransformer3DModel", "MMDiTModel"}


def test_the_core_never_imports_the_adapters_package() -> None:
    """No module of the core imports ``freeloc.adapters`` (adapters are found through the registry)."""
    offenders = []
    for path in sorted(CORE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                dots = "." * node.level
                names = [f"{dots}{node.module or ''}"] + [f"{dots}{node.module or ''}.{a.name}" for a in node.names]
            if any(n.split(".")[:2] == ["freeloc", "adapters"] or n.lstrip(".").split(".")[0] == "adapters"
                   for n in names):
                offenders.append(f"{path.relative_to(CORE)}:{node.lineno}")
    assert not offenders


def test_doctests_of_the_plan_the_adapter_base_and_the_registry() -> None:
    for module in (freeloc.plan, freeloc.adapter, freeloc.registry):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("value,error", [("NoSuchThing", "AttributeError"),
                                         ("freeloc_no_such_module:Adapter", "ModuleNotFoundError")])
def test_an_entry_point_that_fails_to_load_is_named_with_its_error(value: str, error: str) -> None:
    r = registry(ep("fine", "AdapterA"), ep("broken", value))
    with pytest.raises(AdapterLoadError, match=rf"entry point 'broken = \S*{value.split(':')[-1]}' of the group "
                                               rf"'freeloc.adapters' failed to load: {error}"):
        r.adapter_for_class("ModelA")


@pytest.mark.parametrize("value,match", [
    ("freeloc.plan:LayerPlan", "expected a subclass of freeloc.adapter.TransformerAdapter, got <class"),
    ("NoData", r"NoData.model_data must be a freeloc.adapter.ModelData"),
])
def test_an_entry_point_that_is_not_an_adapter_is_named(value: str, match: str) -> None:
    with pytest.raises(AdapterLoadError, match=rf"entry point 'odd = {value if ':' in value else '.*'}.*{match}"):
        registry(ep("odd", value)).supported_classes()


def test_two_adapters_claiming_one_class_are_both_named() -> None:
    r = registry(ep("a", "AdapterA"), ep("b", "AdapterB"))
    with pytest.raises(AdapterConflictError, match=r"2 adapters claim ModelA: .*AdapterA \(entry point 'a = .*; "
                                                   r".*AdapterB \(entry point 'b = .*adapter=\.\.\."):
        r.adapter_for_class("ModelA")
    assert r.adapter_for_class("ModelB") is AdapterB  # the other class is not contested
    with pytest.raises(AdapterConflictError, match=r"two adapters ship a plan named 'shared-name'"):
        r.shipped_plans()


def test_no_adapter_for_a_class_lists_the_supported_ones_and_how_to_add_one() -> None:
    with pytest.raises(ValueError, match=r"no freeloc adapter for Linear; supported classes: \['ModelA'\]\. To add "
                                         r"one, write a freeloc.adapter.TransformerAdapter subclass and declare it as "
                                         r"an entry point of the group 'freeloc.adapters'"):
        registry(ep("a", "AdapterA")).adapters_for(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="found no transformer in object"):
        registry(ep("a", "AdapterA")).adapters_for(object())


def test_an_explicit_adapter_needs_no_registry_lookup() -> None:
    r = registry(ep("broken", "NoSuchThing"))
    model = ModelA()
    assert r.adapters_for(model, adapter=AdapterA) == [("transformer", model, AdapterA)]
    with pytest.raises(TypeError, match="adapter=: expected a subclass of freeloc.adapter.TransformerAdapter"):
        r.adapters_for(model, adapter=freeloc.LayerPlan)


# ---------------------------------------------------------------------------------------------- register_adapter
def test_register_adapter_adds_replaces_and_forgets() -> None:
    r = registry()
    assert r.register(AdapterA) is AdapterA
    r.register(AdapterA)  # again: nothing changes
    assert [x.adapter for x in r.registrations()] == [AdapterA]
    assert "registered with register_adapter" in r.registrations()[0].origin

    def define() -> type:
        class AdapterA(TransformerAdapter):  # the same definition run again (a notebook cell)
            model_data = ModelData(classes=(ModelClass("ModelA", 9),), temporal_factor=4)

        AdapterA.__module__, AdapterA.__qualname__ = __name__, "AdapterA"
        return AdapterA

    again = r.register(define())
    assert r.adapter_for_class("ModelA") is again
    r.unregister(again)
    assert r.supported_classes() == []
    with pytest.raises(ValueError, match="was not registered"):
        r.unregister(again)
    with pytest.raises(TypeError, match="register_adapter: expected a subclass"):
        r.register(ModelA)


def test_a_registered_adapter_is_used_by_enable() -> None:
    diffusers = pytest.importorskip("diffusers", reason="the adapter reused here is the Wan one (extra 'diffusers')")
    from freeloc.adapters.wan import WanAdapter

    class RenamedWan(diffusers.WanTransformer3DModel):
        pass

    @register_adapter
    class RenamedWanAdapter(WanAdapter):
        model_data = ModelData(classes=(ModelClass("RenamedWan", trained_video_frames=21),), temporal_factor=4)

    try:
        torch.manual_seed(0)
        model = RenamedWan(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                           out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2).eval()
        with freeloc.enable(model, num_frames=93, plan="uniform") as session:  # 93 video frames: 24 latent
            assert model.blocks[0].attn1.processor.trained_frames == 6
        assert [s.method for s in session.layers] == ["vrpr", "vrpr"]
    finally:
        REGISTRY.unregister(RenamedWanAdapter)
    assert "RenamedWan" not in freeloc.registry.supported_classes()


# ---------------------------------------------------------------------------------------------- model data
def test_trained_length_by_class_and_variant_and_the_note_when_unknown() -> None:
    data = ModelData(classes=(
        ModelClass("ModelA", 81, variants=(ConfigVariant("big", {"in_channels": 48, "patch": [1, 2]}, 121),
                                           ConfigVariant("tuned", {"in_channels": 32}, None)),
                   note="tuned checkpoints differ"),), temporal_factor=4)

    class Config:
        in_channels, patch = 48, (1, 2)

    entry = data.model_class("ModelA")
    assert entry.trained_video_frames_for(Config()) == 121 and entry.trained_video_frames_for(None) == 81
    Config.in_channels = 32
    assert entry.trained_video_frames_for(Config()) is None

    class Tuned(TransformerAdapter):
        model_data = data

    model = ModelA()
    model.config = Config()
    with pytest.raises(ValueError, match=r"trained length of ModelA is not known to freeloc \(tuned checkpoints "
                                         r"differ\); pass trained_frames="):
        Tuned(model).trained_video_frames()
    with pytest.raises(ValueError, match=r"trained length of Linear is not known to Tuned, which declares "
                                         r"\['ModelA'\]; pass trained_frames="):
        Tuned(torch.nn.Linear(1, 1)).trained_video_frames()
    with pytest.raises(KeyError, match="'ModelB' is not one of the declared classes"):
        data.model_class("ModelB")


@pytest.mark.parametrize("make,match", [
    (lambda: ModelData(classes=(), temporal_factor=4), "classes must be a non-empty tuple of ModelClass"),
    (lambda: ModelData(classes=(ModelClass("A", 9), ModelClass("A", 9)), temporal_factor=4), "names a class twice"),
    (lambda: ModelData(classes=(ModelClass("A", 9),), temporal_factor=0), "temporal_factor must be a positive int"),
    (lambda: ModelData(classes=(ModelClass("A", 9),), temporal_factor=4,
                       plans=(ShippedPlan("p", "B", {}, package="x"),)), "is for 'B', which is not one of"),
    (lambda: ModelClass("A", 0), "trained_video_frames must be a positive int"),
    (lambda: ModelClass("not a name", 9), "must be a class name"),
    (lambda: ShippedPlan("p.json", "A", {}, package="x"), "plain name"),
])
def test_model_data_is_checked_when_declared(make: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_shipped_plans_are_found_through_the_registry_and_a_missing_file_is_named() -> None:
    assert freeloc.LayerPlan.shipped() == sorted(freeloc.registry.shipped_plans())
    assert "wan2.1-t2v-1.3b" in freeloc.LayerPlan.shipped()
    with pytest.raises(FileNotFoundError, match=r"freeloc.adapters/plans/nothing-here.json, which is missing"):
        ShippedPlan("nothing-here", "ModelA", {}, package="freeloc.adapters").load()
