"""The unanimous decision at channel granularity.

A *channel* is one channel of a removable channel group (passes.channel_groups): the
slices of every coupled parameter that must go together. For each ranking unit ``u``
(a task, or the summed loss when ``disentangle=False``):

- the channel's score is the sum of ``u``'s element scores over every prunable
  parameter slice of the channel that ``u`` reaches;
- the channels ``u`` reaches (its score covers at least one of their slices) are ranked
  by score per prunable element the channel holds (importance per parameter removed),
  ties in a seeded random order, giving ``c_u(ch) = (rank + 1) / n_u``.

As for elements, ``u`` keeps ``ch`` iff ``c_u(ch) <= r``, and a channel is removed only
when every unit reaching it votes so: keep iff ``min_u c_u(ch) <= r``; channels inside
one head are reached by that head's task alone. ``r`` is bisected so that the fraction
of prunable parameters removed *after slimming* (a conv loses rows and columns, so this
is not the fraction of channels) is within a percentage point of the target. Each group
keeps at least one channel (and a channel of every split piece); with ``round_to=N``
kept counts are rounded up to a multiple of N (capped at the group size), the extra
channels being the best-ranked ones, credited to the unit ranking them best.

Budgets (``config.budget``). With "params" (the default) the cost of a channel is the
prunable elements it holds and the target counts prunable parameters after slimming, as
above. With "flops" or "latency" the target counts the model's FLOPs per sample
(:func:`passes.channel_costs.flop_cost_model`, exact after slimming) or its modelled
forward time (:mod:`disparse_fx.latency_model`, a measured per-layer table), and a
channel's cost is what its removal saves: ``d cost / d keep_c`` at the current plan, which
depends on the kept widths of its neighbours (a conv's output channel costs its kept
input channels times its kernel and output size; the next layer's input channel its kept
outputs). Each unit ranks the channels it reaches by score per unit of that saving; the
keep ratio ``r`` is searched so the budget quantity removed hits the target; then the
savings are re-estimated at the plan found (averaged with the previous estimate, so the
order settles) and the ranking and search are repeated (:data:`_REESTIMATE` times). The
unanimous rule is untouched: ``keep iff min_u c_u(ch) <= r``. This is the greedy
importance-per-cost ordering that latency-aware pruning uses (HALP, Shen et al., NeurIPS
2022, solves the same ranking as a knapsack over a per-layer latency table; Torch-Pruning
reaches a MACs target by re-counting between steps), applied per task. Cost: each
estimate is one backward through the cost model (a few hundred terms) and each search
``O(log C)`` evaluations of it, C the number of channels; on a ResNet-50 trunk the whole
decision takes about a second.

A target that even the smallest plan misses by more than a point raises
:class:`~disparse_fx.errors.TargetUnreachableError` naming the most that can be removed
and the largest pinned groups with their reasons; ``best_effort=True`` accepts the
smallest plan with a warning.

Element-shaped masks (api.md): ``masks[p]`` keeps an element iff every channel it
belongs to is kept. ``task_masks[t][p]`` uses ``t``'s own vote along the parameter's
first channel dimension and the final keep along the others; a channel that ``p``'s
owners voted away but another task kept (two groups joined by a residual add, say) is
credited to every owner, so ``masks[p] == OR over owners of task_masks[t][p]`` holds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Hashable, Mapping, Optional, Sequence, Tuple

import torch

from disparse_fx.passes.channel_costs import ChannelCostModel, param_cost_model
from disparse_fx.passes.channel_groups import ChannelGroups
from disparse_fx.passes.errors import warn

from .config import CompressConfig
from .decision import _rank_descending
from .errors import TargetUnreachableError
from .importance import SUMMED, TaskScores


__all__ = ["ChannelPlan", "ChannelDecision", "decide_channels", "prunable_sparsity"]


@dataclass(frozen=True)
class ChannelPlan:
    """Channel-level detail of a channel-granularity plan.

    groups: the channel groups of the traced model; keep: {group id: bool per channel}
    for every removable group (True = kept); task_keep: {task: {group id: bool}} each
    task's own votes over the groups it reaches; scores: {task: {group id: float32}}
    channel scores (normalised to sum 1 per task; with ``disentangle=False`` every task
    sees the one summed score, normalised over all groups and restricted to the groups
    it reaches, so its part may sum to less than 1).
    """

    groups: ChannelGroups
    keep: Mapping[int, torch.Tensor]
    task_keep: Mapping[Hashable, Mapping[int, torch.Tensor]]
    scores: Mapping[Hashable, Mapping[int, torch.Tensor]]


@dataclass(frozen=True)
class ChannelDecision:
    channels: ChannelPlan
    masks: Mapping[str, torch.Tensor]
    task_masks: Mapping[Hashable, Mapping[str, torch.Tensor]]
    keep_ratio: float
    sparsity: float
    budget_removed: float = 0.0  # fraction of the budget quantity removed (= sparsity for "params")


def prunable_sparsity(groups: ChannelGroups, keep: Mapping[int, torch.Tensor], prunable: Sequence[str],
                      shapes: Mapping[str, torch.Size]) -> float:
    """Fraction of the prunable parameters' elements that slimming with ``keep`` removes."""
    after = groups.params_after(keep)
    total = sum(math.prod(shapes[p]) for p in prunable)
    kept = sum(after.get(p, math.prod(shapes[p])) for p in prunable)
    return 1.0 - kept / total


