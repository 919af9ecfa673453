"""draw: a picture of a (compressed) multitask graph, nodes coloured by owner.

Every compute node of the graph (module calls, functions, methods) is a box; graph
inputs are white boxes and each task output is a box of its task's colour. A box's
owners are the tasks whose output depends on it: one task gives that task's colour,
several give the "shared" colour (with the owning tasks named when they are not all of
them). Mask plumbing (``w * mask`` multiplies, channel-mask nodes, ``get_attr`` reads)
and shape plumbing (``x.shape``, ``x.size()`` and indexing into them) are not drawn:
edges pass through them. Conv / linear boxes show their output width (channels or
features), before -> after slimming.

Layout: data flows top to bottom in layers (every edge goes down, see
:mod:`disparse_fx.layout`). Boxes with the same owners form a band: the shared trunk,
each task's head (framed in the task's colour), boxes shared by some tasks only. Heads
stand side by side under the trunk; a band's frame holds only its own boxes. With
graphviz's ``dot`` on the PATH (``engine="auto"``) dot renders the same boxes, one
cluster per band; else matplotlib renders the pure-Python layout.

Large graphs (more than ``max_boxes`` boxes, e.g. a ResNet-50) are collapsed. Two
ways, tried from the most detailed picture down until the boxes fit:

* repeats (``repeats``): consecutive children ``P.i, P.i+1, ...`` of a module ``P``
  with the same structure (the same ops, wiring and owners) become one box ``P x3``
  (``P.1-2 x2`` when not all of ``P``'s children repeat);
* module-path depth (``collapse``): depth 3 turns ``trunk.layer2.1.conv2`` into the box
  ``trunk.layer2.1``, one bottleneck block; nodes with different owners never share a
  box, and a box that data would leave and re-enter (a ReLU module called twice in a
  block) is split (``name #2``).

Functional nodes take the module path of their ``nn_module_stack`` (recorded by the
tracer; a functional op inside a flat sub-GraphModule, torchvision's feature extractor,
takes the module around its latest input's), else of the weight they read, else their
latest input's. A collapsed box shows the output width of its last conv / linear.

>>> import os, tempfile, torch.nn as nn
>>> from disparse_fx.passes.trace import trace_model
>>> class Net(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.trunk, self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 2, 1), nn.Linear(8, 3)
...     def forward(self, x):
...         h = self.trunk(x).relu()
...         return {"a": self.a(h), "b": self.b(h.mean((2, 3)))}
>>> d = draw(trace_model(Net()), os.path.join(tempfile.mkdtemp(), "net.svg"), engine="matplotlib")
>>> [(n.name, sorted(n.owners), n.width_before, n.layer) for n in d.nodes]  # doctest: +NORMALIZE_WHITESPACE
[('input:x', ['a', 'b'], None, 0), ('trunk', ['a', 'b'], 8, 1), ('relu', ['a', 'b'], None, 2),
 ('a', ['a'], 2, 3), ('mean', ['b'], None, 3), ('b', ['b'], 3, 4), ('task:a', ['a'], None, 5),
 ('task:b', ['b'], None, 5)]
>>> d.edges[:3], d.crossings
((('input:x', 'trunk'), ('trunk', 'relu'), ('relu', 'a')), 0)
"""
from __future__ import annotations

import dataclasses
import logging
import operator
import pathlib
import shutil
import subprocess
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
from .layout import Layout, layered_layout

__all__ = ["draw", "Drawing", "DrawnNode", "SHARED_COLOR", "ENGINES"]

log = logging.getLogger(__name__)

SHARED_COLOR = "#c9c9c9"
#: ``engine`` values of :func:`draw`: "auto" is dot when it is on the PATH, else matplotlib.
ENGINES = ("auto", "dot", "matplotlib")
_TASK_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
                "#17becf", "#7f7f7f")
_SUFFIXES = (".svg", ".png", ".dot")
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV_FUNCS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}
_CONVT_FUNCS = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}

# matplotlib rendering, in inches and points
_FONT_PT = 7.0
_CHAR_IN = 0.62 * _FONT_PT / 72  # a DejaVu Sans character, on average
_LINE_IN = 1.3 * _FONT_PT / 72
_BOX_PAD_IN = 0.07
_ROW_GAP_IN = 0.5  # between rows: room for the edges' bends and a frame's title
_FRAME_PAD_IN = 0.08
_FRAME_TITLE_IN = 0.2
_MAX_PIXELS = 40e6


@dataclass(frozen=True)
class DrawnNode:
    """One box. ``name``: its id (a node name, a module-path prefix, ``input:x``,
    ``task:seg`` or a repeat ``trunk.layer1 x3``); ``kind``: "input", "op" or "task";
    ``members``: the fx nodes it stands for; ``width_before`` / ``width_after``: output
    width of its last conv / linear (None when it has none; ``width_after`` None also
    when nothing tells it: an element plan drawn without ``slim_model``);
    ``params_before`` / ``params_after``: elements of the parameters its members read
    (after: in the slim model, or by the channel plan; None when neither is known);
    ``layer``: its row, 0 = top; ``x`` / ``width``: its centre and width in the
    pure-Python layout (inches); ``repeat``: how many structurally identical blocks it stands for (1: none)."""

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
    x: float = 0.0
    width: float = 0.0
    repeat: int = 1


