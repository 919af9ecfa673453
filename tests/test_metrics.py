"""Per-task metrics against hand-computed values, the evaluator, and Delta_T."""
import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from disparse_fx.data.metrics import (
    HIGHER_IS_BETTER,
    BinaryF1Meter,
    RegressionMeter,
    SegmentationMeter,
    binary_f1,
    confusion_matrix,
    delta_t,
    evaluate,
    regression_errors,
    segmentation_scores,
    task_deltas,
)


def test_confusion_matrix_by_hand():
    pred = torch.tensor([[0, 0, 1], [2, 2, 1]])
    target = torch.tensor([[0, 1, 1], [2, 0, 1]])
    conf = confusion_matrix(pred, target, 4)
    expected = torch.zeros(4, 4, dtype=torch.long)
    expected[0, 0] = 1  # (t0, p0)
    expected[1, 0] = 1  # (t1, p0)
    expected[1, 1] = 2  # (t1, p1) twice
    expected[2, 2] = 1
    expected[0, 2] = 1  # (t0, p2)
    assert torch.equal(conf, expected)
    assert confusion_matrix(pred, torch.tensor([[0, 255, 1], [2, 0, 255]]), 3, ignore_index=255).sum() == 4
    with pytest.raises(ValueError, match="target labels must be in"):
        confusion_matrix(pred, target, 2)


def test_miou_excludes_classes_absent_in_both_and_pixel_acc():
    pred = torch.tensor([[0, 0, 1], [2, 2, 1]])
    target = torch.tensor([[0, 1, 1], [2, 0, 1]])
    scores = segmentation_scores(confusion_matrix(pred, target, 4))  # class 3 absent in both
    # IoU_c = tp / (#target c + #pred c - tp):
    # IoU0 = 1 / (2 + 2 - 1) = 1/3; IoU1 = 2 / (3 + 2 - 2) = 2/3; IoU2 = 1 / (1 + 2 - 1) = 1/2
    assert scores["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert scores["pixel_acc"] == pytest.approx(4 / 6)
    # a class predicted but never in the target counts (IoU 0)
    assert segmentation_scores(confusion_matrix(torch.tensor([1, 1]), torch.tensor([0, 1]), 2))["miou"] == pytest.approx(
        (0 + 1 / 2) / 2
    )


def test_segmentation_meter_sums_confusions_over_batches():
    logits = torch.zeros(2, 3, 1, 2)
    logits[0, 0, 0, 0] = logits[0, 1, 0, 1] = logits[1, 2, 0, 0] = logits[1, 2, 0, 1] = 1.0
    target = torch.tensor([[[0, 1]], [[2, 0]]])  # preds: [0,1], [2,2]
    meter = SegmentationMeter()
    meter.update(logits[:1], target[:1])
    meter.update(logits[1:], target[1:])
    # IoU0 = 1/2, IoU1 = 1, IoU2 = 1/2; accuracy 3/4
    assert meter.compute() == pytest.approx({"miou": 2 / 3, "pixel_acc": 3 / 4})


def test_binary_f1_by_hand():
    logits = torch.tensor([2.0, 1.0, -1.0, -3.0, 0.5])  # predicted positive: 0, 1, 4
    target = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])  # true positive: 0, 2, 4
    # tp = 2 (0, 4), fp = 1 (1), fn = 1 (2) -> F1 = 4 / (4 + 1 + 1)
    assert binary_f1(logits, target) == pytest.approx(4 / 6)
    assert binary_f1(torch.zeros(3), torch.ones(3)) == 0.0  # sigmoid(0) = 0.5 is not > 0.5
    assert binary_f1(-torch.ones(3), torch.zeros(3)) == 1.0  # nothing to find, nothing found
    meter = BinaryF1Meter()
    meter.update(logits[:2], target[:2])
    meter.update(logits[2:], target[2:])
    assert meter.compute() == {"f1": pytest.approx(4 / 6)}


def test_regression_errors_by_hand():
    pred = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    target = torch.tensor([[1.0, 1.0], [4.0, 2.0]])
    # |errors| = 0, 1, 1, 3 -> l1 = 5/4; sum |target| = 8 -> rel = 5/8
    assert regression_errors(pred, target) == pytest.approx({"l1": 5 / 4, "rel_err": 5 / 8})
    meter = RegressionMeter()
    meter.update(pred[:1], target[:1])
    meter.update(pred[1:], target[1:])
    assert meter.compute() == pytest.approx({"l1": 5 / 4, "rel_err": 5 / 8})
    assert math.isnan(regression_errors(torch.ones(2), torch.zeros(2))["rel_err"])


