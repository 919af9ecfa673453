"""Checks of what the user passes to :func:`compress`, before any importance is estimated.

Each check names the mistake as the user made it, rather than where it first breaks:

- ``data`` that is one Tensor or one batch dict (iterating it would yield rows or keys);
- a loss *class* (``nn.MSELoss``) where a loss function is expected;
- a loss function that raises or returns a tuple or dict: the error names the task and
  the ``loss_fn(prediction, batch)`` signature, and for an ``nn`` loss instance (which
  takes ``(input, target)``) shows how to wrap it;
- a model that returns one Tensor instead of one output per task;
- a model on the meta device (no values), and a model whose parameters' dtype differs
  from the data's where the model does not run on it.

Devices: the example batch is moved to the model's device (when its parameters and
buffers sit on one device), as importance estimation moves every batch, so element and
channel granularity behave alike. Before the channel analysis, a trial forward on the
first batch (on copies of the buffers, the random state restored) finds the remaining
input mistakes; at element granularity importance estimation meets them first (no
extra forward) and :func:`explain_input_error` names a dtype mismatch the same way.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Dict, Hashable, Mapping, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import keystr, tree_map, tree_map_with_path

from disparse_fx.passes.insert_channel_masks import MASK_MODULE
from disparse_fx.passes.insert_masks import MASK_SUFFIX, masked_params

from .errors import DisparseError, DisparseValueError, InputError, LossError, TaskMismatchError

__all__ = ["LossFunctionError", "check_data", "check_loss_functions", "check_outputs", "guard_losses",
           "check_model_tensors", "check_not_masked", "check_example", "to_device", "explain_input_error", "model_device"]


class LossFunctionError(LossError, DisparseValueError):
    """A task loss is not a function ``(prediction, batch) -> scalar Tensor``, or it
    raised: names the task and what would be accepted."""


def check_data(data: Any) -> None:
    """``data`` must be an iterable of batches, not one batch."""
    accepted = "an iterable of batches (a DataLoader, or a list of batches)"
    if isinstance(data, torch.Tensor):
        rows = f"Tensor{tuple(data.shape[1:])}" if data.dim() else "nothing"
        raise DisparseValueError(
            f"data must be {accepted}; got one Tensor of shape {tuple(data.shape)}, whose iteration yields its "
            f"rows ({rows}) as batches. For a single batch pass [tensor]")
    if isinstance(data, Mapping):
        raise DisparseValueError(
            f"data must be {accepted}; got one batch (a {type(data).__name__} with keys {list(data)[:8]}), whose "
            f"iteration yields its keys. For a single batch pass [batch]")
    if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise DisparseValueError(f"data must be {accepted}; got {type(data).__name__}")


def check_loss_functions(task_losses: Any) -> None:
    """No loss class (``nn.MSELoss``) where a loss function is expected."""
    items = task_losses.items() if isinstance(task_losses, Mapping) else (
        enumerate(task_losses) if isinstance(task_losses, (list, tuple)) else ())
    for task, fn in items:
        if isinstance(fn, type):
            name = _class_name(fn)
            raise LossFunctionError(
                f"task_losses[{task!r}] is the class {name}, not a loss function: each task's loss is called as "
                f"loss_fn(prediction, batch) and must return a scalar Tensor. "
                + (f"Create the loss and wrap it, e.g. lambda pred, batch: {name}()(pred, <the target in batch>)"
                   if issubclass(fn, nn.Module) else "Pass a function (prediction, batch) -> scalar Tensor"))


def check_outputs(gm: fx.GraphModule, task_losses: Any, needs_data: bool) -> None:
    """A model that returns one Tensor (not one output per task) cannot be scored per task
    with data: say so, instead of matching task names against a task called 0."""
    out = next((n for n in gm.graph.nodes if n.op == "output"), None)
    if out is None or not isinstance(out.args[0], fx.Node):
        return
    single_loss = (isinstance(task_losses, (list, tuple)) and len(task_losses) == 1) or \
        (isinstance(task_losses, Mapping) and list(task_losses) == [0])
    if single_loss and not needs_data:
        return  # data-free criteria never call the loss
    named = list(task_losses) if isinstance(task_losses, Mapping) else f"{len(task_losses)} loss(es)"
    raise TaskMismatchError(
        f"the model returns a single Tensor, not one output per task (task_losses names {named}): return a dict "
        f"{{task: Tensor}} (e.g. return {{'seg': out}}) matching task_losses, or a tuple of task outputs (a "
        f"single-task model returns (out,) and takes task_losses=[loss_fn])")


def guard_losses(losses: Mapping[Hashable, Callable]) -> Dict[Hashable, Callable]:
    """Each loss wrapped so that its failures and non-scalar returns name the task."""
    return {t: fn if isinstance(fn, _GuardedLoss) else _GuardedLoss(t, fn) for t, fn in losses.items()}


class _GuardedLoss:
    def __init__(self, task: Hashable, fn: Callable):
        self.task, self.fn = task, fn

    def __call__(self, prediction, batch):
        where = f"task_losses[{self.task!r}]"
        try:
            loss = self.fn(prediction, batch)
        except DisparseError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's loss may raise anything
            raise LossFunctionError(
                f"{where} raised {type(exc).__name__}: {_first_line(exc)}. It is called as loss_fn(prediction, "
                f"batch) with prediction {_describe(prediction)} and the whole batch {_describe(batch)}"
                + _wrap_advice(self.fn, self.task, batch)) from exc
        if isinstance(loss, (tuple, list, Mapping)):
            raise LossFunctionError(
                f"{where} returned a {type(loss).__name__} ({_describe(loss)}); a loss function must return one "
                f"scalar Tensor: return the loss alone (e.g. lambda pred, batch: my_loss(pred, batch)[0])")
        if isinstance(loss, nn.Module):
            raise LossFunctionError(
                f"{where} returned a module ({type(loss).__name__}), not a scalar Tensor: was a loss class given "
                f"instead of a loss function (prediction, batch) -> scalar?")
        return loss


def _wrap_advice(fn: Callable, task: Hashable, batch: Any) -> str:
    if not isinstance(fn, nn.Module):
        return ""
    name = _class_name(type(fn))
    if isinstance(batch, Mapping):
        key = task if task in batch else next((k for k in batch if k not in ("input", "inputs", "image", "x")),
                                              "target")
        target = f"batch[{key!r}]"
    elif isinstance(batch, (tuple, list)):
        target = "batch[1]"
    else:
        target = "<the target in batch>"
    return (f"; an nn loss such as {name}() takes (input, target), not (prediction, batch): wrap it, e.g. "
            f"lambda pred, batch: {name}()(pred, {target})")


def check_not_masked(model: nn.Module) -> None:
    """A compress result's masked model cannot be compressed again: its weights are read
    through mask products, which the prunable-weight analysis does not count as weights."""
    if not isinstance(model, fx.GraphModule):
        return
    masked = sorted(masked_params(model))
    channel = hasattr(model, MASK_MODULE)
    if masked or channel:
        what = (f"{len(masked)} weight(s) read through element masks, e.g. '{masked[0]}{MASK_SUFFIX}'" if masked
                else f"channel masks in its '{MASK_MODULE}' submodule")
        raise DisparseValueError(
            f"the model is already a compress result's masked model ({what}); compress does not stack on masks. "
            "To prune further, compress the original model again with the higher sparsity, or slim this result "
            "first (dfx.slim(result)) and compress the slim model")


def check_model_tensors(model: nn.Module) -> None:
    """Parameters and buffers must hold values (not the meta device)."""
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t.is_meta:
            raise DisparseValueError(
                f"the model's tensor '{name}' is on the meta device (a shape without values), so the model "
                f"cannot run on data: materialise it first, e.g. model.to_empty(device='cpu') and load its weights")


def model_device(model: nn.Module) -> Optional[torch.device]:
    """The one device of the model's parameters and buffers, or None (none, or several)."""
    devices = {t.device for t in itertools.chain(model.parameters(), model.buffers())}
    return devices.pop() if len(devices) == 1 else None


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor of ``batch`` (any nesting) on ``device``; a tensor on the meta device
    (a shape without values) cannot be moved and is named instead."""
    def move(path, x):
        if not isinstance(x, torch.Tensor):
            return x
        if x.is_meta and device.type != "meta":
            where = keystr(path) or "the batch"
            raise InputError(
                f"data holds a tensor on the meta device (a shape without values) at {where}, shape "
                f"{tuple(x.shape)}: batches must hold real tensors (any device; they are moved to the model's, "
                f"{device})")
        return x.to(device)

    return tree_map_with_path(move, batch)


def check_example(gm: fx.GraphModule, model: nn.Module, example: Tuple[Any, ...], *,
                  trial: bool) -> Tuple[Any, ...]:
    """The example inputs on the model's device. With ``trial`` (before the channel
    analysis, which runs the model on them), one forward that names dtype mismatches
    and other input mistakes first; otherwise importance estimation meets them, and
    :func:`explain_input_error` names them."""
    device = model_device(model)
    if device is not None:
        example = to_device(example, device)
    if not trial:
        return example
    buffers = {n: b.clone() for n, b in gm.named_buffers()}  # BatchNorm statistics stay as they are
    cuda = sorted({t.device.index or 0 for t in itertools.chain(gm.parameters(), gm.buffers()) if t.is_cuda})
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            torch.func.functional_call(gm, buffers, example, strict=False)
    except DisparseError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's model may raise anything
        error = _dtype_error(gm, example, exc) or InputError(
            f"the model rejected inputs(batch) on batch 0: inputs returned {_describe(example)}; "
            f"{type(exc).__name__}: {_first_line(exc)}. Pass inputs=lambda batch: ... returning the model's "
            f"positional input(s) (a tuple for several inputs)")
        raise error from exc
    return example


def explain_input_error(exc: InputError, gm: fx.GraphModule, example: Optional[Tuple[Any, ...]]) -> DisparseError:
    """The error to raise for an InputError of importance estimation: a dtype mismatch
    between model and data named as such, else ``exc`` itself."""
    cause = exc.__cause__
    if example is None or cause is None:
        return exc
    return _dtype_error(gm, example, cause) or exc


def _dtype_error(gm: fx.GraphModule, example: Tuple[Any, ...], exc: BaseException) -> Optional[DisparseValueError]:
    model_dtypes = {p.dtype for p in gm.parameters() if p.is_floating_point()}
    data_dtypes = {a.dtype for a in _tensors(example) if a.is_floating_point()}
    if not model_dtypes or not data_dtypes or data_dtypes <= model_dtypes:
        return None
    return DisparseValueError(
        f"the model's parameters are {_names(model_dtypes)} but the data's inputs are {_names(data_dtypes)} "
        f"(inputs(batch) on batch 0: {_describe(example)}), and the model fails on them ({type(exc).__name__}: "
        f"{_first_line(exc)}): convert one to the other's dtype, e.g. model.to({_names(data_dtypes)}) or "
        f"inputs=lambda batch: batch[...].to({_names(model_dtypes)})")


def _tensors(tree: Any):
    found = []
    tree_map(lambda x: found.append(x) if isinstance(x, torch.Tensor) else x, tree)
    return found


def _names(dtypes) -> str:
    return "/".join(sorted(str(d) for d in dtypes))


def _class_name(cls: type) -> str:
    return f"nn.{cls.__name__}" if cls.__module__.startswith("torch.nn") else cls.__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def _describe(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"Tensor{tuple(obj.shape)} {str(obj.dtype).replace('torch.', '')}"
    if isinstance(obj, Mapping):
        return f"{type(obj).__name__} with keys {list(obj)[:8]}"
    if isinstance(obj, (tuple, list)):
        return f"{type(obj).__name__} of {len(obj)}: (" + ", ".join(_describe(o) for o in obj[:4]) + \
            (", ..." if len(obj) > 4 else "") + ")"
    return type(obj).__name__
