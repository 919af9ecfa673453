"""Recurrent layers: ``nn.LSTM``, ``nn.GRU``, ``nn.RNN``.

An RNN layer reads its input features through ``weight_ih_l0`` (a contraction, like a
Linear: the producer's channels are its columns, masks go in front of it) and carries
``hidden_size`` hidden units, each with one row in every gate block (LSTM: i, f, g, o;
GRU: r, z, n; RNN: one) of ``weight_ih_l*``, ``weight_hh_l*`` and the biases. A hidden
unit is read back by the recurrence (``weight_hh`` columns) and by the next layer
(``weight_ih_l{k+1}`` columns); the output's last dim, ``h_n`` and ``c_n`` carry the
units::

    y, (h_n, c_n) = lstm(x)     # x (L, N, Hin) or (N, L, Hin) (batch_first) or (L, Hin)
                                # y (..., D * Hout), h_n (D * layers, N, Hout), c_n (.., H)
    weight_ih_l0    (G * H, Hin)          # rows: gate g of unit j at g * H + j; cols: x's channels
    weight_hh_lk    (G * H, Hout)         # cols: the units fed back
    weight_ih_lk    (G * H, D * Hout)     # k >= 1: cols: layer k-1's [forward, backward] units
    weight_hr_lk    (Hout, H)             # LSTM with proj_size > 0: Hout = proj_size

What is one channel:

- **one hidden unit index of every layer and direction.** ``nn.LSTM`` has one
  ``hidden_size`` for all its layers and both directions, so a slim model can only be
  one module if they all keep the same number of units: the rule couples unit ``j`` of
  every layer and direction into one channel (a bidirectional output's last dim holds
  each channel twice, forward then backward). ``h_n`` / ``c_n`` stack the layers and
  directions on dim 0, so they carry the same channels on their last dim.
- **projected units** (``proj_size > 0``): a group of their own (``weight_hr`` rows,
  ``weight_hh`` and next-layer ``weight_ih`` columns, the output). The hidden units of
  a projected LSTM are FIXED: torch requires ``proj_size < hidden_size``, a bound
  between two groups that a plan cannot express; keeping every hidden unit keeps it.
- Sequence and batch dims are recurrently mixed (channels there are pinned); a
  ``PackedSequence`` input pins everything (its data is reordered by batch sizes).

The masked model (:func:`passes.insert_channel_masks.insert_channel_masks`): a removed
unit still runs inside the full-size module, and would feed the kept units through the
recurrence. The hidden units are therefore *internal channels* (``"hidden"``, and
``"proj"`` for projected units); the mask hook swaps in :class:`MaskedLSTM` (``MaskedGRU``,
``MaskedRNN``), which shares the parameters and zeroes the ``weight_hh`` / next-layer
``weight_ih`` / ``weight_hr`` columns that read removed units, so the kept units compute
exactly what the slim module computes. The slim hook builds a plain, smaller
``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` around the sliced parameters.

>>> import torch, torch.nn as nn
>>> from disparse_fx.passes.channel_groups import find_channel_groups
>>> from disparse_fx.passes.slim import slim_channels
>>> class Net(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.lstm, self.head = nn.LSTM(3, 4, num_layers=2, batch_first=True), nn.Linear(4, 2)
...     def forward(self, x):                     # x: (N, L, 3)
...         return {"y": self.head(self.lstm(x)[0])}
>>> gm = torch.fx.symbolic_trace(Net())
>>> groups = find_channel_groups(gm, (torch.randn(2, 5, 3),))
>>> (g, _), = [gm_ for gm_ in groups.members_of("lstm.weight_hh_l1") if gm_[1].dim == 0]
>>> g.size, g.removable
(4, True)
>>> slim = slim_channels(gm, groups, {g.id: torch.tensor([True, False, True, False])})
>>> slim.lstm, slim.head.in_features
(LSTM(3, 2, num_layers=2, batch_first=True), 2)
"""
from __future__ import annotations

import re
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from .registry import Labels, register_channel_rule
from ._types import TensorInfo

__all__ = ["MaskedRNN", "MaskedLSTM", "MaskedGRU", "is_masked_rnn", "unmasked_rnn", "plain_rnn_type"]

#: rows per hidden unit in each weight: one per gate
_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_LAYER = re.compile(r"_l(\d+)(?:_reverse)?$")


