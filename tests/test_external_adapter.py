"""An adapter package outside freeloc, end to end: the package of the guide ``docs/write-an-adapter.md``.

The guide's file blocks (each after a ``<!-- file: PATH -->`` line) are the package: a toy video
transformer, its adapter, a shipped plan, a ``pyproject.toml`` declaring the entry point, and a test file
using :mod:`freeloc.testing`. The test writes them to a temporary folder, installs the package there with
pip (no dependencies, no build isolation: freeloc and torch come from this environment), then, in
subprocesses with only that folder added to the path, runs the package's own tests and checks that
``freeloc.enable`` finds the adapter through its entry point.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "write-an-adapter.md"
#: A file block of the guide: the marker line, then one fenced code block.
FILE_BLOCK = re.compile(r"^<!-- file: (?P<path>\S+) -->\n```\w*\n(?P<code>.*?)\n```$", re.MULTILINE | re.DOTALL)
PACKAGE_FILES = {"pyproject.toml", "toyvideo/__init__.py", "toyvideo/model.py", "toyvideo/adapter.py",
                 "toyvideo/plans/toyvideo-2-layers.json", "tests/test_toyvideo.py"}

ENABLE_THROUGH_THE_ENTRY_POINT = """
import freeloc
import toyvideo
from freeloc.registry import REGISTRY
from toyvideo.model import ToyVideoTransformer

model = ToyVideoTransformer().eval()
with freeloc.enable(model, num_frames=32) as session:
    print("adapter:", REGISTRY.registration_for_class("ToyVideoTransformer").origin)
    print("plan:", session.plan.methods, "from", toyvideo.__file__)
"""


def guide_files() -> dict[str, str]:
    return {m["path"]: m["code"] + "\n" for m in FILE_BLOCK.finditer(GUIDE.read_text(encoding="utf-8"))}


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    print("$", " ".join(args), flush=True)
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    print(done.stdout[-4000:], done.stderr[-4000:], sep="\n")
    assert done.returncode == 0, f"{args[:4]} exited with {done.returncode}"
    return done.stdout


def test_the_guide_holds_the_whole_package() -> None:
    assert set(guide_files()) == PACKAGE_FILES


@pytest.mark.slow
def test_an_external_adapter_package_installs_passes_conformance_and_is_found(tmp_path: Path) -> None:
    # pip is looked up by its metadata, not imported: importing it here would switch this process to the
    # standard library's distutils (setuptools' import hook gives way to pip), which later breaks torch's
    # compiler where it imports setuptools
    try:
        metadata.distribution("pip")
    except metadata.PackageNotFoundError:
        pytest.skip("installing the package needs pip in this environment, which has none")
    pkg, site = tmp_path / "pkg", tmp_path / "site"
    for rel, code in guide_files().items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(code, encoding="utf-8")
    print(f"wrote the guide's package to {pkg}: {sorted(PACKAGE_FILES)}")

    run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
         "--no-build-isolation", "--no-index", "--target", str(site), str(pkg)], cwd=tmp_path)
    assert (site / "toyvideo" / "plans" / "toyvideo-2-layers.json").is_file()
    entry_points = next(site.glob("toyvideo-*.dist-info")) / "entry_points.txt"
    assert "toyvideo = toyvideo.adapter:ToyVideoAdapter" in entry_points.read_text()

    # only the installed copy is importable: the subprocesses run outside the package's source folder
    env = dict(os.environ, PYTHONPATH=str(site))
    out = run([sys.executable, "-m", "pytest", str(pkg / "tests" / "test_toyvideo.py"), "-q", "-rs",
               "-p", "no:cacheprovider"], cwd=tmp_path, env=env)
    from freeloc.testing import CHECKS

    # every check of the suite, and the guide's own test
    assert re.search(rf"\b{len(CHECKS) + 1} passed\b", out) and "failed" not in out and "skipped" not in out
    assert "PytestUnknownMarkWarning" not in out

    out = run([sys.executable, "-c", ENABLE_THROUGH_THE_ENTRY_POINT], cwd=tmp_path, env=env)
    assert ("adapter: toyvideo.adapter.ToyVideoAdapter (entry point 'toyvideo = toyvideo.adapter:ToyVideoAdapter' "
            "of the distribution toyvideo 0.1.0)") in out
    assert f"plan: ['tsa', 'vrpr'] from {site / 'toyvideo' / '__init__.py'}" in out
