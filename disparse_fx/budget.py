"""Budgets: what ``CompressConfig.sparsity`` counts, and the three quantities users buy.

``budget="params"`` counts prunable parameters (the default), ``"flops"`` the FLOPs per
sample at the example input's shape (:mod:`passes.flops`), ``"latency"`` the forward time
on the model's device at the example batch size and dtype (:mod:`disparse_fx.latency_model`).
:func:`budget_model` gives the channel decision the chosen quantity as a function of the
kept channels (:mod:`passes.channel_costs`); :class:`BudgetReport` holds all three before
and after slimming, for the plan, ``summary()``, ``report()``, the CLI and the demo.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from disparse_fx.passes.channel_costs import ChannelCostModel, flop_cost_model, param_cost_model
from disparse_fx.passes.channel_groups import ChannelGroups
from disparse_fx.passes.errors import warn

from .channel_decision import TARGET_TOLERANCE
from .config import CompressConfig
from .latency_model import example_batch_size, latency_cost_model

__all__ = ["BudgetReport", "budget_model", "budget_report"]


@dataclass(frozen=True)
class BudgetReport:
    """The budget a channel plan was made for, and what slimming gives.

    kind: "params" | "flops" | "latency"; target: the requested fraction removed;
    achieved: the fraction of that quantity the plan removes (after slimming).
    params: (all parameters before, after); flops: (FLOPs per sample before, after, as
    passes.flops counts them: conv / linear / matmul / attention multiply-adds x 2);
    latency_ms: (modelled forward ms at the example batch before, after) from the latency
    table, or None when the budget is not latency (no table was measured).
    """

    kind: str
    target: float
    achieved: float
    params: Tuple[int, int]
    flops: Tuple[int, int]
    latency_ms: Optional[Tuple[float, float]] = None
    note: str = ""

    def rows(self):
        """[(quantity, before, after, removed fraction)] for tables."""
        out = [("parameters", f"{self.params[0]:,}", f"{self.params[1]:,}", _removed(*self.params)),
               ("FLOPs / sample", _si(self.flops[0]), _si(self.flops[1]), _removed(*self.flops))]
        if self.latency_ms is not None:
            out.append(("latency (modelled) ms", f"{self.latency_ms[0]:.2f}", f"{self.latency_ms[1]:.2f}",
                        _removed(*self.latency_ms)))
        else:
            out.append(("latency", "not measured", "(budget='latency' measures it)", ""))
        return out

    def __str__(self) -> str:
        head = f"budget {self.kind}: target {self.target:.2%} removed, achieved {self.achieved:.2%}"
        body = "; ".join(f"{q} {b} -> {a}" + (f" (-{r})" if r else "") for q, b, a, r in self.rows()
                         if self.latency_ms is not None or q != "latency")
        if self.latency_ms is None:
            body += "; latency not modelled (budget='latency' measures a per-layer table)"
        return f"{head}; {body}" + (f"; {self.note}" if self.note else "")


#: A latency plan removing this much more of the FLOPs than of the modelled latency is
#: flagged: the model's time is mostly not arithmetic.
OVERHEAD_GAP = 0.25


def _overhead_bound(config: CompressConfig, flops: Tuple[int, int], batch: int) -> str:
    """A warning (also returned, for the report's note) when a latency target needed far
    more of the FLOPs than it removes of the time. Such a model (small inputs, many small
    ops) spends its time in per-op dispatch and memory-bound ops; the latency model
    scales every op's time with its kept channels, so there it promises more speed-up
    than slimming gives."""
    removed = 1.0 - flops[1] / flops[0]
    if removed - config.sparsity <= OVERHEAD_GAP:
        return ""
    text = (f"budget='latency' at sparsity={config.sparsity:g} removes {removed:.1%} of the FLOPs: at batch {batch} "
            "this model's forward time is mostly per-op overhead and memory-bound ops, which the latency table "
            "scales with the kept channels as if they were arithmetic, so the measured speed-up of the slim "
            "model is likely smaller than the modelled one. Time dfx.slim(result) against the dense model "
            "(benchmarks/speed.py) before relying on it, or lower the sparsity")
    warn(text)
    return "overhead-bound: the modelled latency saving is optimistic"


def _removed(before, after) -> str:
    return f"{1 - after / before:.1%}" if before else ""


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f} {unit}"
    return f"{n:.0f}"


def budget_model(config: CompressConfig, gm: fx.GraphModule, groups: ChannelGroups,
                 example: Tuple) -> Optional[ChannelCostModel]:
    """The budget quantity of ``gm`` as a function of its kept channels (None for params)."""
    if config.budget == "flops":
        return flop_cost_model(gm, groups, example)
    if config.budget == "latency":
        return latency_cost_model(gm, groups, example, time_limit_s=config.latency_time_limit_s,
                                  progress=config.progress)
    return None


def budget_report(config: CompressConfig, gm: fx.GraphModule, groups: ChannelGroups, example: Tuple,
                  keep: Mapping[int, torch.Tensor], achieved: float,
                  model: Optional[ChannelCostModel], all_shapes: Mapping[str, Sequence[int]]) -> BudgetReport:
    """All three quantities before and after slimming with ``keep``."""
    flat = groups.keep_vector(keep).double()
    ones = torch.ones_like(flat)
    params = param_cost_model(groups, all_shapes)
    flops = model if model is not None and model.unit == "FLOPs" else flop_cost_model(gm, groups, example)
    latency = None
    note = ""
    if model is not None and model.unit == "ms":
        latency = (float(model.cost(ones)), float(model.cost(flat)))
        note = getattr(model, "note", "")
    flops_pair = (int(round(float(flops.cost(ones)))), int(round(float(flops.cost(flat)))))
    if latency is not None and flops_pair[0]:
        note = "; ".join(filter(None, [note, _overhead_bound(config, flops_pair, example_batch_size(example))]))
    if abs(achieved - config.sparsity) > TARGET_TOLERANCE:
        note = "; ".join(filter(None, [note, f"off target by {achieved - config.sparsity:+.4f}: the nearest cut of "
                                             f"the channel ranking (the next channel in it "
                                             f"moves the budget further)"]))
    return BudgetReport(
        kind=config.budget, target=float(config.sparsity), achieved=float(achieved),
        params=(int(round(float(params.cost(ones)))), int(round(float(params.cost(flat))))),
        flops=flops_pair,
        latency_ms=latency, note=note)
