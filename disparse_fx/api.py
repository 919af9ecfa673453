"""The public verbs: compress (and, as they land, slim and export_onnx)."""
from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Callable, Dict, Hashable, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.nn as nn

from disparse_fx.passes.channel_groups import find_channel_groups
from disparse_fx.passes.insert_channel_masks import insert_channel_masks
from disparse_fx.passes.insert_masks import fold_masks, insert_masks, masked_params
from disparse_fx.passes.slim import channels_emptied_by, slim_channels
from disparse_fx.passes.ownership import analyze_ownership
from disparse_fx.passes.prunable import default_prunable_params, unpruned_weights
from disparse_fx.passes.capture import CAPTURES, capture_model
from disparse_fx.passes.errors import some_names, warn

from .budget import budget_model, budget_report
from .channel_decision import decide_channels
from .config import CompressConfig, default_round_to
from .decision import decide, normalise_scores_, task_scores_of
from .errors import (DisparseValueError, InputError, NoPrunableParametersError, NotEnoughBatchesError,
                     TaskMismatchError)
from .importance import default_inputs, estimate_importance, model_inputs
from .plan import Plan
from .result import CompressionResult
from .validate import (check_data, check_example, check_loss_functions, check_model_tensors, check_not_masked,
                       check_outputs, explain_input_error, guard_losses)

