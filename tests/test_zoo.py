"""The model zoo: DeepLab-ResNet presets and multitask torchvision trunks.

Every model must trace with ``torch.fx.symbolic_trace`` and the traced module must
compute exactly what the eager one does.
"""
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from disparse_fx.zoo import (
    DEFAULT_TASKS,
    DeepLabMultiTask,
    TaskHeadSpec,
    deeplab_resnet,
    find_trunk_output,
    multitask_from_torchvision,
)

torchvision = pytest.importorskip("torchvision")

MIXED_TASKS = {"seg": ("dense", 3), "cls": ("classify", 4), "reg": ("regress", 2)}


def assert_traces_exactly(model: nn.Module, x: torch.Tensor) -> dict:
    """symbolic_trace works, the graph lints, and traced(x) == model(x) bit for bit."""
    gm = fx.symbolic_trace(model)
    gm.graph.lint()
    with torch.no_grad():
        eager, traced = model(x), gm(x)
    assert isinstance(eager, dict) and list(eager) == list(traced)
    for task in eager:
        assert torch.equal(eager[task], traced[task]), task
    return eager


# --- DeepLab ------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_deeplab_preset_shapes_and_trace(size):
    torch.manual_seed(0)
    model = deeplab_resnet(DEFAULT_TASKS, size=size).eval()
    out = assert_traces_exactly(model, torch.randn(2, 3, 48, 40))
    assert {t: tuple(v.shape) for t, v in out.items()} == {
        t: (2, c, 48, 40) for t, (_, c) in DEFAULT_TASKS.items()
    }


def test_deeplab_train_mode_trace_matches():
    torch.manual_seed(0)
    model = deeplab_resnet({"a": 2, "b": 1}, size="tiny").train()
    assert_traces_exactly(model, torch.randn(4, 3, 32, 32))


def test_deeplab_tiny_forward_backward_batch_of_8():
    # The speed target (well under a second on 2 cores) is checked by hand, not timed here.
    torch.manual_seed(0)
    model = deeplab_resnet(DEFAULT_TASKS, size="tiny")
    out = model(torch.randn(8, 3, 64, 64))
    sum(v.square().mean() for v in out.values()).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("tasks", [{"only": 5}, {f"t{i}": i + 1 for i in range(7)}])
def test_deeplab_any_task_set(tasks):
    model = deeplab_resnet(tasks, size="tiny").eval()
    out = assert_traces_exactly(model, torch.randn(1, 3, 32, 32))
    assert {t: v.shape[1] for t, v in out.items()} == tasks
    assert set(model.heads) == set(tasks)


def test_deeplab_paper_trunk_is_resnet34_and_heads_hold_two_thirds():
    model = deeplab_resnet({"seg": 40, "normal": 3}, size="paper")
    resnet34 = torchvision.models.resnet34(weights=None)
    trunk_names = {n: p.shape for n, p in resnet34.named_parameters() if not n.startswith("fc.")}
    assert {n: p.shape for n, p in model.backbone.named_parameters()} == trunk_names
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    head_convs = [m for m in model.heads.modules() if isinstance(m, nn.Conv2d)]
    frac = sum(m.weight.numel() for m in head_convs) / sum(m.weight.numel() for m in convs)
    assert 0.6 < frac < 0.75  # method.md: "about two thirds" on NYU-v2
    assert [m.dilation[0] for m in model.heads["seg"].modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)] == [6, 12, 18, 24]


def test_deeplab_output_stride_8_and_dilations():
    model = DeepLabMultiTask({"a": 1}, layers=(1, 1, 1, 1), width=0.25, head_width=8, head_dilations=(1,))
    assert model.backbone(torch.randn(1, 3, 64, 64)).shape[-2:] == (8, 8)
    assert [model.backbone.get_submodule(f"layer{i}")[0].conv1.dilation[0] for i in (1, 2, 3, 4)] == [1, 1, 2, 4]
    assert [model.backbone.get_submodule(f"layer{i}")[0].conv1.stride[0] for i in (1, 2, 3, 4)] == [1, 2, 1, 1]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tasks={}), "at least one task"),
        (dict(tasks={"a-b": 1}), "identifiers"),
        (dict(tasks={"a": 0}), ">= 1"),
        (dict(tasks={"a": ("classify", 3)}), "dense"),
        (dict(tasks={"a": 1}, width=0), "width must be > 0"),
    ],
)
def test_deeplab_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeepLabMultiTask(**kwargs)


def test_deeplab_unknown_preset():
    with pytest.raises(ValueError, match="size must be one of"):
        deeplab_resnet({"a": 1}, size="huge")


# --- torchvision trunks -------------------------------------------------------------


