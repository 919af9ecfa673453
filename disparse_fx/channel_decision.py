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

Element-shaped masks (api.md): ``masks[p]`` keeps an element iff every channel it
belongs to is kept. ``task_masks[t][p]`` uses ``t``'s own vote along the parameter's
first channel dimension and the final keep along the others; a channel that ``p``'s
owners voted away but another task kept (two groups joined by a residual add, say) is
credited to every owner, so ``masks[p] == OR over owners of task_masks[t][p]`` holds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Hashable, Mapping, Sequence, Tuple

import torch

from passes.channel_groups import ChannelGroups

from .config import CompressConfig
from .decision import _rank_descending
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
) -> ChannelDecision:
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
                per = (s.sum(dim=dims) if dims else s).double().cpu()
                acc = unit_scores[u].setdefault(g.id, torch.zeros(g.size, dtype=torch.float64))
                acc.index_add_(0, m.index[sel], per[sel])

    # Rank each unit's channels by score per element; c_u = (rank + 1) / n_u.
    c_min = {g.id: torch.full((g.size,), math.inf, dtype=torch.float64) for g in removable}
    best_unit = {g.id: torch.full((g.size,), -1, dtype=torch.long) for g in removable}
    unit_c: Dict[Hashable, Dict[int, torch.Tensor]] = {}
    normalised: Dict[Hashable, Dict[int, torch.Tensor]] = {}
    for ui, u in enumerate(units):
        gids = list(unit_scores[u])
        if not gids:
            continue
        flat = torch.cat([unit_scores[u][gid] for gid in gids])
        total = float(flat.sum()) or 1.0
        normalised[u] = {gid: (unit_scores[u][gid] / total).float() for gid in gids}
        density = flat / torch.cat([cost[gid] for gid in gids]).clamp_min(1.0)
        rank = _rank_descending(density, seed=config.seed + ui)
        cu = (rank + 1).double() / len(rank)
        unit_c[u] = dict(zip(gids, cu.split([groups.groups[gid].size for gid in gids])))
        for gid, cg in unit_c[u].items():
            better = cg < c_min[gid]
            c_min[gid] = torch.where(better, cg, c_min[gid])
            best_unit[gid] = torch.where(better, torch.full_like(best_unit[gid], ui), best_unit[gid])
    voted = [g for g in removable if torch.isfinite(c_min[g.id]).any()]

    def keep_at(r: float) -> Tuple[Dict[int, torch.Tensor], Dict[int, torch.Tensor]]:
        keep, extra = {}, {}
        for g in voted:
            cm = c_min[g.id]
            k = cm <= r
            forced = torch.zeros_like(k)
            order = torch.argsort(cm, stable=True)  # best-ranked first
            need = max(int(k.sum()), 1)
            if config.round_to > 1:
                need = min(g.size, -(-need // config.round_to) * config.round_to)
            if int(k.sum()) < need:
                add = order[: need]
                forced[add] = ~k[add]
                k[add] = True
            for piece in g.keep_one_of:
                if not bool(k[piece].any()):
                    best = piece[torch.argmin(cm[piece])]
                    forced[best], k[best] = True, True
            if config.round_to > 1:  # pieces may have added channels: round the count again
                need = min(g.size, -(-int(k.sum()) // config.round_to) * config.round_to)
                add = order[~k[order]][: need - int(k.sum())]
                forced[add], k[add] = True, True
            keep[g.id], extra[g.id] = k, forced
        return keep, extra

    def sparsity_at(r: float) -> float:
        return prunable_sparsity(groups, keep_at(r)[0], prunable, shapes)

    candidates = torch.unique(torch.cat([c[torch.isfinite(c)] for c in c_min.values()])) if voted else torch.ones(1)
    target = config.sparsity
    lo, hi = 0, len(candidates) - 1  # sparsity decreases as r grows
    while lo < hi:
        mid = (lo + hi) // 2
        if sparsity_at(float(candidates[mid])) <= target:
            hi = mid
        else:
            lo = mid + 1
    best = lo
    if lo > 0 and abs(sparsity_at(float(candidates[lo - 1])) - target) < abs(sparsity_at(float(candidates[lo])) - target):
        best = lo - 1
    r = float(candidates[best])
    keep, extra = keep_at(r)

    task_keep: Dict[Hashable, Dict[int, torch.Tensor]] = {}
    for ui, u in enumerate(units):
        task_keep[u] = {gid: (cg <= r) | (extra[gid] & (best_unit[gid] == ui)) for gid, cg in unit_c.get(u, {}).items()}
    if not config.disentangle:  # one global decision: every task sees the final keep of what it reaches
        reach = {t: {g.id for g in voted if any(m.param_name in set(dom) for m in g.members)}
                 for t, dom in task_domains.items()}
        task_keep = {t: {gid: keep[gid] for gid in gids} for t, gids in reach.items()}
        normalised = {t: {gid: normalised[SUMMED][gid] for gid in gids if gid in normalised[SUMMED]}
                      for t, gids in reach.items()}

    masks, task_masks = _element_masks(groups, keep, task_keep, prunable, shapes, owners, task_domains)
    channels = ChannelPlan(groups=groups, keep=keep, task_keep=task_keep, scores=normalised)
    return ChannelDecision(channels=channels, masks=masks, task_masks=task_masks, keep_ratio=r,
                           sparsity=prunable_sparsity(groups, keep, prunable, shapes))


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