def decide_channels(
    scores: TaskScores,
    groups: ChannelGroups,
    *,
    prunable: Sequence[str],
    shapes: Mapping[str, torch.Size],
    owners: Mapping[str, frozenset],
    task_domains: Mapping[Hashable, Sequence[str]],
    config: CompressConfig,
    round_to: int = 1,
    budget_model: Optional[ChannelCostModel] = None,
) -> ChannelDecision:
    """The channel plan at the target (see the module docstring).

    ``budget_model``: the FLOPs or latency of the model as a function of its kept channels
    (``config.budget`` "flops" / "latency"); None counts prunable parameters. ``round_to``:
    the resolved channel alignment. Raises :class:`TargetUnreachableError` when even the
    smallest plan misses the target by more than a point (unless ``config.best_effort``).
    """
    prunable_set = set(prunable)
    removable = [g for g in groups.groups if g.removable]
    units = list(scores.scores)

    # Channel scores per unit and channel cost (prunable elements per channel).
    unit_scores: Dict[Hashable, Dict[int, torch.Tensor]] = {u: {} for u in units}
    cost: Dict[int, torch.Tensor] = {}
    for g in removable:
        cost[g.id] = torch.zeros(g.size, dtype=torch.float64)
        for m in g.members:
            if m.param_name not in prunable_set:
                continue
            sel = m.index >= 0
            per_slice = math.prod(shapes[m.param_name]) // shapes[m.param_name][m.dim]
            cost[g.id].index_add_(0, m.index[sel], torch.full((int(sel.sum()),), float(per_slice), dtype=torch.float64))
            for u in units:
                s = scores.scores[u].get(m.param_name)
                if s is None:
                    continue
                dims = [d for d in range(s.dim()) if d != m.dim]
                per = (s.sum(dim=dims, dtype=torch.float64) if dims else s.double()).cpu()
                acc = unit_scores[u].setdefault(g.id, torch.zeros(g.size, dtype=torch.float64))
                acc.index_add_(0, m.index[sel], per[sel])
    normalised: Dict[Hashable, Dict[int, torch.Tensor]] = {}
    for u in units:
        total = float(sum(float(v.sum()) for v in unit_scores[u].values())) or 1.0
        normalised[u] = {gid: (v / total).float() for gid, v in unit_scores[u].items()}

    # what the target counts, as a function of the kept channels (parameters: the
    # prunable elements left after slimming, as prunable_sparsity counts them)
    counted = budget_model if budget_model is not None else param_cost_model(
        groups, {p: shapes[p] for p in prunable})
    dense_budget = counted.dense_cost()

    def removed_at(keep) -> float:
        return 1.0 - float(counted.cost(groups.keep_vector(keep).double())) / dense_budget

    def choose(cost):
        ranked = _rank_units(units, unit_scores, cost, groups, config.seed)
        keep_at = _keeper(ranked.c_min, removable, round_to)
        r = _search(ranked.c_min, keep_at, removed_at, config.sparsity)
        return ranked, keep_at, r

    if budget_model is not None:
        # Cost-aware ranking: a channel costs what its removal saves at the current widths
        # of its neighbours; re-estimated at each plan (damped, so the order settles).
        marginal = _split(budget_model.marginal(torch.ones(groups.num_channels, dtype=torch.float64)), groups)
        cost = {gid: marginal[gid] for gid in cost}
        for _ in range(_REESTIMATE):
            ranked, keep_at, r = choose(cost)
            now = _split(budget_model.marginal(groups.keep_vector(keep_at(r)[0]).double()), groups)
            cost = {gid: 0.5 * (cost[gid] + now[gid]) for gid in cost}
    ranked, keep_at, r = choose(cost)
    keep, extra = keep_at(r)
    achieved = removed_at(keep)
    unreachable = False
    if achieved < config.sparsity - TARGET_TOLERANCE:  # coarse channels, or a target out of reach?
        most = removed_at(keep_at(-math.inf)[0])
        if most < config.sparsity - TARGET_TOLERANCE:
            _unreachable(groups, most, config, round_to, prunable_set, shapes)  # raises, or warns (best_effort)
            keep, extra = keep_at(-math.inf)
            achieved, unreachable = most, True
    if abs(achieved - config.sparsity) > TARGET_TOLERANCE and not unreachable:
        warn("CompressConfig(sparsity=%g, budget=%r): the nearest cut of the channel ranking removes %.4f "
             "(off by %+.4f)%s; the channels near the cut are coarse for this target (channels are removed in "
             "importance order, not chosen to fit the budget) - a nearby sparsity or a smaller round_to may "
             "land closer" % (config.sparsity, config.budget, achieved,
             achieved - config.sparsity, f" with channels removed {round_to} at a time" if round_to > 1 else ""))

    voted = [g for g in removable if torch.isfinite(ranked.c_min[g.id]).any()]
    task_keep: Dict[Hashable, Dict[int, torch.Tensor]] = {}
    for ui, u in enumerate(units):
        task_keep[u] = {gid: (cg <= r) | (extra[gid] & (ranked.best_unit[gid] == ui))
                        for gid, cg in ranked.unit_c.get(u, {}).items()}
    if not config.disentangle:  # one global decision: every task sees the final keep of what it reaches
        reach = {t: {g.id for g in voted if any(m.param_name in set(dom) for m in g.members)}
                 for t, dom in task_domains.items()}
        task_keep = {t: {gid: keep[gid] for gid in gids} for t, gids in reach.items()}
        normalised = {t: {gid: normalised[SUMMED][gid] for gid in gids if gid in normalised[SUMMED]}
                      for t, gids in reach.items()}

    masks, task_masks = _element_masks(groups, keep, task_keep, prunable, shapes, owners, task_domains)
    channels = ChannelPlan(groups=groups, keep=keep, task_keep=task_keep, scores=normalised)
    return ChannelDecision(channels=channels, masks=masks, task_masks=task_masks, keep_ratio=r,
                           sparsity=prunable_sparsity(groups, keep, prunable, shapes),
                           budget_removed=achieved)


