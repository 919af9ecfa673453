"""ATen ops: what a graph captured by torch.export computes with (``passes.capture``).

The default export IR (no decomposition) keeps the ops a model calls, one ATen overload
each: ``F.linear`` is ``aten.linear.default``, ``x.view(...)`` is ``aten.view.default``,
``x[:, :k]`` is ``aten.slice.Tensor``. Where an overload takes the arguments of the
torch function (or method) in the same places, it gets that function's rule; the few
that differ have their own rule here:

    aten.embedding(weight, ids)            # the table first: F.embedding(ids, weight)
    aten.index_select(x, dim, idx) / aten.index.Tensor(x, [None, idx])   # a gather: pinned
    aten.triu / aten.tril / aten.cumsum / aten.diff   # positional along their dims: pinned there

Capture turns the ATen ops that take sizes into the calls symbolic tracing records
(``x.view(sizes)``, ``x.size(d)``, ``x[:, a:b]``, ``torch.arange(n)``: the ONNX exporter
follows those sizes), so their rules are those of :mod:`passes.rules.shape`.
Ops that read no channel (masks built from shapes, ``arange``, ``full``) need no rule
(:func:`passes.channel_groups.find_channel_groups` passes them), so this file lists
only the ops a channel can flow through.
"""
from __future__ import annotations

import torch

from . import attention, conv, elementwise, norm, pooling, shape
from .registry import Labels, op_name, register_channel_rule
from ._types import TensorInfo

aten = torch.ops.aten


def _ops(*names: str):
    """The overloads ``"packet.overload"`` this torch has."""
    out = []
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(aten, packet, None), overload or "default", None)
        if op is not None:
            out.append(op)
    return out


# ----------------------------------------------------------------------------- same arguments
register_channel_rule(*_ops("scaled_dot_product_attention"),
                      slim=attention._sdpa_slim)(attention._scaled_dot_product_attention)
register_channel_rule(*_ops("layer_norm", "rms_norm"), slim=norm._layer_norm_function_slim,
                      handles_sizes=True)(norm._layer_norm_function)
register_channel_rule(*_ops("group_norm"), slim=norm._group_norm_function_slim)(norm._group_norm_function)
register_channel_rule(*(op for op in conv._FUNCTIONAL_CONVS if isinstance(op, torch._ops.OpOverload)),
                      slim=conv._conv_function_slim)(conv._conv_function)

register_channel_rule(*_ops("permute", "transpose.int", "t", "movedim.int"))(shape._permute)
register_channel_rule(*_ops("unsqueeze"))(shape._unsqueeze)
register_channel_rule(*_ops("squeeze", "squeeze.dim", "squeeze.dims"))(shape._squeeze)
register_channel_rule(*_ops("cat"))(shape._cat_rule)
register_channel_rule(*_ops("stack"))(shape._stack)
register_channel_rule(*_ops("split.Tensor", "split_with_sizes", "chunk"), slim=shape._split_slim,
                      handles_sizes=True)(shape._split_rule)
register_channel_rule(*_ops("unbind.int"))(shape._unbind)
register_channel_rule(*_ops("narrow"), slim=shape._narrow_slim, handles_sizes=True)(shape._narrow_rule)
register_channel_rule(*_ops("select.int"))(shape._select)
register_channel_rule(*_ops("flatten.using_ints"))(shape._flatten)
register_channel_rule(*_ops("unflatten.int"), slim=shape._unflatten_slim, handles_sizes=True)(shape._flatten)

# max_pool2d(x, kernel, ...), adaptive_avg_pool2d(x, size), ...: spatial dims pooled, channels kept
register_channel_rule(*_ops(*(f"{p}{k}d" for p in ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool")
                              for k in (1, 2, 3)),
                            *(f"max_pool{k}d_with_indices" for k in (1, 2, 3))))(pooling._pool_function)

# reductions: mean.dim(x, dims, keepdim), sum.dim_IntList(x, dims, keepdim, dtype=), ...
for _name in ("mean", "sum", "amax", "amin", "std", "var", "prod", "logsumexp", "argmax", "argmin", "any", "all"):
    register_channel_rule(*_ops(_name, f"{_name}.dim", f"{_name}.dim_IntList", f"{_name}.correction"))(
        pooling._make_reduce(_name))
register_channel_rule(*_ops("max.dim", "min.dim"))(pooling._max_min)
register_channel_rule(*_ops("linalg_vector_norm"))(pooling._vector_norm)
register_channel_rule(*_ops("norm.ScalarOpt_dim", "norm.Scalar"))(pooling._norm)
register_channel_rule(*_ops("softmax.int", "_softmax", "log_softmax.int", "_log_softmax"))(pooling._softmax_function)

# relu(x), x.float() (aten._to_copy), dropout(x, p, train), x ** 2 (pow.Tensor_Scalar): x's channels
register_channel_rule(*_ops(
    "relu", "relu_", "gelu", "gelu_", "silu", "silu_", "tanh", "sigmoid", "hardtanh", "hardtanh_", "hardswish",
    "hardsigmoid", "leaky_relu", "elu", "mish", "softplus", "neg", "exp", "log", "sqrt", "rsqrt", "abs", "erf",
    "sin", "cos", "square", "reciprocal", "sign", "floor", "ceil", "round", "log1p", "expm1", "nan_to_num",
    "dropout", "feature_dropout", "alpha_dropout", "clone", "contiguous", "alias", "detach", "lift_fresh_copy",
    "_to_copy", "to.dtype", "to.dtype_layout", "to.device", "type_as", "pow.Tensor_Scalar", "clamp", "clamp_min",
    "clamp_max", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
    "logical_not", "bitwise_not"))(elementwise.first_operand)

