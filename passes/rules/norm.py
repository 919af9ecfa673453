"""Normalisation layers.

    batch_norm(x)      # per channel: weight, bias, running_mean, running_var follow x's dim 1
    instance_norm(x)   # per channel, like batch norm
    group_norm(x)      # statistics per group of C/G channels: a whole norm group is removed
                       # at once (its channels are coupled); num_groups shrinks
    layer_norm(x)      # over the last dim (tokens (N, L, C), channels-last (N, H, W, C)):
                       # removable; the masked model takes the statistics over the kept
                       # channels only, so it computes what the narrower slim LayerNorm
                       # computes. Over several dims: the channels there are pinned.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_channel_rule, torch_attr
from ._types import TensorInfo

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LazyBatchNorm1d,
       nn.LazyBatchNorm2d, nn.LazyBatchNorm3d)
_IN = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def _per_channel(ctx, x: TensorInfo, cd: int, atoms_of_params) -> None:
    """Statistics over every dim but ``cd``: the parameters follow ``cd``; channels on
    other dims are mixed (batch statistics) and pinned."""
    for d in range(x.ndim):
        if d != cd:
            ctx.mix(x, d, "normalised (statistics)")
    params = [p for p in atoms_of_params if p is not None]
    if params:
        ctx.join(ctx.labels(x, cd), *params)


def _batch_norm_module(ctx):
    m = ctx.module
    x = ctx.arg(0, "input")
    cd = 1 if x.ndim >= 2 else 0
    if isinstance(m, _IN):
        cd = x.ndim - int(type(m).__name__[-2]) - 1
    names = [n for n in ("weight", "bias", "running_mean", "running_var") if getattr(m, n, None) is not None]
    follow = x.labels.get(x.dim(cd))  # not materialised here: a lazy dim keeps its atoms' order
    _per_channel(ctx, x, cd, [ctx.param(n, 0, follow=follow) for n in names])
    return ctx.same_as(x)


def _num_features_slim(sctx):
    m = sctx.module
    node = sctx.node
    x = node.args[0] if node.args else node.kwargs["input"]
    cd = 1 if len(sctx.shape(x)) >= 2 else 0
    if isinstance(m, _IN):
        cd = len(sctx.shape(x)) - int(type(m).__name__[-2]) - 1
    m.num_features = sctx.kept_count(x, cd, m.num_features)


register_channel_rule(*_BN, *_IN, slim=_num_features_slim)(_batch_norm_module)


@register_channel_rule(F.batch_norm, torch.batch_norm, F.instance_norm, torch.instance_norm)
def _batch_norm_function(ctx):
    """F.batch_norm(x, running_mean, running_var, weight, bias, ...): all per channel."""
    x = ctx.arg(0, "input")
    others = [ctx.arg(i, n, None) for i, n in ((1, "running_mean"), (2, "running_var"),
                                                (3, "weight"), (4, "bias"))]
    cd = 1 if x.ndim >= 2 else 0
    _per_channel(ctx, x, cd, [ctx.labels(o, 0) for o in others if isinstance(o, TensorInfo)])
    return ctx.same_as(x)


def _group_norm(ctx, x: TensorInfo, num_groups: int, params) -> None:
    for d in range(x.ndim):
        if d != 1:
            ctx.mix(x, d, "normalised (statistics)")
    lab = ctx.labels(x, 1)
    if lab is not None:
        rows = lab.view(num_groups, -1)
        for j in range(1, rows.shape[1]):
            ctx.unify(rows[:, 0], rows[:, j])
    params = [p for p in params if p is not None]
    if params:
        ctx.join(lab, *params)


@register_channel_rule(nn.GroupNorm, slim=lambda sctx: _group_norm_slim(sctx))
def _group_norm_module(ctx):
    """group_norm(x): a whole norm group (C/G channels) is one removable channel."""
    m = ctx.module
    x = ctx.arg(0, "input")
    _group_norm(ctx, x, m.num_groups, [ctx.param(n, 0) for n in ("weight", "bias") if getattr(m, n) is not None])
    return ctx.same_as(x)


def _group_norm_slim(sctx):
    m = sctx.module
    node = sctx.node
    x = node.args[0]
    per = m.num_channels // m.num_groups
    new_c = sctx.kept_count(x, 1, m.num_channels)
    m.num_groups, m.num_channels = new_c // per, new_c


def _group_norm_function_slim(sctx):
    x = sctx.arg(0, "input")
    g = sctx.value(1, "num_groups")
    c = sctx.shape(x)[1]
    new_c = sctx.kept_count(x, 1, c)
    if new_c != c:
        sctx.set_arg(1, "num_groups", new_c // (c // g))


@register_channel_rule(F.group_norm, torch.group_norm, slim=_group_norm_function_slim)
def _group_norm_function(ctx):
    x = ctx.arg(0, "input")
    g = int(ctx.value(1, "num_groups"))
    params = [ctx.labels(ctx.arg(i, n, None), 0) for i, n in ((2, "weight"), (3, "bias"))]
    _group_norm(ctx, x, g, params)
    return ctx.same_as(x)


def _layer_norm(ctx, x: TensorInfo, normalized_shape, weight_atoms) -> None:
    """Over one last dim: removable, the masked model takes statistics over the kept
    channels (``ctx.normalize``); over several dims: the channels there are pinned."""
    k = len(normalized_shape)
    for j in range(k):
        d = x.ndim - k + j
        lab = ctx.labels(x, d) if ctx.has_channels(x, d) else None
        w = weight_atoms(j) if lab is not None else None
        for p in w or ():
            if p is not None:
                ctx.unify(lab, p)
        if lab is None:
            continue
        if k == 1:
            ctx.normalize(x, d)
        else:
            ctx.pin(lab, f"normalised together (statistics over dims {tuple(range(x.ndim - k, x.ndim))}) "
                         f"by {ctx.describe()}")


def _layer_norm_module_slim(sctx):
    m = sctx.module
    x = sctx.arg(0, "input")
    if len(m.normalized_shape) == 1:
        m.normalized_shape = (sctx.kept_count(x, len(sctx.shape(x)) - 1),)


@register_channel_rule(nn.LayerNorm, torch_attr("nn.RMSNorm"), slim=_layer_norm_module_slim)
def _layer_norm_module(ctx):
    """layer_norm(x) over the last dim(s) (see ``_layer_norm``)."""
    m = ctx.module
    x = ctx.arg(0, "input")
    shape = tuple(m.normalized_shape)
    names = [n for n in ("weight", "bias") if getattr(m, n, None) is not None]
    _layer_norm(ctx, x, shape, lambda j: [ctx.param(n, j) for n in names])
    return ctx.same_as(x)


def _layer_norm_function_slim(sctx):
    """normalized_shape = the last dims' kept sizes (also when it was computed from
    channel counts: ``(x.shape[-1],)``)."""
    x = sctx.arg(0, "input")
    shape = sctx.value(1, "normalized_shape")
    k = 1 if isinstance(shape, int) else len(shape)
    nd = len(sctx.shape(x))
    sctx.set_arg(1, "normalized_shape", tuple(sctx.kept_count(x, d) for d in range(nd - k, nd)))


@register_channel_rule(F.layer_norm, torch.layer_norm, torch_attr("nn.functional.rms_norm"),
                       slim=_layer_norm_function_slim, handles_sizes=True)
def _layer_norm_function(ctx):
    x = ctx.arg(0, "input")
    shape = ctx.value(1, "normalized_shape")
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    ps = [ctx.arg(i, n, None) for i, n in ((2, "weight"), (3, "bias"))]
    _layer_norm(ctx, x, shape, lambda j: [ctx.labels(p, j) for p in ps if isinstance(p, TensorInfo)])
    return ctx.same_as(x)


def _masked_norm(ctx, rms: bool):
    """A LayerNorm already rewritten by the channel-mask pass (analysing a masked model):
    ``masked_layer_norm(x, keep, shape, weight, bias, eps, module)`` or
    ``masked_rms_norm(x, keep, shape, weight, eps, module)``."""
    x = ctx.arg(0, "x")
    ps = [ctx.arg(3, "weight", None)] + ([] if rms else [ctx.arg(4, "bias", None)])
    keep = ctx.arg(1, "keep")
    ctx.mix(keep, 0, "a LayerNorm keep mask")
    _layer_norm(ctx, x, (x.shape[-1],), lambda j: [ctx.labels(p, j) for p in ps if isinstance(p, TensorInfo)])
    return ctx.same_as(x)


# The channel-mask pass owns the masked norm functions and registers these two rules for
# them (this module does not import that pass: the rules sit below the passes).
def masked_layer_norm_rule(ctx):
    """The rule of :func:`passes.insert_channel_masks.masked_layer_norm`."""
    return _masked_norm(ctx, rms=False)


def masked_rms_norm_rule(ctx):
    """The rule of :func:`passes.insert_channel_masks.masked_rms_norm`."""
    return _masked_norm(ctx, rms=True)


@register_channel_rule(nn.LocalResponseNorm, F.local_response_norm, nn.CrossMapLRN2d)
def _local_response_norm(ctx):
    """Normalises each channel by its neighbours: the channel dim is mixed (pinned)."""
    x = ctx.arg(0, "input")
    ctx.mix(x, 1, "normalised across channels")
    return ctx.same_as(x)


@register_channel_rule(F.normalize)
def _normalize(ctx):
    x = ctx.arg(0, "input")
    d = ctx.value(2, "dim", 1)
    ctx.mix(x, d, "normalised")
    return ctx.same_as(x)
