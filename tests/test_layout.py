"""The house layout holds: small rooms, one version, no import circle between any two modules.

The layering contracts themselves are checked by `lint-imports` (pyproject.toml); these are the rules
it cannot express.
"""

from __future__ import annotations

import ast
import importlib.metadata
import sys
from pathlib import Path

import grimp

import zdut
from zdut import protocol

ROOT = Path(__file__).resolve().parent.parent / "zdut"
MAX_FILE_LINES = 500
MAX_BROKER_CLASS_LINES = 350


def test_no_file_under_zdut_is_over_500_lines() -> None:
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in ROOT.rglob("*.py")}
    assert len(sizes) > 20
    assert {name: n for name, n in sizes.items() if n > MAX_FILE_LINES} == {}


def test_broker_class_keeps_dispatch_and_policy_only() -> None:
    tree = ast.parse((ROOT / "broker.py").read_text())
    (broker,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Broker"]
    assert broker.end_lineno is not None
    assert broker.end_lineno - broker.lineno + 1 <= MAX_BROKER_CLASS_LINES


def test_one_version_written_once_and_the_package_metadata_agrees() -> None:
    assert zdut.__version__ == importlib.metadata.version("zdut")
    assert protocol.VERSION == zdut.__version__
    restated = [p for p in ROOT.rglob("*.py") if f'"{zdut.__version__}"' in p.read_text()]
    assert restated == [ROOT / "__init__.py"]
    assert 'version = { attr = "zdut.__version__" }' in (ROOT.parent / "pyproject.toml").read_text()


def module_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), in the direct-import graph."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return cycles


def test_no_import_circle_between_any_two_modules() -> None:
    """Every import counts: module level, inside functions, and under TYPE_CHECKING."""
    graph = grimp.build_graph("zdut", exclude_type_checking_imports=False)
    assert len(graph.modules) > 40
    assert module_cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for importer, imported in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]:
        graph.add_import(importer=importer, imported=imported)
    assert module_cycles(graph) == [["a", "b", "c"]]