#: Re-estimations of the channels' marginal FLOPs / latency (each: one ranking and search).
_REESTIMATE = 3
#: How far from the target a plan may land: further below it (and no plan reaches it) the
#: target is unreachable; further off either way, compress warns that channels are coarse.
TARGET_TOLERANCE = 0.01


@dataclass(frozen=True)
class _Ranked:
    c_min: Dict[int, torch.Tensor]      # per group: the best c_u over the units reaching it
    best_unit: Dict[int, torch.Tensor]  # which unit gives c_min (-1: none)
    unit_c: Dict[Hashable, Dict[int, torch.Tensor]]


def _rank_units(units, unit_scores, cost, groups: ChannelGroups, seed: int) -> _Ranked:
    """Rank each unit's channels by score per unit of cost; c_u = (rank + 1) / n_u."""
    c_min = {gid: torch.full((len(c),), math.inf, dtype=torch.float64) for gid, c in cost.items()}
    best_unit = {gid: torch.full((len(c),), -1, dtype=torch.long) for gid, c in cost.items()}
    unit_c: Dict[Hashable, Dict[int, torch.Tensor]] = {}
    for ui, u in enumerate(units):
        gids = list(unit_scores[u])
        if not gids:
            continue
        flat = torch.cat([unit_scores[u][gid] for gid in gids])
        density = flat / torch.cat([cost[gid] for gid in gids]).clamp_min(1e-12)
        rank = _rank_descending(density, seed=seed + ui)
        cu = (rank + 1).double() / len(rank)
        unit_c[u] = dict(zip(gids, cu.split([groups.groups[gid].size for gid in gids])))
        for gid, cg in unit_c[u].items():
            better = cg < c_min[gid]
            c_min[gid] = torch.where(better, cg, c_min[gid])
            best_unit[gid] = torch.where(better, torch.full_like(best_unit[gid], ui), best_unit[gid])
    return _Ranked(c_min=c_min, best_unit=best_unit, unit_c=unit_c)


