"""disparse_fx: disentangled (per-task) sparsification of multitask PyTorch models.

>>> import disparse_fx as dfx
>>> sorted(n for n in dfx.__all__ if n[0].islower())  # doctest: +NORMALIZE_WHITESPACE
['compress', 'draw', 'erk_densities', 'export_onnx', 'finetune', 'load', 'mask_overlap',
 'register_callable', 'register_module_type', 'report', 'save', 'slim', 'write_report']
"""
import logging

from .api import compress, slim
from .config import CompressConfig
from .errors import (
    DisparseError,
    DisparseValueError,
    InputError,
    LossError,
    NoPrunableParametersError,
    NotEnoughBatchesError,
    PostconditionError,
    TargetUnreachableError,
    TaskMismatchError,
    TraceError,
    UnsupportedOpError,
    ZeroGradientError,
)
from .plan import Plan
from .result import CompressionResult
from .channel_decision import ChannelPlan
from .export import ExportError, ExportMismatchError, ExportReport, export_onnx
from .overlap import MaskOverlap, mask_overlap
from .training import DynamicSparsity, erk_densities, finetune
from .serialize import (
    CorruptFileError,
    DisallowedCallableError,
    ForeignFileError,
    SerializationError,
    UnserializableError,
    UnsupportedVersionError,
    load,
    register_callable,
    register_module_type,
    save,
)
from .report import report, write_report
from .draw import Drawing, DrawnNode, draw

__all__ = [
    "compress",
    "slim",
    "export_onnx",
    "ExportReport",
    "ExportError",
    "ExportMismatchError",
    "mask_overlap",
    "MaskOverlap",
    "ChannelPlan",
    "DynamicSparsity",
    "finetune",
    "erk_densities",
    "save",
    "load",
    "register_callable",
    "register_module_type",
    "SerializationError",
    "CorruptFileError",
    "ForeignFileError",
    "UnsupportedVersionError",
    "DisallowedCallableError",
    "UnserializableError",
    "report",
    "write_report",
    "draw",
    "Drawing",
    "DrawnNode",
    "CompressConfig",
    "CompressionResult",
    "Plan",
    "DisparseError",
    "DisparseValueError",
    "TraceError",
    "UnsupportedOpError",
    "PostconditionError",
    "TaskMismatchError",
    "TargetUnreachableError",
    "LossError",
    "ZeroGradientError",
    "NotEnoughBatchesError",
    "NoPrunableParametersError",
    "InputError",
]

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
