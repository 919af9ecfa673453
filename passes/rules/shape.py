"""Shape ops: reshapes, permutations, concatenation, splitting, indexing, sizes, shuffles.

    x.view(n, c * h * w)          # flatten into a Linear: channel k -> features [k*h*w, (k+1)*h*w)
    x.view(n, g, c // g, h, w)    # a channel dim split in two: the pieces are coupled so the
                                  # kept channels stay a (g, c'/g) grid (channel shuffle)
    torch.cat([a, b], 1)          # offsets: output channels = a's channels then b's
    x.chunk(2, 1) / x[:, :k]      # slicing: each piece keeps its own channels; slimming
                                  # rewrites the split sizes / slice bounds to the kept counts
    x.size(1)                     # an int that depends on channel counts: only shape ops
                                  # that get rewritten may use it, anything else pins them
    channel_shuffle(x, g)         # the view-transpose-view permutation, coupled as above

The slimming pass rewrites literal sizes of labelled dims (``view(n, 512, 7, 7)``
becomes ``view(n, 256, 7, 7)``), keeps ``-1`` and batch sizes dynamic, and turns
``chunk`` into ``split`` with the kept sizes.
"""
from __future__ import annotations

import builtins
import operator
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UnsupportedOpError
from .registry import Labels, op_name, register_channel_rule, torch_attr
from ._types import Const, TensorInfo


# ----------------------------------------------------------------------------- helpers
def couple(ctx, E: torch.Tensor, keep: Optional[int] = None) -> Tuple[torch.Tensor, Optional[int]]:
    """Make the atom grid ``E`` depend on one dim only, unifying along the others.

    Returns the coupled grid and the dim it depends on (None if constant). The dim kept
    is ``keep`` if given and ``E`` varies along it, else the largest one among those
    ``E`` varies along (the last on ties), so a ``(groups, channels_per_group)`` grid
    keeps its per-group channels.
    """
    varies = [k for k in range(E.dim()) if E.shape[k] > 1 and not bool((E == E.narrow(k, 0, 1)).all())]
    if not varies:
        return E, None
    if len(varies) == 1:
        return E, varies[0]
    if keep is None or keep not in varies:
        keep = max(varies, key=lambda k: (E.shape[k], k))
    R = E
    for k in varies:
        if k != keep:
            R = R.narrow(k, 0, 1)
    R = R.expand(E.shape).contiguous()
    ctx.unify(R.reshape(-1), E.reshape(-1))
    return R, keep


def along(E: torch.Tensor, k: int) -> torch.Tensor:
    """The atoms of a grid that depends only on dim ``k``."""
    return E.movedim(k, 0).reshape(E.shape[k], -1)[:, 0].contiguous()


def _reshape_groups(in_shape: Sequence[int], out_shape: Sequence[int]):
    ins = [d for d, s in enumerate(in_shape) if s != 1]
    outs = [d for d, s in enumerate(out_shape) if s != 1]
    groups = []
    i = j = 0
    while i < len(ins) and j < len(outs):
        gi, gj = [ins[i]], [outs[j]]
        pi, po = in_shape[ins[i]], out_shape[outs[j]]
        i += 1
        j += 1
        while pi != po:
            if pi < po:
                gi.append(ins[i])
                pi *= in_shape[ins[i]]
                i += 1
            else:
                gj.append(outs[j])
                po *= out_shape[outs[j]]
                j += 1
        groups.append((gi, gj))
    return groups


def _head_axis(ctx, pieces: int) -> Optional[int]:
    """Which piece of a split channel dim keeps its channels when the reshape splits q, k
    or v into heads: ``(..., heads, head_dim)``, the heads (policy "heads") or the
    per-head dims ("head_dims"); None for any other reshape."""
    policy = ctx.head_split
    if policy is None or pieces < 2:
        return None
    return pieces - 2 if policy == "heads" else pieces - 1


