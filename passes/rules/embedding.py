"""Embedding lookups.

    embedding(ids)        # ids (N, L) -> (N, L, C): C is a new channel vector, the
                          # table's dim 1 (its rows, one per token id, are never removed);
                          # with max_norm, rows are renormalised over all C: pinned
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from .registry import Labels, register_channel_rule


def _embedding_slim(sctx):
    m = sctx.module
    m.embedding_dim = m.weight.shape[1]


@register_channel_rule(nn.Embedding, slim=_embedding_slim)
def _embedding_module(ctx):
    """nn.Embedding: the output's last dim carries the table's columns."""
    ids = ctx.arg(0, "input")
    for d in range(ids.ndim):
        ctx.mix(ids, d, "used as token ids")
    out = ctx.param("weight", 1, link=True)
    _pin_max_norm(ctx, out, ctx.module.max_norm)
    return Labels({len(ctx.out_shape) - 1: out})


def _pin_max_norm(ctx, atoms, max_norm) -> None:
    """Rows renormalised to ``max_norm`` (a norm over every column) mix the columns."""
    if max_norm is not None:
        ctx.pin(atoms, f"renormalised over the embedding dim (max_norm) by {ctx.describe()}")


@register_channel_rule(F.embedding)
def _embedding_function(ctx):
    ids, table = ctx.arg(0, "input"), ctx.arg(1, "weight")
    for d in range(ids.ndim):
        ctx.mix(ids, d, "used as token ids")
    out = Labels()
    if ctx.has_channels(table, 1):
        out[len(ctx.out_shape) - 1] = ctx.labels(table, 1)
        _pin_max_norm(ctx, ctx.labels(table, 1), ctx.value(3, "max_norm", None))
    return out
