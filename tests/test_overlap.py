"""Mask-overlap numbers on a hand-built plan, the watershed, and the plot."""
import pytest
import torch

import disparse_fx as dfx
from disparse_fx.overlap import iou

from .zoo import ZOO_BY_NAME


def hand_plan():
    t = torch.tensor
    a = {"l0": t([1, 1, 1, 1]).bool(), "l1": t([1, 1, 0, 0]).bool(), "l2": t([1, 0, 0, 0]).bool()}
    b = {"l0": t([1, 1, 1, 0]).bool(), "l1": t([0, 1, 1, 0]).bool(), "l2": t([0, 0, 0, 1]).bool()}
    c = {"l0": t([1, 1, 1, 1]).bool(), "l1": t([1, 1, 1, 0]).bool(), "l2": t([1, 0, 0, 0]).bool()}
    owners = {p: frozenset("abc") for p in a}
    masks = {p: a[p] | b[p] | c[p] for p in a}
    return dfx.Plan(owners=owners, task_scores={}, task_masks={"a": a, "b": b, "c": c}, masks=masks, sparsity=0.0,
                    config=dfx.CompressConfig(), tasks=("a", "b", "c"), prunable=("l0", "l1", "l2"))


def test_hand_computed_overlap():
    ov = dfx.mask_overlap(hand_plan())
    l0, l1, l2 = ov.layers
    assert l0.pairwise[("a", "b")] == pytest.approx(3 / 4)
    assert l0.all_tasks == pytest.approx(3 / 4)
    assert l1.pairwise[("a", "b")] == pytest.approx(1 / 3)
    assert l1.pairwise[("a", "c")] == pytest.approx(2 / 3)
    assert l1.all_tasks == pytest.approx(1 / 3)  # |AND|=1 (index 1), |OR|=3
    assert l2.all_tasks == 0.0
    # drops: 0.75 -> 0.333 (0.417), 0.333 -> 0 (0.333): the watershed is l1
    assert ov.watershed == "l1" and ov.watershed_drop == pytest.approx(0.75 - 1 / 3)
    assert "<- watershed" in ov.table()


def test_iou_all_is_stricter_than_pairs_for_three_tasks():
    t = torch.tensor
    masks = [t([1, 1, 0]).bool(), t([0, 1, 1]).bool(), t([1, 0, 1]).bool()]
    assert iou(masks) == 0.0
    assert all(iou([x, y]) == pytest.approx(1 / 3) for x, y in [(masks[0], masks[1]), (masks[1], masks[2])])


def test_on_a_real_result_and_plot(tmp_path):
    entry = ZOO_BY_NAME["residual_tuple"]
    result = dfx.compress(entry.build(), entry.task_losses, entry.batches(2),
                          dfx.CompressConfig(sparsity=0.8, num_batches=2, progress=False))
    ov = dfx.mask_overlap(result)
    assert [layer.param for layer in ov.layers] == ["stem.weight", "block1.weight", "block2.weight"]
    assert all(0.0 <= layer.all_tasks <= 1.0 for layer in ov.layers)
    for suffix in ("png", "svg"):
        ov.plot(tmp_path / f"overlap.{suffix}")
        assert (tmp_path / f"overlap.{suffix}").stat().st_size > 1000
    baseline = dfx.compress(entry.build(), entry.task_losses, entry.batches(2),
                            dfx.CompressConfig(sparsity=0.8, num_batches=2, progress=False, disentangle=False))
    assert all(layer.all_tasks == 1.0 for layer in dfx.mask_overlap(baseline).layers)