def reshape_labels(ctx, x: TensorInfo, out_shape: Sequence[int]) -> Labels:
    """Channels of ``x.reshape(out_shape)`` (exact; see the module docstring)."""
    out = Labels()
    out_shape = tuple(int(s) for s in out_shape)
    carried = sorted(set(x.labels) | set(x.lazy))
    if not carried:
        return out
    if 0 in x.shape or 0 in out_shape:
        for d in carried:
            ctx.mix(x, d, "reshaped (empty tensor)")
        return out
    for d in carried:
        if x.shape[d] == 1:
            ctx.mix(x, d, "reshaped (a single-channel dim)")
    for gi, gj in _reshape_groups(x.shape, out_shape):
        ch = [d for d in gi if d in carried]
        if not ch:
            continue
        if len(gi) == 1 and len(gj) == 1:
            d = gi[0]
            if d in x.labels:
                out[gj[0]] = x.labels[d]
            else:
                out.lazy[gj[0]] = x.lazy[d]
            continue
        if len(ch) > 1:
            for d in ch:
                ctx.mix(x, d, "merged with another channel dim by a reshape")
            continue
        d = ch[0]
        if gi[0] == 0 and d != 0:
            ctx.mix(x, d, "merged with the leading (batch) dim by a reshape")
            continue
        lab = ctx.resolve(ctx.labels(x, d))
        sizes_in = [x.shape[k] for k in gi]
        view = [1] * len(gi)
        view[gi.index(d)] = x.shape[d]
        E = lab.view(view).expand(sizes_in).reshape([out_shape[k] for k in gj])
        head_axis = _head_axis(ctx, len(gj))
        E, k = couple(ctx, E, head_axis)
        if head_axis is not None and k is not None:
            ctx.attention_unit(ctx.head_split, along(E, k))
        if k is None:
            if len(gj) == 1:
                out[gj[0]] = E.reshape(-1)
            else:
                ctx.mix(x, d, "reshaped (one channel spread over several dims)")
            continue
        out[gj[k]] = along(E, k)
    return out


def _rearranged(x: TensorInfo, mapping: Sequence[Optional[int]]) -> Labels:
    """Output dim j carries input dim ``mapping[j]`` (None: a new dim)."""
    out = Labels()
    for j, d in enumerate(mapping):
        if d is None:
            continue
        if d in x.labels:
            out[j] = x.labels[d]
        elif d in x.lazy:
            out.lazy[j] = x.lazy[d]
    return out


def _sizes_arg(ctx, start: int, name: str):
    """Size arguments given as ``*sizes`` or as one sequence."""
    if ctx.node.op == "call_method":
        cargs, ckwargs = ctx.values
        vals = list(cargs[start:])
        if len(vals) == 1 and isinstance(vals[0], (tuple, list, torch.Size)):
            vals = list(vals[0])
        if not vals and name in ckwargs:
            vals = list(ckwargs[name])
        return vals
    v = ctx.value(start, name)
    return list(v) if isinstance(v, (tuple, list, torch.Size)) else [v]


# ----------------------------------------------------------------------------- reshapes
def _view_rule(ctx):
    x = ctx.arg(0, "input")
    return reshape_labels(ctx, x, ctx.out_shape)


def _view_slim(sctx):
    """Literal sizes for channel dims and for sizes computed from channel counts."""
    node = sctx.node
    if node.target in ("view_as", "reshape_as"):
        return
    out_ch = sctx.channels(node)
    out_shape = sctx.shape(node)
    if node.op == "call_method":
        sizes = list(node.args[1:])
        packed = len(sizes) == 1 and isinstance(sizes[0], (tuple, list))
        if packed:
            sizes = list(sizes[0])
        elif not sizes and "size" in node.kwargs:
            sizes, packed = list(node.kwargs["size"]), True
    else:
        shape_arg = node.args[1] if len(node.args) > 1 else node.kwargs["shape"]
        sizes, packed = (list(shape_arg), True) if isinstance(shape_arg, (tuple, list)) else ([shape_arg], False)
    if len(sizes) == 1 and isinstance(sizes[0], fx.Node) and len(out_shape) != 1:
        # x.view(y.size()): one size node for the whole shape
        if not out_ch and not sctx.is_size_dependent(sizes[0]):
            return
        new = [sctx.kept_count(node, j, out_shape[j]) for j in range(len(out_shape))]
        if 0 not in out_ch:
            new[0] = -1
        sizes, packed = new, True
    else:
        if len(sizes) != len(out_shape):
            return
        for j, s in enumerate(sizes):
            if isinstance(s, int) and s == -1:
                continue
            if j in out_ch:
                sizes[j] = sctx.kept_count(node, j)
            elif sctx.is_size_dependent(s):
                sizes[j] = out_shape[j]
    if node.op == "call_method":
        if packed and "size" in node.kwargs and len(node.args) == 1:
            sctx.set_kwarg("size", tuple(sizes))
        else:
            node.args = (node.args[0],) + ((tuple(sizes),) if packed else tuple(sizes))
    elif len(node.args) > 1:
        node.args = (node.args[0], tuple(sizes)) + tuple(node.args[2:])
    else:
        sctx.set_kwarg("shape", tuple(sizes))


