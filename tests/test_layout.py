"""The package's layout: imports only downward (no cycle, function-level imports included), small modules,
no private name used outside its module, and a non-editable install that ships every subpackage."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "course_utils"
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (``pkg/__init__.py`` is ``pkg``)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules that ``name`` imports anywhere in its file (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                child = f"{module}.{alias.name}"
                targets.add(child if child in modules else module)
        elif isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
    # a package's own submodules and its parents are not edges of the import graph
    return {t for t in targets if t in modules and t != name and not name.startswith(t + ".")
            and not t.startswith(name + ".")}


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if not state.get(nxt):
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if not state.get(name):
            visit(name)
    assert graph["course_utils.structure"] and "course_utils.models" not in graph["course_utils.structure"]


def test_the_walk_sees_function_level_imports(tmp_path):
    """The checker itself: an import inside a function body counts as an edge."""
    fake = tmp_path / "course_utils"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "a.py").write_text("def f():\n    from . import b\n")
    (fake / "b.py").write_text("from .a import f\n")
    modules = {"course_utils": fake / "__init__.py", "course_utils.a": fake / "a.py", "course_utils.b": fake / "b.py"}
    assert _imports("course_utils.a", modules["course_utils.a"], modules) == {"course_utils.b"}
    assert _imports("course_utils.b", modules["course_utils.b"], modules) == {"course_utils.a"}


def test_modules_are_small():
    big = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}; split them by idea"


def test_no_private_name_crosses_a_module():
    """``from .x import _name`` and ``x._name`` (x a package module) are private uses across modules."""
    modules = _modules()
    short = {name.rpartition(".")[2] for name in modules}
    uses = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("course_utils")):
                uses += [f"{name}: from {node.module} import {a.name}" for a in node.names
                         if a.name.startswith("_") and not a.name.startswith("__")]
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in short):
                uses.append(f"{name}: {node.value.id}.{node.attr}")
    assert not uses, uses


def test_wheel_ships_every_subpackage(tmp_path):
    """A non-editable install (``pip install .``) must include importance/ and surgery/."""
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path), str(PACKAGE.parent)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("course_utils-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")}
    assert expected <= names, sorted(expected - names)


def _readme_floors() -> dict[str, int]:
    """Module name -> floor, from the package table of the README (``| floor | `course_utils/x.py` | ... |``)."""
    floors = {}
    readme = (PACKAGE.parent / "README.md").read_text()
    for floor, path in re.findall(r"^\| (\d+) \| `(course_utils/[\w/]+\.py)` \|", readme, flags=re.M):
        parts = Path(path).with_suffix("").parts
        floors[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = int(floor)
    return floors


def test_readme_table_lists_every_module_and_imports_go_down_it():
    modules = _modules()
    floors = _readme_floors()
    assert set(floors) == set(modules), (f"README package table misses {sorted(set(modules) - set(floors))}, "
                                         f"lists unknown {sorted(set(floors) - set(modules))}")
    upward = [f"{name} (floor {floors[name]}) imports {target} (floor {floors[target]})"
              for name, path in modules.items() for target in _imports(name, path, modules)
              if floors[target] >= floors[name]]
    assert not upward, upward
