"""The code layout holds: every module imports, the serving package imports no tooling, and no import cycle.

Imports are read with ``ast`` (lazy imports inside functions included: a cycle through one is still a cycle),
so the checks do not depend on what happens to be imported at run time.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Top-level package -> the folder that holds it.
PACKAGE_ROOTS = {
    "hybridiff": REPO / "python_backend",
    "export": REPO,
    "client": REPO,
    "tools": REPO,
    "bench": REPO,
    "loadtest": REPO,
    "train": REPO,
    "deploy": REPO,
    "tests": REPO,
}
IMPORTED_PACKAGES = [p for p in PACKAGE_ROOTS if p != "tests"]  # tests need pytest's fixtures to mean anything
TOOLING = {"tools", "bench", "tests", "loadtest", "client", "train", "deploy"}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    modules = {}
    for package, root in PACKAGE_ROOTS.items():
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


MODULES = module_files()


def imported_names(module: str, path: Path) -> set[str]:
    """Every dotted name ``module`` imports, relative imports resolved; ``from a import b`` gives ``a.b``."""
    is_package = path.name == "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                base = parts[: len(parts) - node.level + (1 if is_package else 0)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            names.add(origin)
            names.update(f"{origin}.{alias.name}" for alias in node.names)
    return names


def project_imports(module: str) -> set[str]:
    """The project modules ``module`` imports by name (the longest known prefix of each imported name)."""
    found = set()
    for name in imported_names(module, MODULES[module]):
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            candidate = ".".join(parts[:end])
            if candidate in MODULES:
                if candidate != module:
                    found.add(candidate)
                break
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first module repeated last), or None: depth-first search with colours."""
    done: set[str] = set()
    on_path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in on_path:
            return on_path[on_path.index(node) :] + [node]
        if node in done:
            return None
        on_path.append(node)
        for nxt in sorted(graph[node]):
            cycle = visit(nxt)
            if cycle is not None:
                return cycle
        on_path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle is not None:
            return cycle
    return None


def test_the_project_modules_are_found() -> None:
    for expected in ("hybridiff.tritonserver", "tools.triton_process", "bench.stats", "export.build_checkpoint"):
        assert expected in MODULES


@pytest.mark.parametrize("package", IMPORTED_PACKAGES)
def test_every_module_imports(package: str) -> None:
    """In a child process per package, as each runs: locust (the load test) must patch the standard library
    for gevent before anything imports ssl, and must not patch this test process."""
    names = sorted(m for m in MODULES if m.split(".")[0] == package)
    script = (
        "import importlib, sys\n"
        "failed = []\n"
        f"for name in {names!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        failed.append(f'{name}: {exc!r}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    path = os.pathsep.join([str(PACKAGE_ROOTS["hybridiff"]), str(REPO)])  # this checkout's own code first
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", script]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("hybridiff")))
def test_the_serving_package_imports_no_tooling(module: str) -> None:
    tooling = {name for name in imported_names(module, MODULES[module]) if name.split(".")[0] in TOOLING}
    assert not tooling, f"{module} imports tooling: {sorted(tooling)}"


def test_no_import_cycle() -> None:
    graph = {module: project_imports(module) for module in MODULES}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_find_cycle_finds_one_and_only_one() -> None:
    """The checker itself: the cycle export/ had (build_checkpoint <-> sd3_checkpoint) is found, a chain is not."""
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_relative_imports_are_resolved(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    module = tmp_path / "pkg" / "mod.py"
    module.write_text("from ..families import base\nfrom .common import x\nimport numpy\n")
    assert imported_names("hybridiff.triton.mod", module) == {
        "hybridiff.families",
        "hybridiff.families.base",
        "hybridiff.triton.common",
        "hybridiff.triton.common.x",
        "numpy",
    }