register_channel_rule("view", "reshape", torch.reshape, "view_as", "reshape_as",
                      slim=_view_slim, handles_sizes=True)(_view_rule)


@register_channel_rule(torch.flatten, "flatten", nn.Flatten, torch.ravel, "ravel")
def _flatten(ctx):
    """flatten(x, 1): (N, C, H, W) -> (N, C*H*W), channel k -> a block of H*W features."""
    return reshape_labels(ctx, ctx.arg(0, "input"), ctx.out_shape)


def _unflatten_slim(sctx):
    node = sctx.node
    out_ch = sctx.channels(node)
    if not out_ch:
        return
    out_shape = sctx.shape(node)
    if node.op == "call_module":
        m = sctx.module
        d = m.dim % len(out_shape)
        n = len(m.unflattened_size)
        m.unflattened_size = tuple(sctx.kept_count(node, j, out_shape[j]) for j in range(d, d + n))
        return
    d = sctx.value(1, "dim")
    d = d % len(out_shape)
    sizes = list(sctx.arg(2, "sizes"))
    new = [sctx.kept_count(node, d + i, out_shape[d + i]) if sizes[i] != -1 else -1 for i in range(len(sizes))]
    sctx.set_arg(2, "sizes", tuple(new))


register_channel_rule(torch.unflatten, "unflatten", nn.Unflatten, slim=_unflatten_slim,
                      handles_sizes=True)(_flatten)


def _permutation(ctx) -> List[int]:
    x = ctx.arg(0, "input")
    nd = x.ndim
    name = op_name(ctx.node.target)
    if name == "permute":
        dims = _sizes_arg(ctx, 1, "dims")
        return [d % nd for d in dims]
    if name in ("transpose", "swapaxes", "swapdims", "transpose_"):
        a, b = ctx.value(1, "dim0") % nd, ctx.value(2, "dim1") % nd
        perm = list(range(nd))
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    if name == "t":
        return list(range(nd))[::-1]
    if name in ("movedim", "moveaxis"):
        src, dst = ctx.value(1, "source"), ctx.value(2, "destination")
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        src = [s % nd for s in src]
        dst = [s % nd for s in dst]
        perm: List[Optional[int]] = [None] * nd
        for s, t in zip(src, dst):
            perm[t] = s
        rest = iter(d for d in range(nd) if d not in src)
        return [p if p is not None else next(rest) for p in perm]
    raise UnsupportedOpError(f"no permutation for {ctx.describe()}")


@register_channel_rule(torch.permute, "permute", torch.transpose, "transpose", "transpose_",
                       torch.swapaxes, "swapaxes", torch.swapdims, "swapdims", torch.t, "t",
                       torch.movedim, "movedim", torch.moveaxis, "moveaxis")
def _permute(ctx):
    """permute / transpose / movedim: channels move with their dims."""
    return _rearranged(ctx.arg(0, "input"), _permutation(ctx))


@register_channel_rule(torch.unsqueeze, "unsqueeze", "unsqueeze_")
def _unsqueeze(ctx):
    x = ctx.arg(0, "input")
    d = ctx.value(1, "dim") % (x.ndim + 1)
    mapping = list(range(x.ndim))
    mapping.insert(d, None)
    return _rearranged(x, mapping)


