"""Attention: heads, head dimensions, and the products that attend.

An attention block projects its input to q, k and v, splits each into heads, takes
``softmax(q k^T * scale) v`` per head, merges the heads back and projects them out::

    qkv = linear(x).reshape(B, L, 3, H, D).permute(2, 0, 3, 1, 4)   # the head split
    q, k, v = qkv.unbind(0)
    o = scaled_dot_product_attention(q, k, v)                          # (B, H, L, D)
    y = linear(o.transpose(1, 2).reshape(B, L, H * D))                 # the merge

What a channel of such a block is, is a choice (``find_channel_groups(attention=...)``):

- ``"heads"`` (default): a channel is a whole head, its D rows of each of q, k and v
  and its D columns of the out projection; removing it lowers the head count;
- ``"head_dims"``: a channel is one position of the per-head dimension, taken in every
  head at once (so all heads keep one width); q and k dims go together (they are
  contracted), v dims on their own (for packed qkv projections with one reshape, all
  three go together). The logit scale stays at its original ``D ** -0.5``: the slim
  pass writes it out explicitly.

The choice is made where it must be: at the reshape that splits a projection's output
into ``(..., heads, head_dim)``. :func:`find_head_splits` finds those reshapes before
the analysis runs, by walking back from every attention product (``scaled_dot_product_
attention``, and ``matmul`` / ``einsum`` of two activations) through per-head ops
(shape ops, scaling, qk-norm, rotary embeddings, dropout); the reshape rule
(:mod:`passes.rules.shape`) then keeps the heads' or the head dims' channels. Every
other reshape keeps its usual rule. Grouped-query attention (``enable_gqa``) makes a
k/v head and its query heads one channel.

``nn.MultiheadAttention`` (and :class:`passes.attention.MultiheadAttention`) is a leaf
module whose heads live inside it: its rule declares them as *internal channels*; the
channel-mask pass swaps in :class:`passes.attention.MultiheadAttention` with head masks,
the slim pass rebuilds it with the new head count and dims (torch's module cannot hold
an inner width different from its embedding width).
"""
from __future__ import annotations

import operator
from typing import Any, Dict, FrozenSet, List, Set

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..attention import MultiheadAttention as Slimmable
from ..attention import mha_sizes
from ..errors import UnsupportedOpError
from .registry import Labels, op_name, register_channel_rule, torch_attr
from ._types import TensorInfo
from .conv import product_labels

__all__ = ["find_head_splits", "replace_submodule"]

_SDPA = F.scaled_dot_product_attention
_ATEN_SDPA = torch.ops.aten.scaled_dot_product_attention.default
_EINSUM = (torch.einsum, torch_attr("functional.einsum"))
_PRODUCTS = {operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm", "__matmul__", *_EINSUM,
             torch.ops.aten.matmul.default, torch.ops.aten.bmm.default}
# ops a q, k or v goes through between its head split and the attention product:
# shape ops, scaling, rotary embeddings (x * cos + cat(-x2, x1) * sin), per-head norms
# (qk-norm), dropout
_PER_HEAD = {"permute", "transpose", "contiguous", "getitem", "unbind", "chunk", "split", "mul",
             "truediv", "div", "float", "to", "clone", "normalize", "view", "reshape", "unflatten",
             "squeeze", "unsqueeze", "flatten", "type_as", "half", "bfloat16", "swapaxes", "movedim",
             "add", "sub", "neg", "cat", "concat", "layer_norm", "rms_norm", "dropout",
             # the same at the ATen level (torch.export): x[..., :d] is a slice, .float() a copy,
             # a grouped-query k/v repeat an expand
             "slice", "_to_copy", "alias", "_unsafe_view", "expand"}
_PER_HEAD_MODULES = (nn.LayerNorm, nn.RMSNorm, nn.Dropout, nn.Identity)
_RESHAPES = {"view", "reshape", "unflatten", "_unsafe_view"}


def _op_name(node: fx.Node) -> str:
    return op_name(node.target)


def _is_size_access(node: fx.Node) -> bool:
    """``x.shape`` / ``x.size()`` / ``x.dim()`` / ``x.numel()`` / ``len(x)``: an int, not the data
    (a weight reshaped with such sizes is still a weight)."""
    if node.op == "call_method":
        return node.target in ("size", "dim", "numel", "ndimension")
    if node.op == "call_function":
        if node.target is getattr:
            return len(node.args) > 1 and node.args[1] in ("shape", "ndim")
        return node.target in (len, torch.numel)
    return False


