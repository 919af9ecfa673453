"""Weights the default filter cannot prune are reported, never silently left dense.

A leaf module (``leaf_modules=``) is one ``call_module`` node: the conv / linear layers
inside it are invisible to the graph, so they stay dense. compress() warns naming them and
their share of the weights, keeps them in ``Plan.unpruned`` with the reason, and the
channel analysis's error for the leaf says how to let the tracer in.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import disparse_fx as dfx

from .zoo import ZOO_BY_NAME


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.b(F.relu(self.a(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block = nn.Conv2d(3, 8, 3, padding=1), Block(8)
        self.seg, self.cls = nn.Conv2d(8, 4, 1), nn.Linear(8, 3)

    def forward(self, x):
        h = self.block(F.relu(self.stem(x)))
        return {"seg": self.seg(h), "cls": self.cls(h.mean((2, 3)))}


LOSSES = {"seg": lambda p, b: F.cross_entropy(p, b["seg"]), "cls": lambda p, b: F.cross_entropy(p, b["cls"])}


def _data(n=2):
    g = torch.Generator().manual_seed(0)
    return [{"input": torch.randn(2, 3, 8, 8, generator=g), "seg": torch.randint(0, 4, (2, 8, 8), generator=g),
             "cls": torch.randint(0, 3, (2,), generator=g)} for _ in range(n)]


def _compress(granularity="element", **kwargs):
    cfg = dfx.CompressConfig(sparsity=0.5, granularity=granularity, num_batches=2, progress=False)
    return dfx.compress(Net(), LOSSES, _data(), cfg, **kwargs)


def test_weights_inside_a_leaf_module_are_reported():
    with pytest.warns(dfx.DisparseWarning) as caught:
        result = _compress(leaf_modules=(Block,))
    assert set(result.plan.unpruned) == {"block.a.weight", "block.b.weight"}
    assert "inside leaf module 'block' (Block)" in result.plan.unpruned["block.a.weight"]
    assert not set(result.plan.unpruned) & set(result.plan.prunable)
    (record,) = [w for w in caught if "stay dense" in str(w.message)]
    message = str(record.message)
    # attributed to the user's call (here _compress's line calling dfx.compress), not to the library
    assert record.filename == __file__ and record.lineno == _compress.__code__.co_firstlineno + 2
    share = 100 * (8 * 8 * 9 + 8 * 8) / (8 * 8 * 9 + 8 * 8 + 3 * 8 * 9 + 4 * 8 + 3 * 8)
    assert "2 conv/linear weight(s) stay dense" in message and f"{share:.1f}%" in message
    assert "'block.a.weight'" in message and "leaf_modules" in message


def test_nothing_is_reported_when_every_weight_is_prunable(recwarn):
    result = _compress()
    assert dict(result.plan.unpruned) == {}
    assert not [w for w in recwarn if "stay dense" in str(w.message)]


def test_a_filter_chosen_by_the_user_is_not_reported():
    cfg = dfx.CompressConfig(sparsity=0.5, num_batches=2, progress=False,
                             filter_fn=lambda name, p: name.startswith("stem"))
    result = dfx.compress(Net(), LOSSES, _data(), cfg)
    assert dict(result.plan.unpruned) == {}


def test_zoo_models_leave_nothing_dense():
    entry = ZOO_BY_NAME["two_heads_dict"]
    result = dfx.compress(entry.build(), entry.task_losses, entry.batches(2),
                          dfx.CompressConfig(sparsity=0.5, num_batches=2, progress=False))
    assert dict(result.plan.unpruned) == {}


def test_the_channel_error_for_a_leaf_module_says_how_to_let_the_tracer_in():
    with pytest.raises(dfx.UnsupportedOpError, match=r"'block' is a leaf module: the tracer did not enter it") as info:
        _compress("channel", leaf_modules=(Block,))
    assert "While executing" not in str(info.value)  # the Interpreter's dump is not appended


def test_unpruned_survives_save_and_load(tmp_path, monkeypatch):
    result = _compress(leaf_modules=(Block,))
    monkeypatch.setitem(dfx.serialize._EXTRA_MODULE_TYPES, f"{Block.__module__}.{Block.__qualname__}", Block)
    dfx.save(result, tmp_path / "r.dfx")
    assert dict(dfx.load(tmp_path / "r.dfx").plan.unpruned) == dict(result.plan.unpruned)


def test_summary_and_report_list_the_weights_left_dense(tmp_path, monkeypatch):
    result = _compress(leaf_modules=(Block,))
    summary = result.summary()
    assert "weights left dense (not counted in sparsity):" in summary
    assert "block.a.weight" in summary and "inside leaf module 'block' (Block)" in summary
    monkeypatch.setitem(dfx.serialize._EXTRA_MODULE_TYPES, f"{Block.__module__}.{Block.__qualname__}", Block)
    text = dfx.report(result)
    assert "Weights left dense" in text and "block.b.weight" in text
    assert "weights left dense" not in _compress().summary()


def test_frozen_weights_that_are_pruned_are_named_with_the_filter_that_keeps_them():
    model = Net()
    model.stem.weight.requires_grad_(False)
    cfg = dict(sparsity=0.5, num_batches=2, progress=False)
    with pytest.warns(dfx.DisparseWarning, match=r"1 frozen weight\(s\) \(requires_grad=False\) are pruned "
                                                 r"\('stem.weight'\).*filter_fn=lambda name, p: p.requires_grad"):
        result = dfx.compress(model, LOSSES, _data(), dfx.CompressConfig(**cfg))
    assert "stem.weight" in result.plan.prunable and not model.stem.weight.requires_grad
    # the advice works: the frozen weight stays dense, the others are still pruned
    kept = dfx.compress(model, LOSSES, _data(), dfx.CompressConfig(
        filter_fn=lambda name, p: p.requires_grad and p.dim() > 1, **cfg))
    assert "stem.weight" not in kept.plan.prunable and "seg.weight" in kept.plan.prunable