@register_channel_rule(torch.squeeze, "squeeze", "squeeze_")
def _squeeze(ctx):
    x = ctx.arg(0, "input")
    dims = ctx.value(1, "dim", None)
    if dims is None:
        dims = [d for d in range(x.ndim) if x.shape[d] == 1]
    elif isinstance(dims, int):
        dims = [dims]
    gone = {d % x.ndim for d in dims if x.shape[d % x.ndim] == 1}
    for d in gone:
        ctx.mix(x, d, "squeezed away (a single-channel dim)")
    return _rearranged(x, [d for d in range(x.ndim) if d not in gone])


def _expand_rule(ctx):
    """expand: broadcast dims (size 1 -> n) carry no channels; others pass through."""
    x = ctx.arg(0, "input")
    out_shape = ctx.out_shape
    lead = len(out_shape) - x.ndim
    mapping = [None] * lead + [d if x.shape[d] == out_shape[lead + d] else None for d in range(x.ndim)]
    for d in range(x.ndim):
        if x.shape[d] != out_shape[lead + d]:
            ctx.mix(x, d, "broadcast by expand")
    return _rearranged(x, mapping)


def _expand_slim(sctx):
    node = sctx.node
    out_shape = sctx.shape(node)
    x = node.args[0]
    x_shape = sctx.shape(x)
    lead = len(out_shape) - len(x_shape)
    sizes = list(node.args[1:])
    packed = len(sizes) == 1 and isinstance(sizes[0], (tuple, list))
    if packed:
        sizes = list(sizes[0])
    if len(sizes) != len(out_shape):
        return
    for j, s in enumerate(sizes):
        # a size of 1 computed at run time (a batch size seen as 1 on the example) may
        # broadcast at other sizes: it stays as written, like any size whose channels stay
        follows = j >= lead and x_shape[j - lead] == out_shape[j] and not (out_shape[j] == 1 and isinstance(s, fx.Node))
        if follows:
            sizes[j] = -1  # follows x
        elif sctx.is_size_dependent(s) and sctx.kept_count(node, j) != out_shape[j]:
            sizes[j] = sctx.kept_count(node, j)  # the dim's channels were cut
    node.args = (x,) + ((tuple(sizes),) if packed else tuple(sizes))


register_channel_rule("expand", slim=_expand_slim, handles_sizes=True)(_expand_rule)


@register_channel_rule(torch.broadcast_to, "broadcast_to")
def _broadcast_to(ctx):
    return _expand_rule(ctx)


@register_channel_rule("expand_as")
def _expand_as(ctx):
    """x.expand_as(y): the output follows y's shape, so it carries y's channels."""
    x, y = ctx.arg(0), ctx.arg(1)
    lead = y.ndim - x.ndim
    out = Labels()
    for j in range(y.ndim):
        d = j - lead
        if d >= 0 and x.shape[d] == y.shape[j]:
            lab = ctx.join(ctx.labels(x, d), ctx.labels(y, j)) if (
                ctx.has_channels(x, d) or ctx.has_channels(y, j)) else None
        else:
            if d >= 0:
                ctx.mix(x, d, "broadcast by expand_as")
            lab = ctx.labels(y, j) if ctx.has_channels(y, j) else None
        if lab is not None:
            out[j] = lab
    return out


@register_channel_rule("repeat", torch.tile, "tile")
def _repeat(ctx):
    """x.repeat(r...): each dim's atoms are tiled r times."""
    x = ctx.arg(0, "input")
    reps = _sizes_arg(ctx, 1, "dims" if ctx.node.op != "call_method" else "repeats")
    reps = [int(r) for r in reps]
    lead = len(reps) - x.ndim
    if lead < 0:  # tile pads reps with ones on the left
        reps = [1] * (-lead) + reps
        lead = 0
    out = Labels()
    for d in range(x.ndim):
        if ctx.has_channels(x, d):
            out[lead + d] = ctx.labels(x, d).repeat(reps[lead + d])
    return out


