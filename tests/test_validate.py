"""Mistakes in what is passed to compress: each kind named as the user made it, for both
granularities, before any importance is estimated; nothing passed in is changed."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import disparse_fx as dfx
from disparse_fx.validate import LossFunctionError


class TwoTasks(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.seg = nn.Conv2d(8, 4, 1)
        self.cls = nn.Linear(8, 5)

    def forward(self, x):
        h = self.trunk(x)
        return {"seg": self.seg(h), "cls": self.cls(h.mean((2, 3)))}


class OneOutput(TwoTasks):
    def forward(self, x):
        return self.seg(self.trunk(x))


class OneTuple(TwoTasks):
    def forward(self, x):
        return (self.seg(self.trunk(x)),)


def _data(n=2):
    g = torch.Generator().manual_seed(0)
    return [{"input": torch.randn(4, 3, 8, 8, generator=g), "seg": torch.randint(0, 4, (4, 8, 8), generator=g),
             "cls": torch.randint(0, 5, (4,), generator=g)} for _ in range(n)]


LOSSES = {"seg": lambda p, b: F.cross_entropy(p, b["seg"]), "cls": lambda p, b: F.cross_entropy(p, b["cls"])}
GRANULARITIES = ["element", "channel"]


def _compress(model, losses, data, granularity):
    return dfx.compress(model, losses, data, dfx.CompressConfig(sparsity=0.5, granularity=granularity, num_batches=2,
                                                                progress=False))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


def _unchanged(model, snap):
    state, modes = snap
    return all(torch.equal(v, model.state_dict()[k]) for k, v in state.items()) and \
        modes == [m.training for m in model.modules()]


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("data, what", [
    (_data()[0]["input"], r"got one Tensor of shape \(4, 3, 8, 8\).*pass \[tensor\]"),
    (_data()[0], r"got one batch \(a dict with keys \['input', 'seg', 'cls'\]\).*pass \[batch\]"),
    (42, "got int"),
])
def test_data_that_is_one_batch(data, what, granularity):
    with pytest.raises(dfx.DisparseValueError, match="data must be an iterable of batches.*" + what):
        _compress(TwoTasks(), LOSSES, data, granularity)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("losses, what", [
    ({"seg": nn.CrossEntropyLoss, "cls": LOSSES["cls"]},
     r"task_losses\['seg'\] is the class nn.CrossEntropyLoss, not a loss function.*loss_fn\(prediction, batch\)"),
    ({"seg": LOSSES["seg"], "cls": nn.CrossEntropyLoss()},
     r"task_losses\['cls'\] raised TypeError.*whole batch dict with keys.*nn.CrossEntropyLoss\(\) takes \(input, "
     r"target\), not \(prediction, batch\): wrap it, e.g. lambda pred, batch: nn.CrossEntropyLoss\(\)\(pred, "
     r"batch\['cls'\]\)"),
    ({"seg": lambda p, b: (F.cross_entropy(p, b["seg"]), {"seg": 1.0}), "cls": LOSSES["cls"]},
     r"task_losses\['seg'\] returned a tuple .*must return one scalar Tensor"),
])
def test_loss_functions_that_are_not_prediction_batch_to_scalar(losses, what, granularity):
    model = TwoTasks()
    snap = _snapshot(model)
    with pytest.raises(LossFunctionError, match=what) as info:
        _compress(model, losses, _data(), granularity)
    assert isinstance(info.value, dfx.LossError) and isinstance(info.value, ValueError)
    assert _unchanged(model, snap)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_model_returning_one_tensor(granularity):
    for losses in ({"seg": LOSSES["seg"]}, [LOSSES["seg"]]):
        with pytest.raises(dfx.TaskMismatchError, match=r"the model returns a single Tensor.*returns \(out,\) and "
                                                        r"takes task_losses=\[loss_fn\]"):
            _compress(OneOutput(), losses, _data(), granularity)
    result = _compress(OneTuple(), [LOSSES["seg"]], _data(), granularity)  # the advice works
    assert result.plan.tasks == (0,)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_model_and_data_dtypes_differ(granularity):
    model = TwoTasks().double()
    snap = _snapshot(model)
    with pytest.raises(dfx.DisparseValueError,
                       match=r"the model's parameters are torch.float64 but the data's inputs are torch.float32"):
        _compress(model, LOSSES, _data(), granularity)
    assert _unchanged(model, snap)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_model_without_values_on_the_meta_device(granularity):
    with pytest.raises(dfx.DisparseValueError, match=r"'trunk.0.weight' is on the meta device.*to_empty"):
        _compress(TwoTasks().to("meta"), LOSSES, _data(), granularity)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("model_device, data_device", [("cuda", "cpu"), ("cpu", "cuda")])
def test_data_on_another_device_than_the_model(model_device, data_device, granularity):
    """Both granularities move the batches to the model's device."""
    data = [{k: v.to(data_device) for k, v in b.items()} for b in _data()]
    result = _compress(TwoTasks().to(model_device), LOSSES, data, granularity)
    assert all(m.device.type == model_device for m in result.plan.masks.values())
