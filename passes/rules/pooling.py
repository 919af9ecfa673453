"""Pooling, resizing, padding, reductions and softmax.

    max_pool2d(x)        # (N, C, H, W) -> (N, C, H', W'): channels kept, H/W mixed
    interpolate(x)       # same
    pad(x, (1, 1))       # pads the last dims; padding a channel dim would pin it
    x.mean((2, 3))       # (N, C, H, W) -> (N, C): reduced dims are mixed
    x.sum(1)             # a sum over channels is zero-neutral: masks go in front of it
    softmax(x, dim=1)    # mixes dim 1: its channels are pinned
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .elementwise import elementwise
from .registry import Labels, existing, op_name, register_channel_rule, torch_attr
from ._types import TensorInfo


def spatial(ctx, x: TensorInfo, n_spatial: int, what: str) -> Labels:
    """The last ``n_spatial`` dims are resampled (mixed); the others pass through."""
    out = Labels()
    out_shape = ctx.out.shape if isinstance(ctx.out, torch.Tensor) else ctx.out[0].shape
    first = x.ndim - n_spatial
    for d in range(x.ndim):
        if d >= first:
            ctx.mix(x, d, what)
            continue
        if d in x.labels:
            out[d] = x.labels[d]
        elif d in x.lazy:
            out.lazy[d] = x.lazy[d]
    return out


def _n_spatial_from_name(obj) -> int:
    name = op_name(obj) or type(obj).__name__
    for k in (1, 2, 3):
        if name.endswith(f"{k}d") or f"{k}d_" in name or name.endswith(f"{k}D"):
            return k
    return 2


_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.FractionalMaxPool2d,
    nn.FractionalMaxPool3d,
)


@register_channel_rule(*_POOL_MODULES)
def _pool_module(ctx):
    x = ctx.arg(0, "input")
    lab = spatial(ctx, x, _n_spatial_from_name(type(ctx.module)), "pooled")
    if isinstance(ctx.out, tuple):  # return_indices=True
        return (lab, Labels(lab))
    return lab


_POOL_FUNCTIONS = [torch_attr(f"nn.functional.{n}") for n in (
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
    "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "adaptive_max_pool1d_with_indices", "adaptive_max_pool2d_with_indices",
    "adaptive_max_pool3d_with_indices", "lp_pool1d", "lp_pool2d", "lp_pool3d",
    "fractional_max_pool2d", "fractional_max_pool3d")]
_POOL_FUNCTIONS += [torch_attr(n) for n in ("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d",
                                             "adaptive_avg_pool1d", "adaptive_max_pool1d")]


@register_channel_rule(*[f for f in _POOL_FUNCTIONS if f is not None])
def _pool_function(ctx):
    x = ctx.arg(0, "input")
    lab = spatial(ctx, x, _n_spatial_from_name(ctx.node.target), "pooled")
    if isinstance(ctx.out, tuple):
        return (lab, Labels(lab))
    return lab


@register_channel_rule(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, F.interpolate,
                       F.upsample, F.upsample_nearest, F.upsample_bilinear)
def _resize(ctx):
    """interpolate(x, size=...): the spatial dims (all but N, C) are resampled."""
    x = ctx.arg(0, "input")
    return spatial(ctx, x, max(x.ndim - 2, 0), "resampled")


_PAD_MODULES = tuple(getattr(nn, n) for n in dir(nn) if n.endswith(("Pad1d", "Pad2d", "Pad3d")))


def _padding(ctx, x: TensorInfo, pad: Sequence[int]) -> Labels:
    out = ctx.same_as(x)
    for i in range(len(pad) // 2):
        d = x.ndim - 1 - i
        if pad[2 * i] or pad[2 * i + 1]:
            ctx.mix(x, d, "padded")
            out.pop(d, None)
            out.lazy.pop(d, None)
    return out


@register_channel_rule(*_PAD_MODULES)
def _pad_module(ctx):
    m = ctx.module
    x = ctx.arg(0, "input")
    return _padding(ctx, x, tuple(m.padding))


@register_channel_rule(F.pad, torch_attr("_C._nn.pad"), torch.constant_pad_nd)
def _pad_function(ctx):
    x = ctx.arg(0, "input")
    return _padding(ctx, x, tuple(ctx.value(1, "pad")))


# --------------------------------------------------------------------------- reductions
_SUMS = {"sum", "nansum"}


def _reduce(ctx, op_name: str, dim_pos: int = 1, sums: Optional[bool] = None):
    """A reduction over ``dim`` (argument ``dim_pos``, keepdim after it). A reduced dim that
    carries channels is *contracted* when a removed (all-zero) channel adds nothing to the
    result (``sums``; default: sum and nansum), else *mixed* (pinned: mean's denominator,
    max, std... change when a channel goes)."""
    x = ctx.arg(0, "input")
    if not isinstance(x, TensorInfo):
        return None
    dims = ctx.value(dim_pos, "dim", None)
    keepdim = bool(ctx.value(dim_pos + 1, "keepdim", False))
    if isinstance(dims, int):
        dims = (dims,)
    if dims is None or (isinstance(dims, (tuple, list)) and len(dims) == 0 and op_name != "sum"):
        dims = tuple(range(x.ndim))
    reduced = {x.dim(d) for d in dims}
    sums = op_name in _SUMS if sums is None else sums
    for d in sorted(reduced):
        if sums:
            ctx.contract(x, d)
        else:
            ctx.mix(x, d, f"reduced ({op_name})")
    out = Labels()
    j = 0
    for d in range(x.ndim):
        if d in reduced and not keepdim:
            continue
        if d not in reduced:
            if d in x.labels:
                out[j] = x.labels[d]
            elif d in x.lazy:
                out.lazy[j] = x.lazy[d]
        j += 1
    if isinstance(ctx.out, tuple):  # max(x, dim) -> (values, indices)
        return tuple(Labels(out, lazy=out.lazy) for _ in ctx.out)
    return out


def _make_reduce(name: str):
    def rule(ctx):
        return _reduce(ctx, name)

    rule.__name__ = f"reduce_{name}"
    return rule


for _name in ("mean", "sum", "nansum", "amax", "amin", "std", "var", "prod", "logsumexp", "argmax",
              "argmin", "all", "any", "nanmean", "median", "count_nonzero"):
    targets = [_name] + [f for f in (getattr(torch, _name, None),) if f is not None]
    register_channel_rule(*targets)(_make_reduce(_name))


def _norm_sums(order: Any) -> bool:
    """Whether a p-norm ignores all-zero channels: |0|^p adds nothing for p > 0 (and the
    count of p = 0 or the max of p = inf too); p < 0 and -inf (a minimum) do not."""
    if order is None or order == "fro":
        return True
    return isinstance(order, (int, float)) and order >= 0


@register_channel_rule(torch.norm, "norm")
def _norm(ctx):
    """``x.norm(p, dim, keepdim)`` / ``torch.norm``: a reduction (ConvNeXt-V2's global
    response norm takes the 2-norm over the spatial dims)."""
    return _reduce(ctx, "norm", dim_pos=2, sums=_norm_sums(ctx.value(1, "p", "fro")))


@register_channel_rule(*existing(torch_attr("linalg.vector_norm")))
def _vector_norm(ctx):
    return _reduce(ctx, "vector_norm", dim_pos=2, sums=_norm_sums(ctx.value(1, "ord", 2)))


@register_channel_rule(torch.max, torch.min, "max", "min")
def _max_min(ctx):
    """max(x, dim) reduces; max(a, b) is elementwise; max(x) reduces everything."""
    other = ctx.arg(1, "other", None)
    if isinstance(other, TensorInfo):
        return elementwise(ctx)
    return _reduce(ctx, op_name(ctx.node.target))


# --------------------------------------------------------------------------- softmax
def _softmax(ctx, x: TensorInfo, dim: Optional[int]):
    if dim is None:
        dim = 0 if x.ndim in (0, 1, 3) else 1
    ctx.mix(x, dim, "normalised by softmax")
    return ctx.same_as(x)


@register_channel_rule(nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d)
def _softmax_module(ctx):
    m = ctx.module
    x = ctx.arg(0, "input")
    dim = -3 if isinstance(m, nn.Softmax2d) else m.dim
    return _softmax(ctx, x, dim)


@register_channel_rule(F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax,
                       "softmax", "log_softmax")
def _softmax_function(ctx):
    x = ctx.arg(0, "input")
    return _softmax(ctx, x, ctx.value(1, "dim", None))
