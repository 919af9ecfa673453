"""Pause Python's cyclic garbage collector while an analysis builds its objects.

The analyses (tracing, channel groups) create hundreds of thousands of small objects -
fx nodes, proxies, fake tensors, label vectors - and keep most of them until they
return. Each of those allocations counts towards the collector's thresholds, so it runs
full passes over a heap that is nearly all live: measured on densenet121 (trace +
ownership + channel groups, 2 cores, medians of 9), 147 ms with the collector on and
121 ms paused. Reference counting still frees everything that is not in a cycle; the
cycles are collected at the first collection after the analysis.

>>> import gc
>>> with paused_gc():
...     gc.isenabled()
False
>>> gc.isenabled()
True
"""
from __future__ import annotations

import contextlib
import gc
from typing import Iterator

__all__ = ["paused_gc"]


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Disable the cyclic collector inside the block; restore the state it had (a caller
    that disabled it keeps it disabled). Nesting is safe."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
