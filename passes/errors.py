"""The error hierarchy shared by both layers.

It lives in the lower layer because passes raise these errors and must not import
``disparse_fx``; ``disparse_fx.errors`` re-exports every name.
"""
from __future__ import annotations

import functools
import os

import re
import sys
import warnings
from typing import Optional, Tuple

import torch
import torch.fx as fx

__all__ = [
    "DisparseError",
    "DisparseValueError",
    "TraceError",
    "UnsupportedOpError",
    "PostconditionError",
    "DisparseWarning",
    "warn",
    "some_names",
    "describe_node",
    "user_source_line",
    "user_frame",
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


class DisparseWarning(UserWarning):
    """Something the user should know about a result that is still returned: a target
    landed off, weights left dense, a construct kept rather than pruned. Shown once per
    call site by Python's default filters; silence with
    ``warnings.filterwarnings("ignore", category=dfx.DisparseWarning)``."""


def warn(message: str) -> None:
    """Issue a :class:`DisparseWarning` attributed to the user's line that called into
    the library (not to the library's own frame that noticed the problem, nor to torch's
    frames between them, e.g. fx's tracer calling back into a pass).

    Warnings, not log records: a library's logger stays silent until the application
    configures logging, and these are results the user must see.
    """
    ours = _library_dirs()
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith("<frozen")  # runpy: `python -m` (the CLI)
                                 or os.path.abspath(frame.f_code.co_filename).startswith(ours)):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, DisparseWarning, stacklevel=level + 1 if frame is not None else 2)


def _library_dirs() -> Tuple[str, ...]:
    """This layer's folder, the upper layer's (a sibling in a checkout, the parent when
    installed) and torch's, each with a trailing separator."""
    dirs = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__))]
    top = sys.modules.get("disparse_fx")
    if top is not None and getattr(top, "__file__", None):
        dirs.append(os.path.dirname(os.path.abspath(top.__file__)))
    return tuple(d + os.sep for d in dirs)


def some_names(names, limit: int = 4) -> str:
    """``'a', 'b', 'c' and 5 more``: the first ``limit`` names, quoted, for messages."""
    names = list(names)
    return ", ".join(f"'{n}'" for n in names[:limit]) + (
        f" and {len(names) - limit} more" if len(names) > limit else "")


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
    where = user_source_line(node)
    return f"node '{node.name}' ({node.op} {target})" + (f" at {where}" if where else "")


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n[ \t]*([^\n]*)')


@functools.lru_cache(maxsize=None)
def _is_tracer_file(path: str) -> bool:
    """Frames of passes/trace.py (its tracer, and its stand-ins for torch's transformer
    layers) are ours, not the user's."""
    return os.path.abspath(path) == _TRACE_FILE


_TRACE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trace.py")


def user_frame(node: fx.Node) -> Optional[Tuple[str, str, str, str]]:
    """(file, line, function, code) of the innermost frame of the node's recorded stack
    trace outside torch itself, or None.

    fx records the whole Python stack at trace time, ending in its own frames; the
    user's line is the last one that is not in torch (nor in this library's tracer).
    """
    trace = node.meta.get("stack_trace") or ""
    frames = [f for f in _FRAME.findall(trace)
              if "/torch/" not in f[0].replace("\\", "/") and not _is_tracer_file(f[0])]
    return frames[-1] if frames else None


def user_source_line(node: fx.Node) -> str:
    """The user's source line of a node (see :func:`user_frame`), for error messages."""
    frame = user_frame(node)
    if frame is None:
        return ""
    path, line, func, code = frame
    return f'File "{path}", line {line}, in {func}: {code.strip()}'