@dataclass(frozen=True)
class Drawing:
    """What :func:`draw` drew: its boxes and edges (box names), the files written, the
    module-path depth the boxes were collapsed to (None: no depth collapse), whether
    repeated blocks were merged, the engine that rendered the SVG / PNG files ("dot" or
    "matplotlib") and the edge crossings of the pure-Python layer layout (counted
    between adjacent layers, long edges followed through every layer they pass)."""

    nodes: Tuple[DrawnNode, ...]
    edges: Tuple[Tuple[str, str], ...]
    paths: Tuple[pathlib.Path, ...]
    depth: Optional[int]
    repeats: bool = False
    engine: str = "matplotlib"
    crossings: int = 0


def draw(result_or_graph: Any, path: Union[str, pathlib.Path, Sequence[Union[str, pathlib.Path]]], *,
         collapse: Union[str, int, None] = "auto", repeats: Union[str, bool] = "auto",
         slim_model: Optional[fx.GraphModule] = None, max_boxes: int = 60, title: Optional[str] = None,
         engine: str = "auto") -> Drawing:
    """Draw a CompressionResult (its masked model) or an fx.GraphModule to ``path``.

    Widths and parameters after slimming come from ``slim_model`` (the caller slims:
    ``dfx.slim(result)``), else, for a channel-granularity result, from the plan's kept
    channels; an element result drawn without ``slim_model`` shows widths before only.

    ``path``: ``*.svg``, ``*.png`` or ``*.dot`` (graphviz source); a path without suffix
    writes SVG and PNG; a list writes each. ``collapse``: "auto" (collapse only when there
    are more than ``max_boxes`` boxes), None (no depth collapse) or an int (module-path
    depth). ``repeats``: "auto" (merge repeated blocks when that is what makes the boxes
    fit ``max_boxes``), True or False. ``engine``: one of :data:`ENGINES`.

    Raises DisparseValueError for a bad argument, or ``engine="dot"`` without dot.
    """
    from .result import CompressionResult

    plan = None
    if isinstance(result_or_graph, CompressionResult):
        gm, plan = result_or_graph.model, result_or_graph.plan
        tasks = tuple(plan.tasks)
    elif isinstance(result_or_graph, fx.GraphModule):
        gm = result_or_graph
        tasks = tuple(task_output_nodes(gm))
    else:
        raise DisparseValueError(f"draw expects a CompressionResult or an fx.GraphModule, got "
                                 f"{type(result_or_graph).__name__}")
    if not (collapse is None or collapse == "auto" or (isinstance(collapse, int) and collapse >= 1)):
        raise DisparseValueError(f"collapse must be 'auto', None or an int >= 1, got {collapse!r}")
    if not (repeats == "auto" or isinstance(repeats, bool)):
        raise DisparseValueError(f"repeats must be 'auto', True or False, got {repeats!r}")
    if engine not in ENGINES:
        raise DisparseValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    dot = shutil.which("dot") if engine in ("auto", "dot") else None
    if engine == "dot" and dot is None:
        raise DisparseValueError("engine='dot' needs graphviz's dot on the PATH (e.g. apt-get install graphviz); "
                                 "engine='auto' falls back to matplotlib")
    paths = _paths(path)
    nodes, edges, depth, merged = _boxes(gm, tasks, plan, slim_model, collapse, repeats, max_boxes)
    title = title or f"{type(gm).__name__}: nodes coloured by owner"
    layout = _layout(nodes, edges, tasks)
    nodes = [dataclasses.replace(n, layer=layout.layer[n.name], x=round(layout.x[n.name], 3),
                                 width=round(_box_size(n.label)[0], 3)) for n in nodes]
    source = _dot_source(nodes, edges, tasks, title)
    for p in paths:
        if p.suffix.lower() == ".dot":
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(source, encoding="utf-8")
    images = [p for p in paths if p.suffix.lower() != ".dot"]
    used = "dot" if dot is not None else "matplotlib"
    if images and dot is not None and not _render_dot(dot, source, images):
        used = "matplotlib"
    if images and used == "matplotlib":
        _render(nodes, edges, tasks, layout, images, title)
    log.info("drew %d boxes, %d edges (%d crossings in the layer layout) with %s to %s", len(nodes), len(edges),
             layout.crossings, used, ", ".join(map(str, paths)))
    return Drawing(nodes=tuple(nodes), edges=tuple(edges), paths=tuple(paths), depth=depth, repeats=merged,
                   engine=used, crossings=layout.crossings)


