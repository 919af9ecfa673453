"""Human-readable views of a compression: the per-layer summary table, the full report
(shapes before -> after slimming, parameter and FLOP totals per task) and a report
folder with the mask-overlap plot and the graph drawing.

Every column holding a fraction says which: ``kept[task]`` / ``kept (final)`` are the
fractions of a layer the masks keep (its density), ``(% kept)`` is after / before, and
``removed`` (the budget table) and "sparsity" are what was taken away.

FLOPs are those of :func:`passes.flops.count_flops`: multiply-adds x 2 of convolutions,
linear layers and matmuls, per sample; elementwise ops, norms and pooling are not
counted.
"""
from __future__ import annotations

import html
import logging
import pathlib
import re
from typing import TYPE_CHECKING, Any, Dict, Hashable, List, Optional, Sequence, Tuple, Union

import torch
from tabulate import tabulate

from .plan import Plan

if TYPE_CHECKING:
    import torch.fx as fx

    from .result import CompressionResult

__all__ = ["summary_table", "owners_label", "report", "write_report", "example_inputs_for"]

log = logging.getLogger(__name__)


def owners_label(plan: Plan, param: str) -> str:
    owners = plan.owners[param]
    if not owners:
        return "unused"
    names = ",".join(str(t) for t in plan.tasks if t in owners)
    return f"shared({names})" if len(owners) > 1 else names


def _layer_headers(tasks: Sequence[Hashable], shape: str = "shape") -> List[str]:
    """Headers of a per-layer table: each task's kept fraction of the layer (its own
    mask's density), then the kept fraction of the final mask."""
    return ["parameter", "owners", shape, *[f"kept[{t}]" for t in tasks], "kept (final)"]


def summary_table(plan: Plan, *, tablefmt: str = "github") -> str:
    """Per prunable layer: owners, shape, the fraction each task's own mask keeps, the
    fraction the final mask keeps; totals. Sparsity (below the table) is the fraction removed."""
    tasks: List[Hashable] = list(plan.tasks)
    headers = _layer_headers(tasks)
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
        f"sparsity (fraction removed): target {cfg.sparsity:.4f}, achieved {plan.sparsity:.4f} over "
        f"{numel_total} prunable elements",
    ]
    if unused:
        lines.append(f"unused parameters (reach no task output, never pruned): {', '.join(unused)}")
    budget = budget_table(plan)
    if budget is not None:
        lines += ["", str(plan.budget), tabulate(budget[1], headers=budget[0], tablefmt=tablefmt, disable_numparse=True)]
    fixed = fixed_groups_table(plan)
    if fixed is not None:
        lines += ["", "channel groups that cannot be pruned (they hold prunable parameters):",
                  tabulate(fixed[1], headers=fixed[0], tablefmt=tablefmt, disable_numparse=True)]
    dense = unpruned_table(plan)
    if dense is not None:
        lines += ["", "weights left dense (not counted in sparsity):",
                  tabulate(dense[1], headers=dense[0], tablefmt=tablefmt, disable_numparse=True)]
    return "\n".join(lines)


def unpruned_table(plan: Plan) -> Optional[Tuple[List[str], List[List[str]]]]:
    """(headers, rows): the weights compress() could not prune under the default filter
    (:attr:`Plan.unpruned`), with the reason; None when there are none."""
    unpruned = getattr(plan, "unpruned", None)
    if not unpruned:
        return None
    return ["parameter", "why left dense"], [[p, why] for p, why in unpruned.items()]


def budget_table(plan: Plan) -> Optional[Tuple[List[str], List[List[str]]]]:
    """(headers, rows): parameters, FLOPs and latency before and after slimming, for a
    channel plan (None for element plans)."""
    if plan.budget is None:
        return None
    return ["quantity", "before", "after (slim)", "removed"], [list(r) for r in plan.budget.rows()]