# ----------------------------------------------------------------------------- modules
def _rebuild(cls: type, source: nn.RNNBase, **sizes: int) -> nn.RNNBase:
    """A ``cls`` module configured like ``source`` (sizes overridden by ``sizes``) that
    uses ``source``'s parameter objects (no copy) and keeps its training flag."""
    kw: Dict[str, Any] = dict(input_size=source.input_size, hidden_size=source.hidden_size,
                              num_layers=source.num_layers, bias=source.bias, batch_first=source.batch_first,
                              dropout=source.dropout, bidirectional=source.bidirectional)
    if isinstance(source, nn.LSTM):
        kw["proj_size"] = source.proj_size
    if isinstance(source, nn.RNN):
        kw["nonlinearity"] = source.nonlinearity
    kw.update(sizes)
    new = cls(**kw, device="meta")
    for name in new._flat_weights_names:
        setattr(new, name, getattr(source, name))  # RNNBase.__setattr__ keeps _flat_weights current
    new._init_flat_weights()
    new.train(source.training)
    return new


class _MaskedRecurrence:
    """Mixin: the RNN with the weight columns that read removed units zeroed.

    Buffers ``hidden_keep`` (``hidden_size``,) and, for a projected LSTM, ``proj_keep``
    (``proj_size``,): 1.0 = kept. ``weight_hh_l*`` columns and ``weight_ih_l{k>=1}``
    columns follow the units a layer outputs (projected ones if any), ``weight_hr_l*``
    columns the hidden units. Gradients reach the shared parameters through the masks.
    """

    def set_masks(self, hidden_keep: torch.Tensor, proj_keep: Optional[torch.Tensor] = None) -> None:
        ref = self.weight_hh_l0
        self.register_buffer("hidden_keep", hidden_keep.detach().to(device=ref.device, dtype=ref.dtype))
        if self.proj_size:
            keep = proj_keep if proj_keep is not None else torch.ones(self.proj_size)
            self.register_buffer("proj_keep", keep.detach().to(device=ref.device, dtype=ref.dtype))

    def _masked_weights(self, weights):
        hidden = self.hidden_keep
        units = self.proj_keep if self.proj_size else hidden
        below = units.repeat(2 if self.bidirectional else 1)  # what layer k >= 1 reads
        out = []
        for name, w in zip(self._flat_weights_names, weights):
            layer = int(_LAYER.search(name).group(1))
            if name.startswith("weight_hh"):
                w = w * units.to(w.dtype)
            elif name.startswith("weight_ih") and layer > 0:
                w = w * below.to(w.dtype)
            elif name.startswith("weight_hr"):
                w = w * hidden.to(w.dtype)
            out.append(w)
        return out

    def forward(self, input, hx=None):  # noqa: A002 - torch's argument name
        # bring _flat_weights up to date first (functional_call swaps parameters), so the
        # base forward's own check finds nothing changed and runs the masked list
        self._update_flat_weights()
        plain = self._flat_weights
        self._flat_weights = self._masked_weights(plain)
        try:
            return super().forward(input, hx)
        finally:
            self._flat_weights = plain


class MaskedRNN(_MaskedRecurrence, nn.RNN):
    """``nn.RNN`` computing its slim version (see :class:`_MaskedRecurrence`)."""


class MaskedLSTM(_MaskedRecurrence, nn.LSTM):
    """``nn.LSTM`` computing its slim version (see :class:`_MaskedRecurrence`)."""


class MaskedGRU(_MaskedRecurrence, nn.GRU):
    """``nn.GRU`` computing its slim version (see :class:`_MaskedRecurrence`)."""


_MASKED = {nn.RNN: MaskedRNN, nn.LSTM: MaskedLSTM, nn.GRU: MaskedGRU}


def plain_rnn_type(m: nn.Module) -> type:
    """``nn.LSTM``, ``nn.GRU`` or ``nn.RNN``: the torch type ``m`` is (a masked RNN, or a
    user's subclass, included); ``type(m)`` for another module."""
    return next((t for t in (nn.LSTM, nn.GRU, nn.RNN) if isinstance(m, t)), type(m))


def is_masked_rnn(m: nn.Module) -> bool:
    """Whether ``m`` is a masked RNN made by the channel-mask pass."""
    return isinstance(m, _MaskedRecurrence)


def unmasked_rnn(m: nn.Module) -> nn.Module:
    """The plain torch module a masked RNN stands for (same parameter objects)."""
    return _rebuild(plain_rnn_type(m), m)


# ----------------------------------------------------------------------------- rule
def _suffixes(m: nn.RNNBase):
    return ("", "_reverse") if m.bidirectional else ("",)