# ----------------------------------------------------------------------------- analysis
def _paths(path) -> List[pathlib.Path]:
    raw = [path] if isinstance(path, (str, pathlib.Path)) else list(path)
    out: List[pathlib.Path] = []
    for p in map(pathlib.Path, raw):
        if p.suffix == "":
            out += [p.with_suffix(".svg"), p.with_suffix(".png")]
        elif p.suffix.lower() in _SUFFIXES:
            out.append(p)
        else:
            raise DisparseValueError(f"draw writes .svg, .png or .dot files (SVG and PNG for a path without "
                                     f"suffix), got '{p}'")
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


def _out_weight(gm: fx.GraphModule, n: fx.Node) -> Optional[Tuple[str, torch.Tensor, int, int]]:
    """``(weight name, weight, output dim, groups)`` of a conv, transposed conv or linear
    node: its output width is ``weight.shape[dim] * groups``."""
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        w = getattr(m, "weight", None)
        if isinstance(m, _CONV + (nn.Linear,)) and isinstance(w, torch.Tensor):
            return f"{n.target}.weight", w, 0, 1
        if isinstance(m, _CONVT) and isinstance(w, torch.Tensor):
            return f"{n.target}.weight", w, 1, m.groups
        return None
    if n.op != "call_function" or len(n.args) < 2:
        return None
    w, name = _weight_tensor(gm, n.args[1]), _weight_attr(n.args[1])
    if w is None or name is None:
        return None
    if n.target in _CONV_FUNCS or n.target is F.linear:
        return name, w, 0, 1
    if n.target in _CONVT_FUNCS:
        groups = n.args[6] if len(n.args) > 6 else n.kwargs.get("groups", 1)
        return (name, w, 1, groups) if isinstance(groups, int) else None
    return None


def _out_width(gm: fx.GraphModule, n: fx.Node) -> Optional[int]:
    """Output channels / features of a conv, transposed conv or linear node."""
    found = _out_weight(gm, n)
    return None if found is None else int(found[1].shape[found[2]]) * found[3]


def _params_read(gm: fx.GraphModule, n: fx.Node) -> List[Tuple[str, int]]:
    """``(name, elements)`` of the parameters a node reads (a module's own, or get_attr'd ones)."""
    if n.op == "call_module":
        return [(f"{n.target}.{k}", p.numel()) for k, p in gm.get_submodule(n.target).named_parameters()]
    out = []
    for a in n.all_input_nodes:
        t = _weight_tensor(gm, a)
        if isinstance(t, nn.Parameter):
            out.append((_weight_attr(a), t.numel()))
    return out


def _short(n: int) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def _stack_entries(n: fx.Node) -> List[Tuple[str, Any]]:
    """``(module path, module type)`` of the tracer's ``nn_module_stack``, outermost first."""
    stack = n.meta.get("nn_module_stack")
    if not isinstance(stack, Mapping):
        return []
    return [v for v in stack.values() if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str)]


def _module_path(n: fx.Node) -> Optional[str]:
    if n.op == "call_module":
        return str(n.target)
    entries = _stack_entries(n)
    if entries:
        return entries[-1][0]
    if n.op == "call_function" and len(n.args) >= 2:
        attr = _weight_attr(n.args[1])
        if attr is not None:
            return attr.rpartition(".")[0]
    return None


def _in_flat_graph_module(n: fx.Node) -> bool:
    """Whether the innermost module of a functional node is a sub-GraphModule, whose
    own functional ops the tracer cannot place deeper (torchvision's feature extractor)."""
    entries = _stack_entries(n)
    return bool(entries) and isinstance(entries[-1][1], type) and issubclass(entries[-1][1], fx.GraphModule)


def _describe(gm: fx.GraphModule, n: fx.Node) -> str:
    if n.op == "call_module":
        return type(gm.get_submodule(n.target)).__name__
    if n.op == "call_method":
        return f".{n.target}()"
    return getattr(n.target, "__name__", str(n.target))


@dataclass(frozen=True)
class _View:
    """The drawn nodes of a graph (topological order), the drawn nodes feeding each,
    owners, module paths (``guessed``: the nodes without one, which took their input's),
    each task's output node and the drawn nodes feeding it."""

    drawn: Tuple[fx.Node, ...]
    preds: Mapping[fx.Node, Tuple[fx.Node, ...]]
    owners: Mapping[fx.Node, FrozenSet[Hashable]]
    paths: Mapping[fx.Node, str]
    guessed: FrozenSet[fx.Node]
    outputs: Mapping[Hashable, fx.Node]
    feeding: Mapping[Hashable, Tuple[fx.Node, ...]]


