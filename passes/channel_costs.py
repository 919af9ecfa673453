"""Channel costs: parameters, FLOPs or latency of a model as a function of its kept channels.

A :class:`ChannelCostModel` is a sum of *terms*. Each term has a dense cost and a list
of *factors*; a factor is a set of channel slices (global channel ids of
:class:`~passes.channel_groups.ChannelGroups`, -1 for a slice in no group) whose kept
fraction the term scales with. With ``keep`` the 0/1 flags of every global channel:

    cost(keep) = sum_t  w_t * prod_{f in t} kept_f(keep) / size_f        (product terms)
    cost(keep) = sum_t  table_t(frac_in, frac_out)                      (table terms)

Product terms are exact for parameters (a weight's slimmed size is the product of its
kept widths) and for FLOPs (a conv's multiply-adds are its kept output elements times its
kept input channels per group; see :class:`passes.flops.FlopTerm`). Table terms hold a
measured per-layer latency on a grid of (input, output) kept fractions, bilinear between
the grid points (see :mod:`disparse_fx.latency_model`).

``cost`` is differentiable in ``keep`` (a float vector): ``marginal(keep)`` is
d cost / d keep_c, the cost that removing channel ``c`` saves at the current widths of
its neighbours (exact for a channel whose term holds it once, the first-order estimate
otherwise). The channel decision re-evaluates it as the plan shrinks.

>>> import torch, torch.nn as nn
>>> from disparse_fx.passes.channel_groups import find_channel_groups
>>> class Net(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
...     def forward(self, x):
...         return {"t": self.b(self.a(x).relu())}
>>> gm, x = torch.fx.symbolic_trace(Net()), torch.randn(1, 3, 4, 4)
>>> costs = flop_cost_model(gm, find_channel_groups(gm, (x,)), (x,))
>>> keep = torch.ones(costs.num_channels)
>>> int(costs.cost(keep))  # a: 2*8*16*27, b: 2*4*16*8
7936
>>> keep[:4] = 0  # half of a's 8 output channels (the only removable group)
>>> int(costs.cost(keep)), costs.marginal(keep)[:2].tolist()  # each: 864 in a, 128 in b
(3968, [992.0, 992.0])
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from .channel_groups import ChannelGroups
from .flops import FlopTerm, flop_terms, shape_propagated

__all__ = ["CostTerm", "ChannelCostModel", "factor_channels", "param_cost_model", "flop_cost_model",
           "flop_cost_terms"]


@dataclass(frozen=True, eq=False)
class CostTerm:
    """One term: ``weight * prod(kept fraction of each factor)``, or, with ``table`` (a
    tensor over ``grid`` x ``grid_out``: increasing kept fractions of factors 0 and 1;
    ``grid_out`` defaults to ``grid``), the table bilinearly interpolated.
    ``factors``: LongTensors of global channel ids (-1 = fixed). ``node``: where the term
    comes from (for reports)."""

    weight: float
    factors: Tuple[torch.Tensor, ...] = ()
    table: Optional[torch.Tensor] = None
    grid: Optional[torch.Tensor] = None
    node: str = ""
    grid_out: Optional[torch.Tensor] = None


@dataclass(frozen=True, eq=False)
class ChannelCostModel:
    """A cost (``unit``: "params", "FLOPs" or "ms") as a function of the kept channels.

    ``num_channels`` is the number of global channels of the groups it was built on.
    Costs are per sample for FLOPs (as :func:`passes.flops.count_flops`) and for the
    whole example batch for latency.
    """

    terms: Tuple[CostTerm, ...]
    num_channels: int
    unit: str = ""
    note: str = ""
    _index: Dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        # Unique factors (by content) -> one segment each in a flat id list.
        keys: Dict[bytes, int] = {}
        ids: List[torch.Tensor] = []
        seg: List[torch.Tensor] = []
        term_factors: List[List[int]] = []
        for t in self.terms:
            fidx = []
            for f in t.factors:
                f = f.reshape(-1).long()
                k = hashlib.blake2b(f.numpy().tobytes(), digest_size=16).digest()
                if k not in keys:
                    keys[k] = len(keys)
                    # -1 (a slice in no group) reads the always-kept slot num_channels
                    ids.append(torch.where(f >= 0, f, torch.full_like(f, self.num_channels)))
                    seg.append(torch.full_like(f, keys[k]))
                fidx.append(keys[k])
            term_factors.append(fidx)
        width = max((len(f) for f in term_factors), default=0)
        nf = len(keys)
        # pad with factor nf, whose fraction is always 1
        padded = torch.tensor([f + [nf] * (width - len(f)) for f in term_factors], dtype=torch.long)
        self._index.update(
            ids=torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long),
            seg=torch.cat(seg) if seg else torch.zeros(0, dtype=torch.long),
            sizes=torch.tensor([len(i) for i in ids] + [1], dtype=torch.float64),
            factors=padded.view(len(self.terms), width),
            weights=torch.tensor([t.weight for t in self.terms], dtype=torch.float64),
            is_table=torch.tensor([t.table is not None for t in self.terms], dtype=torch.bool),
        )

    def fractions(self, keep: torch.Tensor) -> torch.Tensor:
        """Kept fraction of every unique factor (the last entry is the constant 1)."""
        ix = self._index
        ext = torch.cat([keep.double(), keep.new_ones(1, dtype=torch.float64)])
        kept = torch.zeros(len(ix["sizes"]) - 1, dtype=torch.float64).index_add(0, ix["seg"], ext[ix["ids"]])
        return torch.cat([kept, kept.new_ones(1)]) / ix["sizes"]

    def term_costs(self, keep: torch.Tensor) -> torch.Tensor:
        """The cost of every term at ``keep`` (float flags of every global channel)."""
        ix = self._index
        frac = self.fractions(keep)
        per = frac[ix["factors"]] if ix["factors"].numel() else torch.ones(len(self.terms), 0, dtype=torch.float64)
        out = ix["weights"] * per.prod(dim=1)
        if bool(ix["is_table"].any()):
            rows = []
            for i, t in enumerate(self.terms):
                rows.append(_bilinear(t.table, t.grid, t.grid if t.grid_out is None else t.grid_out,
                                      per[i, 0], per[i, 1]) if t.table is not None else out[i])
            out = torch.stack(rows)
        return out

    def cost(self, keep: torch.Tensor) -> torch.Tensor:
        """Total cost (a 0-dim float64 tensor) at ``keep``."""
        return self.term_costs(keep).sum()

    def dense_cost(self) -> float:
        return float(self.cost(torch.ones(self.num_channels)))

    def marginal(self, keep: torch.Tensor) -> torch.Tensor:
        """d cost / d keep_c for every global channel: what removing channel c saves."""
        k = keep.detach().double().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(self.cost(k), k, allow_unused=True)
        return torch.zeros_like(k) if grad is None else grad.detach()


def _bilinear(table: torch.Tensor, grid_x: torch.Tensor, grid_y: torch.Tensor, x: torch.Tensor,
              y: torch.Tensor) -> torch.Tensor:
    """``table`` (over ``grid_x`` x ``grid_y``) at (x, y), bilinear; clamped to the grid; a
    grid of one point is constant along its axis."""
    def locate(grid, v):
        if len(grid) == 1:
            return 0, 0, torch.zeros_like(v)
        v = v.clamp(float(grid[0]), float(grid[-1]))
        i = int(torch.searchsorted(grid, v.detach().reshape(1), right=True).clamp(1, len(grid) - 1))
        lo, hi = grid[i - 1], grid[i]
        return i - 1, i, (v - lo) / (hi - lo)

    i0, i1, tx = locate(grid_x, x)
    j0, j1, ty = locate(grid_y, y)
    top = table[i0, j0] * (1 - ty) + table[i0, j1] * ty
    bottom = table[i1, j0] * (1 - ty) + table[i1, j1] * ty
    return top * (1 - tx) + bottom * tx


def factor_channels(groups: ChannelGroups, factor: Tuple[str, ...]) -> List[torch.Tensor]:
    """The channel-id tensors a :class:`passes.flops.FlopTerm` factor stands for (one per
    channel dim; empty when it carries no channels)."""
    kind, node = factor[0], factor[1]
    if kind == "tensor":
        ch = groups.node_channels.get(node)
        if isinstance(ch, tuple):
            ch = ch[0] if ch else None
        return [v for v in ch.values()] if isinstance(ch, dict) or hasattr(ch, "values") else []
    if kind == "reads":
        seen, out = set(), []
        for c in groups.contractions:
            if c.consumer == node and (c.arg, c.dim) not in seen:
                seen.add((c.arg, c.dim))
                ids = groups.read_channels(c)
                if ids is not None:
                    out.append(ids)
        return out
    if kind == "internal":
        ids = groups.internal_channels.get(node, {}).get(factor[2])
        return [] if ids is None else [ids]
    raise ValueError(f"unknown cost factor {factor!r}")


def flop_cost_terms(gm: fx.GraphModule, groups: ChannelGroups,
                    example_inputs: Tuple[torch.Tensor, ...]) -> List[Tuple[fx.Node, FlopTerm, Tuple[torch.Tensor, ...]]]:
    """Every FLOP term of ``gm`` (whole batch) with its factors resolved to channel ids.

    Shapes come from the channel analysis (``groups.node_shapes``) when it ran on inputs
    of the same shapes and recorded every node, else from a shape propagation on a copy
    of ``gm``.
    """
    shapes = groups.node_shapes
    same_example = [tuple(a.shape) for a in example_inputs if isinstance(a, torch.Tensor)] == \
        [spec[1] for spec in groups.input_specs if spec[0] == "tensor"]
    if same_example and all(n.name in shapes for n in gm.graph.nodes if n.op != "output"):
        work, shape_of = gm, _recorded_shape(shapes)
    else:
        work, shape_of = shape_propagated(gm, example_inputs), None
    out = []
    for node in work.graph.nodes:
        terms, _weight = flop_terms(work, node, shape_of)
        for t in terms:
            ids = tuple(i for f in t.factors for i in factor_channels(groups, f))
            out.append((node, t, ids))
    return out


def _recorded_shape(shapes: Mapping[str, object]):
    def shape_of(node: fx.Node):
        shape = shapes.get(node.name)
        return shape if isinstance(shape, (tuple, list, torch.Size)) and all(isinstance(d, int) for d in shape) \
            else None
    return shape_of


def flop_cost_model(gm: fx.GraphModule, groups: ChannelGroups,
                    example_inputs: Tuple[torch.Tensor, ...]) -> ChannelCostModel:
    """FLOPs per sample (as :func:`passes.flops.count_flops` counts them) of ``gm``
    slimmed to any keep; ``groups`` must be the channel groups of ``gm``."""
    batch = example_inputs[0].shape[0] if example_inputs and getattr(example_inputs[0], "dim", lambda: 0)() else 1
    terms = tuple(CostTerm(weight=t.flops / max(batch, 1), factors=ids, node=node.name)
                  for node, t, ids in flop_cost_terms(gm, groups, example_inputs))
    return ChannelCostModel(terms=terms, num_channels=groups.num_channels, unit="FLOPs")


def param_cost_model(groups: ChannelGroups, shapes: Mapping[str, Sequence[int]]) -> ChannelCostModel:
    """Elements of the parameters ``shapes`` names after slimming to any keep (a
    parameter in no group stays whole), as :meth:`ChannelGroups.params_after` counts them."""
    terms = []
    for p, shape in shapes.items():
        dims = groups.slice_channels(p) if p in groups.param_shapes else {}
        terms.append(CostTerm(weight=float(math.prod(shape)), factors=tuple(dims.values()), node=p))
    return ChannelCostModel(terms=tuple(terms), num_channels=groups.num_channels, unit="params")
