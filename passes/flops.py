"""FLOPs of a traced model, per node and per task, from shapes propagated on an example.

Counted: multiply-accumulates x 2 of convolutions (module and functional, transposed
too), linear layers, matmuls and einsums, and attention: ``nn.MultiheadAttention`` (and
:class:`passes.attention.MultiheadAttention`: projections, q k^T, attention x v),
``scaled_dot_product_attention`` and Swin's window attention - the ops that dominate
CNN and transformer cost - and recurrent layers (``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``:
the gate matrices of every layer, direction and time step, and an LSTM's projections).
Elementwise ops, norms and pooling are not counted (say so wherever FLOPs are shown).
Per-sample numbers: totals divided by the example's batch size.

``effective`` FLOPs scale each op by the density of its weight when the weight is
``w * mask`` in the graph (a masked model): what a sparse kernel would execute.
A task's FLOPs are those of the nodes its output depends on.

>>> import torch, torch.nn as nn
>>> from disparse_fx.passes.trace import trace_model
>>> class Net(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.conv, self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 2), nn.Linear(8, 5)
...     def forward(self, x):
...         h = self.conv(x).mean((2, 3))
...         return {"a": self.a(h), "b": self.b(h)}
>>> f = count_flops(trace_model(Net()), (torch.randn(2, 3, 4, 4),))
>>> f.total, f.per_task["a"], f.per_task["b"]  # conv 2*8*16*27=6912, a 2*2*8=32, b 2*5*8=80
(7024, 6944, 6992)
"""
from __future__ import annotations

import contextvars
import copy
import math
import operator
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, Mapping, Optional, Sequence, Tuple

import networkx as nx
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from .ownership import graph_to_networkx
from .trace import task_output_nodes

__all__ = ["FlopCount", "FlopTerm", "count_flops", "flop_terms", "shape_propagated"]

_CONV_FUNCS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}
_CONVT_FUNCS = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
_MATMUL_FUNCS = {torch.matmul, torch.mm, torch.bmm, operator.matmul}
# the same ops in a graph captured by torch.export (passes.capture): ATen overloads
_aten = torch.ops.aten
for _n in (1, 2, 3):
    for _funcs, _packet in ((_CONV_FUNCS, getattr(_aten, f"conv{_n}d")),
                            (_CONVT_FUNCS, getattr(_aten, f"conv_transpose{_n}d"))):
        _funcs.update(getattr(_packet, o) for o in _packet.overloads())
_MATMUL_FUNCS.update({_aten.matmul.default, _aten.mm.default, _aten.bmm.default})
_LINEAR_FUNCS = {F.linear, _aten.linear.default}
_SDPA_FUNCS = {F.scaled_dot_product_attention, _aten.scaled_dot_product_attention.default}


@dataclass(frozen=True)
class FlopCount:
    """per_node: {node name: FLOPs per sample}; per_task: {task: FLOPs its output needs};
    total: all counted FLOPs; effective_*: the same with masked weights' density applied."""

    per_node: Mapping[str, int]
    per_task: Mapping[Hashable, int]
    total: int
    effective_per_task: Mapping[Hashable, int]
    effective_total: int


def count_flops(gm: fx.GraphModule, example_inputs: Tuple[torch.Tensor, ...]) -> FlopCount:
    """Propagate shapes on a copy of ``gm`` (never edited) and count FLOPs per sample."""
    work = shape_propagated(gm, example_inputs)
    batch = example_inputs[0].shape[0] if example_inputs and example_inputs[0].dim() else 1
    per_node: Dict[str, int] = {}
    effective: Dict[str, float] = {}
    for node in work.graph.nodes:
        flops, weight = _node_flops(work, node)
        if flops:
            per_node[node.name] = flops // max(batch, 1)
            effective[node.name] = per_node[node.name] * _density(work, weight)
    dag = graph_to_networkx(work.graph)
    per_task, eff_task = {}, {}
    for task, out in task_output_nodes(work).items():
        needed = nx.ancestors(dag, out.name) | {out.name}
        per_task[task] = sum(v for k, v in per_node.items() if k in needed)
        eff_task[task] = int(round(sum(v for k, v in effective.items() if k in needed)))
    return FlopCount(per_node=per_node, per_task=per_task, total=sum(per_node.values()),
                     effective_per_task=eff_task, effective_total=int(round(sum(effective.values()))))