def _view(gm: fx.GraphModule) -> _View:
    outputs = task_output_nodes(gm)
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
    position = {n: i for i, n in enumerate(drawn)}
    paths: Dict[fx.Node, str] = {}
    guessed: set = set()
    for n in drawn:
        if n.op == "placeholder":
            paths[n] = ""
            continue
        p = _module_path(n)
        # the latest input is the module context the op runs in (a residual add after bn3, a
        # DenseNet concat after the previous layer)
        source = max((a for a in preds[n] if paths.get(a)), key=position.__getitem__, default=None)
        if source is not None and n.op != "call_module":
            inherited = paths[source]
            if p is None:
                p = inherited
                guessed.add(n)
            elif _in_flat_graph_module(n) and inherited.startswith(p + "."):
                # the op belongs to the module around its input's module (a block's residual add)
                p = inherited.rpartition(".")[0] if source.op == "call_module" else inherited
        paths[n] = p or ""
    feeding = {t: (out,) if out in drawn_set else sources(out) for t, out in outputs.items()}
    return _View(drawn=tuple(drawn), preds=preds, owners={n: frozenset(o) for n, o in owners.items()},
                 paths=paths, guessed=frozenset(guessed), outputs=outputs, feeding=feeding)


@dataclass(frozen=True)
class _Run:
    """Consecutive children ``container.first`` .. ``container.last`` of one structure."""

    name: str
    container: str
    count: int
    nodes: Tuple[fx.Node, ...]
    block_type: Optional[str]
    ops_per_block: int


def _repeat_runs(gm: fx.GraphModule, view: _View) -> List[_Run]:
    """Runs of at least two structurally identical consecutive numbered children of a
    module (outer modules first; a node joins one run at most; a node whose module path
    is a guess, taken from its input, belongs to no block)."""
    blocks: Dict[str, Dict[int, List[fx.Node]]] = {}
    first: Dict[str, int] = {}
    for i, n in enumerate(view.drawn):
        parts = view.paths[n].split(".") if view.paths[n] and n not in view.guessed else []
        for k in range(1, len(parts)):
            if parts[k].isdigit():
                container = ".".join(parts[:k])
                blocks.setdefault(container, {}).setdefault(int(parts[k]), []).append(n)
                first.setdefault(container, i)

    def signature(block: str, nodes: List[fx.Node]):
        index = {n: i for i, n in enumerate(nodes)}
        ops = tuple((n.op, _describe(gm, n), view.paths[n][len(block):], view.owners[n]) for n in nodes)
        wiring = tuple((index[p], i) for i, n in enumerate(nodes) for p in view.preds[n] if p in index)
        return ops, wiring

    runs: List[_Run] = []
    taken: set = set()
    for container in sorted(blocks, key=lambda c: (c.count("."), first[c])):
        children = blocks[container]
        idx = sorted(children)
        sigs = {i: signature(f"{container}.{i}", children[i]) for i in idx}
        start = 0
        while start < len(idx):
            end = start
            while end + 1 < len(idx) and idx[end + 1] == idx[end] + 1 and sigs[idx[end + 1]] == sigs[idx[start]]:
                end += 1
            chosen = idx[start:end + 1]
            nodes = tuple(n for i in chosen for n in children[i])
            if len(chosen) > 1 and not taken.intersection(nodes):
                taken.update(nodes)
                whole = len(chosen) == len(idx)
                block = f"{container}.{chosen[0]}"
                kind = next((t.__name__ for p, t in _stack_entries(children[chosen[0]][0])
                             if p == block and isinstance(t, type)), None)
                where = container if whole else f"{container}.{chosen[0]}-{chosen[-1]}"
                name = f"{where} x{len(chosen)}"
                runs.append(_Run(name=name, container=container, count=len(chosen), nodes=nodes, block_type=kind,
                                 ops_per_block=len(children[chosen[0]])))
            start = end + 1
    return runs


def _owner_tag(owners: FrozenSet[Hashable], tasks: Sequence[Hashable]) -> str:
    if not owners:
        return "unused"
    return ",".join(str(t) for t in tasks if t in owners)


def _group(view: _View, tasks: Sequence[Hashable], runs: Sequence[_Run], depth: Optional[int],
           merge: bool) -> Tuple[Dict[str, List[fx.Node]], Dict[str, _Run]]:
    """Box name -> members (graph order), and the repeat run each merged box stands for."""
    run_of: Dict[fx.Node, _Run] = {}
    if merge:
        for run in runs:
            if depth is None or depth > run.container.count(".") + 1:
                run_of.update((n, run) for n in run.nodes)

    def key(n: fx.Node) -> str:
        if n.op == "placeholder":
            return f"input:{n.name}"
        if n in run_of:
            return run_of[n].name
        if depth is None:
            return n.name
        return ".".join(view.paths[n].split(".")[:depth]) if view.paths[n] else "<root>"

    keyed: Dict[Tuple[str, FrozenSet[Hashable]], List[fx.Node]] = {}
    for n in view.drawn:
        keyed.setdefault((key(n), view.owners[n]), []).append(n)
    uses: Dict[str, int] = {}
    for prefix, _ in keyed:
        uses[prefix] = uses.get(prefix, 0) + 1
    groups = {(prefix if uses[prefix] == 1 else f"{prefix} [{_owner_tag(o, tasks)}]"): members
              for (prefix, o), members in keyed.items()}
    groups = _split_reentered(view, groups)
    while True:  # two interleaved boxes can still make a cycle: draw their nodes one by one
        box_of = {m: name for name, members in groups.items() for m in members}
        quotient = nx.DiGraph()
        quotient.add_nodes_from(groups)
        quotient.add_edges_from((box_of[p], box_of[n]) for n in view.drawn for p in view.preds[n]
                                if box_of[p] != box_of[n])
        try:
            cycle = nx.find_cycle(quotient)
        except nx.NetworkXNoCycle:
            break
        for name in {u for u, _ in cycle}:
            if len(groups[name]) > 1:
                members = groups.pop(name)
                groups.update((m.name, [m]) for m in members)
    runs_by_box = {}
    for name, members in groups.items():
        run = run_of.get(members[0])
        if run is not None and all(run_of.get(m) is run for m in members):
            runs_by_box[name] = run
    return groups, runs_by_box