def fixed_groups_table(plan: Plan, most: int = 10) -> Optional[Tuple[List[str], List[List[str]]]]:
    """(headers, rows): the channel groups holding prunable parameters that the graph pins,
    largest first, with the reason (a task output, a graph input, a mixing op...)."""
    if plan.channels is None:
        return None
    prunable = set(plan.prunable)
    rows = []
    for g in plan.channels.groups.groups:
        held = sorted({m.param_name for m in g.members if m.param_name in prunable})
        if g.removable or not held:
            continue
        # source files by base name: the table reads the same before and after save/load
        reason = re.sub(r'File "([^"]*)"', lambda m: f'File "{pathlib.PurePath(m.group(1)).name}"', g.reason)
        rows.append((g.size, [str(g.id), str(g.size), ", ".join(held[:3]) + (" ..." if len(held) > 3 else ""),
                              reason]))
    if not rows:
        return None
    rows.sort(key=lambda r: -r[0])
    out = [r for _, r in rows[:most]]
    if len(rows) > most:
        out.append(["...", "", f"{len(rows) - most} more", ""])
    return ["group", "channels", "prunable parameters", "why fixed"], out


# ----------------------------------------------------------------------------- full report
def example_inputs_for(result: "CompressionResult", example_inputs: Any = None) -> Tuple[Any, ...]:
    """``example_inputs`` as a tuple, or random inputs shaped like the batches compress() saw."""
    if example_inputs is not None:
        return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if result.plan.input_specs is None:
        from .errors import DisparseValueError

        raise DisparseValueError("example_inputs are needed: compress() saw no batch to take their shapes from")
    return result.plan.example_inputs(next((p.device for p in result.model.parameters()), None))


def _shape(t: Optional[torch.Tensor]) -> str:
    return "x".join(map(str, t.shape)) if t is not None else "removed"


def _count(before: float, after: float) -> str:
    ratio = f" ({after / before:.1%})" if before else ""
    return f"{int(before):,} -> {int(after):,}{ratio}"


def _sections(result: "CompressionResult", example_inputs: Any, slim_model: Optional["fx.GraphModule"]):
    """(title, headers, rows) of the layer table and the totals table, and the notes."""
    from disparse_fx.passes.flops import count_flops

    from .api import slim as slim_fn

    plan = result.plan
    example = example_inputs_for(result, example_inputs)
    if slim_model is None:
        slim_model = slim_fn(result, example)
    element = plan.channels is None
    tasks: List[Hashable] = list(plan.tasks)
    before = dict(result.model.named_parameters())
    after = dict(slim_model.named_parameters())
    names = list(dict.fromkeys([*plan.owners, *before]))

    headers = _layer_headers(tasks, "shape before -> after")
    rows = []
    for p in names:
        t_before = before.get(p)
        shape = f"{_shape(t_before)} -> {_shape(after.get(p))}"
        row = [p, owners_label(plan, p) if p in plan.owners else "-", shape]
        prunable = p in plan.masks
        for t in tasks:
            row.append(f"{plan.density(p, t):.3f}" if prunable and p in plan.task_masks.get(t, {}) else "-")
        row.append(f"{plan.density(p):.3f}" if prunable else "not pruned")
        rows.append(row)

    def numel(table, p):
        t = table.get(p)
        return t.numel() if t is not None else 0

    def kept(p):  # what the masks keep of the slim parameter (element results: its nonzeros)
        n = numel(after, p)
        return min(int(plan.masks[p].sum()), n) if p in plan.masks else n

    flops_before = count_flops(result.model, example)
    flops_after = count_flops(slim_model, example)
    totals_headers = ["scope", "parameters before -> after (% kept)"]
    if element:
        totals_headers.append("parameters kept by the masks (% kept)")
    totals_headers += ["FLOPs before -> after (% kept)"]
    if element:
        totals_headers.append("effective FLOPs, masked (% kept)")
    totals = []
    scopes: List[Tuple[str, Sequence[str], Optional[Hashable]]] = [
        (f"task {t}", [p for p in names if t in plan.owners.get(p, ())], t) for t in tasks]
    scopes.append(("overall", names, None))
    for label, params, task in scopes:
        pb = sum(numel(before, p) for p in params)
        pa = sum(numel(after, p) for p in params)
        fb = flops_before.total if task is None else flops_before.per_task.get(task, 0)
        fa = flops_after.total if task is None else flops_after.per_task.get(task, 0)
        row = [label, _count(pb, pa)]
        if element:
            row.append(_count(pb, sum(kept(p) for p in params)))
        row.append(_count(fb, fa))
        if element:
            eff = flops_before.effective_total if task is None else flops_before.effective_per_task.get(task, 0)
            row.append(_count(fb, eff))
        totals.append(row)
    cfg = plan.config
    notes = [
        f"criterion={cfg.criterion} disentangle={cfg.disentangle} granularity={cfg.granularity} "
        f"batches={plan.batches} keep_ratio={plan.keep_ratio:.4f}",
        f"sparsity (fraction removed): target {cfg.sparsity:.4f}, achieved {plan.sparsity:.4f} over the "
        "prunable parameters",
        "shapes after: the slim model (dfx.slim); 'removed' = the parameter is gone from it",
        "FLOPs per sample: conv / linear / matmul / attention multiply-adds x 2 (elementwise ops, norms and "
        "pooling not counted); a task's FLOPs are those its output needs"
        + ("; effective FLOPs scale each op by its weight's mask density (what a sparse kernel would run)"
           if element else ""),
    ]
    unused = [p for p, o in plan.owners.items() if not o]
    if unused:
        notes.append(f"unused parameters (reach no task output, never pruned): {', '.join(unused)}")
    sections = [("Per-layer", headers, rows), ("Totals", totals_headers, totals)]
    budget = budget_table(plan)
    if budget is not None:
        notes.append(str(plan.budget))
        sections.append(("Budget", *budget))
    fixed = fixed_groups_table(plan)
    if fixed is not None:
        sections.append(("Fixed channel groups", *fixed))
    dense = unpruned_table(plan)
    if dense is not None:
        sections.append(("Weights left dense", *dense))
    heads = attention_table(plan)
    if heads is not None:
        sections.append(("Attention heads", *heads))
    return sections, notes


