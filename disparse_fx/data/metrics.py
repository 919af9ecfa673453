"""Per-task metrics, a model evaluator and the multitask score Delta_T.

Metric families (the ``tasks`` values of :func:`evaluate`):

- ``"segmentation"`` -> ``miou`` and ``pixel_acc`` from a confusion matrix summed over
  the whole loader; classes absent from both prediction and target are left out of
  the mean IoU. Predictions are logits ``(N, K, H, W)``, targets labels ``(N, H, W)``.
- ``"binary"`` -> ``f1`` of ``sigmoid(logit) > 0.5`` against 0/1 targets, from counts
  summed over the loader (1.0 when neither prediction nor target has a positive).
- ``"regression"`` -> ``l1`` (mean absolute error) and ``rel_err``
  (``sum |pred - target| / sum |target|``, NaN when the targets are all zero).

All values are fractions, not percent. :data:`HIGHER_IS_BETTER` says which way each
metric points; :func:`delta_t` uses it.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Dict, Iterable, Mapping, Optional, Union

import torch
import torch.nn as nn

__all__ = [
    "confusion_matrix",
    "segmentation_scores",
    "binary_f1",
    "regression_errors",
    "SegmentationMeter",
    "BinaryF1Meter",
    "RegressionMeter",
    "METERS",
    "HIGHER_IS_BETTER",
    "evaluate",
    "task_deltas",
    "delta_t",
]

log = logging.getLogger(__name__)

#: metric name -> True when a larger value is better.
HIGHER_IS_BETTER: Dict[str, bool] = {"miou": True, "pixel_acc": True, "f1": True, "l1": False, "rel_err": False}


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: Optional[int] = None
) -> torch.Tensor:
    """``(K, K)`` int64 counts, rows = target class, columns = predicted class.

    ``pred`` holds labels of the same shape as ``target``; target pixels equal to
    ``ignore_index`` are skipped.

    >>> confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 2).tolist()
    [[1, 1], [0, 1]]
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, but got {tuple(pred.shape)} and {tuple(target.shape)}")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    if target.numel() and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(f"target labels must be in [0, {num_classes}), but got [{int(target.min())}, {int(target.max())}]")
    return torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def segmentation_scores(conf: torch.Tensor) -> Dict[str, float]:
    """``miou`` (mean over classes present in prediction or target) and ``pixel_acc``.

    >>> segmentation_scores(torch.tensor([[1, 1], [0, 1]]))  # IoUs 1/2 and 1/2
    {'miou': 0.5, 'pixel_acc': 0.6666666666666666}
    """
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    miou = float((tp[present] / union[present]).mean()) if present.any() else float("nan")
    total = conf.sum()
    pixel_acc = float(tp.sum() / total) if total > 0 else float("nan")
    return {"miou": miou, "pixel_acc": pixel_acc}


def _f1(tp: int, fp: int, fn: int) -> float:
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2 * tp / denom


def binary_f1(logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> float:
    """F1 of ``sigmoid(logits) > threshold`` against a 0/1 ``target``."""
    pred = torch.sigmoid(logits) > threshold
    true = target > 0.5
    return _f1(int((pred & true).sum()), int((pred & ~true).sum()), int((~pred & true).sum()))


def regression_errors(pred: torch.Tensor, target: torch.Tensor) -> Dict[str, float]:
    """``l1`` = mean ``|pred - target|``; ``rel_err`` = ``sum |pred - target| / sum |target|``."""
    meter = RegressionMeter()
    meter.update(pred, target)
    return meter.compute()


class SegmentationMeter:
    """Accumulates a confusion matrix; the class count comes from the logits' dim 1."""

    def __init__(self, num_classes: Optional[int] = None, ignore_index: Optional[int] = None):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.conf: Optional[torch.Tensor] = None

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        k = self.num_classes or logits.shape[1]
        conf = confusion_matrix(logits.argmax(1), target, k, self.ignore_index).cpu()
        self.conf = conf if self.conf is None else self.conf + conf

    def compute(self) -> Dict[str, float]:
        if self.conf is None:
            raise ValueError("SegmentationMeter.compute() before any update()")
        return segmentation_scores(self.conf)


class BinaryF1Meter:
    """Accumulates true/false positive and false negative counts."""

    def __init__(self, threshold: float = 0.5):
        self.threshold = threshold
        self.tp = self.fp = self.fn = 0
        self.seen = False

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        pred = torch.sigmoid(logits) > self.threshold
        true = target > 0.5
        self.tp += int((pred & true).sum())
        self.fp += int((pred & ~true).sum())
        self.fn += int((~pred & true).sum())
        self.seen = True

    def compute(self) -> Dict[str, float]:
        if not self.seen:
            raise ValueError("BinaryF1Meter.compute() before any update()")
        return {"f1": _f1(self.tp, self.fp, self.fn)}


class RegressionMeter:
    """Accumulates absolute errors and target magnitudes (in float64)."""

    def __init__(self):
        self.abs_err = 0.0
        self.abs_target = 0.0
        self.count = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"pred and target must have the same shape, but got {tuple(pred.shape)} and {tuple(target.shape)}")
        self.abs_err += float((pred.double() - target.double()).abs().sum())
        self.abs_target += float(target.double().abs().sum())
        self.count += target.numel()

    def compute(self) -> Dict[str, float]:
        if self.count == 0:
            raise ValueError("RegressionMeter.compute() before any update()")
        rel = self.abs_err / self.abs_target if self.abs_target > 0 else float("nan")
        return {"l1": self.abs_err / self.count, "rel_err": rel}