def _split_reentered(view: _View, groups: Dict[str, List[fx.Node]]) -> Dict[str, List[fx.Node]]:
    """Split every box that data leaves and re-enters into pieces ``name``, ``name #2``...:
    a member goes to the piece after the last one that reaches it through outside nodes."""
    position = {n: i for i, n in enumerate(view.drawn)}
    out: Dict[str, List[fx.Node]] = {}
    for name, members in groups.items():
        if len(members) == 1:
            out[name] = members
            continue
        inside = set(members)
        piece: Dict[fx.Node, int] = {}
        reach: Dict[fx.Node, int] = {}  # outside node -> latest piece reaching it
        for n in view.drawn[position[members[0]]:position[members[-1]] + 1]:
            from_inside = [piece[p] for p in view.preds[n] if p in piece]
            from_outside = [reach[p] for p in view.preds[n] if p in reach]
            if n in inside:
                piece[n] = max(from_inside + [r + 1 for r in from_outside] + [0])
            elif from_inside or from_outside:
                reach[n] = max(from_inside + from_outside)
        for k in sorted(set(piece.values())):
            out[name if k == 0 else f"{name} #{k + 1}"] = [m for m in members if piece[m] == k]
    return out


def _choose(view: _View, tasks, runs, collapse, repeats, max_boxes):
    """(depth, merged, groups, runs by box): the most detailed grouping that fits."""
    merges = [False, True] if repeats == "auto" else [bool(repeats)]
    if collapse == "auto":
        deepest = max((len(p.split(".")) for p in view.paths.values() if p), default=1)
        depths: List[Optional[int]] = [None, *range(deepest, 0, -1)]
    else:
        depths = [collapse]
    tried = None
    for depth in depths:
        for merge in merges:
            groups, runs_by_box = _group(view, tasks, runs if merge else (), depth, merge)
            tried = depth, merge and bool(runs_by_box), groups, runs_by_box
            if len(groups) + len(view.outputs) <= max_boxes:
                return tried
    return tried


def _sizes_after(gm, view, plan, slim_model):
    """{node: (width after, params after)} from the slim model, else a channel plan, else None."""
    if slim_model is not None:
        slim_nodes = {n.name: n for n in slim_model.graph.nodes}
        out = {}
        for n in view.drawn:
            s = slim_nodes.get(n.name)
            width = _out_width(slim_model, s) if s is not None else 0
            out[n] = (width, sum(k for _, k in _params_read(slim_model, s)) if s is not None else 0)
        return out
    channels = getattr(plan, "channels", None)
    if channels is None:
        return None
    flat = channels.groups.keep_vector(channels.keep)
    numel_after = channels.groups.params_after(channels.keep)
    out = {}
    for n in view.drawn:
        width = None
        found = _out_weight(gm, n)
        if found is not None:
            weight_name, weight, dim, groups = found
            ids = channels.groups.slice_channels(weight_name).get(dim)
            width = (int(flat[ids].sum()) if ids is not None else int(weight.shape[dim])) * groups
        out[n] = (width, sum(numel_after.get(param, k) for param, k in _params_read(gm, n)))
    return out