def attention_table(plan: Plan) -> Optional[Tuple[List[str], List[List[str]]]]:
    """(headers, rows): per attention layer of a channel plan, its heads (or head dims)
    before, kept, and how many each task voted to keep (``-``: the task does not reach
    the layer); None when the plan has no attention."""
    if plan.channels is None or not plan.channels.groups.attention_units:
        return None
    groups, keep, task_keep = plan.channels.groups, plan.channels.keep, plan.channels.task_keep
    tasks = list(plan.tasks)
    rows, seen = [], set()
    for node, kind, gids in groups.attention_units:
        gid = max(i for i, o in enumerate(groups.offsets) if o <= int(gids[0]))
        if (gid, kind) in seen:
            continue  # q, k and v of one layer split into the same heads
        seen.add((gid, kind))
        g = groups.groups[gid]
        local = gids - groups.offsets[gid]
        layer = next((m.param_name for m in g.members if m.param_name in plan.masks), node)
        kept = int(keep[gid][local].sum()) if gid in keep else len(local)
        row = [layer, kind.replace("_", " "), str(len(local)), str(kept) if g.removable else f"{kept} (fixed)"]
        for t in tasks:
            votes = task_keep.get(t, {}).get(gid)
            row.append("-" if votes is None else str(int(votes[local].sum())))
        rows.append(row)
    return ["layer (first pruned parameter)", "unit", "before", "kept", *[f"votes[{t}]" for t in tasks]], rows


def report(result: "CompressionResult", *, example_inputs: Any = None, slim_model: Optional["fx.GraphModule"] = None,
           tablefmt: str = "github") -> str:
    """The compression report: one row per parameter (owners, shape before -> after,
    the fraction each task's mask keeps, the fraction the final mask keeps), then
    parameters and FLOPs before -> after per task and overall, with the percentage kept
    (element results: also what the masks keep, and effective FLOPs).

    ``slim_model``: the slim model to read shapes and FLOPs after from (default:
    ``dfx.slim(result, example_inputs)``). ``example_inputs``: a Tensor or a tuple,
    used to count FLOPs (default: random inputs shaped like the batches compress() saw).
    """
    sections, notes = _sections(result, example_inputs, slim_model)
    parts = []
    for title, headers, rows in sections:
        parts += [f"## {title}", "", tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True), ""]
    parts += [f"- {n}" for n in notes]
    return "\n".join(parts)


