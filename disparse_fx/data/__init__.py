"""Built-in data: a real-image multitask dataset and per-task metrics.

Needs scikit-image (the photographs ship inside it; nothing is downloaded).
"""
from __future__ import annotations

from .metrics import (
    HIGHER_IS_BETTER,
    METERS,
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
from .multitask_photos import (
    COLOR_PHOTOS,
    GRAY_PHOTOS,
    SEGMENT_CLASSES,
    TASK_METRICS,
    TASKS,
    VERSION,
    MultitaskPhotos,
    Splits,
    cache_dir,
    compute_targets,
    default_task_losses,
    harris_heatmap,
    load_photo,
    make_splits,
    segment_classes,
    split_photos,
)

__all__ = [
    "HIGHER_IS_BETTER", "METERS", "BinaryF1Meter", "RegressionMeter", "SegmentationMeter", "binary_f1",
    "confusion_matrix", "delta_t", "evaluate", "regression_errors", "segmentation_scores", "task_deltas",
    "COLOR_PHOTOS", "GRAY_PHOTOS", "SEGMENT_CLASSES", "TASK_METRICS", "TASKS", "VERSION", "MultitaskPhotos",
    "Splits", "cache_dir", "compute_targets", "default_task_losses", "harris_heatmap", "load_photo",
    "make_splits", "segment_classes", "split_photos",
]
