"""Convolutions, transposed convolutions, linear layers and matrix products.

A conv's output channels are a new channel vector (its weight's dim 0, its bias); its
input channels are its weight's dim 1 and it sums over them (masks go in front of it).

Grouped convs keep their group structure exactly, by coupling:

- depthwise-like (``groups > 1`` and one input or one output channel per group): whole
  conv groups are removed; output channel ``k*b + i`` has input channel ``k``'s atom,
  ``groups`` becomes the number of kept input groups;
- other grouped convs (ResNeXt, RegNet): the same positions are removed in every conv
  group (input ``k*a + j`` is coupled across ``k``, output ``k*b + i`` likewise), so
  ``groups`` stays and every group shrinks equally.

    conv(x)           # x (N, Cin, H, W) -> (N, Cout, H', W'): weight (Cout, Cin/g, kh, kw)
    linear(x)         # x (..., Fin) -> (..., Fout): weight (Fout, Fin)
    a @ b             # (..., n, k) @ (..., k, m): the k channels of a and b are one
"""
from __future__ import annotations

import operator
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import Labels, register_channel_rule, torch_attr
from ._types import TensorInfo
from .elementwise import broadcast_labels

_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def conv_mode(groups: int, c_in: int, c_out: int) -> str:
    """'dense' (groups == 1), 'groupwise' (one in or out channel per group) or 'positional'."""
    if groups == 1:
        return "dense"
    if c_in // groups == 1 or c_out // groups == 1:
        return "groupwise"
    return "positional"


def conv_channels(ctx, x: TensorInfo, cd: int, wl: Callable[[int], Optional[torch.Tensor]],
                  bl: Callable[[], Optional[torch.Tensor]], groups: int, c_in: int, c_out: int,
                  transposed: bool, weight: Optional[Tuple[str, int]]) -> torch.Tensor:
    """Atoms of a (transposed) conv's output channels; see the module docstring.

    ``wl(d, follow)`` gives the atoms of the weight's dim ``d``, ``bl(follow)`` the bias'
    (or None); ``follow`` is what they are joined with (see ``RuleContext.param``).
    """
    a, b = c_in // groups, c_out // groups
    xin = ctx.labels(x, cd)

    def fixed(*labels: Optional[torch.Tensor]) -> Optional[str]:
        """The reason of the pin a join of ``labels`` makes when one is fixed (None); None
        when none is: naming the node costs more than the rest of the rule."""
        if all(lab is not None for lab in labels):
            return None
        return f"{ctx.describe()} reads channels that are fixed (a graph input or a tensor made in forward)"

    mode = conv_mode(groups, c_in, c_out)
    if mode == "groupwise":
        if xin is None:
            out = ctx.fresh(c_out)
            ctx.pin(out, fixed(None))
        else:
            rows = xin.view(groups, a)
            for j in range(1, a):
                ctx.unify(rows[:, 0], rows[:, j])
            out = rows[:, 0].repeat_interleave(b)
        w_in = out.view(groups, b)[:, 0].repeat_interleave(a) if transposed and xin is None else xin
        target = w_in if transposed else out
        ctx.join(wl(0, target), target)
    else:
        if xin is not None and groups > 1:
            rows = xin.view(groups, a)
            for k in range(1, groups):
                ctx.unify(rows[0], rows[k])
        out_pos = ctx.fresh(b)
        out = out_pos.repeat(groups)
        if transposed:
            w0 = wl(0, xin)
            ctx.join(w0, xin, reason=fixed(w0, xin))
            ctx.join(wl(1, out_pos), out_pos)
        else:
            x0 = None if xin is None else xin.view(groups, a)[0]
            w1 = wl(1, x0)
            ctx.join(w1, x0, reason=fixed(w1, x0))
            ctx.join(wl(0, out), out)
        ctx.contract(x, cd, weight)
    bias = bl(out)
    if bias is not None:
        ctx.join(bias, out)
    return out


def _pin_spatial(ctx, x: TensorInfo, cd: int) -> None:
    for d in range(x.ndim):
        if d != cd:
            ctx.mix(x, d, "spatially mixed")


