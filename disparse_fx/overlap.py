"""Mask overlap between tasks on shared layers, and the "watershed" layer.

For each shared prunable parameter (in depth order: the order the graph first reads
them), the tasks' own keep-masks are compared by intersection over union, pairwise and
over all tasks (|AND of all| / |OR of all| - for more than two tasks this is stricter
than any pairwise IoU). The watershed is the layer where the all-task IoU falls most
sharply from the layer before it: past it the tasks want different weights, and
sharing brings little (the DiSparse paper's figure).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Hashable, Mapping, Optional, Sequence, Tuple

import torch
from tabulate import tabulate

from .plan import Plan

__all__ = ["LayerOverlap", "MaskOverlap", "mask_overlap", "iou"]


def iou(masks: Sequence[torch.Tensor]) -> float:
    """|AND| / |OR| of boolean masks (1.0 when all are empty)."""
    inter = masks[0].clone()
    union = masks[0].clone()
    for m in masks[1:]:
        inter &= m
        union |= m
    u = int(union.sum())
    return float(int(inter.sum()) / u) if u else 1.0


@dataclass(frozen=True)
class LayerOverlap:
    param: str
    depth: int  # position among the shared layers, 0 = closest to the input
    tasks: Tuple[Hashable, ...]
    pairwise: Mapping[Tuple[Hashable, Hashable], float]
    all_tasks: float


@dataclass(frozen=True)
class MaskOverlap:
    """layers: one row per shared layer, in depth order; watershed: the layer after which
    the all-task IoU drops the most (None with fewer than two shared layers), and the drop."""

    layers: Tuple[LayerOverlap, ...]
    watershed: Optional[str]
    watershed_drop: float

    def table(self, tablefmt: str = "github") -> str:
        pairs = sorted({p for layer in self.layers for p in layer.pairwise}, key=str)
        rows = [[layer.depth, layer.param, *[_fmt(layer.pairwise.get(p)) for p in pairs], f"{layer.all_tasks:.3f}",
                 "<- watershed" if layer.param == self.watershed else ""] for layer in self.layers]
        headers = ["depth", "shared layer", *[f"IoU {a}/{b}" for a, b in pairs], "IoU all", ""]
        return tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)

    def plot(self, path, *, title: str = "Per-task mask overlap on shared layers"):
        """Line plot of the IoU (0..1) of the tasks' keep-masks against depth: all tasks,
        and each pair; the x axis names each shared layer (its parameter, rotated). Writes
        PNG or SVG by the suffix of ``path`` and returns the matplotlib Figure."""
        from matplotlib.figure import Figure

        names = [layer.param for layer in self.layers]
        longest = max(map(len, names), default=0)
        # one tick per layer; the rotated names need about 0.065 inch per character below the axis
        fig = Figure(figsize=(max(6.0, len(names) * 0.3), 3.2 + 0.065 * longest))
        ax = fig.add_subplot()
        depths = [layer.depth for layer in self.layers]
        pairs = sorted({p for layer in self.layers for p in layer.pairwise}, key=str)
        for p in pairs:
            ax.plot(depths, [layer.pairwise.get(p, float("nan")) for layer in self.layers],
                    lw=1, alpha=0.6, label=f"{p[0]} / {p[1]}")
        ax.plot(depths, [layer.all_tasks for layer in self.layers], "k-o", lw=2, ms=3, label="all tasks")
        if self.watershed is not None:
            w = next(layer.depth for layer in self.layers if layer.param == self.watershed)
            ax.axvline(w, color="red", ls="--", lw=1, label=f"watershed: {self.watershed}")
        ax.set_xticks(depths)
        ax.set_xticklabels(names, rotation=90, fontsize=7 if len(names) <= 40 else 5)
        ax.set_xlabel("shared layer (parameter), in depth order")
        ax.set_ylabel("IoU of task keep-masks")
        ax.set_ylim(0, 1.02)
        ax.set_title(title)
        ax.legend(fontsize=7, loc="lower left")
        fig.tight_layout()
        fig.savefig(path)
        return fig


def mask_overlap(result_or_plan, *, order: Optional[Sequence[str]] = None) -> MaskOverlap:
    """Overlap of the tasks' keep-masks on every shared layer of a compression result.

    ``order``: parameter names in depth order (default: the plan's prunable order,
    which is the order the traced graph first reads them).
    """
    plan: Plan = getattr(result_or_plan, "plan", result_or_plan)
    names = [p for p in (order or plan.prunable) if len(plan.owners.get(p, ())) > 1 and p in plan.masks]
    layers = []
    for depth, p in enumerate(names):
        tasks = tuple(t for t in plan.tasks if t in plan.owners[p] and p in plan.task_masks.get(t, {}))
        masks = [plan.task_masks[t][p] for t in tasks]
        pairwise = {(a, b): iou([plan.task_masks[a][p], plan.task_masks[b][p]])
                    for a, b in itertools.combinations(tasks, 2)}
        layers.append(LayerOverlap(param=p, depth=depth, tasks=tasks, pairwise=pairwise, all_tasks=iou(masks)))
    watershed, drop = None, 0.0
    for prev, cur in zip(layers, layers[1:]):
        if prev.all_tasks - cur.all_tasks > drop:
            watershed, drop = cur.param, prev.all_tasks - cur.all_tasks
    return MaskOverlap(layers=tuple(layers), watershed=watershed, watershed_drop=drop)


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3f}"
