"""draw: a picture of a (compressed) multitask graph, nodes coloured by owner.

Every compute node of the graph (module calls, functions, methods) is a box; graph
inputs are white boxes and each task output is a box of its task's colour. A box's
owners are the tasks whose output depends on it: one task gives that task's colour,
several give the "shared" colour (with the owning tasks named when they are not all of
them). Mask plumbing (``w * mask`` multiplies, channel-mask nodes, ``get_attr`` reads)
and shape plumbing (``x.shape``, ``x.size()`` and indexing into them) are not drawn:
edges pass through them. Conv / linear boxes show their output width (channels or
features), before -> after slimming.

Large graphs (more than ``max_boxes`` boxes, e.g. a ResNet-50) are collapsed by module
path: with ``collapse="auto"`` the deepest module-path depth whose boxes number at most
``max_boxes`` (depth 3 turns ``trunk.layer2.1.conv2`` into the box ``trunk.layer2.1``,
one bottleneck block); nodes with different owners never share a box. Functional nodes
take the module path of their ``nn_module_stack`` (recorded by the tracer), else of the
weight they read, else of their first input. A collapsed box shows the output width of
its last conv / linear. Boxes are laid out left to right by topological generation
(``networkx.topological_generations``).

>>> import os, tempfile, torch.nn as nn
>>> from disparse_fx.passes.trace import trace_model
>>> class Net(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.trunk, self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 2, 1), nn.Linear(8, 3)
...     def forward(self, x):
...         h = self.trunk(x).relu()
...         return {"a": self.a(h), "b": self.b(h.mean((2, 3)))}
>>> d = draw(trace_model(Net()), os.path.join(tempfile.mkdtemp(), "net.svg"))
>>> [(n.name, sorted(n.owners), n.width_before) for n in d.nodes]  # doctest: +NORMALIZE_WHITESPACE
[('input:x', ['a', 'b'], None), ('trunk', ['a', 'b'], 8), ('relu', ['a', 'b'], None), ('a', ['a'], 2),
 ('mean', ['b'], None), ('b', ['b'], 3), ('task:a', ['a'], None), ('task:b', ['b'], None)]
>>> d.edges[:3]
(('input:x', 'trunk'), ('trunk', 'relu'), ('relu', 'a'))
"""
from __future__ import annotations

import logging
import operator
import pathlib
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, Hashable, List, Mapping, Optional, Sequence, Tuple, Union

import networkx as nx
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from disparse_fx.passes.insert_channel_masks import is_channel_mask
from disparse_fx.passes.trace import task_output_nodes

from .errors import DisparseValueError

__all__ = ["draw", "Drawing", "DrawnNode", "SHARED_COLOR"]

log = logging.getLogger(__name__)

SHARED_COLOR = "#c9c9c9"
_TASK_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
                "#17becf", "#7f7f7f")
_MAX_COLUMNS = 14
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV_FUNCS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}
_CONVT_FUNCS = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}


@dataclass(frozen=True)
class DrawnNode:
    """One box. ``name``: its id (a node name, a module-path prefix, ``input:x`` or
    ``task:seg``); ``kind``: "input", "op" or "task"; ``members``: the fx nodes it stands
    for; ``width_before`` / ``width_after``: output width of its last conv / linear (None
    when it has none; ``width_after`` None also when no slim model is known);
    ``params_before`` / ``params_after``: elements of the parameters its members read
    (after: in the slim model, None when none is known); ``layer``: its column, 0 = left."""

    name: str
    label: str
    kind: str
    owners: FrozenSet[Hashable]
    members: Tuple[str, ...]
    width_before: Optional[int]
    width_after: Optional[int]
    params_before: int
    params_after: Optional[int]
    layer: int


@dataclass(frozen=True)
class Drawing:
    """What :func:`draw` drew: its boxes and edges (box names), the files written, and the
    module-path depth the boxes were collapsed to (None: one box per node)."""

    nodes: Tuple[DrawnNode, ...]
    edges: Tuple[Tuple[str, str], ...]
    paths: Tuple[pathlib.Path, ...]
    depth: Optional[int]


