"""Latency model: per-layer forward time as a function of kept widths, measured on the device.

The budget ``"latency"`` needs the forward time of every candidate plan without slimming
and timing each one. As HALP does (Shen et al., "Structural Pruning via Latency-Saliency
Knapsack", NeurIPS 2022: a per-layer latency lookup table on the target device), this
module measures, once per layer shape:

- every dense ``Conv{1,2,3}d`` (groups 1) and ``Linear`` module on a grid of kept
  (input, output) widths - fractions :data:`GRID` of the layer's widths, rounded to
  multiples of 8 (the alignment oneDNN and tensor cores like) - run alone on random
  inputs of the example's batch size, spatial shape, dtype and device; depthwise convs on
  the output grid only. Between grid points the time is bilinear (passes.channel_costs);
- every other node of the graph once at full width (an fx Interpreter timing each node),
  scaled by the kept fraction of the channels it reads or writes (its FLOP factors, or
  its output's channels: elementwise ops, norms and pooling are memory bound);
- the end-to-end forward, so the model's dense total is the measured one (every term is
  scaled by the ratio of the whole to the sum of the nodes: each node's time holds its
  own dispatch, so the gap is timing noise on a busy machine, not a fixed cost).

Timings are medians of a few runs after a warm-up (CUDA: synchronised), on the current
thread count. Tables are cached on disk (:func:`disparse_fx.data.cache_dir`, one JSON
file per device, torch version, dtype and thread count; a layer's key holds its type,
widths, kernel, stride, padding, dilation, input shape and batch), so a second compress
of the same architecture measures nothing. ``time_limit_s`` bounds the measuring: layers
not measured by then are scaled by their FLOPs instead, and the model's ``note`` says how
many. Cost: about 25 small timings per distinct layer shape (seconds for a ResNet-50 at
128 px on one CPU thread).
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
from tqdm.auto import tqdm

from disparse_fx.passes.channel_costs import ChannelCostModel, CostTerm, factor_channels
from disparse_fx.passes.channel_groups import ChannelGroups
from disparse_fx.passes.flops import flop_terms, shape_propagated

__all__ = ["latency_cost_model", "example_batch_size", "GRID"]

log = logging.getLogger(__name__)

#: Kept-width fractions measured per layer (both axes).
GRID = (0.125, 0.25, 0.5, 0.75, 1.0)
_ALIGN = 8
_FIXED = torch.tensor([-1])  # a factor that is always fully kept


def latency_cost_model(gm: fx.GraphModule, groups: ChannelGroups, example: Tuple[Any, ...], *,
                       time_limit_s: float = 120.0, progress: bool = True, repeats: int = 5,
                       cache: Optional[os.PathLike] = None) -> ChannelCostModel:
    """Forward milliseconds of ``gm`` at ``example`` as a function of its kept channels."""
    work = shape_propagated(gm, example)
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in gm.parameters() if p.is_floating_point()), torch.float32)
    node_ms = _time_nodes(work, example, device, repeats)
    total_ms = _time_forward(work, example, device, repeats)
    table = _Table(device, dtype, cache)
    deadline = time.monotonic() + time_limit_s
    terms: List[CostTerm] = []
    unmeasured = 0
    layers = [n for n in work.graph.nodes if _tabled(work, n) is not None]
    bar = tqdm(layers, desc="latency table", unit="layer", disable=not progress, leave=False)
    tabled: Dict[str, CostTerm] = {}
    for node in bar:
        if time.monotonic() > deadline:
            unmeasured += 1
            continue
        kind, m = _tabled(work, node)
        measured = table.measure(kind, m, node, repeats=3)
        reads = factor_channels(groups, ("reads", node.name))
        out = factor_channels(groups, ("tensor", node.name))
        if measured is None or len(reads) > 1 or len(out) != 1:
            unmeasured += 1
            continue
        ms, grid_in, grid_out = measured
        tabled[node.name] = CostTerm(weight=node_ms.get(node.name, 0.0), factors=(reads[0] if reads else _FIXED, out[0]),
                                     table=ms, grid=grid_in, grid_out=grid_out, node=node.name)
    table.save()
    for node in work.graph.nodes:
        if node.name in tabled:
            terms.append(tabled[node.name])
            continue
        ms = node_ms.get(node.name)
        if not ms:
            continue
        flops, _ = flop_terms(work, node)
        if flops:  # FLOPs-proportional: each term's share of the node's time
            total = sum(t.flops for t in flops) or 1
            for t in flops:
                ids = tuple(i for f in t.factors for i in factor_channels(groups, f))
                terms.append(CostTerm(weight=ms * t.flops / total, factors=ids, node=node.name))
        else:
            terms.append(CostTerm(weight=ms, factors=tuple(factor_channels(groups, ("tensor", node.name))),
                                  node=node.name))
    # Calibrate to the measured end-to-end time: every node's time already holds its own
    # dispatch, so the gap between the sum and the whole is timing noise (or the timer's
    # own cost): share it out in proportion rather than pin it as a fixed cost.
    model = ChannelCostModel(terms=tuple(terms), num_channels=groups.num_channels, unit="ms")
    summed = model.dense_cost()
    if summed > 0:
        scale = total_ms / summed
        terms = [CostTerm(weight=t.weight * scale, factors=t.factors,
                          table=None if t.table is None else t.table * scale, grid=t.grid, node=t.node,
                          grid_out=t.grid_out) for t in terms]
    note = (f"latency table: {len(tabled)} layers measured on {device.type} ({dtype}, batch "
            f"{example_batch_size(example)}, {torch.get_num_threads()} threads)"
            + (f"; {unmeasured} scaled by FLOPs (time limit {time_limit_s:g} s or unsupported shape)"
               if unmeasured else ""))
    log.info(note)
    return ChannelCostModel(terms=tuple(terms), num_channels=groups.num_channels, unit="ms", note=note)


def example_batch_size(example) -> int:
    """The batch size of the first example input (1 when it has none)."""
    first = example[0] if example else None
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1


def _tabled(gm: fx.GraphModule, node: fx.Node):
    """("conv" | "depthwise" | "linear", module) for layers measured on a grid, else None."""
    if node.op != "call_module":
        return None
    m = gm.get_submodule(node.target)
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        if m.groups == 1:
            return "conv", m
        if m.groups == m.in_channels == m.out_channels:
            return "depthwise", m
        return None
    if type(m) is nn.Linear:
        return "linear", m
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, device, repeats: int) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class _NodeTimer(fx.Interpreter):
    def __init__(self, gm, device):
        super().__init__(gm)
        self.device = device
        self.times: Dict[str, List[float]] = {}

    def run_node(self, n):
        if n.op in ("placeholder", "output", "get_attr"):
            return super().run_node(n)
        _sync(self.device)
        t0 = time.perf_counter()
        out = super().run_node(n)
        _sync(self.device)
        self.times.setdefault(n.name, []).append((time.perf_counter() - t0) * 1e3)
        return out


def _time_nodes(gm: fx.GraphModule, example, device, repeats: int) -> Dict[str, float]:
    timer = _NodeTimer(gm, device)
    with torch.no_grad():
        for _ in range(repeats + 1):
            timer.run(*example)
    return {k: statistics.median(v[1:]) for k, v in timer.times.items()}


def _time_forward(gm: fx.GraphModule, example, device, repeats: int) -> float:
    """The end-to-end forward: the number every term is calibrated to, so more warm-up
    (allocator, oneDNN primitives for new shapes) and more runs than the per-node timings."""
    with torch.no_grad():
        for _ in range(2):
            gm(*example)
        return _median_ms(lambda: gm(*example), device, max(repeats, 10))


class _Table:
    """Measured layer times, cached on disk per device / torch / dtype / threads."""

    def __init__(self, device: torch.device, dtype: torch.dtype, cache):
        from .data import cache_dir

        self.device, self.dtype = device, dtype
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        key = f"{name}-torch{torch.__version__}-{str(dtype).replace('torch.', '')}-t{torch.get_num_threads()}"
        safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in key)
        self.path = cache_dir(cache) / f"latency-{safe}.json"
        try:
            self.entries: Dict[str, float] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.dirty = False

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.entries, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError as exc:  # a read-only cache only costs re-measuring
            log.warning("latency table not cached (%s)", exc)

    def measure(self, kind: str, m: nn.Module, node: fx.Node, repeats: int):
        """(milliseconds over the input x output widths measured, the input widths' and the
        output widths' kept fractions): GRID rounded to multiples of 8 and deduplicated,
        so the axes hold the fractions really measured (a 16-channel layer: 0.5 and 1)."""
        x_meta = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], fx.Node) else None
        if x_meta is None:
            return None
        shape = tuple(x_meta.shape)
        c_in = m.in_channels if kind != "linear" else m.in_features
        c_out = m.out_channels if kind != "linear" else m.out_features
        w_out = sorted({_width(f, c_out) for f in GRID})
        w_in = [None] if kind == "depthwise" else sorted({_width(f, c_in) for f in GRID})
        table = torch.zeros(len(w_in), len(w_out), dtype=torch.float64)
        for i, wi in enumerate(w_in):
            for j, wo in enumerate(w_out):
                wi_ = wo if wi is None else wi  # depthwise: as many inputs as outputs
                key = f"{kind}|{wi_}|{wo}|{_signature(m)}|{shape}"
                if key not in self.entries:
                    self.entries[key] = self._time(kind, m, shape, wi_, wo, repeats)
                    self.dirty = True
                table[i, j] = self.entries[key]
        frac_in = torch.tensor([1.0] if kind == "depthwise" else [w / c_in for w in w_in], dtype=torch.float64)
        return table, frac_in, torch.tensor([w / c_out for w in w_out], dtype=torch.float64)

    def _time(self, kind, m, shape, wi, wo, repeats) -> float:
        dev, dt = self.device, self.dtype
        with torch.no_grad():
            if kind == "linear":
                layer = nn.Linear(wi, wo, bias=m.bias is not None)
                x = torch.randn(*shape[:-1], wi)
            else:
                layer = type(m)(wi, wo, m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
                                groups=wi if kind == "depthwise" else 1, bias=m.bias is not None,
                                padding_mode=m.padding_mode)
                x = torch.randn(shape[0], wi, *shape[2:])
            layer = layer.to(device=dev, dtype=dt).eval()
            x = x.to(device=dev, dtype=dt)
            return _median_ms(lambda: layer(x), dev, repeats)


def _width(fraction: float, channels: int) -> int:
    w = int(round(fraction * channels / _ALIGN)) * _ALIGN
    return max(1, min(channels, w if w > 0 else min(channels, _ALIGN)))


def _signature(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return f"b{m.bias is not None}"
    return f"k{tuple(m.kernel_size)}s{tuple(m.stride)}p{m.padding}d{tuple(m.dilation)}b{m.bias is not None}"