def find_head_splits(gm: fx.GraphModule) -> FrozenSet[str]:
    """Names of the reshape nodes that may split q, k or v into heads.

    A reshape qualifies when a chain of per-head ops (permute, transpose, unbind, chunk,
    getitem, scaling, rotary embeddings, per-head norms, dropout) leads from it to an
    operand of an attention product:
    ``scaled_dot_product_attention``, or a ``matmul`` / ``bmm`` / ``einsum`` whose
    operands are both computed from the inputs (not a weight times an activation).
    """
    param_only: Set[fx.Node] = set()
    for n in gm.graph.nodes:  # values computed from parameters, constants and sizes only
        if n.op == "get_attr" or _is_size_access(n) or (n.op in ("call_function", "call_method")
                                                        and all(a in param_only for a in n.all_input_nodes)):
            param_only.add(n)
    starts: List[fx.Node] = []
    for n in gm.graph.nodes:
        if n.op != "call_function" and n.op != "call_method":
            continue
        if n.target is _SDPA or n.target is _ATEN_SDPA:
            starts.extend(a for a in n.args[:3] if isinstance(a, fx.Node))
            starts.extend(n.kwargs[k] for k in ("query", "key", "value") if isinstance(n.kwargs.get(k), fx.Node))
        elif n.target in _PRODUCTS:
            operands = [a for a in n.all_input_nodes if a not in param_only]
            if len(operands) >= 2:
                starts.extend(operands)
    marks: Set[str] = set()
    seen: Set[fx.Node] = set()
    while starts:
        n = starts.pop()
        if n in seen or n in param_only:
            continue
        seen.add(n)
        if n.op == "call_module":
            if not isinstance(gm.get_submodule(n.target), _PER_HEAD_MODULES):
                continue
        elif n.op not in ("call_function", "call_method") or _op_name(n) not in _PER_HEAD:
            continue
        if _op_name(n) in _RESHAPES:
            marks.add(n.name)
        starts.extend(n.all_input_nodes)
    return frozenset(marks)


def replace_submodule(gm: fx.GraphModule, target: str, new: nn.Module) -> None:
    """Put ``new`` at ``target`` in ``gm`` (the parent container is modified)."""
    parent_name, _, leaf = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, leaf, new)


# ----------------------------------------------------------------------------- sdpa
def _sdpa_slim(sctx):
    """Removed q/k dims would change the default scale 1/sqrt(E): write the original out."""
    q = sctx.arg(0, "query")
    shape = sctx.shape(q)
    d = len(shape) - 1
    if sctx.value(6, "scale", None) is None and sctx.kept_count(q, d) != shape[d]:
        sctx.set_arg(6, "scale", float(shape[d]) ** -0.5)


@register_channel_rule(_SDPA, slim=_sdpa_slim)
def _scaled_dot_product_attention(ctx):
    """sdpa(q, k, v): q (..., L, E), k (..., S, E), v (..., S, Ev) -> (..., L, Ev).

    q and k share E (contracted: masking q suffices); keys are softmax-mixed; the batch
    dims (heads) of q, k, v and a broadcast mask are one channel set. With
    ``enable_gqa`` a channel is a k/v head with its query heads.
    """
    q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    mask = ctx.arg(3, "attn_mask", None)
    if ctx.has_channels(q, -1) or ctx.has_channels(k, -1):
        ctx.join(ctx.labels(q, -1), ctx.labels(k, -1))
        ctx.contract(q, -1)
    for x in (k, v):
        ctx.mix(x, -2, "attended over (softmax over keys)")
    operands = [q, k, v]
    if isinstance(mask, TensorInfo):
        for d in range(max(0, mask.ndim - 2), mask.ndim):
            ctx.mix(mask, d, "used as an attention mask")
        if mask.ndim > 2:
            operands.append(mask)
    if bool(ctx.value(7, "enable_gqa", False)) and q.ndim >= 3 and q.shape[-3] != k.shape[-3]:
        _group_query_heads(ctx, q, k, v)
    return product_labels(ctx, operands, q, v)