def _rnn(ctx):
    """rnn(x, hx): x's features are weight_ih_l0's columns (contracted); hidden units
    (all layers and directions coupled) are internal channels; the output, h_n and c_n
    carry them on their last dim (see the module docstring)."""
    m = ctx.module
    gates, sfx = _GATES[m.mode], _suffixes(m)
    x, hx = ctx.arg(0, "input"), ctx.arg(1, "hx", None)
    hidden = ctx.fresh(m.hidden_size)
    units = ctx.fresh(m.proj_size) if m.proj_size else hidden  # what each layer outputs
    ctx.internal("hidden", hidden)
    if m.proj_size:
        ctx.internal("proj", units)
        ctx.pin(hidden, f"{ctx.describe()} projects its hidden units (proj_size={m.proj_size}): torch requires "
                        f"proj_size < hidden_size, a bound between two channel groups that a plan cannot "
                        f"express, so the hidden units stay (the projected units can go)")
    packed = not isinstance(x, TensorInfo)
    if packed:
        why = f"{ctx.describe()} reads a PackedSequence (its data is reordered by batch sizes)"
        for t in ctx.tensors():
            for d in range(t.ndim):
                ctx.mix(t, d, "read as a PackedSequence")
        ctx.pin(hidden, why)
        ctx.pin(units, why)
        xin = None
    else:
        for d in range(x.ndim - 1):
            ctx.mix(x, d, "recurrently mixed")
        xin = ctx.labels(x, -1)
    rows = hidden.repeat(gates)  # gate g of unit j is row g * H + j
    below = units.repeat(len(sfx))  # layer k >= 1 reads [forward units, backward units]
    for layer in range(m.num_layers):
        for s in sfx:
            ctx.unify(ctx.param(f"weight_ih_l{layer}{s}", 0), rows)
            ctx.unify(ctx.param(f"weight_hh_l{layer}{s}", 0), rows)
            ctx.unify(ctx.param(f"weight_hh_l{layer}{s}", 1), units)
            if layer:
                ctx.unify(ctx.param(f"weight_ih_l{layer}{s}", 1), below)
            if m.bias:
                ctx.unify(ctx.param(f"bias_ih_l{layer}{s}", 0), rows)
                ctx.unify(ctx.param(f"bias_hh_l{layer}{s}", 0), rows)
            if m.proj_size:
                ctx.unify(ctx.param(f"weight_hr_l{layer}{s}", 0), units)
                ctx.unify(ctx.param(f"weight_hr_l{layer}{s}", 1), hidden)
    ctx.join(*[ctx.param(f"weight_ih_l0{s}", 1) for s in sfx], xin,
             reason=f"{ctx.describe()} reads features that are fixed (a graph input or a tensor made in forward)")
    if not packed:
        for s in sfx:  # each direction reads x through its own weight
            ctx.contract(x, -1, (f"{ctx.node.target}.weight_ih_l0{s}", 1))
    states = [(units, "h_0"), (hidden, "c_0")]
    given = hx if isinstance(hx, (tuple, list)) else (hx,)
    for (atoms, what), h in zip(states, given):
        if isinstance(h, TensorInfo):
            for d in range(h.ndim - 1):
                ctx.mix(h, d, "stacked by layer or batch as an initial RNN state")
            ctx.join(atoms, ctx.labels(h, -1), reason=f"{ctx.describe()} gets an initial state {what} whose "
                                                        f"units are fixed (a graph input or a tensor made in forward)")
    if packed:
        return None
    out, state = ctx.out
    y = Labels({out.dim() - 1: below})
    if isinstance(state, tuple):  # LSTM: (h_n, c_n)
        h_n, c_n = state
        return y, (Labels({h_n.dim() - 1: units}), Labels({c_n.dim() - 1: hidden}))
    return y, Labels({state.dim() - 1: units})


def _rnn_mask(sctx):
    """The masked model: a masked twin sharing the parameters (see :class:`_MaskedRecurrence`)."""
    m = sctx.module
    new = _rebuild(_MASKED[plain_rnn_type(m)], m)
    new.set_masks(sctx.internal("hidden"), sctx.internal("proj") if m.proj_size else None)
    sctx.gm.add_submodule(sctx.node.target, new)


def _rnn_slim(sctx):
    """A plain torch RNN sized by the sliced parameters."""
    m = sctx.module
    sizes = dict(input_size=m.weight_ih_l0.shape[1], hidden_size=m.weight_hh_l0.shape[0] // _GATES[m.mode])
    if m.proj_size:
        sizes["proj_size"] = m.weight_hr_l0.shape[0]
    new = _rebuild(plain_rnn_type(m), m, **sizes)
    new.flatten_parameters()  # one cuDNN weight buffer (a no-op on the CPU)
    sctx.gm.add_submodule(sctx.node.target, new)


register_channel_rule(nn.RNN, nn.LSTM, nn.GRU, MaskedRNN, MaskedLSTM, MaskedGRU,
                      slim=_rnn_slim, mask=_rnn_mask)(_rnn)
