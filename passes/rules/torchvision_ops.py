"""Rules for torchvision's fx-wrapped functions (registered only if torchvision imports).

    stochastic_depth(x, p, mode, training)   # drops whole samples (or the batch): every
                                             # channel kept, like dropout
    _patch_merging_pad(x)                    # Swin: (.., H, W, C) -> (.., H/2, W/2, 4C),
                                             # the 4 pixel phases concatenated on channels
    _get_relative_position_bias(table, idx)  # Swin: table (T, heads) -> (1, heads, N, N)
    shifted_window_attention(x, qkv_w, proj_w, bias, window, heads, ...)
        # Swin's window attention: x's channels are qkv_w's columns; the heads (or head
        # dims, see passes.rules.attention) are the qkv rows, the proj columns, the
        # relative-position bias' and logit scale's head dim; the output's channels are
        # proj_w's rows. The masked model zeroes the removed rows/columns of qkv_w,
        # qkv_bias and proj_w; the slim model calls passes.attention's version of the
        # function with the new head count, head width and the original scale.
"""
from __future__ import annotations


from ..attention import shifted_window_attention
from .registry import Labels, register_channel_rule
from ._types import TensorInfo
from .elementwise import first_operand

try:  # torchvision is optional for the library
    from torchvision.ops import stochastic_depth as _stochastic_depth
except Exception:  # noqa: BLE001 - any import problem means: no torchvision rules
    _stochastic_depth = None
try:
    from torchvision.models import swin_transformer as _swin
except Exception:  # noqa: BLE001
    _swin = None

if _stochastic_depth is not None:
    register_channel_rule(_stochastic_depth)(first_operand)


def _patch_merging_pad(ctx):
    x = ctx.arg(0, "x")
    for d in range(x.ndim - 3, x.ndim - 1):
        ctx.mix(x, d, "merged into patches")
    out = Labels({d: l for d, l in x.labels.items() if d < x.ndim - 3})
    if ctx.has_channels(x, -1):
        out[x.ndim - 1] = ctx.labels(x, -1).repeat(4)
    return out


def _relative_position_bias(ctx):
    table = ctx.arg(0, "relative_position_bias_table")
    ctx.mix(table, 0, "gathered by relative position")
    out = Labels()
    if table.dim(-1) in table.labels:
        out[1] = table.labels[table.dim(-1)]
    elif table.dim(-1) in table.lazy:
        out.lazy[1] = table.lazy[table.dim(-1)]
    return out


_SWA_ARGS = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads",
             "shift_size", "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale", "training")


def _swa_arg(ctx, name, default=None):
    return ctx.arg(_SWA_ARGS.index(name), name, default)


def _swa_sizes(x_width: int, num_heads: int, head_dim) -> int:
    return head_dim if head_dim is not None else x_width // num_heads


def _shifted_window_attention(ctx):
    x = _swa_arg(ctx, "input")
    qkv_w, proj_w = _swa_arg(ctx, "qkv_weight"), _swa_arg(ctx, "proj_weight")
    qkv_b, proj_b = _swa_arg(ctx, "qkv_bias"), _swa_arg(ctx, "proj_bias")
    bias, logit_scale = _swa_arg(ctx, "relative_position_bias"), _swa_arg(ctx, "logit_scale")
    heads = int(ctx.value(5, "num_heads"))
    hd = _swa_sizes(x.shape[-1], heads, ctx.value(None, "head_dim", None))
    for d in range(x.ndim - 1):
        ctx.mix(x, d, "partitioned into windows")
    ctx.join(ctx.labels(qkv_w, 1), ctx.labels(x, -1),
             reason=f"{ctx.describe()} reads features that are fixed (a graph input or a tensor made in forward)")
    ctx.contract(x, -1, ctx.weight_name(qkv_w, 1))
    if ctx.attention == "heads":
        unit = ctx.fresh(heads)
        ctx.internal("heads", unit)
        ctx.attention_unit("heads", unit)
        inner = unit.repeat_interleave(hd)
        if isinstance(bias, TensorInfo) and ctx.has_channels(bias, 1):
            ctx.unify(ctx.labels(bias, 1), unit)
        if isinstance(logit_scale, TensorInfo):
            ctx.unify(ctx.labels(logit_scale, 0), unit)
    else:
        unit = ctx.fresh(hd)
        ctx.internal("head_dims", unit)
        ctx.attention_unit("head_dims", unit)
        inner = unit.repeat(heads)
        if isinstance(bias, TensorInfo):
            ctx.mix(bias, 1, "a per-head bias (head dims are pruned, not heads)")
    if isinstance(bias, TensorInfo):
        for d in range(bias.ndim):
            if d != 1:
                ctx.mix(bias, d, "a relative-position bias")
    rows = inner.repeat(3)
    ctx.unify(ctx.labels(qkv_w, 0), rows)
    if isinstance(qkv_b, TensorInfo):
        ctx.unify(ctx.labels(qkv_b, 0), rows)
        ctx.contract(qkv_b, 0)
    ctx.contract(qkv_w, 0)
    ctx.unify(ctx.labels(proj_w, 1), inner)
    ctx.contract(proj_w, 1)
    out = ctx.fresh(proj_w.shape[0])
    ctx.join(ctx.labels(proj_w, 0), out)
    if isinstance(proj_b, TensorInfo):
        ctx.join(ctx.labels(proj_b, 0), out)
    return Labels({x.ndim - 1: out})


def _shifted_window_attention_slim(sctx):
    """Call our version of the function, which takes the head count, head width and
    scale explicitly (torchvision's derives them from the input width)."""
    node = sctx.node
    x = sctx.arg(0, "input")
    heads = int(sctx.value(5, "num_heads"))
    hd = _swa_sizes(sctx.shape(x)[-1], heads, sctx.value(None, "head_dim", None))
    scale = sctx.value(None, "scale", None)
    scale = float(hd) ** -0.5 if scale is None else scale
    if sctx.groups.attention == "heads":
        heads = int(sctx.internal("heads").sum())
    else:
        hd = int(sctx.internal("head_dims").sum())
    node.target = shifted_window_attention
    sctx.set_arg(5, "num_heads", heads)
    sctx.set_kwarg("head_dim", hd)
    sctx.set_kwarg("scale", scale)


def _register_swin() -> None:
    targets = []
    if _swin is not None:
        register_channel_rule(_swin._patch_merging_pad)(_patch_merging_pad)
        register_channel_rule(_swin._get_relative_position_bias)(_relative_position_bias)
        targets.append(_swin.shifted_window_attention)
    targets.append(shifted_window_attention)
    register_channel_rule(*targets, slim=_shifted_window_attention_slim)(_shifted_window_attention)


_register_swin()