#: metric family -> meter class.
METERS: Dict[str, Callable[[], object]] = {
    "segmentation": SegmentationMeter,
    "binary": BinaryF1Meter,
    "regression": RegressionMeter,
}


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def evaluate(
    model: nn.Module,
    loader: Iterable[Mapping[str, torch.Tensor]],
    tasks: Mapping[str, Union[str, Callable[[], object]]],
    *,
    input_key: str = "input",
    device: Optional[torch.device] = None,
    max_batches: Optional[int] = None,
) -> Dict[str, Dict[str, float]]:
    """Run ``model`` over ``loader`` and return ``{task: {metric: value}}``.

    ``tasks`` maps each task to a metric family of :data:`METERS` (e.g.
    ``disparse_fx.data.TASK_METRICS``) or to a factory of an object with
    ``update(pred, target)`` / ``compute()``. Batches are dicts holding ``input_key``
    and one target per task; ``model(batch[input_key])`` must return a dict (or a
    tuple in the order of ``tasks``). The model runs in eval mode under
    ``torch.no_grad()``; every submodule's training flag is restored afterwards.
    """
    meters = {}
    for task, family in tasks.items():
        if callable(family):
            meters[task] = family()
        elif family in METERS:
            meters[task] = METERS[family]()
        else:
            raise ValueError(f"task {task!r}: metric family must be one of {sorted(METERS)} or a factory, but got {family!r}")
    device = device or _device_of(model)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                out = model(batch[input_key].to(device))
                if not isinstance(out, Mapping):
                    out = dict(zip(tasks, out))
                for task, meter in meters.items():
                    meter.update(out[task], batch[task].to(device))
    finally:
        # Pre-order, so a child's own mode wins over its parent's; train() rather than
        # setting .training keeps modules that override it (torchvision's
        # DualGraphModule swaps graphs there) consistent.
        for module, mode in modes:
            if module.training != mode:
                module.train(mode)
    return {task: meter.compute() for task, meter in meters.items()}


def task_deltas(
    metrics: Mapping[str, Mapping[str, float]],
    dense_metrics: Mapping[str, Mapping[str, float]],
    higher_is_better: Optional[Mapping[str, bool]] = None,
) -> Dict[str, float]:
    """Per task: the mean over its metrics of ``100 * (m - d) / |d|``, sign-flipped for
    lower-is-better metrics (the per-task term of :func:`delta_t`)."""
    hib = HIGHER_IS_BETTER if higher_is_better is None else higher_is_better
    out = {}
    for task, dense in dense_metrics.items():
        if task not in metrics:
            raise KeyError(f"task {task!r} has dense metrics but none in metrics (tasks: {sorted(metrics)})")
        if set(metrics[task]) != set(dense):
            raise KeyError(f"task {task!r}: metric names differ: {sorted(metrics[task])} vs dense {sorted(dense)}")
        if not dense:
            raise ValueError(f"task {task!r} has no metrics")
        changes = []
        for name, d in dense.items():
            if name not in hib:
                raise KeyError(f"metric {name!r} of task {task!r} is missing from higher_is_better")
            if d == 0 or not math.isfinite(d):
                raise ValueError(f"task {task!r}: dense {name} is {d}, so its relative change is undefined")
            sign = 1.0 if hib[name] else -1.0
            changes.append(sign * 100.0 * (metrics[task][name] - d) / abs(d))
        out[task] = sum(changes) / len(changes)
    return out


def delta_t(
    metrics: Mapping[str, Mapping[str, float]],
    dense_metrics: Mapping[str, Mapping[str, float]],
    higher_is_better: Optional[Mapping[str, bool]] = None,
) -> float:
    """Multitask score Delta_T in percent: the mean over tasks of :func:`task_deltas`.

    Within a task the relative changes of its metrics are AVERAGED (some papers sum
    them). Positive means better than the dense model.

    >>> dense = {"seg": {"miou": 0.5, "pixel_acc": 0.8}, "depth": {"l1": 0.2}}
    >>> pruned = {"seg": {"miou": 0.45, "pixel_acc": 0.8}, "depth": {"l1": 0.19}}
    >>> round(delta_t(pruned, dense), 6)  # seg (-10 + 0) / 2 = -5; depth +5
    0.0
    """
    deltas = task_deltas(metrics, dense_metrics, higher_is_better)
    return sum(deltas.values()) / len(deltas)