def _keeper(c_min: Mapping[int, torch.Tensor], removable, round_to: int):
    """keep_at(r) -> ({group: kept flags}, {group: channels forced in beyond the votes})."""
    voted = [g for g in removable if torch.isfinite(c_min[g.id]).any()]
    orders = {g.id: torch.argsort(c_min[g.id], stable=True) for g in voted}  # best-ranked first

    def keep_at(r: float) -> Tuple[Dict[int, torch.Tensor], Dict[int, torch.Tensor]]:
        keep, extra = {}, {}
        for g in voted:
            cm = c_min[g.id]
            k = cm <= r
            forced = torch.zeros_like(k)
            order = orders[g.id]
            need = max(int(k.sum()), 1)
            if round_to > 1:
                need = min(g.size, -(-need // round_to) * round_to)
            if int(k.sum()) < need:
                add = order[: need]
                forced[add] = ~k[add]
                k[add] = True
            for piece in g.keep_one_of:
                if not bool(k[piece].any()):
                    best = piece[torch.argmin(cm[piece])]
                    forced[best], k[best] = True, True
            if round_to > 1:  # pieces may have added channels: round the count again
                need = min(g.size, -(-int(k.sum()) // round_to) * round_to)
                add = order[~k[order]][: need - int(k.sum())]
                forced[add], k[add] = True, True
            keep[g.id], extra[g.id] = k, forced
        return keep, extra

    return keep_at


def _search(c_min, keep_at, removed_at, target: float) -> float:
    """The r whose plan removes closest to ``target`` (removal falls as r grows)."""
    finite = [c[torch.isfinite(c)] for c in c_min.values()]
    candidates = torch.unique(torch.cat(finite)) if finite and sum(len(f) for f in finite) else torch.ones(1)

    def removed(i: int) -> float:
        return removed_at(keep_at(float(candidates[i]))[0])

    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if removed(mid) <= target:
            hi = mid
        else:
            lo = mid + 1
    best = lo
    if lo > 0 and abs(removed(lo - 1) - target) < abs(removed(lo) - target):
        best = lo - 1
    return float(candidates[best])


def _split(per_channel: torch.Tensor, groups: ChannelGroups) -> Dict[int, torch.Tensor]:
    return {g.id: per_channel[groups.offsets[g.id]:groups.offsets[g.id] + g.size].double()
            for g in groups.groups}


def _unreachable(groups, smallest: float, config, round_to: int, prunable_set, shapes) -> None:
    """Raise (or, with best_effort, warn) naming the most that can be removed and why."""
    fixed = [g for g in groups.groups if not g.removable and any(m.param_name in prunable_set for m in g.members)]

    def held(g):
        return sum(math.prod(shapes[m.param_name]) // shapes[m.param_name][m.dim] * g.size
                   for m in g.members if m.param_name in prunable_set)

    fixed.sort(key=held, reverse=True)
    pinned = "; ".join(f"group {g.id} ({g.size} channels of {', '.join(g.params[:3])}"
                       f"{'...' if len(g.params) > 3 else ''}): {g.reason}" for g in fixed[:5])
    what = {"params": "prunable parameters", "flops": "FLOPs", "latency": "latency"}[config.budget]
    msg = (f"CompressConfig(sparsity={config.sparsity:g}, budget={config.budget!r}) cannot be reached: keeping "
           f"the fewest channels allowed (one per removable group"
           + (f", rounded up to round_to={round_to}" if round_to > 1 else "")
           + f") removes at most {smallest:.4f} of the {what}. The channels that "
           f"cannot go are held by {len(fixed)} fixed group(s)"
           + (f", the largest: {pinned}" if pinned else "")
           + ". Lower the sparsity, or pass best_effort=True to accept the most that can be removed.")
    if not config.best_effort:
        raise TargetUnreachableError(msg)
    warn(f"{msg} (best_effort=True: continuing)")


def _element_masks(groups, keep, task_keep, prunable, shapes, owners, task_domains):
    flat = groups.keep_vector(keep)
    masks, task_masks = {}, {t: {} for t in task_domains}
    for p in prunable:
        shape = tuple(shapes[p])
        dims = groups.slice_channels(p) if p in groups.param_shapes else {}
        mask = torch.ones(shape, dtype=torch.bool)
        for d, ch in dims.items():
            mask &= _along(_flags(flat, ch), d, shape)
        masks[p] = mask
        tasks = [t for t in task_domains if p in set(task_domains[t])]
        if not dims:
            for t in tasks:
                task_masks[t][p] = mask.clone()
            continue
        vote_dim = min(dims)
        ch = dims[vote_dim]
        rest = torch.ones(shape, dtype=torch.bool)
        for d, c in dims.items():
            if d != vote_dim:
                rest &= _along(_flags(flat, c), d, shape)
        kept = _flags(flat, ch)
        votes = {t: _flags(_task_flat(groups, task_keep.get(t, {}), flat), ch) & kept for t in tasks}
        credited = kept.clone()
        for v in votes.values():
            credited &= ~v
        for t in tasks:
            task_masks[t][p] = _along(votes[t] | credited, vote_dim, shape) & rest
    return masks, task_masks


def _task_flat(groups: ChannelGroups, task_keep: Mapping[int, torch.Tensor], flat: torch.Tensor) -> torch.Tensor:
    """Global-channel flags: the task's own votes where it votes, False elsewhere on
    removable groups it does not reach, True on fixed channels."""
    out = flat.clone()
    for g in groups.groups:
        if g.removable:
            o = groups.offsets[g.id]
            out[o:o + g.size] = task_keep.get(g.id, torch.zeros(g.size, dtype=torch.bool))
    return out


def _flags(flat: torch.Tensor, channel_ids: torch.Tensor) -> torch.Tensor:
    """Per-slice flags from global channel flags; a slice in no group (id -1) is kept."""
    return torch.where(channel_ids >= 0, flat[channel_ids.clamp_min(0)], torch.ones_like(channel_ids, dtype=torch.bool))


def _along(v: torch.Tensor, dim: int, shape) -> torch.Tensor:
    """Per-slice flags ``v`` along ``dim`` as a mask broadcastable to ``shape``."""
    view = [1] * len(shape)
    view[dim] = shape[dim]
    return v.view(view)
