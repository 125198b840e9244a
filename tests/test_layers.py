"""The layers of the package: the core needs only PyTorch and never imports the applications.

The modules are found by walking ``freeloc/`` (and ``adapters/``, installed as ``freeloc.adapters``), and
their imports read with :mod:`ast`, relative ones resolved to ``freeloc.*`` names:

* (a) no core module imports ``freeloc.app``, ``freeloc.shapes`` or ``freeloc.adapters``, not even inside
  a function (the core is every module under ``freeloc/`` outside ``freeloc/app/`` and ``freeloc/shapes/``,
  except ``freeloc/__main__.py``, the entry point of ``python -m freeloc``);
* (b) the imports a module runs when it is imported (at module level, not under ``if TYPE_CHECKING:``)
  form no cycle among the ``freeloc`` modules;
* (c) importing freeloc loads none of the optional packages (:data:`OPTIONAL`), and works without them.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Folders of the import packages: ``adapters/`` is installed as ``freeloc.adapters``.
FOLDERS = {"freeloc": ROOT / "freeloc", "freeloc.adapters": ROOT / "adapters"}
#: Packages above the core: the applications, the shapes test bed and the model adapters.
ABOVE_CORE = ("freeloc.app", "freeloc.shapes", "freeloc.adapters")
#: ``python -m freeloc``: the command's entry point, which runs the application; the core never imports it.
ENTRY_POINTS = ("freeloc.__main__",)
#: The packages only the applications and the test bed may load.
OPTIONAL = ("matplotlib", "tqdm", "imageio", "PIL", "diffusers", "transformers", "safetensors")
#: What the core itself depends on (``pyproject.toml``): what these load is not freeloc's doing.
DEPENDENCIES = ("torch", "einops", "jaxtyping", "beartype")


@dataclass(frozen=True)
class Import:
    """One import statement's target, as a module name."""

    module: str  # the importing module
    target: str  # the imported module (``from a import b``: ``a.b`` when that is a module, else ``a``)
    line: int
    on_import: bool  # runs when ``module`` is imported: module level, not under ``if TYPE_CHECKING:``


def discover() -> dict[str, Path]:
    """Every module of the package, by its import name."""
    modules = {}
    for prefix, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([prefix, *parts])] = path
    return modules


def is_core(module: str) -> bool:
    above = any(module == top or module.startswith(top + ".") for top in ABOVE_CORE)
    return not above and module not in ENTRY_POINTS


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(module: str, path: Path, known: set[str]) -> list[Import]:
    """Every import in the module's source, with whether it runs when the module is imported."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def record(node: ast.Import | ast.ImportFrom, on_import: bool) -> None:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - (node.level - 1)])
                base = f"{parent}.{base}" if base else parent
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        found.extend(Import(module, t, node.lineno, on_import) for t in dict.fromkeys(targets))

    def walk(nodes: list[ast.AST], on_import: bool) -> None:
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                record(node, on_import)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                walk(list(ast.iter_child_nodes(node)), False)
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                walk(node.body, False)
                walk(node.orelse, on_import)
            else:
                walk(list(ast.iter_child_nodes(node)), on_import)

    walk(ast.parse(path.read_text(), filename=str(path)).body, True)
    return found


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    modules = discover()
    found = [imp for name, path in modules.items() for imp in imports_of(name, path, set(modules))]
    core = sorted(m for m in modules if is_core(m))
    print(f"{len(modules)} modules ({len(core)} core: {', '.join(core)}), {len(found)} imports")
    return found


def test_the_core_imports_nothing_above_it(imports: list[Import]) -> None:
    """The core finds adapters through the registry (entry points), never by importing them."""
    upward = [imp for imp in imports if is_core(imp.module) and not is_core(imp.target)]
    wrong = [f"{imp.module} (line {imp.line}) imports {imp.target}" for imp in upward]
    print(f"(a) {sum(is_core(imp.module) for imp in imports)} imports of core modules checked for "
          f"{', '.join(ABOVE_CORE)}")
    assert not wrong, "core modules import the applications, the test bed or the adapters:\n" + "\n".join(wrong)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with a cycle (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in edges.get(node, ()):
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_cycle(imports: list[Import]) -> None:
    known = set(discover())
    edges: dict[str, set[str]] = {}
    for imp in imports:
        if imp.on_import and imp.target in known:
            edges.setdefault(imp.module, set()).add(imp.target)
    print(f"(b) {sum(map(len, edges.values()))} module-level imports among {len(known)} freeloc modules")
    cycles = _cycles(edges)
    assert not cycles, "import cycles among freeloc modules:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_cycles_are_found() -> None:
    """The cycle search itself: a two-module cycle and a self-import are found, a chain is not."""
    assert _cycles({"a": {"b"}, "b": {"a", "c"}, "c": set()}) == [["a", "b"]]
    assert _cycles({"a": {"a"}}) == [["a"]]
    assert _cycles({"a": {"b"}, "b": {"c"}}) == []


def _run(code: str) -> dict[str, list[str]]:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_importing_freeloc_loads_no_optional_package() -> None:
    """``import freeloc`` and every module of the core, the applications and the test bed import lazily."""
    names = sorted(m for m in discover() if not m.startswith("freeloc.adapters"))
    code = f"""
