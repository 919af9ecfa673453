"""Import order of the upper layer: ``api``, ``result``, ``report`` and ``draw`` import
each other in one direction when their modules load (``api -> result``; the report and
the drawing read a result, a result imports the report only inside ``summary()``), and
drawing never slims (the caller passes ``slim_model``).

The graph is read from the source with ``ast`` as tests/test_layering.py reads it (``from
pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``),
keeping the statements that run when a module loads: module level, class bodies,
``try`` / ``if`` blocks, but not ``if TYPE_CHECKING:`` and not function bodies.
"""
from __future__ import annotations

import ast
import pathlib
from typing import Dict, Iterator, List

import networkx as nx

from .test_layering import ROOT, _imports, _module_name  # the same reading of import statements

PACKAGE = "disparse_fx"
CORE = ("disparse_fx.api", "disparse_fx.result", "disparse_fx.report", "disparse_fx.draw")


def _modules() -> Dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _load_time_statements(body: List[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements that run when the module is imported."""
    for stmt in body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        yield stmt
        if isinstance(stmt, ast.If):
            if not _is_type_checking(stmt.test):
                yield from _load_time_statements(stmt.body)
            yield from _load_time_statements(stmt.orelse)
        elif isinstance(stmt, ast.Try):
            for block in (stmt.body, *(h.body for h in stmt.handlers), stmt.orelse, stmt.finalbody):
                yield from _load_time_statements(block)
        elif isinstance(stmt, (ast.With, ast.ClassDef)):
            yield from _load_time_statements(stmt.body)


def import_graph(load_time_only: bool = True) -> nx.DiGraph:
    """Edges between disparse_fx modules: those that run when a module loads (or every
    import statement, local ones included, with ``load_time_only=False``)."""
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        load_time = {stmt.lineno for stmt in _load_time_statements(ast.parse(path.read_text(), str(path)).body)}
        for target, line in _imports(name, path, set(modules)):
            if target in modules and target != name and (line in load_time or not load_time_only):
                graph.add_edge(name, target)
                graph.edges[name, target].setdefault("lines", set()).add(line)
    return graph


def _shown(graph: nx.DiGraph, cycles: List[List[str]]) -> List[str]:
    return [" -> ".join(c + [c[0]]) + "  (lines: " + ", ".join(
        f"{a}:{sorted(graph.edges[a, b]['lines'])}" for a, b in zip(c, c[1:] + c[:1])) + ")" for c in cycles[:5]]


def test_the_graph_sees_load_time_imports_only():
    graph = import_graph()
    assert graph.has_edge("disparse_fx.api", "disparse_fx.result")  # module level
    assert graph.has_edge("disparse_fx.report", "disparse_fx.plan")
    assert not graph.has_edge("disparse_fx.report", "disparse_fx.result")  # under TYPE_CHECKING
    assert not graph.has_edge("disparse_fx.report", "disparse_fx.draw")  # inside write_report
    everything = import_graph(load_time_only=False)
    assert everything.has_edge("disparse_fx.report", "disparse_fx.draw")
    assert everything.has_edge("disparse_fx.result", "disparse_fx.report")  # inside summary()


def test_api_result_report_draw_are_on_no_import_cycle():
    graph = import_graph()
    cycles = sorted((c for c in nx.simple_cycles(graph) if set(c) & set(CORE)), key=len)
    assert not cycles, "import cycles through api / result / report / draw:\n" + "\n".join(_shown(graph, cycles))
    # the circle api -> result -> report -> draw -> api began with a result loading the report
    assert not graph.has_edge("disparse_fx.result", "disparse_fx.report")


def test_draw_never_slims():
    """draw takes widths after from ``slim_model`` or the plan: it imports no slimming,
    not even inside a function."""
    imported = {target for target, _ in _imports(f"{PACKAGE}.draw", ROOT / PACKAGE / "draw.py", set())}
    assert "disparse_fx.passes.insert_channel_masks" in imported  # the walk sees draw's imports
    assert not [t for t in imported if t == "disparse_fx.api" or t.endswith(".slim") or ".slim." in t]
    assert not import_graph(load_time_only=False).has_edge("disparse_fx.draw", "disparse_fx.api")
