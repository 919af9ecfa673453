"""Human-readable views of a compression: the per-layer summary table."""
from __future__ import annotations

from typing import Hashable, List

from tabulate import tabulate

from .plan import Plan

__all__ = ["summary_table", "owners_label"]


def owners_label(plan: Plan, param: str) -> str:
    owners = plan.owners[param]
    if not owners:
        return "unused"
    names = ",".join(str(t) for t in plan.tasks if t in owners)
    return f"shared({names})" if len(owners) > 1 else names


def summary_table(plan: Plan, *, tablefmt: str = "github") -> str:
    """Per prunable layer: owners, shape, each task's own density, final density; totals."""
    tasks: List[Hashable] = list(plan.tasks)
    headers = ["parameter", "owners", "shape", *[f"density[{t}]" for t in tasks], "final density"]
    rows = []
    kept_total = numel_total = 0
    for p in plan.prunable:
        mask = plan.masks[p]
        row = [p, owners_label(plan, p), "x".join(map(str, mask.shape))]
        for t in tasks:
            row.append(f"{plan.density(p, t):.3f}" if p in plan.task_masks.get(t, {}) else "-")
        row.append(f"{plan.density(p):.3f}")
        rows.append(row)
        kept_total += int(mask.sum())
        numel_total += mask.numel()
    unused = [p for p, o in plan.owners.items() if not o]
    totals = ["TOTAL", f"{len(plan.prunable)} prunable", f"{numel_total} elements", *([""] * len(tasks)),
              f"{kept_total / max(numel_total, 1):.3f}"]
    rows.append(totals)
    text = tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)
    cfg = plan.config
    lines = [
        text,
        "",
        f"criterion={cfg.criterion} disentangle={cfg.disentangle} granularity={cfg.granularity} "
        f"batches={plan.batches} keep_ratio={plan.keep_ratio:.4f}",
        f"sparsity: target {cfg.sparsity:.4f}, achieved {plan.sparsity:.4f} over {numel_total} prunable elements",
    ]
    if unused:
        lines.append(f"unused parameters (reach no task output, never pruned): {', '.join(unused)}")
    return "\n".join(lines)
