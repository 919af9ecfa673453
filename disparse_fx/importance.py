"""Disentangled importance: every parameter scored separately for each task using it.

For each batch the model runs ONE forward pass; then each task's loss (on its own
output only) is back-propagated (``backward(inputs=...)``) to the parameters of that
task's domain alone, keeping the autograd graph between the backwards. A
post-accumulate-grad hook on each parameter adds |gradient| to the task's running sum
and frees the gradient at once, so memory holds one float32 score tensor per task and
parameter plus the autograd graph, never a task's whole gradient (bfloat16 with
``CompressConfig(score_dtype="bfloat16")``: half of it; each |gradient| is taken in
float32 and added to the stored sum). The weights do not change while they are scored,
so the criterion's weight factor (|w| for snip, w^2 for taylor) multiplies the sum once
at the end: sum_b |g_b * w| = |w| * sum_b |g_b|, one elementwise pass per backward
instead of three (3-task resnet50 trunk: about 0.05 s of each backward). (Batched vector-Jacobian
products over the stacked losses, ``torch.autograd.grad(..., is_grads_batched=True)``,
measured no faster on CPU and hold T gradients at once: 3-task resnet18 trunk, batch 4,
64 px, 19.5-21.2 s vs 20.6-21.9 s per batch; 3-task resnet50 trunk, batch 8, 96 px, one
thread, forward + gradients of every weight for each task, interleaved, median of 3:
10.69 s batched vs 9.97 s for T separate backwards, scores equal to 1.4e-7 relative; on
a loaded 2-core machine. See issue 13.) No copy of the model is made: the forward is a
``torch.func.functional_call`` with detached leaf tensors for the prunable parameters
(so the user's requires_grad flags are untouched) and clones of the buffers (so
BatchNorm statistics are not updated). The model's train/eval modes are set to train
for the estimate and restored afterwards, whatever happens.

Criteria (method.md), accumulated in ``config.score_dtype`` (float32 by default) whatever
the weights' dtype:

=========  ============================================
snip       sum over batches of |g_t * w|  (= |w| * sum of |g_t|)
taylor     w^2 * sum over batches of |g_t|
magnitude  |w|  (data-free; identical for every task)
random     seeded uniform, one draw per task
=========  ============================================

With ``disentangle=False`` a single score is computed on the summed loss (one backward
per batch) - the baseline users compare against.
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, Iterable, Mapping, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
from tqdm.auto import tqdm

from . import distributed
from .config import CompressConfig
from disparse_fx.passes.errors import some_names, warn

from .errors import InputError, LossError, NotEnoughBatchesError, ZeroGradientError
from .validate import LossFunctionError, to_device

__all__ = ["TaskScores", "estimate_importance", "default_inputs", "model_inputs", "SUMMED"]

log = logging.getLogger(__name__)

SUMMED = "__summed__"  # key of the summed-loss score (disentangle=False)

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]


@dataclass(frozen=True)
class TaskScores:
    """Per-unit importance: {unit: {param name: float32 score}}.

    A unit is a task (``disentangle=True``) or :data:`SUMMED`. Each unit's scores cover
    exactly its domain's prunable parameters. ``batches`` is how many batches were used.
    """

    scores: Mapping[Hashable, Mapping[str, torch.Tensor]]
    domains: Mapping[Hashable, Tuple[str, ...]]
    batches: int


def default_inputs(batch: Any) -> Any:
    """api.md's default: batch[0] for tuples/lists, batch["input"] for dicts, else the batch."""
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, Mapping):
        if "input" not in batch:
            raise InputError(
                f"the batch is a dict with keys {sorted(map(str, batch))} but no 'input'; "
                "pass inputs=lambda batch: batch['<your key>'] to compress()"
            )
        return batch["input"]
    return batch


def estimate_importance(
    gm: fx.GraphModule,
    *,
    domains: Mapping[Hashable, Sequence[str]],
    params: Mapping[str, nn.Parameter],
    task_losses: Mapping[Hashable, LossFn],
    data: Iterable,
    inputs: Callable[[Any], Any],
    config: CompressConfig,
) -> TaskScores:
    """Score the prunable parameters for each task over its domain.

    ``domains``: {task: prunable parameter names whose output reaches the task}.
    ``params``: {name: parameter object} for those names (the objects ``gm`` reads).
    """
    units: Dict[Hashable, Tuple[str, ...]] = {t: tuple(d) for t, d in domains.items()}
    if not config.disentangle:
        units = {SUMMED: tuple(dict.fromkeys(p for d in domains.values() for p in d))}
    if config.criterion == "magnitude":
        kind = config.score_torch_dtype
        scores = {u: {p: params[p].detach().abs().to(kind) for p in d} for u, d in units.items()}
        return TaskScores(scores, units, 0)
    if config.criterion == "random":
        return TaskScores(_random_scores(units, params, config.seed, config.score_torch_dtype), units, 0)
    return _gradient_scores(gm, units, params, task_losses, data, inputs, config)