def _boxes(gm, tasks, plan, slim_model, collapse, repeats, max_boxes):
    view = _view(gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    runs = _repeat_runs(gm, view) if repeats is not False else []
    depth, merged, groups, runs_by_box = _choose(view, tasks, runs, collapse, repeats, max_boxes)
    after = _sizes_after(gm, view, plan, slim_model)
    all_tasks = frozenset(tasks)
    box_of: Dict[fx.Node, str] = {}
    nodes: List[DrawnNode] = []
    for name, members in sorted(groups.items(), key=lambda item: order[item[1][0]]):
        for m in members:
            box_of[m] = name
        owners = view.owners[members[0]]
        run = runs_by_box.get(name)
        if members[0].op == "placeholder":
            kind, text = "input", f"input {members[0].name}"
        elif run is not None:
            kind = "op"
            text = f"{name}\n{run.count} x {run.block_type or 'block'}, {run.ops_per_block} ops each"
        elif len(members) == 1 and (depth is None or name == members[0].name):
            m = members[0]
            weight = _weight_attr(m.args[1]) if m.op == "call_function" and len(m.args) >= 2 else None
            where = f" ({weight.rpartition('.')[0]})" if weight and "." in weight else ""
            kind, text = "op", f"{m.name}{where}\n{_describe(gm, m)}"
        else:
            kind = "op"
            text = name + (f"\n{_describe(gm, members[0])}" if len(members) == 1 else f"\n{len(members)} ops")
        if owners and len(owners) > 1 and owners != all_tasks:
            text += f"\nshared by {_owner_tag(owners, tasks)}"
        weighted = [m for m in members if _out_width(gm, m) is not None]
        wb = _out_width(gm, weighted[-1]) if weighted else None
        wa = after[weighted[-1]][0] if weighted and after is not None else None
        if wb is not None:
            text += f"\nwidth {wb}" if wa is None or wa == wb else f"\nwidth {wb} -> {wa}"
        pb = sum(k for m in members for _, k in _params_read(gm, m))
        pa = None if after is None else sum(after[m][1] or 0 for m in members)
        if pb:
            text += f"\nparams {_short(pb)}" if pa is None or pa == pb else f"\nparams {_short(pb)} -> {_short(pa)}"
        nodes.append(DrawnNode(name=name, label=text, kind=kind, owners=owners, members=tuple(m.name for m in members),
                               width_before=wb, width_after=wa, params_before=pb, params_after=pa, layer=0,
                               repeat=run.count if run is not None else 1))
    edges = [(box_of[p], box_of[n]) for n in view.drawn for p in view.preds[n] if box_of[p] != box_of[n]]
    for task in view.outputs:
        name = f"task:{task}"
        nodes.append(DrawnNode(name=name, label=f"task {task}", kind="task", owners=frozenset([task]), members=(),
                               width_before=None, width_after=None, params_before=0, params_after=None, layer=0))
        edges += [(box_of[f], name) for f in view.feeding[task]]
    return nodes, list(dict.fromkeys(edges)), depth, merged


# ----------------------------------------------------------------------------- layout
def _band_order(bands, tasks: Sequence[Hashable]) -> List[FrozenSet[Hashable]]:
    """Owner sets left to right: by the mean position of their tasks (a set shared by
    some tasks sits between their heads), the larger set first; unused last."""
    position = {t: i for i, t in enumerate(tasks)}

    def key(owners):
        if not owners:
            return (len(tasks), 0, "")
        return (sum(position.get(t, 0) for t in owners) / len(owners), -len(owners), _owner_tag(owners, tasks))

    return sorted(set(bands), key=key)


def _box_size(label: str) -> Tuple[float, float]:
    lines = label.split("\n")
    return max(map(len, lines)) * _CHAR_IN + 2 * _BOX_PAD_IN, len(lines) * _LINE_IN + 2 * _BOX_PAD_IN


def _layout(nodes: Sequence[DrawnNode], edges, tasks) -> Layout:
    band_of = {n.name: n.owners for n in nodes}
    return layered_layout([n.name for n in nodes], edges, band_of=band_of,
                          band_order=_band_order(band_of.values(), tasks),
                          width={n.name: _box_size(n.label)[0] for n in nodes},
                          sinks=[n.name for n in nodes if n.kind == "task"], gap=0.25, band_gap=0.5)


def _frame_title(owners: FrozenSet[Hashable], tasks: Sequence[Hashable]) -> Optional[str]:
    """The title of a band's frame: None for unused boxes and single-task graphs."""
    if not owners or len(tasks) < 2:
        return None
    if len(owners) == 1:
        return f"head {next(iter(owners))}"
    return "shared trunk" if set(owners) >= set(tasks) else f"shared by {_owner_tag(owners, tasks)}"


# ----------------------------------------------------------------------------- rendering
def _colors(tasks: Sequence[Hashable]) -> Dict[Hashable, str]:
    return {t: _TASK_COLORS[i % len(_TASK_COLORS)] for i, t in enumerate(tasks)}


def _face(n: DrawnNode, colors: Mapping[Hashable, str]) -> Tuple[str, str]:
    """(fill, text) colours of a box."""
    if n.kind == "input" or not n.owners:
        return "white", "black"
    if len(n.owners) == 1:
        return colors[next(iter(n.owners))], "white"
    return SHARED_COLOR, "black"


def _tint(color: str, amount: float = 0.88) -> str:
    """``color`` mixed with white (``amount`` of white)."""
    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return "#" + "".join(f"{round(c + (255 - c) * amount):02x}" for c in (r, g, b))


def _frame_color(owners: FrozenSet[Hashable], colors: Mapping[Hashable, str]) -> str:
    return colors[next(iter(owners))] if len(owners) == 1 else "#888888"


def _render(nodes: Sequence[DrawnNode], edges, tasks, layout: Layout, paths: Sequence[pathlib.Path],
            title: str) -> None:
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch
    from matplotlib.path import Path

    colors = _colors(tasks)
    size = {n.name: (n.width, _box_size(n.label)[1]) for n in nodes}
    row_height = [0.12] * layout.num_layers
    for n in nodes:
        row_height[n.layer] = max(row_height[n.layer], size[n.name][1])
    centre, top = [], 0.0
    for h in row_height:
        centre.append(top - h / 2)
        top -= h + _ROW_GAP_IN
    pos = {n.name: (n.x, centre[n.layer]) for n in nodes}

    frames = _frames(nodes, layout, size, centre, row_height, tasks)
    # one data unit is one inch: the axes fill the figure, whose size is the drawing's
    x_low, y_low, y_high = -0.3, top + _ROW_GAP_IN - 0.25, 1.3  # above y = 0: the title and the legend
    fig_width = max(6.0, max((x + size[n][0] / 2 for n, (x, _) in pos.items()), default=1.0) + 0.3 - x_low)
    fig = Figure(figsize=(fig_width, y_high - y_low))
    ax = fig.add_axes((0, 0, 1, 1))  # patches go in with add_artist: the limits are set, not computed
    ax.set_axis_off()
    ax.set_xlim(x_low, x_low + fig_width)
    ax.set_ylim(y_low, y_high)
    for owners, (frame_title, x0, x1, y0, y1) in frames.items():
        color = _frame_color(owners, colors)
        ax.add_artist(FancyBboxPatch((x0, y1), x1 - x0, y0 - y1, boxstyle="round,pad=0,rounding_size=0.08",
                                    fc=_tint(color, 0.9 if len(owners) == 1 else 0.8), ec=color, lw=1.0,
                                    ls="-" if len(owners) == 1 else "--", zorder=0))
        ax.text(x0 + 0.06, y0 - 0.03, frame_title, ha="left", va="top", fontsize=_FONT_PT + 0.5,
                color=color if len(owners) == 1 else "#444444", fontweight="bold", zorder=1)
    for a, b in edges:
        points = _edge_points(a, b, layout, pos, size, centre, row_height, frames)
        ax.add_artist(FancyArrowPatch(path=_curve(points, Path), arrowstyle="-|>", mutation_scale=7,
                                     color="#666666", lw=0.7, zorder=2))
    for n in nodes:
        face, text_color = _face(n, colors)
        w, h = size[n.name]
        x, y = pos[n.name]
        ax.add_artist(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0,rounding_size=0.05",
                                    fc=face, ec="#333333", lw=0.6 if n.kind == "op" else 1.4, zorder=3))
        ax.text(x, y, n.label, ha="center", va="center", fontsize=_FONT_PT, color=text_color, zorder=4,
                linespacing=1.15)
    handles = [Patch(fc=SHARED_COLOR, ec="#333333", label="shared")]
    handles += [Patch(fc=colors[t], ec="#333333", label=f"task {t}") for t in tasks]
    handles.append(Patch(fc="white", ec="#333333", label="input / unused"))
    ax.legend(handles=handles, loc="upper left", fontsize=_FONT_PT, frameon=False, ncol=min(len(handles), 6),
              bbox_to_anchor=(0.0, 1.0 - 0.3 / fig.get_figheight()))
    ax.text(0.0, 1.15, title, fontsize=9, ha="left", va="bottom")
    # 100 dots per inch, fewer for a picture over 40 megapixels (a DenseNet drawn node by node)
    dpi = min(100.0, (_MAX_PIXELS / (fig.get_figwidth() * fig.get_figheight())) ** 0.5)
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=dpi)