# ----------------------------------------------------------------------------- concat
def _cat_rule(ctx):
    """cat(tensors, dim): channels of the inputs, concatenated at their offsets."""
    tensors = [t for t in ctx.arg(0, "tensors")]
    x0 = tensors[0]
    d = x0.dim(ctx.value(1, "dim", 0))
    out = Labels()
    if any(ctx.has_channels(t, d) for t in tensors):
        parts = []
        for t in tensors:
            lab = ctx.labels(t, d)
            if lab is None:
                lab = ctx.fresh(t.shape[d])
                ctx.pin(lab, f"concatenated by {ctx.describe()} with '{t.origin}', whose channels "
                             f"are fixed (a graph input or a tensor made in forward)")
            parts.append(lab)
        out[d] = torch.cat(parts)
    for e in range(x0.ndim):
        if e == d:
            continue
        if any(e in t.labels for t in tensors):
            out[e] = ctx.join(*[ctx.labels(t, e) for t in tensors])
    return out


register_channel_rule(torch.cat, torch.concat, torch_attr("concatenate"))(_cat_rule)


@register_channel_rule(torch.stack)
def _stack(ctx):
    tensors = list(ctx.arg(0, "tensors"))
    x0 = tensors[0]
    d = ctx.value(1, "dim", 0) % (x0.ndim + 1)
    out = Labels()
    for e in range(x0.ndim):
        if any(e in t.labels for t in tensors):
            out[e if e < d else e + 1] = ctx.join(*[ctx.labels(t, e) for t in tensors])
    return out


# ----------------------------------------------------------------------------- splitting
def _pieces(ctx, d: int) -> List[Tuple[int, int]]:
    """(start, length) of each output piece along ``d``, from the concrete outputs."""
    start, out = 0, []
    for t in ctx.out:
        n = t.shape[d]
        out.append((start, n))
        start += n
    return out


def _sliced(x: TensorInfo, d: int, start: int, length: int, lab: Optional[torch.Tensor]) -> Labels:
    out = Labels({e: l for e, l in x.labels.items() if e != d})
    out.lazy = {e: l for e, l in x.lazy.items() if e != d}
    if lab is not None:
        out[d] = lab[start:start + length]
    return out


def _split_rule(ctx):
    """split / chunk along dim: each piece carries its slice of the atoms."""
    x = ctx.arg(0, "input")
    d = x.dim(ctx.value(2, "dim", 0))
    lab = ctx.labels(x, d) if ctx.has_channels(x, d) else None
    return tuple(_sliced(x, d, s, n, lab) for s, n in _pieces(ctx, d))


def _split_slim(sctx):
    """Split sizes become the kept counts of each piece (chunk becomes split)."""
    node = sctx.node
    x = node.args[0] if node.args else node.kwargs["input"]
    d = sctx.value(2, "dim", 0) % len(sctx.shape(x))
    pieces = [s[d] for s in sctx.shape(node)]
    lab = sctx.channels(x).get(d)
    size_arg = sctx.arg(1, "split_size_or_sections" if node.op == "call_function" else "split_size", None)
    if lab is None and not sctx.is_size_dependent(size_arg):
        return
    if lab is None:
        new = pieces
    else:
        kept = sctx.keep[lab]
        new, start = [], 0
        for n in pieces:
            new.append(int(kept[start:start + n].sum()))
            start += n
    target = op_name(node.target)
    if isinstance(node.target, torch._ops.OpOverload):  # aten split.Tensor / chunk take no sizes list
        node.target = torch.ops.aten.split_with_sizes.default
    elif target in ("chunk", "tensor_split"):
        if node.op == "call_method":
            node.target = "split"
        else:
            node.target = torch.split
    node.args = (x, list(new), d)
    node.kwargs = {}


register_channel_rule(torch.split, "split", torch_attr("split_with_sizes"), "split_with_sizes", torch.chunk,
                      "chunk", slim=_split_slim, handles_sizes=True)(_split_rule)


@register_channel_rule(torch.unbind, "unbind")
def _unbind(ctx):
    x = ctx.arg(0, "input")
    d = x.dim(ctx.value(1, "dim", 0))
    ctx.mix(x, d, "unbound into single slices")
    mapping = [e for e in range(x.ndim) if e != d]
    return tuple(_rearranged(x, mapping) for _ in ctx.out)


def _narrow_rule(ctx):
    x = ctx.arg(0, "input")
    d = x.dim(ctx.value(1, "dim"))
    start = int(ctx.value(2, "start"))
    start = start % x.shape[d] if start < 0 else start
    length = int(ctx.value(3, "length"))
    lab = ctx.labels(x, d) if ctx.has_channels(x, d) else None
    return _sliced(x, d, start, length, lab)


def _narrow_slim(sctx):
    node = sctx.node
    x = node.args[0]
    d = sctx.value(1, "dim") % len(sctx.shape(x))
    start = int(sctx.value(2, "start"))
    length = int(sctx.value(3, "length"))
    start = start % sctx.shape(x)[d] if start < 0 else start
    lab = sctx.channels(x).get(d)
    if lab is not None:
        kept = sctx.keep[lab]
        start, length = int(kept[:start].sum()), int(kept[start:start + length].sum())
    elif not (sctx.is_size_dependent(sctx.arg(2, "start")) or sctx.is_size_dependent(sctx.arg(3, "length"))):
        return
    node.args = (x, d, start, length)
    node.kwargs = {}


register_channel_rule(torch.narrow, "narrow", slim=_narrow_slim, handles_sizes=True)(_narrow_rule)


@register_channel_rule(torch.select, "select")
def _select(ctx):
    x = ctx.arg(0, "input")
    d = x.dim(ctx.value(1, "dim"))
    ctx.mix(x, d, "indexed by a single channel")
    return _rearranged(x, [e for e in range(x.ndim) if e != d])


# ----------------------------------------------------------------------------- indexing
def index_plan(index: Any, ndim: int) -> List[Tuple[Any, Optional[int], Optional[int]]]:
    """``(item, input dim, output dim)`` for each item of a basic index."""
    items = list(index) if isinstance(index, tuple) else [index]
    for it in items:
        if not (it is None or it is Ellipsis or isinstance(it, (int, slice)) or isinstance(it, fx.Node)):
            raise TypeError(f"advanced index item {type(it).__name__}")
    consuming = sum(1 for it in items if it is not None and it is not Ellipsis)
    if Ellipsis in items:
        k = items.index(Ellipsis)
        items = items[:k] + [slice(None)] * (ndim - consuming) + items[k + 1:]
    else:
        items = items + [slice(None)] * (ndim - consuming)
    plan = []
    i = o = 0
    for it in items:
        if it is None:
            plan.append((it, None, o))
            o += 1
        elif isinstance(it, slice):
            plan.append((it, i, o))
            i += 1
            o += 1
        else:  # an int (or a node holding one)
            plan.append((it, i, None))
            i += 1
    return plan


def _gather_plan(index: Any, ndim: int) -> Optional[Tuple[int, int]]:
    """``(dim, new dims)`` when ``index`` picks along one dim with an integer tensor and
    takes every other dim whole (``table[idx]``, ``x[:, idx]``), else None."""
    items = list(index) if isinstance(index, tuple) else [index]
    tensors = [i for i, it in enumerate(items) if isinstance(it, torch.Tensor)]
    if len(tensors) != 1 or Ellipsis in items:
        return None
    t = items[tensors[0]]
    if t.dtype == torch.bool or t.is_floating_point():
        return None
    if any(not (isinstance(it, slice) and it == slice(None)) for i, it in enumerate(items) if i != tensors[0]):
        return None
    return tensors[0], t.dim()