def _random_scores(units, params, seed, kind=torch.float32):
    scores = {}
    for i, (u, dom) in enumerate(units.items()):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        scores[u] = {p: torch.rand(params[p].shape, generator=gen).to(params[p].device, kind) for p in dom}
    return scores


def _gradient_scores(gm, units, params, task_losses, data, inputs, config) -> TaskScores:
    device = next(iter(params.values())).device
    names_in_gm = _gm_names(gm, params)
    grad_acc = {u: flat_scores({p: params[p].shape for p in d}, device, config.score_torch_dtype)
                for u, d in units.items()}
    batches = 0
    bar = tqdm(total=config.batch_limit, desc="importance", unit="batch",
               disable=not (config.progress and sys.stderr.isatty()), leave=False)
    with _train_mode(gm), _forked_rng(device, config.seed), bar:
        buffers = {n: b.detach().clone() for n, b in gm.named_buffers()}
        for index, batch in enumerate(_take(data, config.batch_limit)):
            leaves = {p: params[p].detach().requires_grad_(True) for p in names_in_gm}
            batch = to_device(batch, device)
            outputs = _forward(gm, leaves, names_in_gm, buffers, batch, inputs, index)
            losses = _losses(outputs, task_losses, batch, index)
            if config.disentangle:
                todo = [(u, losses[u]) for u in units]
            else:
                todo = [(SUMMED, torch.stack([losses[t] for t in task_losses]).sum())]
            # Each gradient is folded into its unit's score as soon as autograd has it and
            # then freed, so no unit's full set of gradients is ever held at once.
            current = [None]
            hooks = [leaf.register_post_accumulate_grad_hook(_accumulate(p, current, grad_acc))
                     for p, leaf in leaves.items()]
            try:
                for i, (u, loss) in enumerate(todo):
                    current[0] = u
                    loss.backward(inputs=[leaves[p] for p in units[u]], retain_graph=i < len(todo) - 1)
            finally:
                for h in hooks:
                    h.remove()
            batches += 1
            bar.update(1)
            del outputs, losses, todo, leaves
    if batches == 0:
        raise NotEnoughBatchesError(
            f"data yielded no batch; criterion {config.criterion!r} needs at least one "
            "(use criterion='magnitude' or 'random' for data-free pruning)"
        )
    if config.num_batches is not None and batches < config.num_batches and not config.allow_fewer_batches:
        raise NotEnoughBatchesError(
            f"data yielded {batches} batches, fewer than config.num_batches={config.num_batches}; "
            "pass more data, lower num_batches, or set allow_fewer_batches=True to use what there is"
        )
    distributed.all_reduce_scores(grad_acc)
    for u, acc in grad_acc.items():
        what = f"task {u!r}" if u != SUMMED else "the summed loss"
        reached = torch.stack([a.any() for a in acc.values()]).tolist()  # one sync per unit
        if not any(reached):
            raise ZeroGradientError(
                f"the gradient of {what} is zero on every prunable parameter of its domain "
                f"({len(acc)} parameters, {batches} batches); its loss does not depend on them - "
                "check the loss function (detached output? constant?) or drop the task"
            )
        if not all(reached):
            _warn_gradient_free(what, [p for p, r in zip(acc, reached) if not r], len(acc), batches, config)
    # the weight factor, once per parameter (a shared one is in T units): snip |w|, taylor w^2
    for p in dict.fromkeys(p for acc in grad_acc.values() for p in acc):
        w = params[p].detach().float()  # (the parameter itself when float32: no in-place op)
        factor = w.abs() if config.criterion == "snip" else w.square()
        for acc in grad_acc.values():
            if p in acc:
                acc[p] *= factor
    return TaskScores(grad_acc, units, batches)


def _warn_gradient_free(what: str, names: Sequence[str], domain: int, batches: int, config) -> None:
    """Parameters of a unit's domain that got no gradient at all: their gradient scores
    are 0, so the decision removes them first. Said, not guessed around: a frozen
    block (``torch.no_grad()`` / ``.detach()`` in forward), a non-differentiable path,
    or a zero-initialised layer after them (e.g. ``zero_init_residual``)."""
    warn(f"{len(names)} of the {domain} prunable parameters that {what} reaches got zero gradient on all "
         f"{batches} batches ({some_names(names)}): their {config.criterion} scores are 0, so they are pruned "
         "first. Typical causes: a gradient-free path (torch.no_grad() or .detach() in forward, a "
         "non-differentiable op) or a zero-initialised layer after them. To keep them, leave them out with "
         "CompressConfig(filter_fn=...); to score them by size, use criterion='magnitude'")


def flat_scores(shapes: Mapping[str, Sequence[int]], device, dtype: torch.dtype = torch.float32
                ) -> Dict[str, torch.Tensor]:
    """Zero scores (``dtype``), one per parameter, as views of ONE buffer in the given order,
    so the decision reads a unit's whole domain without concatenating it (a copy of
    every score) - see :func:`joined`."""
    sizes = [math.prod(shape) for shape in shapes.values()]
    buffer = torch.zeros(sum(sizes), dtype=dtype, device=device)
    return {p: part.view(tuple(shape)) for (p, shape), part in zip(shapes.items(), buffer.split(sizes))}


