"""The DiSparse paper's model family: a dilated (DeepLab-style) ResNet trunk shared by
per-task ASPP-like heads.

Trunk: stem (conv7x7/2 + BN + ReLU + maxpool/2), then four stages of BasicBlocks with
strides ``(1, 2, 1, 1)`` and dilations ``(1, 1, 2, 4)`` (output stride 8), base widths
``64, 128, 256, 512`` times ``width``. Head of every task: four branches with
dilations ``(6, 12, 18, 24)``, each ``conv3x3 -> ReLU -> conv1x1 -> ReLU -> conv1x1``
to the task's channels, summed and upsampled (bilinear) to the input size.

The model traces with :func:`torch.fx.symbolic_trace`; ``forward`` returns a dict
``{task: Tensor}`` in the order of ``tasks``.

>>> import torch
>>> m = deeplab_resnet({"seg": 6, "depth": 1}, size="tiny")
>>> {k: tuple(v.shape) for k, v in m(torch.randn(2, 3, 32, 32)).items()}
{'seg': (2, 6, 32, 32), 'depth': (2, 1, 32, 32)}
"""
from __future__ import annotations

import logging
from typing import Dict, Mapping, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DeepLabMultiTask", "deeplab_resnet", "DEEPLAB_PRESETS", "task_channels"]

log = logging.getLogger(__name__)

TaskChannels = Union[int, Tuple[str, int]]

#: Presets of :func:`deeplab_resnet`. "paper" is the DiSparse model (ResNet-34 trunk,
#: 1024-wide heads); "tiny" runs a 64x64 batch of 8 forward+backward in a fraction of
#: a second on two CPU cores.
DEEPLAB_PRESETS: Dict[str, dict] = {
    "tiny": dict(layers=(1, 1, 1, 1), width=0.25, head_width=32, head_dilations=(1, 2, 3, 4)),
    "small": dict(layers=(2, 2, 2, 2), width=0.5, head_width=128, head_dilations=(2, 4, 6, 8)),
    "paper": dict(layers=(3, 4, 6, 3), width=1.0, head_width=1024, head_dilations=(6, 12, 18, 24)),
}


def task_channels(spec: TaskChannels, task: str = "?") -> int:
    """Output channels of a dense task given as ``C`` or ``("dense", C)``."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        channels = spec
    elif isinstance(spec, (tuple, list)) and len(spec) == 2 and spec[0] == "dense":
        channels = int(spec[1])
    elif hasattr(spec, "kind") and hasattr(spec, "out_dim") and spec.kind == "dense":
        channels = int(spec.out_dim)
    else:
        raise ValueError(
            f"task {task!r}: DeepLab heads are dense, so a task must be an int or "
            f"('dense', channels), but got {spec!r}"
        )
    if channels < 1:
        raise ValueError(f"task {task!r}: output channels must be >= 1, but got {channels}")
    return channels


def _check_task_names(tasks: Mapping[str, object]) -> None:
    if not tasks:
        raise ValueError("tasks must hold at least one task, but got none")
    for name in tasks:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"task names must be Python identifiers, but got {name!r}")


class BasicBlock(nn.Module):
    """ResNet BasicBlock with dilation (padding = dilation keeps the size)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class DilatedResNet(nn.Module):
    """DeepLab-style ResNet trunk of BasicBlocks (output stride 8 by default)."""

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        width: float = 1.0,
        strides: Sequence[int] = (1, 2, 1, 1),
        dilations: Sequence[int] = (1, 1, 2, 4),
        in_channels: int = 3,
    ):
        super().__init__()
        if not (len(layers) == len(strides) == len(dilations)):
            raise ValueError(
                f"layers, strides and dilations must have the same length, but got "
                f"{len(layers)}, {len(strides)}, {len(dilations)}"
            )
        if width <= 0:
            raise ValueError(f"width must be > 0, but got {width}")
        widths = [max(1, int(round(64 * (2 ** min(i, 3)) * width))) for i in range(len(layers))]
        stem = widths[0]
        self.conv1 = nn.Conv2d(in_channels, stem, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        inplanes = stem
        for i, (n, s, d, w) in enumerate(zip(layers, strides, dilations, widths)):
            if n < 1:
                raise ValueError(f"every stage needs >= 1 block, but got layers={tuple(layers)}")
            blocks = [BasicBlock(inplanes, w, s, d)] + [BasicBlock(w, w, 1, d) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = w
        self.num_stages = len(layers)
        self.out_channels = inplanes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x


class ASPPHead(nn.Module):
    """Sum of dilated branches ``conv3x3(d) -> ReLU -> conv1x1 -> ReLU -> conv1x1``."""

    def __init__(self, in_channels: int, out_channels: int, head_width: int, dilations: Sequence[int]):
        super().__init__()
        if not dilations:
            raise ValueError("head_dilations must not be empty")
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(in_channels, head_width, 3, padding=d, dilation=d),
                nn.ReLU(inplace=True),
                nn.Conv2d(head_width, head_width, 1),
                nn.ReLU(inplace=True),
                nn.Conv2d(head_width, out_channels, 1),
            )
            for d in dilations
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


class DeepLabMultiTask(nn.Module):
    """Dilated ResNet trunk (``self.backbone``) plus one ASPP head per task (``self.heads``).

    Args:
        tasks: task name -> output channels (``C`` or ``("dense", C)``); the names must
            be identifiers and give the keys (and order) of the output dict.
        layers: BasicBlocks per stage; ``(3, 4, 6, 3)`` is ResNet-34.
        width: multiplier of the base widths ``64, 128, 256, 512``.
        head_width: channels inside every head branch (1024 in the paper).
        head_dilations: one branch per dilation; scale down for small inputs.
        strides, dilations: of the trunk stages.
    """

    def __init__(
        self,
        tasks: Mapping[str, TaskChannels],
        layers: Sequence[int] = (3, 4, 6, 3),
        width: float = 1.0,
        head_width: int = 1024,
        head_dilations: Sequence[int] = (6, 12, 18, 24),
        strides: Sequence[int] = (1, 2, 1, 1),
        dilations: Sequence[int] = (1, 1, 2, 4),
        in_channels: int = 3,
    ):
        super().__init__()
        _check_task_names(tasks)
        if head_width < 1:
            raise ValueError(f"head_width must be >= 1, but got {head_width}")
        self.tasks: Dict[str, int] = {t: task_channels(c, t) for t, c in tasks.items()}
        self.backbone = DilatedResNet(layers, width, strides, dilations, in_channels)
        self.heads = nn.ModuleDict(
            {t: ASPPHead(self.backbone.out_channels, c, head_width, head_dilations) for t, c in self.tasks.items()}
        )

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        size = x.shape[-2:]
        features = self.backbone(x)
        return {
            task: F.interpolate(head(features), size=size, mode="bilinear", align_corners=False)
            for task, head in self.heads.items()
        }


def deeplab_resnet(tasks: Mapping[str, TaskChannels], size: str = "tiny", **overrides) -> DeepLabMultiTask:
    """A :class:`DeepLabMultiTask` from a preset of :data:`DEEPLAB_PRESETS`.

    ``size`` is ``"tiny"``, ``"small"`` or ``"paper"``; keyword ``overrides`` replace
    preset entries (e.g. ``head_dilations=(1, 2, 3, 4)``).
    """
    if size not in DEEPLAB_PRESETS:
        raise ValueError(f"size must be one of {sorted(DEEPLAB_PRESETS)}, but got {size!r}")
    kwargs = {**DEEPLAB_PRESETS[size], **overrides}
    return DeepLabMultiTask(tasks, **kwargs)
