"""Recognise hand-written RMSNorms as ``F.rms_norm``.

Llama-style code writes the norm out::

    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

A mean over the channels pins them (every output reads every channel); ``F.rms_norm``
has a rule that keeps the normalised width removable (the masked model takes the mean
square over the kept channels, as the narrower slim norm does). :func:`fuse_rms_norms`
rewrites the pattern into ``F.rms_norm`` on symbolically traced graphs (torch-level ops)
and on exported ones (ATen ops): the same matcher reads both spellings:

    square:  x.pow(2), torch.pow(x, 2), x ** 2, x * x          aten.pow.Tensor_Scalar(x, 2), aten.mul.Tensor(x, x)
    mean:    .mean(-1, keepdim=True), torch.mean(...)           aten.mean.dim(s, [-1], True)
    + eps:   s + eps, eps + s, torch.add(s, eps), .add(eps)     aten.add.Tensor(s, eps)
    rsqrt:   torch.rsqrt(v), v.rsqrt()                          aten.rsqrt.default(v)
    times x: x * r, r * x, torch.mul, .mul                      aten.mul.Tensor(x, r)

Each intermediate must have no other user. ``x`` may be a cast (``x.to(torch.float32)``,
as Llama writes it): the casts stay around the norm, so the computation is the same.
A following multiply by a 1-D parameter read directly (``weight * h``, no cast between)
becomes the norm's weight. The width is the static last dim where the graph records it
(exported graphs), else ``x.size(-1)`` (the slim rule rewrites either).

>>> import torch, torch.nn as nn
>>> class Norm(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.weight = nn.Parameter(torch.ones(8))
...     def forward(self, x):
...         return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
>>> gm = torch.fx.symbolic_trace(Norm())
>>> print(gm.code.strip())   # before
def forward(self, x):
    weight = self.weight
    pow_1 = x.pow(2)
    mean = pow_1.mean(-1, keepdim = True);  pow_1 = None
    add = mean + 1e-06;  mean = None
    rsqrt = torch.rsqrt(add);  add = None
    mul = x * rsqrt;  x = rsqrt = None
    mul_1 = weight * mul;  weight = mul = None
    return mul_1
>>> fused = fuse_rms_norms(gm)
>>> print(fused.code.strip())   # after
def forward(self, x):
    weight = self.weight
    size = x.size(-1)
    mul_1 = torch.nn.functional.rms_norm(x, (size,), weight, 1e-06);  x = size = weight = None
    return mul_1
>>> x = torch.randn(2, 3, 8)
>>> bool(torch.allclose(fused(x), gm(x), atol=1e-6)), fuse_rms_norms(fused) is fused
(True, True)
"""
from __future__ import annotations

import logging
import operator
from typing import Any, List, NamedTuple, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from .trace import keep_unused_tensors

__all__ = ["fuse_rms_norms", "fuse_rms_norms_", "RmsNormMatch", "match_rms_norm"]

log = logging.getLogger(__name__)

_aten = torch.ops.aten
# one op of the pattern, at either level: (functions, tensor methods)
_SQUARE = ((operator.pow, torch.pow, _aten.pow.Tensor_Scalar), ("pow",))
_MUL = ((operator.mul, torch.mul, _aten.mul.Tensor), ("mul",))
_MEAN = ((torch.mean, _aten.mean.dim), ("mean",))
_ADD = ((operator.add, torch.add, _aten.add.Tensor, _aten.add.Scalar), ("add",))
_RSQRT = ((torch.rsqrt, _aten.rsqrt.default), ("rsqrt",))


class RmsNormMatch(NamedTuple):
    """``out = x * rsqrt(mean(x ** 2, -1, keepdim=True) + eps)`` [``* weight``]: the nodes."""
    out: fx.Node                  # the multiply by the rsqrt
    x: fx.Node
    eps: float
    weight: Optional[fx.Node]     # a get_attr of a 1-D parameter multiplying ``out``, or None
    scaled: Optional[fx.Node]     # that multiply


def _is(n: Any, op, single: bool = True) -> bool:
    fns, methods = op
    if not isinstance(n, fx.Node) or (single and len(n.users) != 1):
        return False
    return (n.op == "call_function" and n.target in fns) or (n.op == "call_method" and n.target in methods)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _squares(n: fx.Node, x: fx.Node) -> bool:
    a = list(n.args) + [n.kwargs.get(k) for k in ("exponent",) if k in n.kwargs]
    if _is(n, _SQUARE):
        return len(a) == 2 and a[0] is x and _number(a[1]) and a[1] == 2
    return _is(n, _MUL) and len(n.args) == 2 and not n.kwargs and n.args[0] is x and n.args[1] is x