def _group_query_heads(ctx, q: TensorInfo, k: TensorInfo, v: TensorInfo) -> None:
    """Grouped-query attention: q head ``i`` reads k/v head ``i // g``. One channel is a
    k/v head with its ``g`` query heads (removing a k/v head removes its query heads;
    the ratio ``g`` stays, so the grouping stays valid)."""
    if not any(ctx.has_channels(x, -3) for x in (q, k, v)):
        return
    hq, hkv = q.shape[-3], k.shape[-3]
    reason = f"grouped-query heads of {ctx.describe()} combined with heads that are fixed"
    q_heads = ctx.labels(q, -3)
    if q_heads is None:
        ctx.join(None, ctx.labels(k, -3), ctx.labels(v, -3), reason=reason)
        return
    rows = q_heads.view(hkv, hq // hkv)
    for j in range(1, rows.shape[1]):
        ctx.unify(rows[:, 0], rows[:, j])
    ctx.join(rows[:, 0].contiguous(), ctx.labels(k, -3), ctx.labels(v, -3), reason=reason)


# ----------------------------------------------------------------------------- einsum
def _einsum_terms(ctx, equation: str, operands: List[Any]):
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(operands):
        raise UnsupportedOpError(f"{ctx.describe()}: einsum equation {equation!r} names {len(terms)} "
                                 f"operands, got {len(operands)}")
    free = [chr(c) for c in range(0x100, 0x200) if chr(c) not in eq]
    n_ell = max((o.ndim - (len(t) - 3) for t, o in zip(terms, operands) if "..." in t), default=0)
    ell = "".join(free[:n_ell])
    expanded = []
    for t, o in zip(terms, operands):
        if "..." in t:
            n = o.ndim - (len(t) - 3)
            t = t.replace("...", ell[n_ell - n:] if n else "")
        expanded.append(t)
    if arrow:
        rhs = rhs.replace("...", ell)
    else:  # implicit output: broadcast dims, then letters used once, in order
        counts: Dict[str, int] = {}
        for t in expanded:
            for c in t:
                counts[c] = counts.get(c, 0) + 1
        rhs = ell + "".join(sorted(c for c, n in counts.items() if n == 1 and c not in ell))
    return expanded, rhs


@register_channel_rule(*_EINSUM)
def _einsum(ctx):
    """einsum: each letter's dims are one channel set; letters left out of the output are
    contracted (zero-neutral: a mask on one operand suffices)."""
    equation = ctx.value(0, "equation")
    if not isinstance(equation, str):
        raise UnsupportedOpError(f"{ctx.describe()}: einsum in sublist form has no channel rule; "
                                 f"use an equation string")
    operands = list(ctx.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not all(isinstance(o, TensorInfo) for o in operands):
        raise UnsupportedOpError(f"{ctx.describe()}: einsum operands must be tensors")
    terms, rhs = _einsum_terms(ctx, equation, operands)
    places: Dict[str, List[tuple]] = {}
    for t, o in zip(terms, operands):
        for d, c in enumerate(t):
            places.setdefault(c, []).append((o, d))
    out = Labels()
    for c, occ in places.items():
        size = max(o.shape[d] for o, d in occ)
        sized = [(o, d) for o, d in occ if o.shape[d] == size]
        for o, d in occ:
            if o.shape[d] != size:
                ctx.mix(o, d, "broadcast by einsum")
        if not any(ctx.has_channels(o, d) for o, d in sized):
            continue
        joined = ctx.join(*[ctx.labels(o, d) for o, d in sized])
        if c in rhs:
            out[rhs.index(c)] = joined
            continue
        weights = [ctx.weight_name(o, d) for o, d in sized]
        act = [(o, d) for (o, d), w in zip(sized, weights) if w is None]
        named = [w for w in weights if w is not None]
        if act:
            o, d = act[0]
            ctx.contract(o, d, named[0] if len(named) == 1 and len(act) == 1 else None)
        else:
            ctx.contract(sized[0][0], sized[0][1])
    return out


# ----------------------------------------------------------------------------- nn.MultiheadAttention
def _mha(ctx):
    """MultiheadAttention(query, key, value): the inputs' channels are the projections'
    columns; heads (or head dims) are internal channels; the output's are out_proj's."""
    m = ctx.module
    h, dqk, dv, _scale = mha_sizes(m)
    query = ctx.arg(0, "query")
    key, value = ctx.arg(1, "key"), ctx.arg(2, "value")
    fixed = f"{ctx.describe()} reads features that are fixed (a graph input or a tensor made in forward)"
    if m._qkv_same_embed_dim:
        cols = ctx.param("in_proj_weight", 1)
        ctx.join(cols, *[ctx.labels(x, -1) for x in (query, key, value)], reason=fixed)
        for x in (query, key, value):
            ctx.contract(x, -1, (f"{ctx.node.target}.in_proj_weight", 1))
    else:
        for x, name in ((query, "q_proj_weight"), (key, "k_proj_weight"), (value, "v_proj_weight")):
            ctx.join(ctx.param(name, 1), ctx.labels(x, -1), reason=fixed)
            ctx.contract(x, -1, (f"{ctx.node.target}.{name}", 1))
    for x in (query, key, value):  # tokens are attended over, never channels
        for d in range(x.ndim - 1):
            ctx.mix(x, d, "attended over by multi-head attention")
    if ctx.attention == "heads":
        heads = ctx.fresh(h)
        q_at, v_at = heads.repeat_interleave(dqk), heads.repeat_interleave(dv)
        ctx.internal("heads", heads)
        ctx.attention_unit("heads", heads)
        mask = ctx.arg(5, "attn_mask", None)
        if isinstance(mask, TensorInfo) and mask.ndim == 3:  # (batch * heads, L, S): sized by the heads
            ctx.pin(heads, f"{ctx.describe()} gets one attn_mask slice per head (a 3-D mask)")
    else:
        qk_dims, v_dims = ctx.fresh(dqk), ctx.fresh(dv)
        q_at, v_at = qk_dims.repeat(h), v_dims.repeat(h)
        ctx.internal("qk_dims", qk_dims)
        ctx.internal("v_dims", v_dims)
        ctx.attention_unit("qk_dims", qk_dims)
        ctx.attention_unit("v_dims", v_dims)
    rows = torch.cat([q_at, q_at, v_at])
    if m._qkv_same_embed_dim:
        ctx.unify(ctx.param("in_proj_weight", 0), rows)
    else:
        for name, at in (("q_proj_weight", q_at), ("k_proj_weight", q_at), ("v_proj_weight", v_at)):
            ctx.unify(ctx.param(name, 0), at)
    if m.in_proj_bias is not None:
        ctx.unify(ctx.param("in_proj_bias", 0), rows)
    if m.bias_k is not None:
        ctx.unify(ctx.param("bias_k", 2), q_at)
    if m.bias_v is not None:
        ctx.unify(ctx.param("bias_v", 2), v_at)
    ctx.unify(ctx.param("out_proj.weight", 1), v_at)
    out = ctx.param("out_proj.weight", 0, link=True)
    if m.out_proj.bias is not None:
        ctx.unify(ctx.param("out_proj.bias", 0), out)
    result = ctx.out
    first = Labels({result[0].dim() - 1: out})
    weights = result[1]
    if weights is None:
        return (first, None)
    w = Labels()
    if weights.dim() == query.ndim + 1 and ctx.attention == "heads":  # per-head weights (N, H, L, S)
        w[weights.dim() - 3] = heads
    return (first, w)


def _mha_mask(sctx):
    """The masked model: our module, sharing the parameters, with head (or dim) masks."""
    m = sctx.module
    h, dqk, dv, scale = mha_sizes(m)
    new = Slimmable.from_torch(m) if not isinstance(m, Slimmable) else Slimmable.rebuild(
        m, num_heads=h, head_dim=dqk, v_head_dim=dv, scale=scale)
    if sctx.groups.attention == "heads":
        new.set_masks(head_keep=sctx.internal("heads"))
    else:
        new.set_masks(qk_dim_keep=sctx.internal("qk_dims"), v_dim_keep=sctx.internal("v_dims"))
    replace_submodule(sctx.gm, sctx.node.target, new)


def _mha_slim(sctx):
    """Rebuild with the kept head count / dims around the sliced parameters."""
    m = sctx.module
    h, dqk, dv, scale = mha_sizes(m)
    if sctx.groups.attention == "heads":
        h = int(sctx.internal("heads").sum())
    else:
        dqk, dv = int(sctx.internal("qk_dims").sum()), int(sctx.internal("v_dims").sum())
    new = Slimmable.rebuild(m, num_heads=h, head_dim=dqk, v_head_dim=dv, scale=scale)
    replace_submodule(sctx.gm, sctx.node.target, new)


register_channel_rule(nn.MultiheadAttention, Slimmable, slim=_mha_slim, mask=_mha_mask)(_mha)