def _frames(nodes, layout: Layout, size, centre, row_height, tasks) -> Dict[FrozenSet[Hashable], Tuple]:
    """``{owners: (title, x0, x1, top, bottom)}``: the frame around a band's boxes and the
    points its long edges pass (None-titled bands, unused boxes, get no frame)."""
    extent: Dict[FrozenSet[Hashable], List[float]] = {}

    def grow(owners, x0, x1, layer):
        e = extent.setdefault(owners, [x0, x1, layer, layer])
        e[0], e[1], e[2], e[3] = min(e[0], x0), max(e[1], x1), min(e[2], layer), max(e[3], layer)

    for n in nodes:
        grow(n.owners, n.x - size[n.name][0] / 2, n.x + size[n.name][0] / 2, n.layer)
    for edge, route in layout.routes.items():
        for (x, layer), band in zip(route[1:-1], layout.route_bands[edge][1:-1]):
            grow(band, x - 0.06, x + 0.06, layer)
    frames = {}
    for owners, (x0, x1, first, last) in extent.items():
        title = _frame_title(owners, tasks)
        if title is not None:
            frames[owners] = (title, x0 - _FRAME_PAD_IN, x1 + _FRAME_PAD_IN,
                              centre[first] + row_height[first] / 2 + _FRAME_TITLE_IN,
                              centre[last] - row_height[last] / 2 - _FRAME_PAD_IN)
    return frames


