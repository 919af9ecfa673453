"""The error hierarchy shared by both layers.

It lives in the lower layer because passes raise these errors and must not import
``disparse_fx``; ``disparse_fx.errors`` re-exports every name.
"""
from __future__ import annotations

from typing import Optional

import torch.fx as fx

__all__ = [
    "DisparseError",
    "DisparseValueError",
    "TraceError",
    "UnsupportedOpError",
    "PostconditionError",
    "describe_node",
]


class DisparseError(Exception):
    """Base of every error raised by disparse_fx for bad input or an impossible request."""


class DisparseValueError(DisparseError, ValueError):
    """A bad argument: the message names it and says what would be accepted."""


class TraceError(DisparseError):
    """torch.fx could not trace the model (or its outputs are not task tensors)."""


class UnsupportedOpError(DisparseError):
    """An analysis met an op it has no rule for; it never guesses."""


class PostconditionError(DisparseError, AssertionError):
    """A pass produced a graph that breaks one of its own guarantees (a bug, please report)."""


def describe_node(node: fx.Node, gm: Optional[fx.GraphModule] = None) -> str:
    """One line naming a node for error messages: its name, op, target and source line."""
    target = node.target
    if node.op == "call_module" and gm is not None:
        try:
            target = f"{node.target} ({type(gm.get_submodule(node.target)).__name__})"
        except AttributeError:
            pass
    elif callable(target):
        target = getattr(target, "__qualname__", None) or getattr(target, "__name__", repr(target))
    where = _source_line(node)
    return f"node '{node.name}' ({node.op} {target})" + (f" at {where}" if where else "")


def _source_line(node: fx.Node) -> str:
    """The innermost user frame of the node's recorded stack trace, or ''."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    # fx records a Python traceback: 'File "x.py", line N, in f' followed by the code.
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File "):
            code = lines[i + 1] if i + 1 < len(lines) else ""
            return f"{lines[i]}: {code}".rstrip(": ")
    return lines[-1]
