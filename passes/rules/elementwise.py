"""Elementwise ops and activations: output channels = the (broadcast) operands' channels.

All tensor operands that are not broadcast along a dim share that dim's channels
(``a + b`` of two feature maps: one group; ``x * gate`` with ``gate`` of shape
``(N, C, 1, 1)``: the squeeze-excitation gate joins ``x``'s channels; ``x * w`` with a
parameter ``w`` of shape ``(C, 1, 1)``: ``w`` becomes a member). An operand whose
channels are fixed (a graph input, a constant made in ``forward``) pins them.

    relu(x)              # (N, C, H, W) -> same channels
    a + b                # channels of a == channels of b == output channels
    x * se(x)            # (N, C, H, W) * (N, C, 1, 1): one group
    x.size(1) // 2       # int arithmetic: keeps track of channel-count dependence
"""
from __future__ import annotations

import operator
from typing import Any, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import Labels, register_channel_rule, torch_attr
from ._types import Const, LazyDim, TensorInfo


def broadcast_labels(ctx, operands: List[TensorInfo], out_shape) -> Labels:
    """Join the operands' channels dim by dim under broadcasting (see module docstring)."""
    nd = len(out_shape)
    out = Labels()
    for d in range(nd):
        labelled: List[torch.Tensor] = []
        lazies: List[tuple] = []
        fixed: Optional[TensorInfo] = None
        for op in operands:
            od = d - (nd - op.ndim)
            if od < 0 or op.shape[od] != out_shape[d]:
                continue  # broadcast along d
            lab = op.labels.get(od)
            if lab is not None:
                labelled.append(lab)
            elif od in op.lazy:
                lazies.append((op, od))
            elif fixed is None:
                fixed = op
        if labelled:
            for op, od in lazies:
                labelled.append(ctx.labels(op, od))
            first = labelled[0]
            for other in labelled[1:]:
                ctx.unify(first, other)
            if fixed is not None and out_shape[d] > 1:
                ctx.pin(first, f"combined by {ctx.describe()} with '{fixed.origin}', whose dim {d} "
                               f"is fixed (a graph input or a tensor made in forward)")
            out[d] = first
        elif lazies and fixed is None:
            parts = tuple(op.lazy[od] for op, od in lazies)
            out.lazy[d] = parts[0] if len(parts) == 1 else LazyDim(parts=parts)
    return out


def elementwise(ctx) -> Any:
    """All tensor arguments are broadcast operands; ints: channel-count arithmetic."""
    operands = ctx.tensors()
    if not isinstance(ctx.out, torch.Tensor):
        if isinstance(ctx.out, (int, float, bool)) or ctx.out is None:
            return ctx.const(*ctx.args, *ctx.kwargs.values())
        return None
    out = broadcast_labels(ctx, operands, ctx.out_shape)
    # a channel count used as a tensor operand (x * x.size(1)) cannot follow slimming
    for a in list(ctx.args) + list(ctx.kwargs.values()):
        if isinstance(a, Const) and a.deps is not None:
            ctx.pin(a.deps, f"a channel count is used as a value by {ctx.describe()}")
    return out


def first_operand(ctx) -> Any:
    """Ops whose output has the shape and channels of their first argument only."""
    x = ctx.arg(0, "input")
    if isinstance(x, TensorInfo) and isinstance(ctx.out, torch.Tensor) and tuple(ctx.out.shape) == x.shape:
        return ctx.same_as(x)
    if isinstance(x, TensorInfo) and isinstance(ctx.out, torch.Tensor):
        return broadcast_labels(ctx, [x], ctx.out_shape)
    return None


def fixed_output(ctx) -> Any:
    """Creation ops (torch.zeros(...)): a fresh tensor whose channels are fixed."""
    return None


_ACTIVATION_MODULES = [
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.Hardshrink, nn.Softshrink, nn.RReLU,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout,
]
# relu(x)  # (N, C, ...) -> same channels; dropout2d zeroes whole channels at random in
# training and is the identity in eval, so it keeps channels too.
register_channel_rule(*_ACTIVATION_MODULES)(first_operand)

_UNARY_FUNCTIONS = [
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.leaky_relu_, F.elu, F.elu_,
    F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.hardtanh_,
    F.softplus, F.softsign, F.tanhshrink, F.logsigmoid, F.hardshrink, F.softshrink, F.threshold,
    F.rrelu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, torch.exp, torch.log, torch.sqrt,
    torch.rsqrt, torch.abs, torch.neg, torch.square, torch.erf, torch.sign, torch.sin, torch.cos,
    torch.reciprocal, torch.log1p, torch.expm1, torch.floor, torch.ceil, torch.round, torch.trunc,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    torch.dropout, torch.clone, torch.detach, operator.neg, operator.pos, operator.abs,
    torch.nan_to_num, torch.logit, operator.invert, operator.not_, torch.logical_not, torch.bitwise_not,
]
register_channel_rule(*_UNARY_FUNCTIONS)(first_operand)