def joined(parts: Mapping[str, torch.Tensor], dom: Sequence[str]) -> torch.Tensor:
    """The scores of ``dom`` as one flat tensor: the shared buffer itself when the parts
    are consecutive views of one (:func:`flat_scores`), else a concatenated copy."""
    first = parts[dom[0]] if dom else None
    base = getattr(first, "_base", None)
    if base is not None and base.dim() == 1 and base.dtype == first.dtype and first.is_contiguous():
        offset = 0
        for p in dom:
            x = parts[p]
            if x._base is not base or not x.is_contiguous() or x.storage_offset() != offset:
                break
            offset += x.numel()
        else:
            if offset == base.numel() and base.storage_offset() == 0:
                return base
    return torch.cat([parts[p].reshape(-1) for p in dom])


def _accumulate(p, current, grad_acc):
    """Post-accumulate-grad hook of leaf ``p``: add |its gradient| to the current unit's sum.

    The gradient is taken from ``leaf.grad`` (which is cleared), so nothing else holds it
    and its absolute value is taken in place."""

    def hook(leaf: torch.Tensor) -> None:
        g, leaf.grad = leaf.grad, None
        acc = grad_acc[current[0]].get(p)
        if g is None or acc is None:
            return
        acc += g.float().abs_()

    return hook


def _gm_names(gm: fx.GraphModule, params: Mapping[str, nn.Parameter]) -> Dict[str, str]:
    """{canonical name: name under which gm's functional_call accepts that parameter}."""
    by_id = {}
    for name, p in gm.named_parameters():
        by_id.setdefault(id(p), name)
    return {canon: by_id[id(p)] for canon, p in params.items()}


def model_inputs(inputs: Callable[[Any], Any], batch: Any, index: int) -> tuple:
    """``inputs(batch)`` as a tuple of positional inputs; InputError if it raises."""
    try:
        args = inputs(batch)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"inputs(batch) raised {type(exc).__name__}: {exc} on batch {index}") from exc
    return args if isinstance(args, tuple) else (args,)


def _forward(gm, leaves, names_in_gm, buffers, batch, inputs, index):
    args = model_inputs(inputs, batch, index)
    tensors = {names_in_gm[p]: t for p, t in leaves.items()}
    try:
        return torch.func.functional_call(gm, (tensors, buffers), args, strict=False)
    except Exception as exc:  # noqa: BLE001
        raise InputError(
            f"the model rejected inputs(batch) on batch {index}: inputs returned "
            f"{_describe(args)}; {type(exc).__name__}: {exc}. "
            "Pass inputs=lambda batch: ... returning the model's positional input(s) "
            "(a tuple for several inputs)."
        ) from exc


def _losses(outputs, task_losses, batch, index) -> Dict[Hashable, torch.Tensor]:
    losses = {}
    for task, fn in task_losses.items():
        pred = outputs[task]
        try:
            loss = fn(pred, batch)
        except LossFunctionError as exc:
            raise LossFunctionError(f"on batch {index}: {exc}") from exc.__cause__
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise LossError(
                f"loss of task {task!r} on batch {index} is {shape}, expected a scalar Tensor "
                "(reduce it, e.g. with .mean())"
            )
        if not torch.isfinite(loss.detach()).all():
            raise LossError(f"loss of task {task!r} on batch {index} is {loss.item()} (not finite)")
        if not loss.requires_grad:
            if isinstance(pred, torch.Tensor) and not pred.requires_grad:
                raise ZeroGradientError(
                    f"the output of task {task!r} (batch {index}) depends on no parameter of the model: it is "
                    "computed from the inputs and constants only, or under torch.no_grad() / .detach() in "
                    "forward, so the task cannot be scored by gradients. Compute it from the model's "
                    "parameters, or drop the task from task_losses")
            raise ZeroGradientError(
                f"loss of task {task!r} on batch {index} does not depend on the model's output "
                "(no autograd graph); it must be computed from the prediction"
            )
        losses[task] = loss.reshape(())
    return losses


def _take(data: Iterable, n: int):
    for i, batch in enumerate(data):
        if i >= n:
            return
        yield batch


def _describe(args) -> str:
    def one(a):
        if isinstance(a, torch.Tensor):
            return f"Tensor{tuple(a.shape)} {a.dtype}"
        return type(a).__name__

    return "(" + ", ".join(one(a) for a in args) + ")"


@contextlib.contextmanager
def _train_mode(gm: nn.Module):
    """Train mode for the estimate; every module's own flag restored afterwards."""
    modes = [(m, m.training) for m in gm.modules()]
    try:
        gm.train()
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _forked_rng(device: torch.device, seed: int):
    """Seed dropout etc. for determinism without disturbing the caller's RNG state."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield

