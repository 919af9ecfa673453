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

from .channel_decision import TARGET_TOLERANCE
from .config import CompressConfig

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
        from .latency_model import latency_cost_model

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
    if abs(achieved - config.sparsity) > TARGET_TOLERANCE:
        note = "; ".join(filter(None, [note, f"off target by {achieved - config.sparsity:+.4f}: the nearest cut of "
                                             f"the channel ranking (the next channel in it "
                                             f"moves the budget further)"]))
    return BudgetReport(
        kind=config.budget, target=float(config.sparsity), achieved=float(achieved),
        params=(int(round(float(params.cost(ones)))), int(round(float(params.cost(flat))))),
        flops=(int(round(float(flops.cost(ones)))), int(round(float(flops.cost(flat))))),
        latency_ms=latency, note=note)