import importlib, json, sys
for name in {list(DEPENDENCIES)!r}:
    importlib.import_module(name)
by_dependencies = set(sys.modules)
import freeloc
import freeloc.attention
after_freeloc = set(sys.modules)
for name in {names!r}:
    importlib.import_module(name)
loaded = lambda modules: sorted(m for m in modules if m.partition(".")[0] in {list(OPTIONAL)!r})
print(json.dumps({{"dependencies": loaded(by_dependencies), "freeloc": loaded(after_freeloc - by_dependencies),
                  "all": loaded(set(sys.modules) - by_dependencies)}}))
"""
    loaded = _run(code)
    print(f"(c) optional packages {list(OPTIONAL)}: loaded by torch and the core's other dependencies "
          f"{loaded['dependencies']}; by import freeloc, freeloc.attention {loaded['freeloc']}; by all "
          f"{len(names)} modules {loaded['all']}")
    assert loaded["freeloc"] == [], f"import freeloc loads optional packages: {loaded['freeloc']}"
    assert loaded["all"] == [], f"importing the modules of freeloc loads optional packages: {loaded['all']}"


def test_freeloc_imports_and_runs_without_the_optional_packages() -> None:
    """With every optional package made unimportable, ``import freeloc`` works and the core computes;
    the other modules import too (they need the packages only when called)."""
    names = sorted(m for m in discover() if not m.startswith("freeloc.adapters"))
    code = f"""
import importlib, json, sys
for name in {list(OPTIONAL)!r}:
    sys.modules[name] = None  # "import name" now raises ImportError, as if it were not installed
import freeloc
import freeloc.attention
r = freeloc.VRPR.for_length(81, 21).relative_distance(81)
for name in {names!r}:
    importlib.import_module(name)
print(json.dumps({{"max_abs_r": [int(r.abs().max())]}}))
"""
    result = _run(code)
    print(f"(c) with {list(OPTIONAL)} missing: import freeloc, freeloc.attention; VRPR max |r| = "
          f"{result['max_abs_r']}; then the {len(names)} modules of freeloc import")
    assert result["max_abs_r"] == [20]


def test_the_architecture_page_names_files_that_exist() -> None:
    """``docs/architecture.md`` names the modules of each layer: every path it gives exists (relative to the
    repository, or to ``freeloc/`` for the attention modules), so that the page stays true."""
    import re

    page = (ROOT / "docs" / "architecture.md").read_text()
    paths = sorted({p for p in re.findall(r"`([\w./]+(?:\.py|/))`", page) if "/" in p})
    print(f"{len(paths)} paths named: {paths}")
    assert len(paths) > 10
    missing = [p for p in paths if not (ROOT / p).exists() and not (ROOT / "freeloc" / p).exists()]
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"
