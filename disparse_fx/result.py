"""CompressionResult: what compress() returns."""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from .plan import Plan

__all__ = ["CompressionResult"]


@dataclass(frozen=True)
class CompressionResult:
    """``model``: the masked GraphModule (trainable, ``print(model.code)`` shows the
    mask multiplies); ``plan``: the decision (see :class:`Plan`)."""

    model: fx.GraphModule
    plan: Plan

    def summary(self, *, tablefmt: str = "github") -> str:
        """Per-layer table: owners, shape, each task's kept fraction, the final kept fraction."""
        from .report import summary_table  # the report reads results: imported here, not at module level

        return summary_table(self.plan, tablefmt=tablefmt)