def _conv_module(ctx):
    m = ctx.module
    x = ctx.arg(0, "input")
    transposed = isinstance(m, _CONVT_MODULES)
    cd = x.ndim - len(m.kernel_size) - 1
    _pin_spatial(ctx, x, cd)
    prefix = ctx.node.target
    out = conv_channels(
        ctx, x, cd, lambda d, follow: ctx.param("weight", d, follow=follow),
        lambda follow: ctx.param("bias", 0, follow=follow) if m.bias is not None else None,
        m.groups, m.in_channels, m.out_channels, transposed,
        (f"{prefix}.weight", 0 if transposed else 1))
    return {cd: out}


def _conv_module_slim(sctx):
    m = sctx.module
    node = sctx.node
    x = node.args[0] if node.args else node.kwargs["input"]
    transposed = isinstance(m, _CONVT_MODULES)
    cd = len(sctx.shape(x)) - len(m.kernel_size) - 1
    new_in = sctx.kept_count(x, cd, m.in_channels)
    new_out = sctx.kept_count(node, cd, m.out_channels)
    if conv_mode(m.groups, m.in_channels, m.out_channels) == "groupwise":
        per_group = m.in_channels // m.groups
        m.groups = new_in // per_group
    m.in_channels, m.out_channels = new_in, new_out


register_channel_rule(*_CONV_MODULES, *_CONVT_MODULES, slim=_conv_module_slim)(_conv_module)


_FUNCTIONAL_CONVS = {f: False for f in (F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d)}
_FUNCTIONAL_CONVS.update({f: True for f in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
                                              torch.conv_transpose1d, torch.conv_transpose2d,
                                              torch.conv_transpose3d)})
# the ATen ops of an exported graph take the same arguments in the same places
_ATEN = torch.ops.aten
for _n in (1, 2, 3):
    for _packet, _transposed in ((f"conv{_n}d", False), (f"conv_transpose{_n}d", True)):
        _op = getattr(_ATEN, _packet)
        _FUNCTIONAL_CONVS.update({getattr(_op, o): _transposed for o in _op.overloads()})
_GROUPS_POS = {False: 6, True: 6}  # conv(x, w, b, stride, padding, dilation, groups); convT(.., output_padding, groups)


def _conv_function(ctx):
    transposed = _FUNCTIONAL_CONVS[ctx.node.target]
    x, w = ctx.arg(0, "input"), ctx.arg(1, "weight")
    b = ctx.arg(2, "bias", None)
    groups = int(ctx.value(6, "groups", 1))
    cd = x.ndim - (w.ndim - 2) - 1
    _pin_spatial(ctx, x, cd)
    if transposed:
        c_in, c_out = w.shape[0], w.shape[1] * groups
    else:
        c_in, c_out = w.shape[1] * groups, w.shape[0]
    out = conv_channels(
        ctx, x, cd, lambda d, follow: ctx.labels(w, d),
        lambda follow: ctx.labels(b, 0) if isinstance(b, TensorInfo) else None,
        groups, c_in, c_out, transposed, ctx.weight_name(w, 0 if transposed else 1))
    return {cd: out}


