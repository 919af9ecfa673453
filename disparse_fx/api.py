"""The public verbs: compress (and, as they land, slim and export_onnx)."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, Hashable, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.nn as nn

from passes.insert_masks import insert_masks
from passes.ownership import analyze_ownership
from passes.prunable import default_prunable_params
from passes.trace import trace_model

from .config import CompressConfig
from .decision import decide
from .errors import DisparseValueError, NoPrunableParametersError, TaskMismatchError
from .importance import default_inputs, estimate_importance
from .plan import Plan
from .result import CompressionResult

__all__ = ["compress"]

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]


def compress(
    model: nn.Module,
    task_losses: Union[Mapping[Hashable, LossFn], Sequence[LossFn]],
    data: Iterable,
    config: Optional[CompressConfig] = None,
    *,
    inputs: Optional[Callable[[Any], Any]] = None,
    leaf_modules: Sequence[type] = (),
    concrete_args: Optional[Dict[str, Any]] = None,
) -> CompressionResult:
    """Prune a multitask model with DiSparse and return the masked GraphModule and plan.

    ``model``: an nn.Module (or fx.GraphModule) whose forward returns a dict
    ``{task: Tensor}`` or a tuple/list of Tensors. ``task_losses``: ``{task: loss_fn}``
    for dict outputs, or a sequence aligned with a tuple/list output;
    ``loss_fn(prediction, batch) -> scalar``. ``data``: an iterable of batches.
    ``inputs(batch)``: the model's positional input(s), a tuple for several (default:
    batch[0] for tuples/lists, batch["input"] for dicts, else the batch).
    ``leaf_modules`` / ``concrete_args``: passed to the tracer for models torch.fx
    cannot trace through.

    ``model`` is never mutated: its parameters, buffers, train/eval modes and
    requires_grad flags are as before the call, also when an error is raised.
    """
    t0 = time.perf_counter()
    config = config if config is not None else CompressConfig()
    if not isinstance(config, CompressConfig):
        raise DisparseValueError(f"config must be a CompressConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise DisparseValueError(f"model must be a torch.nn.Module or fx.GraphModule, got {type(model).__name__}")
    if inputs is not None and not callable(inputs):
        raise DisparseValueError(f"inputs must be a callable batch -> model input(s), got {type(inputs).__name__}")

    gm = trace_model(model, leaf_modules=leaf_modules, concrete_args=concrete_args)
    ownership = analyze_ownership(gm, reference=model)
    losses = _match_task_losses(task_losses, ownership.tasks)

    prunable = _select_prunable(gm, model, ownership.owners, config)
    if config.granularity == "channel":
        raise NotImplementedError(
            "granularity='channel' is not available yet (structured pruning lands with the "
            "channel-group analysis); use granularity='element'"
        )
    params = dict(model.named_parameters())
    domains = {t: tuple(p for p in prunable if t in ownership.owners[p]) for t in ownership.tasks}
    for t, dom in domains.items():
        if not dom:
            log.warning("task %r reaches no prunable parameter; its output depends only on "
                        "non-prunable parameters", t)
    domains = {t: d for t, d in domains.items() if d}

    scores = estimate_importance(
        gm,
        domains=domains,
        params={p: params[p] for p in prunable},
        task_losses=losses,
        data=data,
        inputs=inputs or default_inputs,
        config=config,
    )
    shapes = {p: params[p].shape for p in prunable}
    decision = decide(scores, prunable=prunable, shapes=shapes, task_domains=domains, config=config)

    masked = insert_masks(gm, _gm_keyed(gm, params, decision.masks))
    kept = sum(int(m.sum()) for m in decision.masks.values())
    total = sum(m.numel() for m in decision.masks.values())
    plan = Plan(
        owners=dict(ownership.owners),
        task_scores=decision.task_scores,
        task_masks=decision.task_masks,
        masks=decision.masks,
        sparsity=1.0 - kept / total,
        config=config,
        tasks=ownership.tasks,
        prunable=prunable,
        keep_ratio=decision.keep_ratio,
        batches=scores.batches,
        shapes={p: tuple(s) for p, s in shapes.items()},
    )
    log.info("compress: %d tasks, %d prunable parameters (%d elements), sparsity %.4f (target %.4f) in %.2fs",
             len(ownership.tasks), len(prunable), total, plan.sparsity, config.sparsity, time.perf_counter() - t0)
    return CompressionResult(model=masked, plan=plan)


def _match_task_losses(task_losses, tasks) -> Dict[Hashable, LossFn]:
    """{task: loss_fn} aligned with the model's outputs, or TaskMismatchError naming both sides."""
    if isinstance(task_losses, Mapping):
        given = dict(task_losses)
    elif isinstance(task_losses, (list, tuple)):
        given = dict(enumerate(task_losses))
    else:
        raise DisparseValueError(
            f"task_losses must be a dict {{task: loss_fn}} or a list aligned with the model's "
            f"tuple output, got {type(task_losses).__name__}"
        )
    if set(given) != set(tasks):
        missing = [t for t in tasks if t not in given]
        extra = [t for t in given if t not in set(tasks)]
        raise TaskMismatchError(
            f"task_losses names tasks {list(given)} but the model outputs {list(tasks)}"
            + (f"; no loss for {missing}" if missing else "")
            + (f"; no output for {extra}" if extra else "")
        )
    for t, fn in given.items():
        if not callable(fn):
            raise DisparseValueError(f"task_losses[{t!r}] must be callable (prediction, batch) -> scalar, "
                                     f"got {type(fn).__name__}")
    return {t: given[t] for t in tasks}


def _select_prunable(gm, model, owners, config) -> tuple:
    """Prunable = used by at least one task and accepted by the filter (or the default)."""
    if config.filter_fn is not None:
        params = dict(model.named_parameters())
        chosen = tuple(p for p in owners if owners[p] and config.filter_fn(p, params[p]))
        what = "config.filter_fn accepted none of the used parameters"
    else:
        chosen = tuple(p for p in default_prunable_params(gm, reference=model) if owners.get(p))
        what = ("it has no Conv/ConvTranspose/Linear weight (nor functional conv/linear weight) "
                "that reaches a task output; pass CompressConfig(filter_fn=...) to choose parameters")
    if not chosen:
        raise NoPrunableParametersError(f"the model has no prunable parameter: {what}")
    return chosen


def _gm_keyed(gm: fx.GraphModule, params: Mapping[str, nn.Parameter], masks: Mapping[str, torch.Tensor]):
    """Re-key masks from the original model's names to gm's names (they differ only for tied weights)."""
    by_id = {}
    for name, p in gm.named_parameters():
        by_id.setdefault(id(p), name)
    return {by_id[id(params[p])]: m for p, m in masks.items()}
