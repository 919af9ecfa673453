"""Multitask model zoo: the DiSparse DeepLab-ResNet family and torchvision trunks.

>>> from disparse_fx.zoo import deeplab_resnet, DEFAULT_TASKS
>>> sorted(deeplab_resnet(DEFAULT_TASKS, size="tiny").heads)
['denoise', 'edge', 'keypoint', 'segment']
"""
from __future__ import annotations

from typing import Dict, Tuple

from .deeplab import DEEPLAB_PRESETS, DeepLabMultiTask, deeplab_resnet
from .torchvision_trunk import (
    HEAD_KINDS,
    MultiTaskTorchvision,
    TaskHeadSpec,
    TrunkInfo,
    default_input_size,
    find_trunk_output,
    multitask_from_torchvision,
)

__all__ = [
    "DEFAULT_TASKS",
    "DEEPLAB_PRESETS",
    "DeepLabMultiTask",
    "deeplab_resnet",
    "HEAD_KINDS",
    "MultiTaskTorchvision",
    "TaskHeadSpec",
    "TrunkInfo",
    "default_input_size",
    "find_trunk_output",
    "multitask_from_torchvision",
]

#: The tasks of the built-in photo dataset (:mod:`disparse_fx.data`): task ->
#: (head kind, output channels). Both zoo builders accept this mapping.
DEFAULT_TASKS: Dict[str, Tuple[str, int]] = {
    "edge": ("dense", 1),
    "keypoint": ("dense", 1),
    "segment": ("dense", 6),
    "denoise": ("dense", 3),
}