def _conv_function_slim(sctx):
    node = sctx.node
    transposed = _FUNCTIONAL_CONVS[node.target]
    groups = sctx.value(6, "groups", 1)
    w_shape = sctx.shape(sctx.arg(1, "weight"))
    x = sctx.arg(0, "input")
    cd = len(sctx.shape(x)) - (len(w_shape) - 2) - 1
    if transposed:
        c_in, c_out = w_shape[0], w_shape[1] * groups
    else:
        c_in, c_out = w_shape[1] * groups, w_shape[0]
    if conv_mode(groups, c_in, c_out) == "groupwise":
        new_in = sctx.kept_count(x, cd, c_in)
        sctx.set_arg(6, "groups", new_in // (c_in // groups))


register_channel_rule(*_FUNCTIONAL_CONVS, slim=_conv_function_slim)(_conv_function)


def _linear_channels(ctx, x: TensorInfo, wl, bl, weight) -> Labels:
    xin = ctx.labels(x, -1)
    w1 = wl(1, xin)
    ctx.join(w1, xin, reason=None if w1 is not None and xin is not None else
             f"{ctx.describe()} reads features that are fixed (a graph input or a tensor made in forward)")
    ctx.contract(x, -1, weight)
    w0 = wl(0, None)  # made before the output atoms: it cannot follow them
    out = ctx.fresh(w0.numel() if w0 is not None else ctx.out_shape[-1])
    ctx.join(w0, out)
    bias = bl(out)
    if bias is not None:
        ctx.join(bias, out)
    labels = Labels({d: l for d, l in x.labels.items() if d != x.ndim - 1})
    labels.lazy = {d: l for d, l in x.lazy.items() if d != x.ndim - 1}
    labels[x.ndim - 1] = out
    return labels


@register_channel_rule(nn.Linear, slim=lambda sctx: _linear_slim(sctx))
def _linear_module(ctx):
    """linear(x): x (..., Fin) -> (..., Fout); in features may be flattened channels."""
    m = ctx.module
    x = ctx.arg(0, "input")
    return _linear_channels(ctx, x, lambda d, follow: ctx.param("weight", d, follow=follow),
                            lambda follow: ctx.param("bias", 0, follow=follow) if m.bias is not None else None,
                            (f"{ctx.node.target}.weight", 1))


def _linear_slim(sctx):
    m = sctx.module
    m.in_features = m.weight.shape[1]
    m.out_features = m.weight.shape[0]


@register_channel_rule(F.linear, torch_attr("_C._nn.linear"), _ATEN.linear.default)
def _linear_function(ctx):
    x, w = ctx.arg(0, "input"), ctx.arg(1, "weight")
    b = ctx.arg(2, "bias", None)
    return _linear_channels(ctx, x, lambda d, follow: ctx.labels(w, d),
                            lambda follow: ctx.labels(b, 0) if isinstance(b, TensorInfo) else None,
                            ctx.weight_name(w, 1))


@register_channel_rule(torch.addmm, _ATEN.addmm.default)
def _addmm(ctx):
    """addmm(bias, x, w) = bias + x @ w with w (Fin, Fout): a linear layer with its weight
    transposed (Hugging Face's Conv1D)."""
    b, x, w = ctx.arg(0, "input"), ctx.arg(1, "mat1"), ctx.arg(2, "mat2")
    return _linear_channels(ctx, x, lambda d, follow: ctx.labels(w, 1 - d),
                            lambda follow: ctx.labels(b, -1) if isinstance(b, TensorInfo) else None,
                            ctx.weight_name(w, 0))


@register_channel_rule(operator.matmul, torch.matmul, torch.mm, torch.bmm, "matmul", "mm", "bmm",
                       "__matmul__", _ATEN.matmul.default, _ATEN.mm.default, _ATEN.bmm.default)
def _matmul(ctx):
    """a @ b: the contracted dims of a and b share atoms; batch dims broadcast."""
    a, b = ctx.arg(0, "input"), ctx.arg(1, "other" if ctx.node.op != "call_method" else "mat2")
    if not isinstance(a, TensorInfo) or not isinstance(b, TensorInfo):
        return None
    if a.ndim < 2 or b.ndim < 2:
        for x in (a, b):
            for d in range(x.ndim):
                ctx.mix(x, d, "contracted by a vector product")
        return None
    ka, kb = ctx.labels(a, -1), ctx.labels(b, -2)
    if ka is not None or kb is not None:
        ctx.join(ka, kb)
        wa, wb = ctx.weight_name(a, -1), ctx.weight_name(b, -2)
        if wb is not None or wa is None:
            ctx.contract(a, -1, wb)  # mask the activation; the parameter reads it
        else:
            ctx.contract(b, -2, wa)
    return product_labels(ctx, [a, b], a, b)


def product_labels(ctx, operands, rows: TensorInfo, cols: TensorInfo) -> Labels:
    """Output channels of a batched product ``(..., n, k) x (..., k, m) -> (..., n, m)``:
    the operands' batch dims broadcast together, rows from ``rows``' dim -2, columns
    from ``cols``' dim -1."""
    out_shape = ctx.out_shape
    nd = len(out_shape)
    batch = broadcast_labels(ctx, [_batch_view(x) for x in operands], out_shape[:-2]) if nd > 2 else Labels()
    out = Labels(batch)
    out.lazy = dict(batch.lazy)
    for src, sd, od in ((rows, rows.ndim - 2, nd - 2), (cols, cols.ndim - 1, nd - 1)):
        if sd in src.labels:
            out[od] = src.labels[sd]
        elif sd in src.lazy:
            out.lazy[od] = src.lazy[sd]
    return out


def _batch_view(x: TensorInfo) -> TensorInfo:
    v = TensorInfo(x.shape[:-2], x.dtype, x.origin)
    v.labels = {d: l for d, l in x.labels.items() if d < x.ndim - 2}
    v.lazy = {d: l for d, l in x.lazy.items() if d < x.ndim - 2}
    return v