def write_report(result: "CompressionResult", folder: Union[str, pathlib.Path], *, example_inputs: Any = None,
                 format: str = "md", slim_model: Optional["fx.GraphModule"] = None) -> Dict[str, pathlib.Path]:
    """Write ``report.md`` (or ``report.html``) with the report, the mask-overlap table
    and plot (``overlap.png``) and the graph drawing (``graph.svg``, ``graph.png``) into
    ``folder`` (created if needed). Returns ``{"report", "overlap_plot", "graph_svg",
    "graph_png": path}`` (no ``overlap_plot`` when the model has no shared layer).
    """
    from .api import slim as slim_fn
    from .draw import draw
    from .errors import DisparseValueError
    from .overlap import mask_overlap

    if format not in ("md", "html"):
        raise DisparseValueError(f"format must be 'md' or 'html', got {format!r}")
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    example = example_inputs_for(result, example_inputs)
    slim_model = slim_model if slim_model is not None else slim_fn(result, example)
    paths: Dict[str, pathlib.Path] = {}
    sections, notes = _sections(result, example, slim_model)
    overlap = mask_overlap(result)
    if overlap.layers:
        paths["overlap_plot"] = folder / "overlap.png"
        overlap.plot(paths["overlap_plot"])
    paths["graph_svg"], paths["graph_png"] = folder / "graph.svg", folder / "graph.png"
    drawing = draw(result, [paths["graph_svg"], paths["graph_png"]], slim_model=slim_model)
    fmt = "github" if format == "md" else "html"
    watershed = (f"watershed layer: {overlap.watershed} (all-task IoU drops by {overlap.watershed_drop:.3f})"
                 if overlap.watershed else "watershed layer: none (" + (
                     "the all-task IoU never drops from one shared layer to the next)" if len(overlap.layers) > 1
                     else "fewer than two shared layers)"))
    title = f"Compression report: {type(result.model).__name__}"
    graph_note = (f"{len(drawing.nodes)} boxes; nodes coloured by owner, conv/linear output widths before -> "
                  f"after" + (f"; module paths collapsed to depth {drawing.depth}" if drawing.depth else ""))
    if format == "md":
        lines = [f"# {title}", ""]
        for name, headers, rows in sections:
            lines += [f"## {name}", "", tabulate(rows, headers=headers, tablefmt=fmt, disable_numparse=True), ""]
        lines += [f"- {n}" for n in notes] + ["", "## Mask overlap on shared layers", ""]
        if overlap.layers:
            lines += [overlap.table(fmt), "", f"- {watershed}", "", "![mask overlap](overlap.png)", ""]
        else:
            lines += ["No shared prunable layer.", ""]
        lines += ["## Graph", "", f"- {graph_note}", "", "![graph](graph.svg)", ""]
        text = "\n".join(lines)
    else:
        body = [f"<h1>{html.escape(title)}</h1>"]
        for name, headers, rows in sections:
            body += [f"<h2>{html.escape(name)}</h2>", tabulate(rows, headers=headers, tablefmt=fmt,
                                                                disable_numparse=True)]
        body.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
        body.append("<h2>Mask overlap on shared layers</h2>")
        if overlap.layers:
            body += [overlap.table(fmt), f"<p>{html.escape(watershed)}</p>",
                     '<img src="overlap.png" alt="mask overlap">']
        else:
            body.append("<p>No shared prunable layer.</p>")
        body += ["<h2>Graph</h2>", f"<p>{html.escape(graph_note)}</p>", '<img src="graph.svg" alt="graph">']
        text = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>" + html.escape(title)
                + "</title><style>table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;"
                "font-family:monospace}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    paths["report"] = folder / f"report.{format}"
    paths["report"].write_text(text, encoding="utf-8")
    log.info("wrote report to %s", folder)
    return {k: paths[k] for k in ("report", "overlap_plot", "graph_svg", "graph_png") if k in paths}
