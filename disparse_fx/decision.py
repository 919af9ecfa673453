"""The unanimous decision, with the requested sparsity hit exactly.

Each ranking unit ``u`` (a task when disentangled, the summed loss otherwise) ranks the
elements of its domain ``D_u`` by its normalised score (ties broken by a seeded random
order, so every top-k has exactly k elements). Keeping the top ``r * |D_u|`` of every
unit for one common keep ratio ``r`` (the paper's ``keep_ratio``) means:

    unit u keeps element e  <=>  c_u(e) = (rank_u(e) + 1) / |D_u|  <=  r

and the final mask keeps e iff ANY unit owning e keeps it (a shared element is removed
only when every task agrees; a task-specific one follows its task):

    keep(e)  <=>  c(e) = min over owning u of c_u(e)  <=  r

So the overall density is a step function of r that rises one element at a time, and
the r that hits the target is found by bisection over the sorted values of c - no
hand-tuned keep ratio. The per-layer floor ``min_layer_density`` is part of that
search: a parameter keeps at least ``max(1, ceil(min_layer_density * numel))``
elements, the extra ones being those with the smallest c, credited to the task that
ranks them best (so ``masks == OR of task_masks`` still holds element by element).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Hashable, Mapping, Sequence

import torch

from .config import CompressConfig
from .importance import SUMMED, TaskScores

__all__ = ["Decision", "decide", "layer_floor"]


@dataclass(frozen=True)
class Decision:
    """task_masks: {task: {param: bool}}; masks: {param: bool}; keep_ratio: the r found;
    task_scores: {task: {param: float32 score normalised to sum 1 over the task's domain}}."""

    task_masks: Mapping[Hashable, Mapping[str, torch.Tensor]]
    masks: Mapping[str, torch.Tensor]
    keep_ratio: float
    task_scores: Mapping[Hashable, Mapping[str, torch.Tensor]]


def layer_floor(numel: int, min_layer_density: float) -> int:
    """Elements a parameter keeps at least: one, and its min_layer_density share."""
    return min(numel, max(1, math.ceil(min_layer_density * numel - 1e-9)))


def decide(
    scores: TaskScores,
    *,
    prunable: Sequence[str],
    shapes: Mapping[str, torch.Size],
    task_domains: Mapping[Hashable, Sequence[str]],
    config: CompressConfig,
) -> Decision:
    """Turn per-unit scores into per-task masks and the final mask at the target sparsity."""
    offsets, total = {}, 0
    for p in prunable:
        offsets[p] = (total, total + math.prod(shapes[p]))
        total = offsets[p][1]
    device = next(iter(next(iter(scores.scores.values())).values())).device

    # Per unit: normalised scores and the rank of each element in its domain. Memory
    # is O(N) per unit at 4 bytes (int32 ranks); flat indices are rebuilt when needed.
    ranks: Dict[Hashable, torch.Tensor] = {}
    normalised: Dict[Hashable, Dict[str, torch.Tensor]] = {}
    c = torch.full((total,), math.inf, dtype=torch.float64, device=device)
    best_unit = torch.full((total,), -1, dtype=torch.int16, device=device)
    units = list(scores.scores)

    def domain_index(u) -> torch.Tensor:
        return torch.cat([torch.arange(*offsets[p], device=device) for p in scores.domains[u]])

    for ui, u in enumerate(units):
        dom = scores.domains[u]
        idx = domain_index(u)
        s = torch.cat([scores.scores[u][p].reshape(-1).float() for p in dom])
        s = s / s.sum().clamp_min(torch.finfo(torch.float32).tiny)
        pieces = s.split([_n(offsets, p) for p in dom])
        normalised[u] = {p: v.view(shapes[p]) for p, v in zip(dom, pieces)}
        rank = _rank_descending(s, seed=config.seed + ui)
        ranks[u] = rank.to(torch.int32)
        cu = (rank + 1).double() / len(s)
        better = cu < c[idx]
        c[idx] = torch.where(better, cu, c[idx])
        best_unit[idx] = torch.where(better, torch.full_like(best_unit[idx], ui), best_unit[idx])
        del rank, cu, better, idx

    floors = {p: layer_floor(_n(offsets, p), config.min_layer_density) for p in prunable}
    target_kept = max(round((1.0 - config.sparsity) * total), 1)
    r = _search_ratio(c, offsets, floors, target_kept)

    keep = c <= r
    floor_extra = torch.zeros(total, dtype=torch.bool, device=device)
    for p in prunable:
        lo, hi = offsets[p]
        if int(keep[lo:hi].sum()) < floors[p]:
            top = torch.argsort(c[lo:hi], stable=True)[: floors[p]] + lo
            floor_extra[top] = ~keep[top]
            keep[top] = True

    masks = {p: keep[slice(*offsets[p])].view(shapes[p]).clone() for p in prunable}
    task_masks: Dict[Hashable, Dict[str, torch.Tensor]] = {}
    if config.disentangle:
        for ui, u in enumerate(units):
            rank = ranks[u]
            kept_u = torch.zeros(total, dtype=torch.bool, device=device)
            kept_u[domain_index(u)] = ((rank.double() + 1) / len(rank)) <= r
            kept_u |= floor_extra & (best_unit == ui)
            task_masks[u] = {p: kept_u[slice(*offsets[p])].view(shapes[p]).clone() for p in scores.domains[u]}
        task_scores = normalised
    else:  # one global decision: every task sees the final mask over its domain
        task_masks = {t: {p: masks[p] for p in dom} for t, dom in task_domains.items()}
        summed = normalised[SUMMED]
        task_scores = {t: {p: summed[p] for p in dom} for t, dom in task_domains.items()}
    return Decision(task_masks=task_masks, masks=masks, keep_ratio=float(r), task_scores=task_scores)


def _n(offsets, p) -> int:
    lo, hi = offsets[p]
    return hi - lo


def _rank_descending(s: torch.Tensor, seed: int) -> torch.Tensor:
    """rank[i] = position of element i when sorted by decreasing score, ties in seeded order."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(s), generator=gen).to(s.device)
    order = perm[torch.argsort(s[perm], descending=True, stable=True)]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(s), device=s.device)
    return rank


def _search_ratio(c: torch.Tensor, offsets, floors, target_kept: int) -> float:
    """Smallest r among the values of c with sum_p max(#{c_p <= r}, floor_p) >= target."""
    sorted_c = torch.sort(c).values
    per_param = {p: torch.sort(c[lo:hi]).values for p, (lo, hi) in offsets.items()}

    def kept(r: torch.Tensor) -> int:
        return sum(max(int(torch.searchsorted(v, r, right=True)), floors[p]) for p, v in per_param.items())

    lo, hi = 0, len(sorted_c) - 1
    if kept(sorted_c[hi]) < target_kept:  # cannot happen: r = max keeps everything
        return float(sorted_c[hi])
    while lo < hi:
        mid = (lo + hi) // 2
        if kept(sorted_c[mid]) >= target_kept:
            hi = mid
        else:
            lo = mid + 1
    return float(sorted_c[lo])
