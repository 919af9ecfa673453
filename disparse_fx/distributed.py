"""torch.distributed glue: nothing home-made, only the process group the user started.

When a default process group is initialised, every rank scores its own shard of the
data and the per-task score accumulators are all-reduced (summed) before the decision,
so every rank takes the same decision from the same numbers. Without a process group
these functions do nothing.
"""
from __future__ import annotations

import logging
from typing import Hashable, Mapping

import torch
import torch.distributed as dist

__all__ = ["is_active", "all_reduce_scores", "rank"]

log = logging.getLogger(__name__)


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def all_reduce_scores(acc: Mapping[Hashable, Mapping[str, torch.Tensor]]) -> None:
    """Sum every accumulator across ranks, in place, in a rank-independent order.

    Tensors are flattened into one buffer per task so a model with many layers costs
    one collective per task, not one per parameter.
    """
    if not is_active():
        return
    for unit in acc:
        tensors = [acc[unit][p] for p in sorted(acc[unit])]
        if not tensors:
            continue
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n
    log.debug("all-reduced importance of %d units over %d ranks", len(acc), dist.get_world_size())