_UNARY_METHODS = [
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "exp_", "log", "sqrt", "rsqrt",
    "abs", "neg", "square", "sign", "erf", "reciprocal", "floor", "ceil", "round", "sin", "cos",
    "contiguous", "clone", "detach", "detach_", "float", "half", "double", "bfloat16", "to", "type",
    "type_as", "cpu", "cuda", "requires_grad_", "nan_to_num", "log1p", "expm1",
    "hardswish", "hardsigmoid", "silu", "gelu", "softplus", "mish", "elu", "leaky_relu", "relu6",
    "logical_not", "bitwise_not", "__invert__",
]
register_channel_rule(*_UNARY_METHODS)(first_operand)

# a + b, a * b, torch.where(c, a, b), clamp(x, lo_tensor, hi_tensor): broadcast operands
_BINARY_FUNCTIONS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
    operator.pow, operator.iadd, operator.isub, operator.imul, operator.itruediv,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide,
    torch.true_divide, torch.floor_divide, torch.pow, torch.maximum, torch.minimum, torch.fmod,
    torch.remainder, torch.where, torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max,
    torch.lerp, torch.addcmul, torch.addcdiv, torch.rsub, torch.masked_fill, torch.hypot,
    torch.atan2, torch.logical_and, torch.logical_or, torch.eq, torch.ne, torch.gt, torch.ge,
    torch.lt, torch.le, operator.eq, operator.ne, operator.gt, operator.ge, operator.lt,
    operator.le, operator.and_, operator.or_, operator.xor,
]
register_channel_rule(*_BINARY_FUNCTIONS, handles_sizes=True)(elementwise)

_BINARY_METHODS = [
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "true_divide", "floor_divide",
    "pow", "pow_", "maximum", "minimum", "fmod", "remainder", "where", "clamp", "clamp_", "clip",
    "clamp_min", "clamp_max", "lerp", "addcmul", "addcdiv", "masked_fill", "masked_fill_", "eq",
    "ne", "gt", "ge", "lt", "le", "rsub", "__radd__", "__rmul__", "__rsub__", "__rtruediv__",
]
register_channel_rule(*_BINARY_METHODS)(elementwise)


# torch.zeros_like(x): the shape follows x, so do its channels
register_channel_rule(torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like,
                      torch.rand_like, torch.randn_like, torch.randint_like)(first_operand)
register_channel_rule("zero_", "fill_", "normal_", "uniform_", "bernoulli_")(first_operand)

# torch.zeros(n, c, h, w) and friends: fixed channels (their size arguments, if computed
# from channel counts, pin those channels: see ChannelRule.handles_sizes)
register_channel_rule(
    torch.zeros, torch.ones, torch.empty, torch.full, torch.rand, torch.randn, torch.randint,
    torch.arange, torch.linspace, torch.tensor, torch.as_tensor, torch.eye, torch.scalar_tensor,
    "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor",
)(fixed_output)


@register_channel_rule(torch_attr("_assert"), torch_attr("_assert_async"), torch_attr("fx._symbolic_trace._assert_is_none"))
def _no_channels(ctx):
    """Checks (torch._assert): no tensor output."""
    return None


def _prelu_module(ctx):
    """prelu(x) with one slope per channel: the slopes are members of x's channel group."""
    x = ctx.arg(0)
    m = ctx.module
    if m.num_parameters > 1:
        cd = 1 if x.ndim >= 2 else 0
        ctx.join(ctx.labels(x, cd), ctx.param("weight", 0))
    return ctx.same_as(x)


def _prelu_module_slim(sctx):
    m = sctx.module
    if m.num_parameters > 1:
        m.num_parameters = m.weight.shape[0]


register_channel_rule(nn.PReLU, slim=_prelu_module_slim)(_prelu_module)


@register_channel_rule(F.prelu, torch.prelu)
def _prelu_function(ctx):
    """F.prelu(x, w): w (C,) follows x's dim 1 (not its last dim)."""
    x, w = ctx.arg(0, "input"), ctx.arg(1, "weight")
    if isinstance(w, TensorInfo) and w.shape and w.shape[0] > 1:
        cd = 1 if x.ndim >= 2 else 0
        ctx.join(ctx.labels(x, cd), ctx.labels(w, 0))
    return ctx.same_as(x)
