"""Errors raised by disparse_fx: all derive from :class:`DisparseError`.

Those about a bad argument also derive from ValueError. Every message names the
offending thing (task, parameter, graph node with its source line) and what would be
accepted.
"""
from disparse_fx.passes.errors import (  # the hierarchy lives in the lower layer, which raises it too
    DisparseError,
    DisparseValueError,
    DisparseWarning,
    PostconditionError,
    TraceError,
    UnsupportedOpError,
)

__all__ = [
    "DisparseError",
    "DisparseValueError",
    "DisparseWarning",
    "TraceError",
    "UnsupportedOpError",
    "PostconditionError",
    "TaskMismatchError",
    "LossError",
    "ZeroGradientError",
    "NotEnoughBatchesError",
    "NoPrunableParametersError",
    "InputError",
    "TargetUnreachableError",
]


class TaskMismatchError(DisparseValueError):
    """task_losses does not name the same tasks as the model's outputs."""


class LossError(DisparseValueError):
    """A task loss is not a finite scalar (names the task and the batch index)."""


class ZeroGradientError(DisparseValueError):
    """A task's loss has zero gradient on every parameter of its domain."""


class NotEnoughBatchesError(DisparseValueError):
    """The data yielded fewer batches than config.num_batches."""


class NoPrunableParametersError(DisparseValueError):
    """The model has no parameter that the prunable filter accepts."""


class InputError(DisparseValueError):
    """The model rejected what ``inputs(batch)`` returned."""


class TargetUnreachableError(DisparseValueError):
    """The requested sparsity / budget cannot be reached: the channels the graph pins hold
    too much of it (names the most that can be removed and the largest pinned groups)."""
