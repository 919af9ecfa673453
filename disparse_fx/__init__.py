"""disparse_fx: disentangled (per-task) sparsification of multitask PyTorch models.

>>> import disparse_fx as dfx
>>> sorted(n for n in dfx.__all__ if n[0].islower())
['compress']
"""
import logging

from .api import compress
from .config import CompressConfig
from .errors import (
    DisparseError,
    DisparseValueError,
    InputError,
    LossError,
    NoPrunableParametersError,
    NotEnoughBatchesError,
    PostconditionError,
    TaskMismatchError,
    TraceError,
    UnsupportedOpError,
    ZeroGradientError,
)
from .plan import Plan
from .result import CompressionResult

__all__ = [
    "compress",
    "CompressConfig",
    "CompressionResult",
    "Plan",
    "DisparseError",
    "DisparseValueError",
    "TraceError",
    "UnsupportedOpError",
    "PostconditionError",
    "TaskMismatchError",
    "LossError",
    "ZeroGradientError",
    "NotEnoughBatchesError",
    "NoPrunableParametersError",
    "InputError",
]

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
