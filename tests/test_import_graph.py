"""The package's import graph: no cycles, and the runtime never imports the simulator."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
from conftest import REPO

PACKAGE = REPO / "nixery_core"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> nx.DiGraph[str]:
    """Every import between nixery_core modules, wherever it is written.

    Function-level and ``TYPE_CHECKING`` imports count too: an import hidden
    in a function to dodge a cycle is still a cycle.  ``from pkg import mod``
    is an edge to ``pkg.mod`` (importing ``pkg`` itself only runs its
    ``__init__``, which re-exports and is checked like any module).
    """
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: nx.DiGraph[str] = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    targets.append(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                targets.extend(alias.name for alias in node.names)
            for target in targets:
                if target.split(".")[0] in ("nixery_core", "nixery_core_sim"):
                    graph.add_edge(name, target)
    return graph


def test_there_is_no_import_cycle() -> None:
    """No module of nixery_core imports, directly or not, a module that imports it back."""
    graph = import_graph()
    assert len(graph) > 30
    assert list(nx.simple_cycles(graph)) == []


def test_the_runtime_package_does_not_import_the_simulator() -> None:
    """nixery_core_sim is for measurements only: nothing in nixery_core reaches it."""
    graph = import_graph()
    assert not any(target.startswith("nixery_core_sim") for _, target in graph.edges)
    assert not (PACKAGE / "layering" / "universe.py").exists()
    assert not (PACKAGE / "layering" / "evaluation.py").exists()


def test_the_graph_sees_hidden_imports() -> None:
    """A cycle closed only by a function-level import is found (the check can fail)."""
    graph = import_graph()
    graph.add_edge("nixery_core.names", "nixery_core.build")  # as a lazy import would add
    assert list(nx.simple_cycles(graph))