def _last_dim_mean(n: fx.Node) -> bool:
    if not _is(n, _MEAN):
        return False
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
    dims = list(dim) if isinstance(dim, (list, tuple)) else [dim]
    if dims != [-1]:
        width = _static_shape(n.args[0])
        if width is None or dims != [len(width) - 1]:
            return False
    return keep is True and n.kwargs.get("dtype") is None


def _static_shape(n: Any) -> Optional[tuple]:
    meta = n.meta.get("val", n.meta.get("tensor_meta")) if isinstance(n, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def match_rms_norm(mul: fx.Node) -> Optional[RmsNormMatch]:
    """The hand-written RMSNorm ending at the multiply ``mul``, or None."""
    if not _is(mul, _MUL, single=False) or len(mul.args) != 2 or mul.kwargs:
        return None
    for x, rsqrt in (mul.args, mul.args[::-1]):
        if not isinstance(x, fx.Node) or not _is(rsqrt, _RSQRT) or len(rsqrt.args) != 1:
            continue
        add = rsqrt.args[0]
        if not _is(add, _ADD) or len(add.args) != 2 or add.kwargs:
            continue
        mean, eps = add.args if isinstance(add.args[0], fx.Node) else add.args[::-1]
        if not _number(eps) or not _last_dim_mean(mean) or not _squares(mean.args[0], x):
            continue
        weight, scaled = _weight(mul, x)
        return RmsNormMatch(mul, x, float(eps), weight, scaled)
    return None


def _weight(out: fx.Node, x: fx.Node):
    """(weight, multiply) when ``out``'s only use is a multiply by a 1-D parameter of x's width."""
    if len(out.users) != 1:
        return None, None
    scaled = next(iter(out.users))
    if not _is(scaled, _MUL, single=False) or len(scaled.args) != 2 or scaled.kwargs:
        return None, None
    w = scaled.args[1] if scaled.args[0] is out else scaled.args[0]
    if not isinstance(w, fx.Node) or w.op != "get_attr":
        return None, None
    try:
        param = w.graph.owning_module.get_parameter(str(w.target))
    except (AttributeError, TypeError):
        return None, None
    shape = _static_shape(x)
    if param.dim() != 1 or (shape and isinstance(shape[-1], int) and shape[-1] != param.shape[0]):
        return None, None
    return w, scaled


def fuse_rms_norms_(graph: fx.Graph) -> int:
    """:func:`fuse_rms_norms` on ``graph`` in place; returns how many norms it fused."""
    matches: List[RmsNormMatch] = [m for m in (match_rms_norm(n) for n in list(graph.nodes)) if m is not None]
    for m in matches:
        shape = _static_shape(m.x)
        if shape and isinstance(shape[-1], int):
            width = shape[-1]
        else:
            with graph.inserting_before(m.out):
                width = graph.call_method("size", (m.x, -1))
        target = m.scaled if m.weight is not None else m.out
        target.op, target.target = "call_function", F.rms_norm
        target.args, target.kwargs = (m.x, (width,), m.weight, m.eps), {}
        if target.meta.get("val") is None and m.out.meta.get("val") is not None:
            target.meta["val"] = m.out.meta["val"]
    if matches:
        graph.eliminate_dead_code()
        log.debug("fused %d hand-written RMSNorm(s) into F.rms_norm", len(matches))
    return len(matches)


def fuse_rms_norms(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule computing ``gm`` with every hand-written RMSNorm (see the module
    docstring) as ``F.rms_norm``; ``gm`` itself when it has none. ``gm`` is not changed;
    the new one shares its submodules and parameters."""
    if not any(match_rms_norm(n) is not None for n in gm.graph.nodes):
        return gm
    graph = fx.Graph(tracer_cls=gm.graph._tracer_cls)
    graph._codegen = gm.graph._codegen
    out = graph.graph_copy(gm.graph, {})
    old_output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    graph.output(out, type_expr=old_output.type)
    fused = fx.GraphModule(gm, graph, type(gm).__name__)
    keep_unused_tensors(fused, gm)  # fx copies only what the graph reads
    fuse_rms_norms_(fused.graph)
    fused.recompile()
    fused.graph.lint()
    fused.training = gm.training
    fused.meta.update(getattr(gm, "meta", {}))
    return fused