def shape_propagated(gm: fx.GraphModule, example_inputs: Tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """A copy of ``gm`` in eval mode whose nodes carry ``meta["tensor_meta"]`` for
    ``example_inputs`` (``gm`` itself is never edited)."""
    work = copy.deepcopy(gm).eval()
    with torch.no_grad():
        ShapeProp(work).propagate(*example_inputs)
    return work


#: Where flop_terms reads a node's output shape: None = ``node.meta["tensor_meta"]``.
_SHAPE_OF: contextvars.ContextVar = contextvars.ContextVar("flops_shape_of", default=None)


def _numel(node) -> int:
    shape = _shape(node)
    return math.prod(shape) if shape is not None else 0


def _shape(node):
    if not isinstance(node, fx.Node):
        return None
    lookup = _SHAPE_OF.get()
    if lookup is not None:
        shape = lookup(node)
        return tuple(shape) if shape is not None else None
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


@dataclass(frozen=True)
class FlopTerm:
    """``flops`` (whole batch) that scale with the kept fraction of every ``factor``.

    A factor names channels of the graph: ``("tensor", node)`` every channel dim of the
    node's output (its first output for tuples), ``("reads", node)`` every dim the node
    sums over (the contractions the channel analysis records for it: a dense conv's
    input channels, not a depthwise conv's), ``("internal", node, key)`` channels inside
    one op (attention heads or head dims). :mod:`passes.channel_costs` resolves them to
    channel ids, so the FLOPs of any slimmed model are ``sum(flops * prod(kept
    fractions))`` (exact for products of independent widths).
    """

    flops: int
    factors: Tuple[Tuple[str, ...], ...] = ()


def flop_terms(gm: fx.GraphModule, node: fx.Node,
               shape_of: Optional[Callable[[fx.Node], Optional[Sequence[int]]]] = None,
               ) -> Tuple[Tuple[FlopTerm, ...], Optional[fx.Node]]:
    """(the node's FLOP terms for the whole batch, the node holding its weight or None);
    shapes are read from ``node.meta["tensor_meta"]`` (ShapeProp), or from
    ``shape_of(node)`` (a tensor output's shape, None when unknown) when given."""
    token = _SHAPE_OF.set(shape_of)
    try:
        return _flop_terms(gm, node)
    finally:
        _SHAPE_OF.reset(token)


def _flop_terms(gm: fx.GraphModule, node: fx.Node) -> Tuple[Tuple[FlopTerm, ...], Optional[fx.Node]]:
    out, reads = ("tensor", node.name), ("reads", node.name)
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if hasattr(m, "num_heads") and hasattr(m, "out_proj"):  # torch's or our MultiheadAttention
            return _mha_terms(m, node), None
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return (FlopTerm(2 * _numel(node) * (m.in_channels // m.groups) * math.prod(m.kernel_size),
                             (out, reads)),), None
        if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            inp = node.args[0]
            return (FlopTerm(2 * _numel(inp) * (m.out_channels // m.groups) * math.prod(m.kernel_size),
                             (out, reads)),), None
        if isinstance(m, nn.Linear):
            return (FlopTerm(2 * _numel(node) * m.in_features, (out, reads)),), None
        if isinstance(m, nn.RNNBase):
            return _rnn_terms(m, node), None
        return (), None
    if node.op != "call_function":
        return (), None
    if node.target in _CONV_FUNCS:
        w = node.args[1]
        ws = _shape(w)
        return ((FlopTerm(2 * _numel(node) * math.prod(ws[1:]), (out, reads)),), w) if ws else ((), None)
    if node.target in _CONVT_FUNCS:
        w = node.args[1]
        ws = _shape(w)
        return ((FlopTerm(2 * _numel(node.args[0]) * math.prod(ws[1:]), (out, reads)),), w) if ws else ((), None)
    if node.target in _LINEAR_FUNCS:
        w = node.args[1]
        ws = _shape(w)
        return ((FlopTerm(2 * _numel(node) * ws[-1], (out, reads)),), w) if ws else ((), None)
    if node.target is _aten.addmm.default:  # addmm(bias, x, w): w (Fin, Fout)
        w = node.args[2]
        ws = _shape(w)
        return ((FlopTerm(2 * _numel(node) * ws[0], (out, reads)),), w) if ws else ((), None)
    if node.target in _MATMUL_FUNCS:
        a = _shape(node.args[0])
        return ((FlopTerm(2 * _numel(node) * a[-1], (out, reads)),), None) if a else ((), None)
    if node.target in _SDPA_FUNCS:
        q, k, v = (_shape(a) for a in node.args[:3])
        if not (q and k and v):
            return (), None
        pairs = math.prod(q[:-1]) * k[-2]  # batch x heads x Lq x Lk
        q_node = node.args[0]
        return (FlopTerm(2 * pairs * q[-1], (("tensor", q_node.name),)),  # q k^T: heads x qk dims
                FlopTerm(2 * pairs * v[-1], (out,))), None                   # attention x v: heads x v dims
    if node.target in _EINSUM_FUNCS:
        f = _einsum_flops(node)
        return ((FlopTerm(f, (out, reads)),) if f else ()), None
    if getattr(node.target, "__name__", "") == "shifted_window_attention":
        # not resolved to channels (fixed in budgets; see passes.channel_costs)
        f = _window_attention_flops(node)
        return ((FlopTerm(f),) if f else ()), None
    return (), None


def _node_flops(gm: fx.GraphModule, node: fx.Node) -> Tuple[int, Optional[fx.Node]]:
    """(FLOPs of the whole batch, the node holding the weight or None)."""
    terms, weight = flop_terms(gm, node)
    return sum(t.flops for t in terms), weight


_EINSUM_FUNCS = {torch.einsum, getattr(torch.functional, "einsum", torch.einsum)}


def _einsum_flops(node: fx.Node) -> int:
    """2 x the product of every letter's size (each output element sums over the rest)."""
    eq = node.args[0] if isinstance(node.args[0], str) else None
    shapes = [_shape(a) for a in node.args[1:]]
    if eq is None or "..." in eq or not all(shapes):
        return 0
    sizes: Dict[str, int] = {}
    for term, shape in zip(eq.replace(" ", "").split("->")[0].split(","), shapes):
        for c, n in zip(term, shape):
            sizes[c] = max(sizes.get(c, 1), n)
    return 2 * math.prod(sizes.values())


def _mha_terms(m: nn.Module, node: fx.Node) -> Tuple[FlopTerm, ...]:
    """Projections (q, k, v, out) plus q k^T and attention x v, for the whole batch; the
    heads (or the q/k and v head dims) are the module's internal channels."""
    query = node.args[0]
    key = node.args[1] if len(node.args) > 1 else node.kwargs.get("key")
    q, k = _shape(query), _shape(key)
    if not (q and k):
        return ()
    heads = m.num_heads
    dqk = getattr(m, "head_dim", m.embed_dim // heads)
    dv = getattr(m, "v_head_dim", dqk)
    out_dim = m.out_proj.out_features
    lq = math.prod(q[:-1])  # every query token of the batch
    lk = math.prod(k[:-1])
    per_query_keys = k[0] if (len(k) == 3 and not m.batch_first) or len(k) == 2 else k[1]
    h = ("internal", node.name, "heads")
    qk, v = (h, ("internal", node.name, "qk_dims")), (h, ("internal", node.name, "v_dims"))
    q_in, k_in = ("tensor", query.name), ("tensor", key.name)
    return (
        FlopTerm(2 * lq * q[-1] * heads * dqk, (q_in,) + qk),
        FlopTerm(2 * lk * k[-1] * heads * dqk, (k_in,) + qk),
        FlopTerm(2 * lk * k[-1] * heads * dv, (k_in,) + v),
        FlopTerm(2 * lq * heads * dv * out_dim, v + (("tensor", node.name),)),
        FlopTerm(2 * lq * per_query_keys * heads * dqk, qk),
        FlopTerm(2 * lq * per_query_keys * heads * dv, v),
    )


def _rnn_terms(m: nn.RNNBase, node: fx.Node) -> Tuple[FlopTerm, ...]:
    """``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``: at every time step of every sequence, each
    layer and direction multiplies its gate rows (gates x hidden) by what they read -
    layer 0 the input features, every layer the units it feeds back, layer k >= 1 the
    units layer k-1 outputs (both directions) - and an LSTM with ``proj_size`` projects
    its hidden units. The hidden (and projected) units are the module's internal channels
    (:mod:`passes.rules.rnn`), layer 0's input features the channels the node reads.
    Gate nonlinearities and the elementwise cell updates are not counted.

    >>> import torch, torch.nn as nn
    >>> from disparse_fx.passes.trace import trace_model
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.rnn = nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True)
    ...     def forward(self, x):
    ...         return {"y": self.rnn(x)[0]}
    >>> x = torch.randn(2, 5, 3)  # batch 2, 5 steps; per sample: 2 x 5 steps x 2 directions
    >>> count_flops(trace_model(Net()), (x,)).total  # x 16 gate rows x (3 + 4 | 8 + 4) per layer
    6080
    """
    x = _shape(node.args[0] if node.args else node.kwargs.get("input"))
    if not x:  # a PackedSequence (no shape; its channels are pinned anyway)
        return ()
    steps = math.prod(x[:-1])  # sequence x batch (or sequence alone, unbatched)
    dirs = 2 if m.bidirectional else 1
    units = m.proj_size or m.hidden_size  # what each layer outputs and feeds back
    rows = 2 * steps * dirs * m.weight_ih_l0.shape[0]  # x 2: multiply-adds; gate rows of one direction
    hidden = ("internal", node.name, "hidden")
    fed = ("internal", node.name, "proj") if m.proj_size else hidden
    terms = [FlopTerm(rows * x[-1], (hidden, ("reads", node.name))),  # layer 0 reads the input
             # every layer reads the units it feeds back; layer k >= 1 those of layer k-1
             FlopTerm(rows * units * (m.num_layers + dirs * (m.num_layers - 1)), (hidden, fed))]
    if m.proj_size:
        terms.append(FlopTerm(2 * steps * dirs * m.num_layers * m.hidden_size * units, (fed, hidden)))
    return tuple(terms)


def _window_attention_flops(node: fx.Node) -> int:
    """Swin: qkv and proj over every (padded) token, attention within each window."""
    x = _shape(node.args[0])
    qkv_w, proj_w = _shape(node.args[1]), _shape(node.args[2])
    window = node.args[4] if len(node.args) > 4 else node.kwargs.get("window_size")
    if not (x and qkv_w and proj_w and window):
        return 0
    b, h, w = x[0], -(-x[1] // window[0]) * window[0], -(-x[2] // window[1]) * window[1]
    tokens, per_window = b * h * w, window[0] * window[1]
    inner = qkv_w[0] // 3
    return 2 * (tokens * qkv_w[1] * qkv_w[0] + tokens * per_window * 2 * inner + tokens * inner * proj_w[0])


def _density(gm: fx.GraphModule, weight: Optional[fx.Node]) -> float:
    """Density of a ``w * mask`` weight operand (1.0 for anything else)."""
    if weight is None or weight.op != "call_function" or weight.target is not operator.mul:
        return 1.0
    for arg in weight.args:
        if isinstance(arg, fx.Node) and arg.op == "get_attr" and str(arg.target).endswith("_mask"):
            mask = gm.get_buffer(arg.target)
            return float((mask != 0).float().mean())
    return 1.0