def _getitem(ctx):
    obj = ctx.arg(0)
    idx_info = ctx.arg(1)
    if isinstance(obj, (tuple, list)):
        item = obj[ctx.value(1)]
        return item if not isinstance(item, (tuple, list)) else item
    if isinstance(obj, dict):
        return obj[ctx.value(1)]
    if isinstance(obj, Const):
        idx = ctx.value(1)
        if obj.items is not None:
            sel = obj.items[idx]
            if isinstance(idx, slice):
                deps = [s for s in sel if s is not None]
                return Const(None, torch.cat(deps) if deps else None, tuple(sel))
            return Const(None, sel)
        return Const(None, obj.deps)
    if not isinstance(obj, TensorInfo):
        return None
    index = ctx.value(1)
    gathered = _gather_plan(index, obj.ndim)
    if gathered is not None:  # table[idx]: one dim indexed by a tensor
        d, n_new = gathered
        if ctx.has_channels(obj, d):
            ctx.mix(obj, d, "gathered by a tensor index")
        return _rearranged(obj, list(range(d)) + [None] * n_new + list(range(d + 1, obj.ndim)))
    try:
        plan = index_plan(index, obj.ndim)
    except TypeError as exc:
        if any(ctx.has_channels(obj, d) for d in range(obj.ndim)):
            raise UnsupportedOpError(
                f"{ctx.describe()}: {exc} on a tensor with channels; register a rule for this "
                f"indexing or index before the channels are formed") from None
        return None
    out = Labels()
    for it, i, o in plan:
        if i is None:
            continue
        has = ctx.has_channels(obj, i)
        if not isinstance(it, slice):
            if has:
                ctx.mix(obj, i, "indexed by a single channel")
            continue
        if not has:
            continue
        rng = range(obj.shape[i])[it]
        if rng.start == 0 and rng.step == 1 and len(rng) == obj.shape[i]:
            if i in obj.labels:
                out[o] = obj.labels[i]
            else:
                out.lazy[o] = obj.lazy[i]
            continue
        lab = ctx.labels(obj, i)
        if rng.step != 1 and len(rng) > 1:
            ctx.mix(obj, i, "sliced with a step")
            continue
        out[o] = lab[list(rng)] if len(rng) else lab[:0]
    # indexes that depend on channel counts on unlabelled dims are rewritten by slim
    return out


def _getitem_slim(sctx):
    node = sctx.node
    x = node.args[0]
    x_shape = sctx.shape(x)
    if not isinstance(sctx.groups.node_channels.get(x.name), dict):
        return  # indexing a tuple, a dict or a size: nothing to rewrite
    index = node.args[1]
    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(it, fx.Node) and isinstance(sctx.groups.node_channels.get(it.name), dict) for it in items):
        return  # a gather by a tensor index: its sizes follow the tensors
    ch = sctx.channels(x)
    plan = index_plan(index, len(x_shape))
    concrete = sctx.concrete_index(index)
    cplan = index_plan(concrete, len(x_shape))
    changed = False
    new_items = []
    for (it, i, o), (cit, _, _) in zip(plan, cplan):
        if i is not None and isinstance(cit, slice):
            rng = range(x_shape[i])[cit]
            if i in ch:
                kept = sctx.keep[ch[i]]
                if not (rng.start == 0 and rng.step == 1 and len(rng) == x_shape[i]):
                    start = int(kept[:rng.start].sum())
                    n = int(kept[list(rng)].sum()) if len(rng) else 0
                    new_items.append(slice(start, start + n))
                    changed = True
                    continue
                if isinstance(it, slice) and any(sctx.is_size_dependent(b) for b in (it.start, it.stop, it.step)):
                    new_items.append(slice(None))
                    changed = True
                    continue
            elif isinstance(it, slice) and any(sctx.is_size_dependent(b) for b in (it.start, it.stop, it.step)):
                new_items.append(slice(rng.start, rng.stop if rng.stop >= 0 else None, rng.step))
                changed = True
                continue
        elif i is not None and sctx.is_size_dependent(it):
            new_items.append(cit)
            changed = True
            continue
        new_items.append(it)
    if changed:
        node.args = (x, tuple(new_items))


register_channel_rule(operator.getitem, slim=_getitem_slim, handles_sizes=True)(_getitem)


# ----------------------------------------------------------------------------- sizes
@register_channel_rule("size", handles_sizes=True)
def _size(ctx):
    x = ctx.arg(0)
    d = ctx.value(1, "dim", None)
    if d is None:
        items = tuple(ctx.labels(x, e) if ctx.has_channels(x, e) else None for e in range(x.ndim))
        deps = [i for i in items if i is not None]
        return Const(None, torch.cat(deps) if deps else None, items)
    return Const(None, ctx.labels(x, d) if ctx.has_channels(x, d) else None)