def draw(result_or_graph: Any, path: Union[str, pathlib.Path, Sequence[Union[str, pathlib.Path]]], *,
         collapse: Union[str, int, None] = "auto", slim_model: Optional[fx.GraphModule] = None,
         max_boxes: int = 60, title: Optional[str] = None) -> Drawing:
    """Draw a CompressionResult (its masked model, widths after from ``slim_model`` or
    ``dfx.slim(result)``) or an fx.GraphModule to ``path``.

    ``path``: ``*.svg`` or ``*.png``; a path without suffix writes both; a list writes
    each. ``collapse``: "auto" (collapse only when there are more than ``max_boxes``
    boxes), None (one box per node) or an int (module-path depth).
    """
    from .result import CompressionResult

    if isinstance(result_or_graph, CompressionResult):
        gm = result_or_graph.model
        if slim_model is None:
            from .api import slim

            try:
                slim_model = slim(result_or_graph)
            except DisparseValueError as exc:  # e.g. no example inputs recorded: draw without widths after
                log.warning("draw: no widths after slimming (%s); pass slim_model=dfx.slim(result, inputs)", exc)
        tasks = tuple(result_or_graph.plan.tasks)
    elif isinstance(result_or_graph, fx.GraphModule):
        gm = result_or_graph
        tasks = tuple(task_output_nodes(gm))
    else:
        raise DisparseValueError(f"draw expects a CompressionResult or an fx.GraphModule, got "
                                 f"{type(result_or_graph).__name__}")
    if not (collapse is None or collapse == "auto" or (isinstance(collapse, int) and collapse >= 1)):
        raise DisparseValueError(f"collapse must be 'auto', None or an int >= 1, got {collapse!r}")
    paths = _paths(path)
    nodes, edges, depth = _boxes(gm, tasks, slim_model, collapse, max_boxes)
    _render(nodes, edges, tasks, paths, title or f"{type(gm).__name__}: nodes coloured by owner")
    log.info("drew %d boxes, %d edges to %s", len(nodes), len(edges), ", ".join(map(str, paths)))
    return Drawing(nodes=tuple(nodes), edges=tuple(edges), paths=tuple(paths), depth=depth)


# ----------------------------------------------------------------------------- analysis
def _paths(path) -> List[pathlib.Path]:
    raw = [path] if isinstance(path, (str, pathlib.Path)) else list(path)
    out: List[pathlib.Path] = []
    for p in map(pathlib.Path, raw):
        if p.suffix == "":
            out += [p.with_suffix(".svg"), p.with_suffix(".png")]
        elif p.suffix.lower() in (".svg", ".png"):
            out.append(p)
        else:
            raise DisparseValueError(f"draw writes .svg or .png files (or both for a path without suffix), "
                                     f"got '{p}'")
    if not out:
        raise DisparseValueError("draw needs at least one path")
    return out


def _is_mask_mul(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target is operator.mul and len(n.args) == 2
            and any(isinstance(a, fx.Node) and a.op == "get_attr" and str(a.target).endswith("_mask")
                    for a in n.args))


def _is_shape_plumbing(n: fx.Node, plumbing: set) -> bool:
    if n.op == "call_function" and n.target is getattr:
        return True
    if n.op == "call_method" and n.target in ("size", "dim"):
        return True
    if n.op == "call_function" and n.target is operator.getitem and n.args and n.args[0] in plumbing:
        return True
    return False


def _weight_tensor(gm: fx.GraphModule, arg: Any) -> Optional[torch.Tensor]:
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        obj = gm
        for part in str(arg.target).split("."):
            obj = getattr(obj, part, None)
        return obj if isinstance(obj, torch.Tensor) else None
    if isinstance(arg, fx.Node) and _is_mask_mul(arg):
        return _weight_tensor(gm, arg.args[0])
    return None


def _weight_attr(arg: Any) -> Optional[str]:
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        return str(arg.target)
    if isinstance(arg, fx.Node) and _is_mask_mul(arg):
        return _weight_attr(arg.args[0])
    return None


