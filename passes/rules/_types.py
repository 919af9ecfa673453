"""Value descriptions the channel analysis attaches to every fx node (internal)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

__all__ = ["TensorInfo", "Const", "LazyDim"]


class LazyDim:
    """A dim of a parameter-derived value whose atoms are made only when needed.

    ``params`` are ``(qualified_name, dim)`` pairs, ``parts`` other LazyDims merged
    into this one (``w * m``); ``carriers`` are the ``(TensorInfo, dim)`` places that
    receive the atoms once they exist.
    """

    __slots__ = ("params", "parts", "carriers", "labels")

    def __init__(self, params: Tuple[Tuple[str, int], ...] = (), parts: Tuple["LazyDim", ...] = ()):
        self.params = tuple(params)
        self.parts = tuple(parts)
        self.carriers: List[Tuple["TensorInfo", int]] = []
        self.labels: Optional[torch.Tensor] = None


class TensorInfo:
    """A tensor value: its shape and dtype on the example inputs, the atoms of its
    channel dims (``labels``: dim -> LongTensor, one atom per slice) and lazily
    labelled dims (``lazy``: dim -> LazyDim). ``origin`` is the producing node's name."""

    __slots__ = ("shape", "dtype", "labels", "lazy", "origin")

    def __init__(self, shape: Tuple[int, ...], dtype: torch.dtype, origin: str = ""):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self.labels: Dict[int, torch.Tensor] = {}
        self.lazy: Dict[int, LazyDim] = {}
        self.origin = origin

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self, d: int) -> int:
        """``d`` normalised to ``[0, ndim)``."""
        n = len(self.shape)
        if not -n <= d < max(n, 1):
            raise IndexError(f"dim {d} out of range for a {n}-d tensor")
        return d % n if n else 0

    def __repr__(self) -> str:
        return f"TensorInfo({self.origin}: {list(self.shape)}, channels on dims {sorted(self.labels)})"


class Const:
    """A non-tensor value (int, size, dtype, ...). ``deps``: atoms whose count the value
    depends on (``x.size(1)``), or None; ``items``: per-item deps of a sequence."""

    __slots__ = ("value", "deps", "items")

    def __init__(self, value: Any, deps: Optional[torch.Tensor] = None,
                 items: Optional[Tuple[Optional[torch.Tensor], ...]] = None):
        self.value = value
        self.deps = deps if deps is not None and deps.numel() else None
        self.items = items

    def __repr__(self) -> str:
        return f"Const({self.value!r}{', channel-dependent' if self.deps is not None else ''})"
