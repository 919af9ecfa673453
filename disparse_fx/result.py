"""CompressionResult: what compress() returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch.fx as fx

from .plan import Plan

__all__ = ["CompressionResult"]


@dataclass(frozen=True)
class CompressionResult:
    """``model``: the masked GraphModule (trainable, ``print(model.code)`` shows the
    mask multiplies); ``plan``: the decision (see :class:`Plan`); ``inputs``: the
    ``inputs=`` callable (batch -> model input(s)) compress() was given, or None for the
    default - :func:`finetune` and :class:`DynamicSparsity` use it unless given their own.
    A callable is not saved: a loaded result has ``inputs=None``."""

    model: fx.GraphModule
    plan: Plan
    inputs: Optional[Callable[[Any], Any]] = field(default=None, compare=False, repr=False)

    def summary(self, *, tablefmt: str = "github") -> str:
        """Per-layer table: owners, shape, each task's kept fraction, the final kept fraction."""
        from .report import summary_table  # the report reads results: imported here, not at module level

        return summary_table(self.plan, tablefmt=tablefmt)
