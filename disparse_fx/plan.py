"""Plan: everything compress() decided, keyed by the ORIGINAL model's parameter names."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, FrozenSet, Hashable, Mapping, Optional, Tuple

import torch

from .config import CompressConfig

if TYPE_CHECKING:
    from .budget import BudgetReport
    from .channel_decision import ChannelPlan

__all__ = ["Plan", "inputs_from_specs"]


def inputs_from_specs(specs, device=None) -> Tuple[Any, ...]:
    """Random model inputs shaped like recorded ``(shape, dtype)`` specs (seeded).

    Float inputs are standard normal, integer inputs zeros; other recorded values are
    passed through. Only shapes matter to the analyses that use them.
    """
    gen = torch.Generator().manual_seed(0)
    out = []
    for spec in specs:
        if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], torch.dtype):
            shape, dtype = spec
            t = torch.randn(shape, generator=gen) if dtype.is_floating_point else torch.zeros(shape, dtype=torch.long)
            out.append(t.to(device=device, dtype=dtype))
        else:
            out.append(spec)
    return tuple(out)


@dataclass(frozen=True)
class Plan:
    """The decision of :func:`disparse_fx.compress` (see api.md).

    owners: {param: frozenset(tasks)} for every parameter (unused ones: empty set).
    task_scores: {task: {param: score}} over the task's prunable domain (float32, or
        bfloat16 with ``config.score_dtype="bfloat16"``), normalised to sum 1 per task (normalising does not change a task's ranking).
        With ``disentangle=False`` these are the summed-loss scores seen through each
        task's domain.
    task_masks: {task: {param: bool}} each task's own keep-mask over its domain.
    masks: {param: bool} the final keep-mask of every prunable parameter (True = kept).
    sparsity: achieved fraction of prunable elements removed.
    config: the CompressConfig used.
    tasks: the tasks in output order. prunable: the prunable parameters (used by at
    least one task and accepted by the filter). keep_ratio: the per-task keep ratio the
    search found. batches: batches used for importance (0 for data-free criteria).
    channels: channel granularity only - the channel groups, each channel's keep flag
    and each task's votes (see :class:`disparse_fx.channel_decision.ChannelPlan`).
    input_specs: (shape, dtype) of the model inputs compress() saw, for slim's checks.
    budget: channel granularity only - what ``sparsity`` counted (config.budget) and the
    parameters, FLOPs and (for a latency budget) modelled latency before and after
    slimming (see :class:`disparse_fx.budget.BudgetReport`).
    timings: wall seconds per phase of the compress() call - "trace" (tracing and output
    checks), "ownership" (ownership and prunable selection), "groups" (example check and,
    at channel granularity, the channel groups), "importance" (the scoring passes over
    the data), "decision", "masks" (inserting the masks), "budget" (channel granularity:
    the cost model and the budget report) and "total" (the whole call, validation
    included). Diagnostic only; empty for plans built by hand.
    unpruned: conv / linear weights that reach a task but stay dense under the default
    parameter filter, ``{name: reason}`` (inside a leaf module the graph calls as one op, or
    also used as something other than a weight); ``sparsity`` does not count them.
    compress() names them in a DisparseWarning; summary() and report() list them.
    """

    owners: Mapping[str, FrozenSet[Hashable]]
    task_scores: Mapping[Hashable, Mapping[str, torch.Tensor]]
    task_masks: Mapping[Hashable, Mapping[str, torch.Tensor]]
    masks: Mapping[str, torch.Tensor]
    sparsity: float
    config: CompressConfig
    tasks: Tuple[Hashable, ...] = ()
    prunable: Tuple[str, ...] = ()
    keep_ratio: float = 1.0
    batches: int = 0
    shapes: Mapping[str, Tuple[int, ...]] = field(default_factory=dict)
    channels: Optional["ChannelPlan"] = None
    input_specs: Optional[Tuple[Any, ...]] = None
    budget: Optional["BudgetReport"] = None
    timings: Mapping[str, float] = field(default_factory=dict)
    unpruned: Mapping[str, str] = field(default_factory=dict)

    def density(self, param: str, task: Hashable = None) -> float:
        """Kept fraction of ``param`` in the final mask, or in ``task``'s own mask."""
        m = self.masks[param] if task is None else self.task_masks[task][param]
        return float(m.float().mean())

    def example_inputs(self, device=None) -> Optional[Tuple[Any, ...]]:
        """Random inputs shaped like the batches compress() saw (None if it saw none)."""
        return None if self.input_specs is None else inputs_from_specs(self.input_specs, device)

    def kind(self, param: str) -> str:
        """'shared', 'task' (one owner) or 'unused'."""
        n = len(self.owners[param])
        return "shared" if n > 1 else ("task" if n == 1 else "unused")