@pytest.mark.parametrize(
    "name, node",
    [
        ("resnet18", "layer4.1.relu_1"),
        ("mobilenet_v3_small", "features.12"),
        ("shufflenet_v2_x0_5", "conv5.2"),
        ("regnet_x_400mf", "trunk_output.block4.block4-11.activation"),
    ],
)
def test_torchvision_trunk_fast(name, node):
    torch.manual_seed(0)
    model = multitask_from_torchvision(name, MIXED_TASKS).eval()
    assert model.info.node == node and model.info.layout == "NCHW"
    out = assert_traces_exactly(model, torch.randn(2, 3, 64, 64))
    assert {t: tuple(v.shape) for t, v in out.items()} == {"seg": (2, 3, 64, 64), "cls": (2, 4), "reg": (2, 2)}
    # the classifier is gone, the trunk keeps readable parameter names
    names = [n for n, _ in model.named_parameters()]
    assert all(n.startswith(("trunk.", "heads.")) for n in names)
    assert not any(n.startswith(("trunk.fc.", "trunk.classifier.")) for n in names)


def test_torchvision_trunk_other_input_size_and_train_mode():
    torch.manual_seed(0)
    model = multitask_from_torchvision("resnet18", {"seg": 2, "cls": ("classify", 3)}).train()
    out = assert_traces_exactly(model, torch.randn(2, 3, 80, 48))
    assert out["seg"].shape == (2, 2, 80, 48)
    assert "trunk.layer4.1.conv2.weight" in dict(model.named_parameters())


def test_token_trunk_from_module():
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    model = multitask_from_torchvision(vit, MIXED_TASKS).eval()
    info = model.info
    assert (info.node, info.layout, info.shape) == ("encoder.ln", "NLC", (2, 17, 16))
    assert (info.prefix_tokens, info.grid, info.channels) == (1, (4, 4), 16)
    out = assert_traces_exactly(model, torch.randn(2, 3, 32, 32))
    assert {t: tuple(v.shape) for t, v in out.items()} == {"seg": (2, 3, 32, 32), "cls": (2, 4), "reg": (2, 2)}


def test_find_trunk_output_restores_mode():
    model = torchvision.models.resnet18(weights=None).train()
    info = find_trunk_output(model, 64)
    assert model.training and info.channels == 512 and info.shape == (2, 512, 2, 2)


def test_task_head_spec_validation():
    assert TaskHeadSpec.of(3) == TaskHeadSpec("dense", 3)
    assert TaskHeadSpec.of(("regress", 2)) == TaskHeadSpec("regress", 2)
    with pytest.raises(ValueError, match="kind must be one of"):
        TaskHeadSpec("segment", 3)
    with pytest.raises(ValueError, match="out_dim must be"):
        TaskHeadSpec("dense", 0)
    with pytest.raises(ValueError, match="identifiers"):
        multitask_from_torchvision("resnet18", {"a.b": 1})


def _all_classification_models():
    return torchvision.models.list_models(module=torchvision.models)


def _kwargs(name):
    # ViTs have a fixed input size: pick the smallest that gives a 2x2+ patch grid.
    if name == "vit_h_14":
        return {"image_size": 56}
    if name.startswith("vit_"):
        return {"image_size": 64}
    return {}


@pytest.mark.long
@pytest.mark.parametrize("name", _all_classification_models())
def test_every_torchvision_classifier(name):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = multitask_from_torchvision(name, MIXED_TASKS, **_kwargs(name)).eval()
    size = model.info.input_size
    out = assert_traces_exactly(model, torch.randn(2, 3, size, size))
    assert {t: tuple(v.shape) for t, v in out.items()} == {"seg": (2, 3, size, size), "cls": (2, 4), "reg": (2, 2)}


class _ModeDependentNet(nn.Module):
    """A classifier whose traced graph depends on the mode (functional dropout)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.nn.functional.dropout(self.bn(self.conv(x)).relu(), 0.5, training=self.training)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("build", ["resnet18", "mode_dependent"])
def test_deepcopy_keeps_mode_and_output(build):
    import copy

    torch.manual_seed(0)
    source = "resnet18" if build == "resnet18" else _ModeDependentNet()
    model = multitask_from_torchvision(source, {"seg": 2, "cls": ("classify", 3)}, input_size=32).eval()
    # one graph where train and eval trace alike, a graph-swapping trunk where they differ
    assert (type(model.trunk).__name__ == "DualTrunk") == (build == "mode_dependent")
    clone = copy.deepcopy(model)
    assert not any(m.training for m in clone.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), clone(x)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # train() / eval() switch the trunk's graph where it differs by mode
    model.train()
    assert_traces_exactly(model.eval(), x)
