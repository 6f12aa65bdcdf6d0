"""The house rules: who may import whom (ARCHITECTURE.md), no import cycles, tests mirror node/.

The import contracts live in pyproject.toml ([tool.importlinter]) and are checked here by
import-linter itself, so that `make test` fails on the first import that crosses a wall.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("node", "protocol", "benchmarks")


def test_import_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    modules = sorted(m for m in graph.modules if m.split(".")[0] in PACKAGES)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in modules:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child.split(".")[0] not in PACKAGES:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_no_module_imports_in_a_circle() -> None:
    # Imports under TYPE_CHECKING count too: a cycle that only typing hides is still a knot.
    # A package's __init__ re-exporting its own modules is not a cycle of the design.
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    for package in [m for m in graph.modules if (ROOT / m.replace(".", "/") / "__init__.py").is_file()]:
        for child in graph.find_modules_directly_imported_by(package):
            if child.startswith(package + "."):
                graph.remove_import(importer=package, imported=child)
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for name in ("node.a", "node.b", "node.c"):
        graph.add_module(name)
    graph.add_import(importer="node.a", imported="node.b")
    graph.add_import(importer="node.b", imported="node.c")
    graph.add_import(importer="node.c", imported="node.a")
    assert _cycles(graph) == [["node.a", "node.b", "node.c"]]


def test_tests_mirror_the_layout() -> None:
    roles = {p.name for p in (ROOT / "node").iterdir() if (p / "__init__.py").is_file()}
    mirrored = {p.name for p in (ROOT / "tests" / "node").iterdir() if (p / "__init__.py").is_file()}
    assert mirrored <= roles, f"tests/node/ has folders with no node/ counterpart: {sorted(mirrored - roles)}"
    flat = sorted(p.name for p in (ROOT / "tests" / "node").glob("test_*.py"))
    assert not flat, f"tests of node/ belong in the folder of their role: {flat}"
    assert not [p for p in (ROOT / "node").glob("*.py") if p.name not in ("__init__.py", "__main__.py")], \
        "node/ holds only its role packages"
