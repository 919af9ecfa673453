"""torch.distributed glue: nothing home-made, only the process group the user started.

When a default process group is initialised, every rank scores its own shard of the
data and the per-task score accumulators are all-reduced (summed) before the decision,
so every rank takes the same decision from the same numbers. Without a process group
these functions do nothing.

Dynamic sparse training uses the same glue: regrowth gradients are averaged across ranks
(:func:`all_reduce_mean_`) and masks are checked against rank 0's (:func:`broadcast_`).
Collectives run on the tensors' own device, so gloo (CPU) and NCCL (CUDA) both work.
"""
from __future__ import annotations

import logging
from typing import Callable, Hashable, Mapping, Sequence

import torch
import torch.distributed as dist

__all__ = ["is_active", "all_reduce_scores", "rank", "world_size", "all_reduce_mean_", "broadcast_"]

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
        # summed in float32 whatever the scores' storage (bfloat16 sums of world-size terms
        # would round at every step; not every backend reduces bfloat16)
        flat = torch.cat([t.reshape(-1) for t in tensors]).float()
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n
    log.debug("all-reduced importance of %d units over %d ranks", len(acc), dist.get_world_size())


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def _flat_apply(tensors: Sequence[torch.Tensor], collective: Callable[[torch.Tensor], None]) -> None:
    """Run one collective on the concatenation of ``tensors`` and copy the result back."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    collective(flat)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """Average same-dtype tensors across ranks, in place, with one collective (no-op alone).

    Sum then divide by the world size, as DistributedDataParallel averages gradients.
    """
    if not is_active():
        return
    n = dist.get_world_size()

    def reduce(flat):
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(n)

    _flat_apply(tensors, reduce)


def broadcast_(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite same-dtype tensors with rank ``src``'s values, in place (no-op alone)."""
    if not is_active():
        return
    _flat_apply(tensors, lambda flat: dist.broadcast(flat, src=src))