def _out_width(gm: fx.GraphModule, n: fx.Node) -> Optional[int]:
    """Output channels / features of a conv, transposed conv or linear node."""
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        w = getattr(m, "weight", None)
        if isinstance(m, _CONV + (nn.Linear,)) and isinstance(w, torch.Tensor):
            return int(w.shape[0])
        if isinstance(m, _CONVT) and isinstance(w, torch.Tensor):
            return int(w.shape[1]) * m.groups
        return None
    if n.op != "call_function" or len(n.args) < 2:
        return None
    if n.target in _CONV_FUNCS or n.target is F.linear:
        w = _weight_tensor(gm, n.args[1])
        return int(w.shape[0]) if w is not None else None
    if n.target in _CONVT_FUNCS:
        w = _weight_tensor(gm, n.args[1])
        groups = n.args[6] if len(n.args) > 6 else n.kwargs.get("groups", 1)
        return int(w.shape[1]) * int(groups) if w is not None and isinstance(groups, int) else None
    return None


def _params_read(gm: fx.GraphModule, n: fx.Node) -> int:
    """Elements of the parameters a node reads (a module's own, or get_attr'd ones)."""
    if n.op == "call_module":
        return sum(p.numel() for p in gm.get_submodule(n.target).parameters())
    total = 0
    for a in n.all_input_nodes:
        t = _weight_tensor(gm, a)
        if isinstance(t, nn.Parameter):
            total += t.numel()
    return total


def _short(n: int) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def _module_path(n: fx.Node) -> Optional[str]:
    if n.op == "call_module":
        return str(n.target)
    stack = n.meta.get("nn_module_stack")
    if isinstance(stack, Mapping) and stack:
        last = list(stack.values())[-1]
        if isinstance(last, tuple) and last and isinstance(last[0], str):
            return last[0]
    if n.op == "call_function" and len(n.args) >= 2:
        attr = _weight_attr(n.args[1])
        if attr is not None:
            return attr.rpartition(".")[0]
    return None


def _describe(gm: fx.GraphModule, n: fx.Node) -> str:
    if n.op == "call_module":
        return type(gm.get_submodule(n.target)).__name__
    if n.op == "call_method":
        return f".{n.target}()"
    return getattr(n.target, "__name__", str(n.target))