def _edge_points(a, b, layout: Layout, pos, size, centre, row_height, frames) -> List[Tuple[float, float]]:
    """The points an edge passes: out of the bottom of ``a``, straight down through every
    row it crosses, and where it goes from one band to another below, straight out of the
    bottom of the one's frame and straight into the top of the other's, then into ``b``."""
    stops = [(pos[a][0], pos[a][1] - size[a][1] / 2, pos[a][1] - size[a][1] / 2)]
    for x, layer in layout.routes[(a, b)][1:-1]:
        stops.append((x, centre[layer] + row_height[layer] / 2, centre[layer] - row_height[layer] / 2))
    stops.append((pos[b][0], pos[b][1] + size[b][1] / 2, pos[b][1] + size[b][1] / 2))
    bands = layout.route_bands[(a, b)]
    points: List[Tuple[float, float]] = []
    for i, (x, y_in, y_out) in enumerate(stops):
        if i and bands[i] != bands[i - 1]:
            left, entered = frames.get(bands[i - 1]), frames.get(bands[i])
            if left is not None and y_in < left[4] - 0.04 < points[-1][1]:
                points.append((points[-1][0], left[4] - 0.04))
            if entered is not None and y_in < entered[3] + 0.04 < points[-1][1]:
                points.append((x, entered[3] + 0.04))
        points.append((x, y_in))
        if y_out != y_in:
            points.append((x, y_out))
    return points


def _curve(points: Sequence[Tuple[float, float]], path_cls):
    """A path through ``points``: vertical runs straight, bends as S-curves with vertical tangents."""
    verts, codes = [points[0]], [path_cls.MOVETO]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if abs(x1 - x0) < 1e-6:
            verts.append((x1, y1))
            codes.append(path_cls.LINETO)
        else:
            mid = (y0 + y1) / 2
            verts += [(x0, mid), (x1, mid), (x1, y1)]
            codes += [path_cls.CURVE4] * 3
    return path_cls(verts, codes)


# ----------------------------------------------------------------------------- graphviz
def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _dot_source(nodes: Sequence[DrawnNode], edges, tasks, title: str) -> str:
    """graphviz source of the drawing: top to bottom, one cluster per band with a frame title."""
    colors = _colors(tasks)
    lines = ["digraph disparse_fx {",
             f"  graph [rankdir=TB, label={_dot_quote(title)}, labelloc=t, labeljust=l, fontname=Helvetica, "
             "fontsize=11, nodesep=0.25, ranksep=0.35];",
             '  node [shape=box, style="rounded,filled", fontname=Helvetica, fontsize=8, margin="0.08,0.04"];',
             '  edge [color="#666666", arrowsize=0.6];']
    by_band: Dict[FrozenSet[Hashable], List[DrawnNode]] = {}
    for n in nodes:
        by_band.setdefault(n.owners, []).append(n)
    for i, owners in enumerate(_band_order(by_band, tasks)):
        frame_title = _frame_title(owners, tasks)
        indent = "  "
        if frame_title is not None:
            color = _frame_color(owners, colors)
            style = "rounded,filled" if len(owners) == 1 else "rounded,dashed,filled"
            lines.append(f"  subgraph cluster_{i} {{")
            lines.append(f"    label={_dot_quote(frame_title)}; style={_dot_quote(style)}; color={_dot_quote(color)}; "
                         f"fillcolor={_dot_quote(_tint(color, 0.9 if len(owners) == 1 else 0.8))};")
            indent = "    "
        for n in by_band[owners]:
            face, text_color = _face(n, colors)
            lines.append(f"{indent}{_dot_quote(n.name)} [label={_dot_quote(n.label)}, fillcolor={_dot_quote(face)}, "
                         f"fontcolor={_dot_quote(text_color)}, penwidth={0.6 if n.kind == 'op' else 1.4}];")
        if frame_title is not None:
            lines.append("  }")
    lines += [f"  {_dot_quote(a)} -> {_dot_quote(b)};" for a, b in edges]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _render_dot(dot: str, source: str, paths: Sequence[pathlib.Path]) -> bool:
    """Render ``source`` with dot to each path (format from the suffix); False when dot fails."""
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run([dot, f"-T{p.suffix[1:].lower()}", "-o", str(p)], input=source, text=True,
                                  capture_output=True, timeout=300, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("draw: dot failed (%s); drawing with matplotlib instead", exc)
            return False
        if done.returncode != 0:
            log.warning("draw: dot exited with %d (%s); drawing with matplotlib instead", done.returncode,
                        done.stderr.strip()[:500])
            return False
    return True
