"""disparse_fx: disentangled (per-task) sparsification of multitask PyTorch models.

>>> import disparse_fx as dfx
>>> sorted(n for n in dfx.__all__ if n[0].islower())  # doctest: +NORMALIZE_WHITESPACE
['compress', 'draw', 'erk_densities', 'export_onnx', 'finetune', 'load', 'mask_overlap',
 'register_callable', 'register_module_type', 'report', 'save', 'slim', 'write_report']
"""
import importlib.util
import logging
import os
import sys


def _source_checkout_passes() -> None:
    """Make the lower layer importable as ``disparse_fx.passes`` in a source checkout.

    Installed, ``pyproject.toml``'s package-dir puts the repository's ``passes/`` folder at
    ``disparse_fx/passes``, so nothing but ``disparse_fx`` lands in site-packages. Run from a
    checkout without installing (``PYTHONPATH=.``), ``passes/`` is the sibling folder: load
    it under the same name, so every import reads ``disparse_fx.passes`` either way.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    folder = os.path.join(os.path.dirname(here), "passes")
    if os.path.isdir(os.path.join(here, "passes")) or not os.path.isfile(os.path.join(folder, "__init__.py")):
        return  # installed (or installed editable: its finder maps the name)
    spec = importlib.util.spec_from_file_location(
        f"{__name__}.passes", os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])
    if spec is None or spec.loader is None:
        raise ImportError(f"disparse_fx.passes is missing (looked in {folder}); reinstall disparse_fx")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_source_checkout_passes()

from .api import compress, slim  # noqa: E402 (after the lower layer is importable)
from .config import CompressConfig
from .errors import (
    DisparseError,
    DisparseValueError,
    DisparseWarning,
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
    "DisparseWarning",
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
