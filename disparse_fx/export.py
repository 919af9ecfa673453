"""ONNX export, verified by onnxruntime.

``export_onnx`` writes a slim or masked GraphModule to ONNX with one output per task,
named after the task, and a dynamic batch axis; it then runs the file in onnxruntime
on the example inputs and on a second batch size and compares every output with
PyTorch (max abs diff <= ``rtol`` x the output's scale). A mismatch raises
:class:`ExportMismatchError` naming the output and the difference; a file that
onnxruntime cannot run at the second batch size (a size baked in at export) raises it
naming that batch size. Every failure is an :class:`ExportError` (a ``DisparseError``).

Nothing the caller passes in changes: the model is run in eval mode only (no forward in
train mode, so BatchNorm statistics stay), and every submodule's own train/eval flag is
put back afterwards, also when an error is raised.

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

from disparse_fx.passes.trace import task_output_nodes

from .errors import DisparseError, DisparseValueError

__all__ = ["export_onnx", "ExportReport", "ExportError", "ExportMismatchError", "verify_onnx", "onnx_output_name"]

log = logging.getLogger(__name__)


def _rms_norm_symbolic(g, x, normalized_shape, weight, eps):
    """ONNX for ``aten::rms_norm`` below opset 23 (which has RMSNormalization):
    ``x / sqrt(mean(x * x over the normalised dims) + eps) * weight``."""
    from torch.onnx import symbolic_helper as sh

    dims = sh._get_const(normalized_shape, "is", "normalized_shape")
    eps = None if sh._is_none(eps) else sh._get_const(eps, "f", "eps")
    if eps is None:
        eps = torch.finfo(torch.float32).eps
    axes = list(range(-len(dims), 0))
    mean_square = g.op("ReduceMean", g.op("Mul", x, x), axes_i=axes, keepdims_i=1)
    eps = g.op("CastLike", g.op("Constant", value_t=torch.tensor(eps, dtype=torch.float32)), x)
    y = g.op("Div", x, g.op("Sqrt", g.op("Add", mean_square, eps)))
    return y if sh._is_none(weight) else g.op("Mul", y, weight)


# F.rms_norm / nn.RMSNorm (and hand-written RMSNorms, which torch.export capture turns
# into F.rms_norm); opsets 17 and below reduce with an axes attribute
for _opset in range(15, 18):
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm_symbolic, _opset)


class ExportError(DisparseError):
    """The model could not be written to ONNX, or onnxruntime could not load the file."""


class ExportMismatchError(ExportError):
    """onnxruntime's outputs differ from PyTorch's beyond the tolerance, or it rejects a
    batch size the file was meant to accept."""


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
    dynamic_sequence: bool = False,
    rtol: float = 1e-4,
) -> ExportReport:
    """Export ``model`` (its forward returns {task: Tensor} or a tuple/list) and verify it.

    ``example_inputs``: a Tensor or a tuple of Tensors (the model's positional inputs,
    batch first). The model is exported in eval mode (its own mode is restored).
    ``dynamic_sequence``: token inputs (integer tensors of 2 or more dims) also get a
    dynamic axis 1 ("sequence"), checked in onnxruntime at a second length too (the
    slim model of a Hugging Face trunk captured with torch.export follows any length).
    """
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise DisparseValueError("example_inputs must be a Tensor or a tuple of Tensors (batch first), "
                                 f"got {type(example_inputs).__name__}")
    if any(a.dim() == 0 for a in args):
        raise DisparseValueError("example_inputs must be batch first (at least 1-D), got a 0-d tensor")
    if not isinstance(model, nn.Module):
        raise DisparseValueError(f"model must be an nn.Module or fx.GraphModule, got {type(model).__name__}")
    path = pathlib.Path(path)
    if path.is_dir():
        raise DisparseValueError(f"export_onnx: {str(path)!r} is a folder; give the file to write, e.g. "
                                 f"{str(path / 'model.onnx')!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    opset = opset or 17
    modes = [(m, m.training) for m in model.modules()]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        model.eval()  # before any forward: a train-mode forward would update BatchNorm statistics
        # nn.MultiheadAttention's eval fast path is one fused op that ONNX lacks: export
        # its standard path (the same function)
        torch.backends.mha.set_fastpath_enabled(False)
        tasks = _task_names(model, args)
        output_names = [onnx_output_name(t) for t in tasks]
        input_names = [f"input{i}" if len(args) > 1 else "input" for i in range(len(args))]
        dynamic_axes = None
        if dynamic_batch:
            dynamic_axes = {n: {0: "batch"} for n in input_names + output_names}
        if dynamic_sequence:
            dynamic_axes = dynamic_axes or {}
            for n, a in zip(input_names, args):
                if _is_tokens(a):
                    dynamic_axes.setdefault(n, {})[1] = "sequence"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
            # the exporter restores its module's mode recursively afterwards: the wrapper
            # must itself be in eval mode, or it would put the model back in train mode
            try:
                torch.onnx.export(
                    _TupleOutputs(model, tasks).eval(), args, str(path), dynamo=False, opset_version=opset,
                    input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                    do_constant_folding=True,
                )
            except DisparseError:
                raise
            except Exception as exc:  # noqa: BLE001 - the exporter's own errors, named as ours
                raise ExportError(f"torch.onnx.export could not write {type(model).__name__} to '{path}' "
                                  f"(opset {opset}): {type(exc).__name__}: {_first_line(exc)}") from exc
        batch_sizes = [args[0].shape[0]]
        if dynamic_batch:
            batch_sizes.append(args[0].shape[0] * 2)
        diffs, scales = verify_onnx(model, path, args, tasks, batch_sizes=batch_sizes, rtol=rtol)
        if dynamic_sequence and any(_is_tokens(a) for a in args):
            longer = tuple(_resize_sequence(a, 2 * a.shape[1] + 1) if _is_tokens(a) else a for a in args)
            more = verify_onnx(model, path, longer, tasks, batch_sizes=batch_sizes[:1], rtol=rtol)
            diffs = {k: max(v, more[0][k]) for k, v in diffs.items()}
            scales = {k: max(v, more[1][k]) for k, v in scales.items()}
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m, training in modes:  # each submodule's own flag (a frozen BatchNorm stays in eval)
            m.training = training
    report = ExportReport(path=path, size_bytes=path.stat().st_size, outputs=tuple(output_names),
                          max_abs_diff=diffs, scale=scales, batch_sizes=tuple(batch_sizes), opset=opset)
    log.info("exported %s (%.1f KiB), onnxruntime parity %s", path, report.size_bytes / 1024,
             {k: f"{v:.1e}" for k, v in diffs.items()})
    return report


def verify_onnx(model: nn.Module, path, args: Tuple[torch.Tensor, ...], tasks: Sequence[Hashable], *,
                batch_sizes: Sequence[int], rtol: float) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Run the ONNX file in onnxruntime and compare with ``model`` for each batch size.

    ``model`` is run as it is (export_onnx puts it in eval mode first). Raises
    :class:`ExportMismatchError` when onnxruntime rejects a batch size or an output
    differs; :class:`ExportError` when onnxruntime cannot load the file.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: errors reach the caller as exceptions, not as log lines on stderr
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's exception types are not ours
        raise ExportError(f"onnxruntime cannot load '{path}': {type(exc).__name__}: {_first_line(exc)}") from exc
    input_names = [i.name for i in session.get_inputs()]
    diffs: Dict[str, float] = {}
    scales: Dict[str, float] = {}
    for bs in batch_sizes:
        batch = tuple(_resize_batch(a, bs) for a in args)
        with torch.no_grad():
            want = _as_list(_run_model(model, batch, f"at batch size {bs}"), tasks)
        try:
            got = session.run(None, {n: a.detach().cpu().float().numpy() if a.is_floating_point()
                                     else a.cpu().numpy() for n, a in zip(input_names, batch)})
        except Exception as exc:  # noqa: BLE001 - onnxruntime's exception types are not ours
            example_bs = args[0].shape[0]
            hint = ("" if bs == example_bs else
                    f"; the file was exported at batch size {example_bs} and some size in it did not follow "
                    f"the batch (a size read through .data, int(...) or a Python number becomes a constant): "
                    f"compute it from the tensor's shape, or pass dynamic_batch=False to fix the batch size "
                    f"at {example_bs}")
            raise ExportMismatchError(f"onnxruntime rejects batch size {bs} for '{path}'{hint}. onnxruntime "
                                      f"said: {type(exc).__name__}: {_first_line(exc)}") from exc
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
        out = _run_model(model, args, "")
    if isinstance(out, Mapping):
        return tuple(out)
    if isinstance(out, (tuple, list)):
        return tuple(range(len(out)))
    return (0,)


def _run_model(model: nn.Module, args: Tuple[torch.Tensor, ...], when: str):
    """model(*args); the model's own error re-raised as one that names example_inputs."""
    try:
        return model(*args)
    except DisparseError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's model may raise anything
        shapes = ", ".join(f"{tuple(a.shape)} {str(a.dtype).replace('torch.', '')}" for a in args)
        raise DisparseValueError(
            f"{type(model).__name__} raised {type(exc).__name__} on example_inputs ({shapes}){' ' + when if when else ''}"
            f" in eval mode: {_first_line(exc)}. example_inputs must be the model's positional input(s), "
            f"batch first" + ("; pass dynamic_batch=False if the model only runs at the example's batch size"
                              if when else "")) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else ""


def _as_list(out, tasks):
    if isinstance(out, Mapping):
        return [out[t] for t in tasks]
    if isinstance(out, torch.Tensor):
        return [out]
    return list(out)


def _is_tokens(a: torch.Tensor) -> bool:
    """Token ids: an integer tensor (batch, sequence, ...)."""
    return a.dim() >= 2 and not a.is_floating_point() and not a.is_complex() and a.dtype != torch.bool


def _resize_sequence(a: torch.Tensor, length: int) -> torch.Tensor:
    """The example tokens repeated or cut to ``length`` along dim 1 (a second length to check)."""
    reps = -(-length // a.shape[1])
    return torch.cat([a] * reps, 1)[:, :length]


def _resize_batch(a: torch.Tensor, bs: int) -> torch.Tensor:
    """The example batch repeated or cut to ``bs`` rows (a second batch size to check)."""
    if a.shape[0] >= bs:
        return a[:bs]
    reps = -(-bs // a.shape[0])
    return torch.cat([a] * reps)[:bs]