def _boxes(gm, tasks, slim_model, collapse, max_boxes):
    outputs = task_output_nodes(gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    # owners: tasks whose output depends on the node
    owners: Dict[fx.Node, set] = {n: set() for n in gm.graph.nodes}
    for task, out in outputs.items():
        stack, seen = [out], set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            owners[n].add(task)
            stack.extend(n.all_input_nodes)
    plumbing: set = set()
    drawn: List[fx.Node] = []
    for n in gm.graph.nodes:
        if n.op in ("get_attr", "output") or _is_mask_mul(n) or is_channel_mask(n):
            continue
        if _is_shape_plumbing(n, plumbing):
            plumbing.add(n)
            continue
        drawn.append(n)
    drawn_set = set(drawn)

    memo: Dict[fx.Node, Tuple[fx.Node, ...]] = {}

    def sources(n: fx.Node) -> Tuple[fx.Node, ...]:
        """Drawn nodes feeding ``n`` (through undrawn pass-through nodes)."""
        out: List[fx.Node] = []
        for a in n.all_input_nodes:
            if a in drawn_set:
                out.append(a)
            elif a not in plumbing and a.op != "get_attr":
                if a not in memo:
                    memo[a] = sources(a)
                out.extend(memo[a])
        return tuple(dict.fromkeys(out))

    preds = {n: sources(n) for n in drawn}
    consumers: Dict[fx.Node, List[fx.Node]] = {n: [] for n in drawn}
    for n in drawn:
        for p in preds[n]:
            consumers[p].append(n)
    paths: Dict[fx.Node, Optional[str]] = {}
    for n in drawn:
        if n.op == "placeholder":
            paths[n] = None
            continue
        p = _module_path(n)
        inherited = next((paths[a] for a in preds[n] if paths.get(a)), None)
        # a functional op traced inside a flat sub-GraphModule (torchvision's feature
        # extractor) is only attributed to that module: its input's deeper path is better
        if inherited is not None and (p is None or (n.op != "call_module" and inherited.startswith(p + "."))):
            p = inherited
        paths[n] = p or ""

    slim_nodes = {n.name: n for n in slim_model.graph.nodes} if slim_model is not None else None
    width_before = {n: _out_width(gm, n) for n in drawn}
    width_after = {}
    for n in drawn:
        if slim_nodes is None or width_before[n] is None:
            width_after[n] = None
        else:
            s = slim_nodes.get(n.name)
            width_after[n] = _out_width(slim_model, s) if s is not None else 0

    params_before = {n: _params_read(gm, n) for n in drawn}
    params_after = {}
    for n in drawn:
        s = slim_nodes.get(n.name) if slim_nodes is not None else None
        params_after[n] = _params_read(slim_model, s) if s is not None else (0 if slim_nodes is not None else None)

    def key(n: fx.Node, depth: Optional[int]) -> Tuple[str, FrozenSet[Hashable]]:
        if n.op == "placeholder":
            return f"input:{n.name}", frozenset(owners[n])
        if depth is None:
            return n.name, frozenset(owners[n])
        prefix = ".".join(paths[n].split(".")[:depth]) if paths[n] else "<root>"
        return prefix, frozenset(owners[n])

    def count(depth):
        return len({key(n, depth) for n in drawn}) + len(outputs)

    depth: Optional[int]
    if collapse == "auto":
        depth = None
        if count(None) > max_boxes:
            deepest = max((len(p.split(".")) for p in paths.values() if p), default=1)
            depth = 1
            for d in range(deepest, 0, -1):
                if count(d) <= max_boxes:
                    depth = d
                    break
    else:
        depth = collapse
    groups: Dict[Tuple[str, FrozenSet[Hashable]], List[fx.Node]] = {}
    for n in drawn:
        groups.setdefault(key(n, depth), []).append(n)
    prefixes: Dict[str, int] = {}
    for prefix, _ in groups:
        prefixes[prefix] = prefixes.get(prefix, 0) + 1
    all_tasks = frozenset(tasks)

    def owner_tag(o: FrozenSet[Hashable]) -> str:
        if not o:
            return "unused"
        return ",".join(str(t) for t in tasks if t in o)

    box_of: Dict[fx.Node, str] = {}
    specs = []
    for (prefix, o), members in groups.items():
        name = prefix if prefixes[prefix] == 1 else f"{prefix} [{owner_tag(o)}]"
        for m in members:
            box_of[m] = name
        weighted = [m for m in members if width_before[m] is not None]
        wb = width_before[weighted[-1]] if weighted else None
        wa = width_after[weighted[-1]] if weighted else None
        if members[0].op == "placeholder":
            kind, text = "input", f"input {members[0].name}"
        elif depth is None:
            m = members[0]
            weight = _weight_attr(m.args[1]) if m.op == "call_function" and len(m.args) >= 2 else None
            where = f" ({weight.rpartition('.')[0]})" if weight and "." in weight else ""
            kind, text = "op", f"{m.name}{where}\n{_describe(gm, m)}"
        else:
            kind = "op"
            text = prefix + (f"\n{_describe(gm, members[0])}" if len(members) == 1 else f"\n{len(members)} ops")
        if o and len(o) > 1 and o != all_tasks:
            text += f"\nshared by {owner_tag(o)}"
        if wb is not None:
            text += f"\nwidth {wb}" if wa is None or wa == wb else f"\nwidth {wb} -> {wa}"
        pb = sum(params_before[m] for m in members)
        pa = None if slim_nodes is None else sum(params_after[m] or 0 for m in members)
        if pb:
            text += f"\nparams {_short(pb)}" if pa is None or pa == pb else f"\nparams {_short(pb)} -> {_short(pa)}"
        specs.append(dict(name=name, label=text, kind=kind, owners=o, members=tuple(m.name for m in members),
                          width_before=wb, width_after=wa, params_before=pb, params_after=pa,
                          first=min(order[m] for m in members)))
    edges = []
    for n in drawn:
        for p in preds[n]:
            if box_of[p] != box_of[n]:
                edges.append((box_of[p], box_of[n]))
    for task, out in outputs.items():
        name = f"task:{task}"
        specs.append(dict(name=name, label=f"task {task}", kind="task", owners=frozenset([task]), members=(),
                          width_before=None, width_after=None, params_before=0, params_after=None,
                          first=len(order)))
        feeding = (out,) if out in drawn_set else sources(out)
        edges += [(box_of[f], name) for f in feeding]
    edges = list(dict.fromkeys(edges))
    layers = _layers([s["name"] for s in specs], edges, {s["name"]: s["first"] for s in specs})
    last = 1 + max((layers[s["name"]] for s in specs if s["kind"] != "task"), default=0)
    layers.update({s["name"]: last for s in specs if s["kind"] == "task"})  # task outputs in the last column
    nodes = [DrawnNode(name=s["name"], label=s["label"], kind=s["kind"], owners=frozenset(s["owners"]),
                       members=s["members"], width_before=s["width_before"], width_after=s["width_after"],
                       params_before=s["params_before"], params_after=s["params_after"],
                       layer=layers[s["name"]]) for s in specs]
    return nodes, edges, depth


def _layers(names: Sequence[str], edges: Sequence[Tuple[str, str]], first: Mapping[str, int]) -> Dict[str, int]:
    """Topological generation of each box (back edges made by collapsing are ignored)."""
    g = nx.DiGraph()
    g.add_nodes_from(names)
    g.add_edges_from(edges)
    if not nx.is_directed_acyclic_graph(g):
        g.remove_edges_from([(a, b) for a, b in edges if first[a] >= first[b]])
    layer = {}
    for i, generation in enumerate(nx.topological_generations(g)):
        for n in generation:
            layer[n] = i
    return layer


# ----------------------------------------------------------------------------- rendering
def _colors(tasks: Sequence[Hashable]) -> Dict[Hashable, str]:
    return {t: _TASK_COLORS[i % len(_TASK_COLORS)] for i, t in enumerate(tasks)}


def _render(nodes: Sequence[DrawnNode], edges, tasks, paths: Sequence[pathlib.Path], title: str) -> None:
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyArrowPatch, Patch

    colors = _colors(tasks)
    by_layer: Dict[int, List[DrawnNode]] = {}
    for n in nodes:
        by_layer.setdefault(n.layer, []).append(n)
    n_layers = max(by_layer) + 1 if by_layer else 1
    # long chains (a ResNet trunk) wrap into bands of columns, read like lines of text
    per_band = n_layers if n_layers <= _MAX_COLUMNS else -(-n_layers // -(-n_layers // _MAX_COLUMNS))
    pos = {}
    top = 0.0
    for band in range(-(-n_layers // per_band)):
        columns = [by_layer.get(layer, []) for layer in range(band * per_band, (band + 1) * per_band)]
        tallest = max((len(c) for c in columns), default=1)
        for j, members in enumerate(columns):
            for i, n in enumerate(members):
                pos[n.name] = (j * 2.0, top - (i + (tallest - len(members)) / 2) * 1.3)
        top -= tallest * 1.3 + 0.9
    fig = Figure(figsize=(max(6.0, 1.9 * per_band), max(3.5, -top * 0.8 + 1.2)))
    ax = fig.add_subplot()
    ax.set_axis_off()
    for a, b in edges:
        ax.add_patch(FancyArrowPatch(pos[a], pos[b], arrowstyle="-|>", mutation_scale=8, color="#777777", lw=0.8,
                                     shrinkA=22, shrinkB=22, connectionstyle="arc3,rad=0.08"))
    for n in nodes:
        if n.kind == "input" or not n.owners:
            face, text_color = "white", "black"
        elif len(n.owners) == 1:
            face, text_color = colors[next(iter(n.owners))], "white"
        else:
            face, text_color = SHARED_COLOR, "black"
        x, y = pos[n.name]
        ax.text(x, y, n.label, ha="center", va="center", fontsize=6.5, color=text_color, zorder=3,
                bbox=dict(boxstyle="round,pad=0.35", fc=face, ec="#333333", lw=0.6 if n.kind == "op" else 1.4))
    xs = [p[0] for p in pos.values()] or [0.0]
    ys = [p[1] for p in pos.values()] or [0.0]
    ax.set_xlim(min(xs) - 1.2, max(xs) + 1.2)
    ax.set_ylim(min(ys) - 1.0, max(ys) + 1.0)
    handles = [Patch(fc=SHARED_COLOR, ec="#333333", label="shared")]
    handles += [Patch(fc=colors[t], ec="#333333", label=f"task {t}") for t in tasks]
    handles.append(Patch(fc="white", ec="#333333", label="input / unused"))
    ax.legend(handles=handles, loc="upper left", fontsize=7, frameon=False, ncol=min(len(handles), 6),
              bbox_to_anchor=(0.0, 1.0))
    ax.set_title(title, fontsize=9, loc="left", pad=18)
    fig.tight_layout()
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=100)