@register_channel_rule(builtins.getattr, handles_sizes=True)
def _getattr(ctx):
    x = ctx.arg(0)
    attr = ctx.value(1)
    if not isinstance(x, TensorInfo):
        return None
    if attr == "shape":
        items = tuple(ctx.labels(x, e) if ctx.has_channels(x, e) else None for e in range(x.ndim))
        deps = [i for i in items if i is not None]
        return Const(None, torch.cat(deps) if deps else None, items)
    if attr in ("ndim", "dtype", "device", "is_cuda", "requires_grad", "layout", "is_sparse"):
        return None
    if attr in ("T", "mT"):
        return _rearranged(x, list(range(x.ndim))[::-1] if attr == "T" else
                           list(range(x.ndim - 2)) + [x.ndim - 1, x.ndim - 2])
    if attr in ("data",):
        return ctx.same_as(x)
    raise UnsupportedOpError(f"no channel rule for attribute '{attr}' of a tensor at {ctx.describe()}")


@register_channel_rule("dim", "ndimension", "is_contiguous", "get_device", "element_size")
def _no_channel_int(ctx):
    return None


@register_channel_rule("numel", torch.numel, builtins.len, handles_sizes=True)
def _numel(ctx):
    x = ctx.arg(0)
    if not isinstance(x, TensorInfo):
        return None
    dims = range(x.ndim) if ctx.node.target is not builtins.len else range(min(1, x.ndim))
    deps = [ctx.labels(x, e) for e in dims if ctx.has_channels(x, e)]
    return Const(None, torch.cat(deps) if deps else None)


# ----------------------------------------------------------------------------- shuffles
def _shuffle_labels(ctx, lab: torch.Tensor, groups: int) -> torch.Tensor:
    """Channel shuffle = view(g, C/g) -> transpose -> view(C): coupled to stay a grid."""
    c = lab.numel()
    E, k = couple(ctx, ctx.resolve(lab).view(groups, c // groups))
    T = E.t().contiguous().reshape(-1)
    return T


@register_channel_rule(nn.ChannelShuffle, torch_attr("nn.functional.channel_shuffle"),
                       torch_attr("channel_shuffle"), torch_attr("native_channel_shuffle"))
def _channel_shuffle(ctx):
    x = ctx.arg(0, "input")
    groups = ctx.module.groups if ctx.node.op == "call_module" else int(ctx.value(1, "groups"))
    out = ctx.same_as(x)
    if ctx.has_channels(x, 1):
        out[1] = _shuffle_labels(ctx, ctx.labels(x, 1), groups)
    return out


@register_channel_rule(nn.PixelShuffle, F.pixel_shuffle, torch.pixel_shuffle)
def _pixel_shuffle(ctx):
    """(N, C*r*r, H, W) -> (N, C, H*r, W*r): each block of r*r channels is one channel."""
    x = ctx.arg(0, "input")
    r = ctx.module.upscale_factor if ctx.node.op == "call_module" else int(ctx.value(1, "upscale_factor"))
    cd = x.ndim - 3
    for d in range(cd + 1, x.ndim):
        ctx.mix(x, d, "pixel-shuffled")
    out = Labels()
    if ctx.has_channels(x, cd):
        rows = ctx.labels(x, cd).view(-1, r * r)
        for j in range(1, r * r):
            ctx.unify(rows[:, 0], rows[:, j])
        out[cd] = rows[:, 0].clone()
    return out


@register_channel_rule(nn.PixelUnshuffle, F.pixel_unshuffle, torch.pixel_unshuffle)
def _pixel_unshuffle(ctx):
    x = ctx.arg(0, "input")
    r = ctx.module.downscale_factor if ctx.node.op == "call_module" else int(ctx.value(1, "downscale_factor"))
    cd = x.ndim - 3
    for d in range(cd + 1, x.ndim):
        ctx.mix(x, d, "pixel-unshuffled")
    out = Labels()
    if ctx.has_channels(x, cd):
        out[cd] = ctx.labels(x, cd).repeat_interleave(r * r)
    return out