__all__ = ["compress", "slim"]

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
    capture: str = "auto",
) -> CompressionResult:
    """Prune a multitask model with DiSparse and return the masked GraphModule and plan.

    ``model``: an nn.Module (or fx.GraphModule) whose forward returns a dict
    ``{task: Tensor}`` or a tuple/list of Tensors. ``task_losses``: ``{task: loss_fn}``
    for dict outputs, or a sequence aligned with a tuple/list output;
    ``loss_fn(prediction, batch) -> scalar``. ``data``: an iterable of batches.
    ``inputs(batch)``: the model's positional input(s), a tuple for several (default:
    batch[0] for tuples/lists, batch["input"] for dicts, else the batch).
    ``leaf_modules`` / ``concrete_args``: passed to the tracer for models torch.fx
    cannot trace through. ``capture``: how the model becomes a graph - ``"fx"``
    (symbolic tracing), ``"export"`` (torch.export on the first batch's inputs: current
    Hugging Face models, code symbolic tracing cannot follow; batch and sequence dims
    stay dynamic) or ``"auto"`` (default: tracing, and torch.export only if tracing fails).

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
    if capture not in CAPTURES:
        raise DisparseValueError(f"capture must be one of {CAPTURES}, got {capture!r}")

    check_data(data)
    check_loss_functions(task_losses)
    check_model_tensors(model)
    check_not_masked(model)

    timings: Dict[str, float] = {}  # seconds per phase (Plan.timings)
    tick = time.perf_counter()
    given_inputs, inputs = inputs, inputs or default_inputs
    first, data = _peek(data)
    gm = capture_model(model, _capture_example(model, inputs, first, capture), capture=capture,
                       leaf_modules=leaf_modules, concrete_args=concrete_args)
    check_outputs(gm, task_losses, config.needs_data)
    tick = _lap(timings, "trace", tick)
    ownership = analyze_ownership(gm, reference=model)
    losses = guard_losses(_match_task_losses(task_losses, ownership.tasks))

    params = dict(model.named_parameters())
    prunable = _select_prunable(gm, model, params, ownership.owners, config)
    unpruned = {}
    if config.filter_fn is None:
        unpruned = _report_unpruned(gm, model, params, prunable, ownership.owners, config)
        _report_frozen(params, prunable)
    tick = _lap(timings, "ownership", tick)
    example = None if first is None else check_example(gm, model, model_inputs(inputs, first, 0),
                                                       trial=config.granularity == "channel")
    groups = None
    if config.granularity == "channel":
        if example is None:
            raise NotEnoughBatchesError("granularity='channel' needs one batch to find the channel groups; data is empty")
        groups = find_channel_groups(gm, example, attention=config.attention)
    tick = _lap(timings, "groups", tick)
    domains = {t: tuple(p for p in prunable if t in ownership.owners[p]) for t in ownership.tasks}
    for t, dom in domains.items():
        if not dom:
            warn(f"task {t!r} reaches no prunable parameter; its output depends only on "
                 "non-prunable parameters")
    domains = {t: d for t, d in domains.items() if d}

    try:
        scores = estimate_importance(
            gm,
            domains=domains,
            params={p: params[p] for p in prunable},
            task_losses=losses,
            data=data,
            inputs=inputs,
            config=config,
        )
    except InputError as exc:
        error = explain_input_error(exc, gm, example)
        if error is exc:
            raise
        raise error from exc.__cause__
    tick = _lap(timings, "importance", tick)
    shapes = {p: params[p].shape for p in prunable}
    channels = budget = None
    if groups is None:
        decision = decide(scores, prunable=prunable, shapes=shapes, task_domains=domains, config=config)
        tick = _lap(timings, "decision", tick)
        masked = insert_masks(gm, _gm_keyed(gm, params, decision.masks))
        sparsity = 1.0 - sum(int(m.sum()) for m in decision.masks.values()) / sum(m.numel() for m in decision.masks.values())
        task_scores = decision.task_scores
        tick = _lap(timings, "masks", tick)
    else:
        first_param = next(iter(params.values()))
        round_to = config.round_to or default_round_to(first_param.device, first_param.dtype, config.budget)
        cost_model = budget_model(config, gm, groups, example)
        tick = _lap(timings, "budget", tick)
        decision = decide_channels(scores, groups, prunable=prunable, shapes=shapes, owners=ownership.owners,
                                   task_domains=domains, config=config, round_to=round_to,
                                   budget_model=cost_model)
        tick = _lap(timings, "decision", tick)
        masked = insert_channel_masks(gm, groups, decision.channels.keep)
        sparsity = decision.sparsity
        channels = decision.channels
        # in place: a normalised copy would hold every score twice until compress returns
        task_scores = task_scores_of(normalise_scores_(scores), domains, config.disentangle)
        tick = _lap(timings, "masks", tick)
        budget = budget_report(config, gm, groups, example, decision.channels.keep, decision.budget_removed,
                               cost_model, {n: tuple(p.shape) for n, p in params.items()})
        tick = _lap(timings, "budget", tick)
    total = sum(m.numel() for m in decision.masks.values())
    timings["total"] = time.perf_counter() - t0
    plan = Plan(
        owners=dict(ownership.owners),
        task_scores=task_scores,
        task_masks=decision.task_masks,
        masks=decision.masks,
        sparsity=sparsity,
        config=config,
        tasks=ownership.tasks,
        prunable=prunable,
        keep_ratio=decision.keep_ratio,
        batches=scores.batches,
        shapes={p: tuple(s) for p, s in shapes.items()},
        channels=channels,
        input_specs=_input_specs(example),
        budget=budget,
        timings=timings,
        unpruned=unpruned,
    )
    log.info("compress: %d tasks, %d prunable parameters (%d elements), sparsity %.4f (target %.4f) in %.2fs (%s)%s",
             len(ownership.tasks), len(prunable), total, plan.sparsity, config.sparsity, timings["total"],
             ", ".join(f"{k} {v:.2f}s" for k, v in timings.items() if k != "total"),
             f"; {budget}" if budget is not None else "")
    return CompressionResult(model=masked, plan=plan, inputs=given_inputs)


def slim(result: CompressionResult, example_inputs=None) -> fx.GraphModule:
    """The compact model: pruned channels physically removed, masks folded away.

    Channel-granularity results remove every channel the plan removed. Element results
    remove the channels their element masks emptied entirely (exact only: a channel
    some kept weight still reads stays), keeping the remaining masks folded into the
    weights; around an op without a channel rule every channel is kept, with a
    :class:`DisparseWarning` naming the node (a channel result cannot contain such an op:
    compress raises :class:`UnsupportedOpError`). The slim model computes what the masked
    model computes (checked: eval mode, max abs diff <= 1e-4 x output scale), keeps
    parameters' device and dtype, and never shares storage with ``result.model``.
    Submodules the forward never calls are not in it (``result.model`` keeps them, so
    its state_dict has every key of the user's model); unused parameters and buffers
    held directly by a kept module stay.
    ``example_inputs``: defaults to random inputs shaped like the batches compress() saw.
    """
    if not isinstance(result, CompressionResult):
        raise DisparseValueError(f"slim expects the CompressionResult of compress(), got {type(result).__name__}")
    plan = result.plan
    if plan.channels is not None:
        return slim_channels(result.model, plan.channels.groups, plan.channels.keep)
    device = next((p.device for p in result.model.parameters()), None)
    example = example_inputs if example_inputs is not None else plan.example_inputs(device)
    if example is None:
        raise DisparseValueError("slim needs example_inputs: compress() saw no batch to take their shapes from")
    example = example if isinstance(example, tuple) else (example,)
    folded = fold_masks(result.model)  # pruned weights are zeros; masks leave the graph
    # exact-only removal may keep what it cannot analyse: an op without a channel rule
    # keeps every channel it touches (a DisparseWarning names it) instead of raising
    groups = find_channel_groups(folded, example, unknown_ops="keep")
    # the model's mask buffers are the truth (dynamic sparse training moves them after compress)
    masks = {p: m != 0 for p, m in masked_params(result.model).items()}
    return slim_channels(folded, groups, channels_emptied_by(groups, masks))


def _capture_example(model: nn.Module, inputs, first, capture: str):
    """The first batch's inputs on the model's device, for torch.export (None for
    ``capture="fx"``, for no data, and for ``"auto"`` when ``inputs`` rejects the batch:
    the checks after capture name that)."""
    if capture == "fx" or first is None or isinstance(model, fx.GraphModule):
        return None
    try:
        example = model_inputs(inputs, first, 0)
    except InputError:
        if capture == "export":
            raise
        return None
    return check_example(model, model, example, trial=False)


def _lap(timings: Dict[str, float], phase: str, since: float) -> float:
    """Add the seconds since ``since`` to ``timings[phase]``; return now."""
    now = time.perf_counter()
    timings[phase] = timings.get(phase, 0.0) + now - since
    return now


def _peek(data: Iterable):
    """(first batch or None, an iterable that still yields every batch)."""
    it = iter(data)
    try:
        first = next(it)
    except StopIteration:
        return None, []
    return first, itertools.chain([first], it)


def _input_specs(example):
    if example is None:
        return None
    return tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in example)


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


def _select_prunable(gm, model, params, owners, config) -> tuple:
    """Prunable = used by at least one task and accepted by the filter (or the default)."""
    if config.filter_fn is not None:
        chosen = tuple(p for p in owners if owners[p] and _accepts(config.filter_fn, p, params[p]))
        what = "config.filter_fn accepted none of the used parameters"
    else:
        chosen = tuple(p for p in default_prunable_params(gm, reference=model) if owners.get(p))
        what = ("it has no Conv/ConvTranspose/Linear weight (nor functional conv/linear weight) "
                "that reaches a task output; pass CompressConfig(filter_fn=...) to choose parameters")
    if not chosen:
        raise NoPrunableParametersError(f"the model has no prunable parameter: {what}")
    return chosen


def _report_frozen(params: Mapping[str, nn.Parameter], prunable: Sequence[str]) -> None:
    """Frozen weights (requires_grad=False) are pruned like the others - importance scores
    detached copies - but fine-tuning cannot make up for what they lose: say so. A
    filter_fn the user wrote is their choice and is not second-guessed."""
    frozen = [p for p in prunable if not params[p].requires_grad]
    if frozen:
        warn(f"{len(frozen)} frozen weight(s) (requires_grad=False) are pruned ({some_names(frozen)}); "
             "fine-tuning will not update them to make up for it. To leave them dense, e.g.: "
             "CompressConfig(filter_fn=lambda name, p: p.requires_grad and p.dim() > 1)")


def _accepts(filter_fn, name: str, param: nn.Parameter) -> bool:
    """``filter_fn(name, param)``, its failures named (the user's code may raise anything)."""
    try:
        return bool(filter_fn(name, param))
    except Exception as exc:  # noqa: BLE001
        raise DisparseValueError(
            f"CompressConfig.filter_fn raised {type(exc).__name__}: {exc} on parameter '{name}' (shape "
            f"{tuple(param.shape)}); it is called as filter_fn(name, param) for every parameter a task uses "
            "and must return True to prune it") from exc


def _report_unpruned(gm, model, params, prunable, owners, config) -> Dict[str, str]:
    """Conv / linear weights that reach a task but the default filter could not prune
    (inside a leaf module, or also used as something other than a weight): warned about
    here and kept in Plan.unpruned, so ``sparsity`` is never read as covering them. At
    channel granularity an RNN's weights shrink with its hidden units: not reported."""
    unpruned = {p: why for p, why in unpruned_weights(gm, prunable, reference=model).items() if owners.get(p)}
    if config.granularity == "channel":
        unpruned = {p: why for p, why in unpruned.items()
                    if not isinstance(model.get_submodule(p.rpartition(".")[0]), nn.RNNBase)}
    if unpruned:
        left = sum(params[p].numel() for p in unpruned)
        total = left + sum(params[p].numel() for p in prunable)
        by_reason: Dict[str, list] = {}
        for p, why in unpruned.items():
            by_reason.setdefault(why, []).append(p)
        shown = "; ".join(f"{why}: {some_names(names, 3)}" for why, names in by_reason.items())
        warn("%d conv/linear weight(s) stay dense (%d elements, %.1f%% of all conv/linear weight elements; "
             "sparsity counts only the prunable ones): %s. To prune them, let the tracer enter the "
             "module (leave it out of leaf_modules) or choose parameters with CompressConfig(filter_fn=...)"
             % (len(unpruned), left, 100.0 * left / total, shown))
    return unpruned


def _gm_keyed(gm: fx.GraphModule, params: Mapping[str, nn.Parameter], masks: Mapping[str, torch.Tensor]):
    """Re-key masks from the original model's names to gm's names (they differ only for tied weights)."""
    by_id = {}
    for name, p in gm.named_parameters():
        by_id.setdefault(id(p), name)
    return {by_id[id(params[p])]: m for p, m in masks.items()}
