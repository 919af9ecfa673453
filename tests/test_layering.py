"""Layering of ``passes/``: its modules import each other in one direction, and never
``disparse_fx`` (docs/architecture.md, "Two layers").

The import graph is read from the source with ``ast``, so it sees every import: at module
level, inside functions (a local import that closes a circle is still a circle) and under
``TYPE_CHECKING``. ``from pkg import name`` is an edge to ``pkg.name`` when that is a
module, else to ``pkg``; a package's ``__init__`` importing its own submodules (the rule
registry loading the built-in rules) is an edge like any other.
"""
from __future__ import annotations

import ast
import pathlib
from typing import Dict, Iterator, List, Set, Tuple

import networkx as nx

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "passes"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> Dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _imports(name: str, path: pathlib.Path, known: Set[str]) -> Iterator[Tuple[str, int]]:
    """``(imported module, line)`` for every import statement of the module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                yield (sub if sub in known else source), node.lineno


def import_graph() -> Tuple[nx.DiGraph, List[str]]:
    """The graph of imports between ``passes`` modules, and every import of disparse_fx."""
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    upward = []
    for name, path in modules.items():
        for target, line in _imports(name, path, set(modules)):
            if target == "disparse_fx" or target.startswith("disparse_fx."):
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
            elif target in modules and target != name:
                graph.add_edge(name, target)
                graph.edges[name, target].setdefault("lines", set()).add(line)
    return graph, upward


def test_the_graph_sees_the_packages_imports():
    graph, _ = import_graph()
    # a module-level import, a relative one from a subpackage, and the registry's loading
    assert graph.has_edge("passes.slim", "passes.channel_groups")
    assert graph.has_edge("passes.rules.norm", "passes.rules.registry")
    assert graph.has_edge("passes.rules", "passes.rules.norm")
    assert graph.has_edge("passes.rules.attention", "passes.attention")


def test_passes_has_no_import_cycle():
    graph, _ = import_graph()
    cycles = sorted(nx.simple_cycles(graph), key=len)
    shown = [" -> ".join(c + [c[0]]) + "  (lines: " + ", ".join(
        f"{a}:{sorted(graph.edges[a, b]['lines'])}" for a, b in zip(c, c[1:] + c[:1])) + ")" for c in cycles[:5]]
    assert not cycles, f"{len(cycles)} import cycles in passes/, e.g.\n" + "\n".join(shown)


def test_passes_never_imports_disparse_fx():
    _, upward = import_graph()
    assert not upward, "passes/ is the lower layer:\n" + "\n".join(upward)


def test_passes_imports_itself_relatively():
    """The folder installs as ``disparse_fx.passes`` (pyproject's package-dir): an absolute
    ``import passes...`` inside it would load a second copy, or nothing once installed."""
    absolute = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            absolute += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names
                         if n == PACKAGE or n.startswith(PACKAGE + ".")]
    assert not absolute, "import passes/ modules relatively:\n" + "\n".join(absolute)