class _ModeAware(nn.Dropout):
    """Keeps state in sync through train(), as torchvision's DualGraphModule does."""

    def train(self, mode=True):
        self.graph = "train" if mode else "eval"
        return super().train(mode)


class _Fixed(nn.Module):
    """Predicts the targets for seg (one-hot logits) and a constant for depth."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.drop = nn.Dropout(0.5)
        self.aware = _ModeAware()

    def forward(self, x):
        seg = torch.stack([1 - x[:, 0], x[:, 0]], 1) * self.scale
        return {"seg": self.drop(seg) if self.training else seg, "depth": torch.zeros_like(x[:, :1]) + 0.5}


def test_evaluate_restores_modes_and_uses_no_grad():
    x = torch.tensor([[[[0.0, 1.0]]], [[[1.0, 1.0]]]])
    batches = [{"input": x, "seg": x[:, 0].long(), "depth": torch.ones(2, 1, 1, 2)}]
    model = _Fixed().train()
    model.drop.eval()  # mixed modes must come back as they were
    grads = []
    model.register_forward_hook(lambda m, i, o: grads.append(torch.is_grad_enabled()))
    result = evaluate(model, batches, {"seg": "segmentation", "depth": "regression"})
    assert result == {
        "seg": pytest.approx({"miou": 1.0, "pixel_acc": 1.0}),
        "depth": pytest.approx({"l1": 0.5, "rel_err": 0.5}),
    }
    assert model.training and not model.drop.training and grads == [False]
    assert model.aware.training and model.aware.graph == "train"


def test_evaluate_with_dataset_and_loader(tmp_path):
    pytest.importorskip("skimage")
    from disparse_fx.data import TASK_METRICS, TASKS, make_splits
    from disparse_fx.zoo import deeplab_resnet

    val = make_splits(cache_path=tmp_path, n_train=4, n_val=4, n_test=4).val
    torch.manual_seed(0)
    model = deeplab_resnet(TASKS, size="tiny")
    result = evaluate(model, DataLoader(val, batch_size=2), TASK_METRICS)
    assert set(result) == set(TASKS)
    assert set(result["segment"]) == {"miou", "pixel_acc"} and set(result["edge"]) == {"f1"}
    assert all(set(result[t]) == {"l1", "rel_err"} for t in ("keypoint", "denoise"))
    for metrics in result.values():
        for name, value in metrics.items():
            assert name in HIGHER_IS_BETTER and math.isfinite(value)
    assert model.training


def test_evaluate_rejects_unknown_family():
    with pytest.raises(ValueError, match="metric family must be one of"):
        evaluate(nn.Identity(), [], {"a": "psnr"})


def test_delta_t_hand_example():
    dense = {"seg": {"miou": 0.40, "pixel_acc": 0.80}, "normal": {"l1": 20.0}}
    pruned = {"seg": {"miou": 0.42, "pixel_acc": 0.76}, "normal": {"l1": 22.0}}
    # seg: (+5% - 5%) / 2 = 0; normal: error up 10% -> -10; Delta_T = (0 - 10) / 2 = -5
    assert task_deltas(pruned, dense) == pytest.approx({"seg": 0.0, "normal": -10.0})
    assert delta_t(pruned, dense) == pytest.approx(-5.0)
    assert delta_t(dense, dense) == 0.0
    # explicit direction table
    assert delta_t({"t": {"acc": 0.5}}, {"t": {"acc": 0.4}}, {"acc": True}) == pytest.approx(25.0)
    assert delta_t({"t": {"acc": 0.5}}, {"t": {"acc": 0.4}}, {"acc": False}) == pytest.approx(-25.0)


def test_delta_t_errors():
    dense = {"a": {"l1": 1.0}}
    with pytest.raises(KeyError, match="none in metrics"):
        delta_t({}, dense)
    with pytest.raises(KeyError, match="metric names differ"):
        delta_t({"a": {"f1": 1.0}}, dense)
    with pytest.raises(KeyError, match="higher_is_better"):
        delta_t({"a": {"psnr": 1.0}}, {"a": {"psnr": 2.0}})
    with pytest.raises(ValueError, match="undefined"):
        delta_t(dense, {"a": {"l1": 0.0}})
