"""ONNX export, verified by onnxruntime.

``export_onnx`` writes a slim or masked GraphModule to ONNX with one output per task,
named after the task, and a dynamic batch axis; it then runs the file in onnxruntime
on the example inputs and on a second batch size and compares every output with
PyTorch (max abs diff <= ``rtol`` x the output's scale). A mismatch raises
:class:`ExportMismatchError` naming the output and the difference.

The exporter is torch's TorchScript-based one (``dynamo=False``): it needs no extra
package and handles every fx GraphModule this library produces. Masks in a masked
model are folded by constant folding, so a masked model exports at dense size; slim
first to get a smaller file.
"""
from __future__ import annotations

import logging
import os
import pathlib
import warnings
from dataclasses import dataclass
from typing import Dict, Hashable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from passes.trace import task_output_nodes

from .errors import DisparseError, DisparseValueError

__all__ = ["export_onnx", "ExportReport", "ExportMismatchError", "verify_onnx", "onnx_output_name"]

log = logging.getLogger(__name__)


class ExportMismatchError(DisparseError):
    """onnxruntime's outputs differ from PyTorch's beyond the tolerance."""


@dataclass(frozen=True)
class ExportReport:
    """What export_onnx wrote and checked.

    path: the file; size_bytes: its size (weights included); outputs: task output names
    in order; max_abs_diff: {output: worst |onnxruntime - torch| over the checked batch
    sizes}; scale: {output: max |torch output|}; batch_sizes: the batch sizes checked.
    """

    path: pathlib.Path
    size_bytes: int
    outputs: Tuple[str, ...]
    max_abs_diff: Mapping[str, float]
    scale: Mapping[str, float]
    batch_sizes: Tuple[int, ...]
    opset: int


def export_onnx(
    model: nn.Module,
    example_inputs,
    path: Union[str, os.PathLike],
    *,
    opset: Optional[int] = None,
    dynamic_batch: bool = True,
    rtol: float = 1e-4,
) -> ExportReport:
    """Export ``model`` (its forward returns {task: Tensor} or a tuple/list) and verify it.

    ``example_inputs``: a Tensor or a tuple of Tensors (the model's positional inputs,
    batch first). The model is exported in eval mode (its own mode is restored).
    """
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise DisparseValueError("example_inputs must be a Tensor or a tuple of Tensors (batch first), "
                                 f"got {type(example_inputs).__name__}")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opset = opset or 17
    tasks = _task_names(model, args)
    output_names = [onnx_output_name(t) for t in tasks]
    input_names = [f"input{i}" if len(args) > 1 else "input" for i in range(len(args))]
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {n: {0: "batch"} for n in input_names + output_names}
    was_training = model.training
    model.eval()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        # nn.MultiheadAttention's eval fast path is one fused op that ONNX lacks: export
        # its standard path (the same function)
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
            # the exporter restores its module's mode recursively afterwards: the wrapper
            # must itself be in eval mode, or it would put the model back in train mode
            torch.onnx.export(
                _TupleOutputs(model, tasks).eval(), args, str(path), dynamo=False, opset_version=opset,
                input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
        batch_sizes = [args[0].shape[0]]
        if dynamic_batch:
            batch_sizes.append(args[0].shape[0] * 2)
        diffs, scales = verify_onnx(model, path, args, tasks, batch_sizes=batch_sizes, rtol=rtol)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)
    report = ExportReport(path=path, size_bytes=path.stat().st_size, outputs=tuple(output_names),
                          max_abs_diff=diffs, scale=scales, batch_sizes=tuple(batch_sizes), opset=opset)
    log.info("exported %s (%.1f KiB), onnxruntime parity %s", path, report.size_bytes / 1024,
             {k: f"{v:.1e}" for k, v in diffs.items()})
    return report


def verify_onnx(model: nn.Module, path, args: Tuple[torch.Tensor, ...], tasks: Sequence[Hashable], *,
                batch_sizes: Sequence[int], rtol: float) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Run the ONNX file in onnxruntime and compare with ``model`` for each batch size."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_names = [i.name for i in session.get_inputs()]
    diffs: Dict[str, float] = {}
    scales: Dict[str, float] = {}
    for bs in batch_sizes:
        batch = tuple(_resize_batch(a, bs) for a in args)
        with torch.no_grad():
            want = _as_list(model(*batch), tasks)
        got = session.run(None, {n: a.detach().cpu().float().numpy() if a.is_floating_point() else a.cpu().numpy()
                                 for n, a in zip(input_names, batch)})
        for t, w, g in zip(tasks, want, got):
            name = onnx_output_name(t)
            w = w.detach().float().cpu().numpy()
            if w.shape != g.shape:
                raise ExportMismatchError(f"output '{name}' has shape {g.shape} in onnxruntime but {w.shape} "
                                          f"in PyTorch (batch size {bs})")
            diff = float(np.abs(w - g).max()) if w.size else 0.0
            scale = float(np.abs(w).max()) if w.size else 0.0
            diffs[name] = max(diffs.get(name, 0.0), diff)
            scales[name] = max(scales.get(name, 0.0), scale)
            if diff > rtol * max(scale, 1.0):
                raise ExportMismatchError(
                    f"output '{name}' differs between onnxruntime and PyTorch by {diff:.3g} at batch size "
                    f"{bs} (allowed {rtol:g} x output scale {scale:.3g}); file: {path}"
                )
    return diffs, scales


def onnx_output_name(task: Hashable) -> str:
    """A task's ONNX output name: the task name, or ``task_<i>`` for positional tasks."""
    return f"task_{task}" if isinstance(task, int) else str(task)


class _TupleOutputs(nn.Module):
    """Presents the model's task outputs as a flat tuple in task order, for the exporter."""

    def __init__(self, model: nn.Module, tasks: Sequence[Hashable]):
        super().__init__()
        self.model = model
        self.tasks = list(tasks)

    def forward(self, *args):
        return tuple(_as_list(self.model(*args), self.tasks))


def _task_names(model: nn.Module, args) -> Tuple[Hashable, ...]:
    if isinstance(model, fx.GraphModule):
        return tuple(task_output_nodes(model))
    with torch.no_grad():
        out = model(*args)
    if isinstance(out, Mapping):
        return tuple(out)
    if isinstance(out, (tuple, list)):
        return tuple(range(len(out)))
    return (0,)


def _as_list(out, tasks):
    if isinstance(out, Mapping):
        return [out[t] for t in tasks]
    if isinstance(out, torch.Tensor):
        return [out]
    return list(out)


def _resize_batch(a: torch.Tensor, bs: int) -> torch.Tensor:
    """The example batch repeated or cut to ``bs`` rows (a second batch size to check)."""
    if a.shape[0] >= bs:
        return a[:bs]
    reps = -(-bs // a.shape[0])
    return torch.cat([a] * reps)[:bs]