# a + b, x * mask, torch.where(c, a, b): broadcast operands
register_channel_rule(*_ops(
    "add.Tensor", "add.Scalar", "add_.Tensor", "sub.Tensor", "sub.Scalar", "rsub.Tensor", "rsub.Scalar",
    "mul.Tensor", "mul.Scalar", "mul_.Tensor", "div.Tensor", "div.Scalar", "div.Tensor_mode", "div.Scalar_mode",
    "pow.Tensor_Tensor", "pow.Scalar", "maximum", "minimum", "fmod.Tensor", "fmod.Scalar", "remainder.Tensor",
    "remainder.Scalar", "floor_divide", "where.self", "where.ScalarOther", "where.ScalarSelf", "where.Scalar",
    "masked_fill.Scalar", "masked_fill.Tensor", "clamp.Tensor", "lerp.Scalar", "lerp.Tensor", "addcmul",
    "addcdiv", "eq.Tensor", "eq.Scalar", "ne.Tensor", "ne.Scalar", "gt.Tensor", "gt.Scalar", "ge.Tensor",
    "ge.Scalar", "lt.Tensor", "lt.Scalar", "le.Tensor", "le.Scalar", "logical_and", "logical_or",
    "bitwise_and.Tensor", "bitwise_or.Tensor", "__and__.Tensor", "__or__.Tensor"), handles_sizes=True)(
    elementwise.elementwise)

# new tensors whose shape may read a channel count: fixed channels
register_channel_rule(*_ops("new_zeros", "new_ones", "new_empty", "new_full"))(elementwise.fixed_output)


# ----------------------------------------------------------------------------- own arguments
@register_channel_rule(*_ops("batch_norm", "instance_norm"))
def _batch_norm(ctx):
    """aten.batch_norm(x, weight, bias, running_mean, running_var, training, ...): every
    per-channel tensor follows x's dim 1 (F.batch_norm takes the statistics first)."""
    x = ctx.arg(0, "input")
    per_channel = [ctx.arg(i, n, None) for i, n in ((1, "weight"), (2, "bias"), (3, "running_mean"),
                                                     (4, "running_var"))]
    norm._per_channel(ctx, x, 1 if x.ndim >= 2 else 0,
                      [ctx.labels(t, 0) for t in per_channel if isinstance(t, TensorInfo)])
    return ctx.same_as(x)


@register_channel_rule(*_ops("embedding"))
def _embedding(ctx):
    """aten.embedding(weight, ids, padding_idx, ...): the table's columns are the output's
    last dim (see :mod:`passes.rules.embedding`)."""
    table, ids = ctx.arg(0, "weight"), ctx.arg(1, "indices")
    for d in range(ids.ndim if isinstance(ids, TensorInfo) else 0):
        ctx.mix(ids, d, "used as token ids")
    out = Labels()
    if ctx.has_channels(table, 1):
        out[len(ctx.out_shape) - 1] = ctx.labels(table, 1)
    return out


@register_channel_rule(*_ops("index_select"))
def _index_select(ctx):
    """index_select(x, dim, idx): a gather along ``dim`` (pinned there); other dims pass."""
    x = ctx.arg(0, "input")
    d = x.dim(ctx.value(1, "dim"))
    ctx.mix(x, d, "gathered by a tensor index")
    return shape._rearranged(x, [e for e in range(x.ndim)])


@register_channel_rule(*_ops("index.Tensor"))
def _index(ctx):
    """x[idx] / x[:, idx] (``index.Tensor(x, [None, idx])``): one dim gathered by one
    integer tensor; every other index form pins the channels it reads."""
    x = ctx.arg(0, "input")
    items = list(ctx.arg(1, "indices"))
    given = [i for i, it in enumerate(items) if it is not None]
    if len(given) == 1 and isinstance(items[given[0]], TensorInfo) and \
            not items[given[0]].dtype.is_floating_point and items[given[0]].dtype != torch.bool:
        d = given[0]
        n_new = items[d].ndim
        ctx.mix(x, d, "gathered by a tensor index")
        return shape._rearranged(x, list(range(d)) + [None] * n_new + list(range(d + 1, x.ndim)))
    for d in range(x.ndim):
        ctx.mix(x, d, "indexed by tensors")
    return None


@register_channel_rule(*_ops("gather"))
def _gather(ctx):
    """gather(x, dim, idx): the output has idx's shape; every dim of x is pinned."""
    x = ctx.arg(0, "input")
    for d in range(x.ndim):
        ctx.mix(x, d, "gathered by a tensor index")
    return None


@register_channel_rule(*_ops("triu", "tril"))
def _triangle(ctx):
    """triu / tril keep elements by their position in the last two dims: pinned there."""
    x = ctx.arg(0, "input")
    for d in (-2, -1):
        ctx.mix(x, d, "positions kept by a triangle mask")
    return ctx.same_as(x)


@register_channel_rule(*_ops("cumsum", "cumprod", "diff"))
def along_dim(ctx):
    """cumsum / cumprod / diff(x, dim): each element reads its neighbours along ``dim``
    (pinned there); the other dims pass through."""
    x = ctx.arg(0, "input")
    d = x.dim(ctx.value(2, "dim", -1) if op_name(ctx.node.target) == "diff" else ctx.value(1, "dim"))
    ctx.mix(x, d, "accumulated along")
    return shape._sliced(x, d, 0, 0, None)  # every dim but d (whose length diff may change)
