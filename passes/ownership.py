"""Ownership analysis: which tasks each parameter reaches, read off the graph.

A parameter is *used* by the fx node that reads it: the ``call_module`` node of the
module that holds it, or a ``get_attr`` node that fetches it. It is owned by task ``t``
when the node that produces ``t``'s output is reachable from a node that uses it.
Reachability is a networkx query on the graph's data-flow DiGraph. A parameter used in
several places (weight tying) gets the union of its uses' tasks and is reported under
one name (the first under which ``named_parameters()`` lists it).

- shared: ``len(owners[p]) > 1``      - task-specific: ``== 1``      - unused: ``== 0``

>>> import torch.nn as nn
>>> from disparse_fx.passes.trace import trace_model
>>> class Net(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.trunk, self.a, self.b, self.spare = (nn.Linear(4, 4) for _ in range(4))
...     def forward(self, x):
...         h = self.trunk(x)
...         return {"a": self.a(h), "b": self.b(h)}
>>> own = analyze_ownership(trace_model(Net()))
>>> sorted(own.owners["trunk.weight"]), sorted(own.owners["a.weight"])
(['a', 'b'], ['a'])
>>> own.shared_params()
('trunk.weight', 'trunk.bias')
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, FrozenSet, Hashable, Iterator, Mapping, Optional, Tuple

import networkx as nx
import torch.fx as fx
import torch.nn as nn

from .trace import task_output_nodes

__all__ = ["Ownership", "analyze_ownership", "enclosing_modules", "graph_to_networkx", "parameter_uses"]


@dataclass(frozen=True)
class Ownership:
    """Result of :func:`analyze_ownership`; never edits the graph.

    ``owners``: {param_name: frozenset(tasks)} for every parameter of the model, unused
    ones included (empty set). ``uses``: {param_name: names of the fx nodes reading it}.
    ``tasks``: the tasks in output order.
    """

    tasks: Tuple[Hashable, ...]
    owners: Mapping[str, FrozenSet[Hashable]]
    uses: Mapping[str, Tuple[str, ...]]

    def domain(self, task: Hashable) -> Tuple[str, ...]:
        """The parameters from which ``task``'s output is reachable (its domain D_t)."""
        return tuple(p for p, ts in self.owners.items() if task in ts)

    def shared_params(self) -> Tuple[str, ...]:
        return tuple(p for p, ts in self.owners.items() if len(ts) > 1)

    def task_specific_params(self, task: Optional[Hashable] = None) -> Tuple[str, ...]:
        return tuple(
            p for p, ts in self.owners.items() if len(ts) == 1 and (task is None or task in ts)
        )

    def unused_params(self) -> Tuple[str, ...]:
        return tuple(p for p, ts in self.owners.items() if not ts)


def graph_to_networkx(graph: fx.Graph) -> nx.DiGraph:
    """The data-flow graph: one vertex per fx node name, an edge from input to user."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node.name)
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def enclosing_modules(qualified_name: str) -> Iterator[str]:
    """The modules that hold ``qualified_name`` (a parameter, buffer or submodule),
    innermost first: ``"a.b.weight"`` -> ``"a.b"``, ``"a"`` (the root, ``""``, is left out)."""
    for i in range(1, qualified_name.count(".") + 1):
        yield qualified_name.rsplit(".", i)[0]


def parameter_uses(gm: fx.GraphModule, reference: Optional[nn.Module] = None) -> Dict[str, Tuple[str, ...]]:
    """{canonical param name: names of the nodes that read it}, for every parameter.

    The canonical name of a parameter is the first name ``reference.named_parameters()``
    gives it (``reference`` defaults to ``gm``; pass the original model, whose parameter
    objects a fresh trace shares, to key everything by the ORIGINAL names). Tied
    parameters (one object under several names) therefore share one entry, and
    parameters of ``reference`` that the graph never reads get an empty tuple.
    """
    graph_params = list(gm.named_parameters(remove_duplicate=False))
    canonical: Dict[int, str] = {}
    for name, p in reference.named_parameters(remove_duplicate=False) if reference is not None else graph_params:
        canonical.setdefault(id(p), name)
    if reference is not None:  # parameters only the graph knows (e.g. added by a pass)
        for name, p in graph_params:
            canonical.setdefault(id(p), name)
    uses: Dict[str, list] = {name: [] for name in dict.fromkeys(canonical.values())}
    # the parameters under each module, from one walk (module.parameters() per node walks
    # the tree again each time)
    under: Dict[str, list] = {}
    for name, p in graph_params:
        for module in enclosing_modules(name):
            under.setdefault(module, []).append(p)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            params = under.get(node.target, ())
        elif node.op == "get_attr":
            obj = _resolve_attr(gm, node.target)
            params = [obj] if isinstance(obj, nn.Parameter) else (
                obj.parameters() if isinstance(obj, nn.Module) else [])
        else:
            continue
        for p in params:
            uses[canonical[id(p)]].append(node.name)
    return {name: tuple(dict.fromkeys(nodes)) for name, nodes in uses.items()}


def analyze_ownership(gm: fx.GraphModule, *, reference: Optional[nn.Module] = None) -> Ownership:
    """Compute, for every parameter, the set of tasks whose output it reaches.

    ``reference``: the original model when ``gm`` is a fresh trace of it; names are then
    the original model's, and its parameters that the forward never reads (torch.fx
    drops their modules) are reported as unused.
    """
    outputs = task_output_nodes(gm)
    dag = graph_to_networkx(gm.graph)
    # Ancestors of each task's output node = every node whose value can reach it.
    reaches = {task: nx.ancestors(dag, node.name) | {node.name} for task, node in outputs.items()}
    uses = parameter_uses(gm, reference)
    owners = {
        name: frozenset(t for t, anc in reaches.items() if any(n in anc for n in nodes))
        for name, nodes in uses.items()
    }
    return Ownership(tasks=tuple(outputs), owners=owners, uses=uses)


def _resolve_attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
