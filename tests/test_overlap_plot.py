"""The mask-overlap plot names its shared layers on the x axis (not a bare index)."""
import disparse_fx as dfx

from .test_overlap import hand_plan


def test_x_axis_names_each_shared_layer(tmp_path):
    overlap = dfx.mask_overlap(hand_plan())
    for suffix in ("png", "svg"):
        fig = overlap.plot(tmp_path / f"overlap.{suffix}")
        assert (tmp_path / f"overlap.{suffix}").stat().st_size > 1000
    ax = fig.axes[0]
    assert list(ax.get_xticks()) == [0, 1, 2]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["l0", "l1", "l2"]
    assert all(t.get_rotation() == 90 for t in ax.get_xticklabels())
    assert "shared layer" in ax.get_xlabel()
    assert "watershed: l1" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_long_layer_names_are_shown_whole_below_the_axis(tmp_path):
    plan = hand_plan()
    names = {"l0": "trunk.layer1.0.conv1.weight", "l1": "trunk.layer4.2.downsample.0.weight", "l2": "heads.shared.weight"}
    renamed = dfx.Plan(owners={names[p]: o for p, o in plan.owners.items()}, task_scores={},
                       task_masks={t: {names[p]: m for p, m in masks.items()} for t, masks in plan.task_masks.items()},
                       masks={names[p]: m for p, m in plan.masks.items()}, sparsity=0.0, config=plan.config,
                       tasks=plan.tasks, prunable=tuple(names[p] for p in plan.prunable))
    fig = dfx.mask_overlap(renamed).plot(tmp_path / "overlap.png")
    labels = fig.axes[0].get_xticklabels()
    assert [t.get_text() for t in labels] == list(names.values())
    fig.canvas.draw()
    bottom_of_axes = fig.axes[0].get_window_extent().y0
    assert all(0 <= t.get_window_extent().y0 and t.get_window_extent().y1 <= bottom_of_axes for t in labels)
