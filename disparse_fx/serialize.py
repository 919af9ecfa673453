"""save / load: slim models and compression results, without pickling code.

A saved file is one zip archive holding

- ``disparse_fx/format.json``: ``{"format": "disparse_fx.saved", "version": 1, "kind": ...}``;
- ``disparse_fx/model.json``: the GraphModule as data - its module tree (each module's
  class, named from an allow-list, and its plain attributes: ``in_channels``,
  ``stride``, ``eps``...) and its graph (every node's op, name, target, args and kwargs;
  ``call_function`` targets by qualified name, resolved on load from an allow-list);
- ``disparse_fx/tensors.pt``: every parameter, buffer and tensor constant, written with
  ``torch.save`` and read back with ``torch.load(weights_only=True)``;
- ``disparse_fx/plan.json`` (results only): the :class:`~disparse_fx.plan.Plan`, its
  masks and scores being references into ``tensors.pt``.

Nothing in the file is unpickled as code: a callable comes back only if its name is in
the allow-list - ``torch`` ops, ``torch.nn.functional``, ``torch._C._nn``,
``torch.special`` / ``linalg`` / ``fft``, ``torch.Tensor`` methods, ``operator`` (minus
its callable factories), ``math``, a few builtins, ``torch.func.functional_call``, this
library's graph functions (``channel_mask``, the masked LayerNorms, Swin's window
attention; torchvision's fx-wrapped Swin functions) and whatever
:func:`register_callable` added. Modules come back only as ``torch.nn`` built-in types,
:class:`passes.attention.MultiheadAttention`, the masked RNNs of a channel-masked model
(:class:`passes.rules.rnn.MaskedLSTM`, ``MaskedGRU``, ``MaskedRNN``), or types given to
:func:`register_module_type`; a module the graph never calls (a container such as a
user's ``Bottleneck``) comes back as a plain ``nn.Module`` holding the same children,
parameters and buffers. An RNN's flat weight list (its parameters again, and weakrefs to
them) is not written: load() rebuilds it from the parameters its saved names must name. ``call_method`` names must be public
``torch.Tensor`` methods (minus those taking a callable), ``getattr`` nodes must read a
public attribute, ``get_attr`` / ``call_module`` targets must walk the module tree
(submodules, parameters, buffers, tensor constants) and ``functional_call`` must call a
module of the model: a crafted file cannot reach ``__class__``, globals or the OS.

Loaded models compute bitwise what the saved ones computed: the same graph (node names,
targets, arguments), the same tensors, the same parameter and buffer names and order,
the same ``requires_grad`` flags, train/eval modes and tied weights.

Not saved: ``CompressConfig.filter_fn`` (a callable; saved as None, with a logged
warning), forward/backward hooks (saving a module with hooks raises), node metadata
other than plain data (the channel-mask tag; ``nn_module_stack`` classes are saved as
their qualified names, e.g. ``("layer1.0", "torch.nn.modules.container.Sequential")``).

No absolute path of the saving machine: a node's ``stack_trace`` is cut to the one
frame error messages quote (the user's source line), and every file name in the saved
text - that frame, and source lines quoted in the plan's reasons - is written relative
to the current folder (the user's project) or to its ``sys.path`` entry
(``timm/models/convnext.py``); a file elsewhere keeps its base name only, and any other
mention of the current folder, the Python installation or the home folder is made
relative (``~/`` for home).

>>> import torch, torch.nn as nn, tempfile, os
>>> from disparse_fx.passes.trace import trace_model
>>> class Net(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.fc = nn.Linear(3, 2)
...     def forward(self, x):
...         return {"y": torch.relu(self.fc(x))}
>>> gm = trace_model(Net())
>>> path = os.path.join(tempfile.mkdtemp(), "net.dfx")
>>> save(gm, path)
>>> back = load(path)
>>> x = torch.randn(4, 3)
>>> torch.equal(back(x)["y"], gm(x)["y"]), back.code == gm.code
(True, True)
"""
from __future__ import annotations

import builtins
import collections
import dataclasses
import importlib
import inspect
import io
import json
import logging
import math
import operator
import os
import pathlib
import re
import sys
import types
import zipfile
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn

from disparse_fx.passes.errors import user_frame, warn
from disparse_fx.passes.trace import NN_MODULE_KEYS as _BASE_MODULE_KEYS, module_hooks

from .errors import DisparseError, DisparseValueError

__all__ = [
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
    "FORMAT_NAME",
    "FORMAT_VERSION",
]

log = logging.getLogger(__name__)

FORMAT_NAME = "disparse_fx.saved"
FORMAT_VERSION = 1
_DIR = "disparse_fx/"
_FORMAT, _MODEL, _PLAN, _TENSORS = (_DIR + n for n in ("format.json", "model.json", "plan.json", "tensors.pt"))

PathLike = Union[str, os.PathLike]


# ----------------------------------------------------------------------------- errors
class SerializationError(DisparseError):
    """save() or load() failed; the message names the file and the problem."""


class CorruptFileError(SerializationError):
    """The file is not a readable disparse_fx archive (truncated, damaged, not a zip)."""


class ForeignFileError(SerializationError):
    """The file is a zip archive, but not one written by disparse_fx.save."""


class UnsupportedVersionError(SerializationError):
    """The file was written in a newer format version than this disparse_fx reads."""


class DisallowedCallableError(SerializationError):
    """The file names a callable, method or module class outside the allow-list."""


class UnserializableError(SerializationError, DisparseValueError):
    """save() was given something it cannot write without pickling code."""


# ----------------------------------------------------------------------------- allow-lists
_SAFE_BUILTINS = ("getattr", "len", "int", "float", "bool", "str", "range", "slice", "tuple", "list", "dict",
                  "min", "max", "abs", "sum", "round", "pow", "divmod", "all", "any", "zip", "enumerate",
                  "reversed", "sorted", "hash")
# operator entries that build or call arbitrary callables / reach arbitrary attributes
_OPERATOR_DENY = {"attrgetter", "itemgetter", "methodcaller", "call"}
# Tensor methods that take a Python callable
_METHOD_DENY = {"apply_", "map_", "map2_", "register_hook", "register_post_accumulate_grad_hook"}
_TORCH_DENY_PREFIXES = ("set_", "manual_seed", "seed", "initial_seed", "use_deterministic", "from_file", "save",
                        "load", "compile", "export", "hub", "jit")
_SAFE_TYPES = (int, float, bool, str, range, slice, tuple, list, dict, zip, enumerate, reversed)
_EXTRA_CALLABLES: Dict[str, Callable] = {}
_EXTRA_MODULE_TYPES: Dict[str, type] = {}
_REGISTRY: Optional[Tuple[Dict[str, Callable], Dict[int, str]]] = None


def register_callable(fn: Callable, name: Optional[str] = None) -> Callable:
    """Allow ``fn`` as a ``call_function`` target in saved graphs (usable as a decorator).

    ``name`` defaults to ``module.qualname``; loading a file that names it needs the same
    registration in the loading process.
    """
    if not callable(fn):
        raise DisparseValueError(f"register_callable expects a callable, got {type(fn).__name__}")
    global _REGISTRY
    _EXTRA_CALLABLES[name or _qualname(fn)] = fn
    _REGISTRY = None
    return fn


def register_module_type(cls: type) -> type:
    """Allow a module type that is not a ``torch.nn`` built-in to be saved and loaded.

    Its instances are restored as ``cls.__new__(cls)`` + ``nn.Module.__init__`` + their
    saved plain attributes, parameters, buffers and children, so the type must keep all
    its state in those (as torch.nn's own modules do).
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise DisparseValueError(f"register_module_type expects an nn.Module subclass, got {cls!r}")
    _EXTRA_MODULE_TYPES[_qualname(cls)] = cls
    return cls


def _current_name(name: Any) -> Any:
    """A saved qualified name as this version spells it: files saved before the lower layer
    installed as ``disparse_fx.passes`` name its functions and classes ``passes.<module>...``."""
    return f"disparse_fx.{name}" if isinstance(name, str) and name.startswith("passes.") else name


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', None) or ''}.{getattr(obj, '__qualname__', getattr(obj, '__name__', ''))}"


def _registry() -> Tuple[Dict[str, Callable], Dict[int, str]]:
    """(name -> callable, id(callable) -> canonical name), built once."""
    global _REGISTRY
    if _REGISTRY is not None:
        return _REGISTRY
    by_name: Dict[str, Callable] = {}

    def add(name: str, fn: Any) -> None:
        if callable(fn) and (not isinstance(fn, type) or any(fn is t for t in _SAFE_TYPES)):
            by_name.setdefault(name, fn)

    import torch.nn.functional as F

    for attr in dir(F):  # first: F.linear is saved as torch.nn.functional.linear
        if not attr.startswith("_"):
            add(f"torch.nn.functional.{attr}", getattr(F, attr))
    functional_defs = set(getattr(torch.functional, "__all__", ()))
    for attr in dir(torch):
        if attr.startswith("_") or attr.startswith(_TORCH_DENY_PREFIXES):
            continue
        fn = getattr(torch, attr, None)
        if isinstance(fn, types.BuiltinFunctionType) or attr in functional_defs:
            add(f"torch.{attr}", fn)
    for ns in ("torch._C._nn", "torch.special", "torch.linalg", "torch.fft"):
        mod = importlib.import_module(ns)
        for attr in dir(mod):
            if not attr.startswith("_"):
                add(f"{ns}.{attr}", getattr(mod, attr))
    for attr in dir(torch.Tensor):
        if not attr.startswith("_") and attr not in _METHOD_DENY:
            add(f"torch.Tensor.{attr}", getattr(torch.Tensor, attr))
    for attr in dir(operator):
        if not attr.startswith("_") and attr not in _OPERATOR_DENY:
            add(f"operator.{attr}", getattr(operator, attr))
    for attr in dir(math):
        if not attr.startswith("_"):
            add(f"math.{attr}", getattr(math, attr))
    for attr in _SAFE_BUILTINS:
        add(f"builtins.{attr}", getattr(builtins, attr))
    add("torch._assert", torch._assert)
    add("torch.func.functional_call", torch.func.functional_call)
    from disparse_fx.passes import attention
    from disparse_fx.passes.insert_channel_masks import channel_mask, masked_layer_norm, masked_rms_norm

    add("disparse_fx.passes.insert_channel_masks.channel_mask", channel_mask)
    add("disparse_fx.passes.insert_channel_masks.masked_layer_norm", masked_layer_norm)
    add("disparse_fx.passes.insert_channel_masks.masked_rms_norm", masked_rms_norm)
    add("disparse_fx.passes.attention.shifted_window_attention", attention.shifted_window_attention)
    from disparse_fx.passes import capture

    add("disparse_fx.passes.capture.diff", capture.diff)
    add("disparse_fx.passes.capture.cumsum", capture.cumsum)
    try:  # torchvision's Swin functions (fx-wrapped, so they appear in graphs)
        from torchvision.models import swin_transformer as swin

        for attr in ("shifted_window_attention", "_get_relative_position_bias", "_patch_merging_pad"):
            add(f"torchvision.models.swin_transformer.{attr}", getattr(swin, attr))
    except ImportError:  # pragma: no cover - torchvision is optional
        pass
    try:  # torchvision's traceable functional ops (stochastic_depth, roi_align, ...)
        import torchvision.ops as tvops

        for attr in getattr(tvops, "__all__", ()):
            fn = getattr(tvops, attr, None)
            if inspect.isfunction(fn):
                add(f"torchvision.ops.{attr}", fn)
    except ImportError:  # pragma: no cover - torchvision is optional
        pass
    for name, fn in _EXTRA_CALLABLES.items():
        by_name[name] = fn
    by_id: Dict[int, str] = {}
    for name, fn in by_name.items():
        by_id.setdefault(id(fn), name)
    for name, fn in _EXTRA_CALLABLES.items():
        by_id[id(fn)] = name
    _REGISTRY = (by_name, by_id)
    return _REGISTRY


def _aten_name(fn: Any) -> Optional[str]:
    """``torch.ops.aten.<op>.<overload>`` for an ATen overload (the ops of a graph captured
    by torch.export), else None."""
    if isinstance(fn, torch._ops.OpOverload) and fn.namespace == "aten":
        return f"torch.ops.aten.{fn._opname}.{fn._overloadname}"
    return None


def _callable(name: Any, by_name: Mapping[str, Callable]) -> Optional[Callable]:
    """The allowed callable of a saved name: the allow-list's, or an ATen overload named
    ``torch.ops.aten.<op>.<overload>`` (torch ops, like the ``torch.*`` builtins)."""
    fn = by_name.get(name)
    if fn is not None or not isinstance(name, str):
        return fn
    parts = name.split(".")
    if len(parts) != 5 or parts[:3] != ["torch", "ops", "aten"] or not all(p.isidentifier() for p in parts[3:]):
        return None
    packet = getattr(torch.ops.aten, parts[3], None)
    if not isinstance(packet, torch._ops.OpOverloadPacket) or parts[4] not in packet.overloads():
        return None
    op = getattr(packet, parts[4])
    return op if _aten_name(op) == name else None


def _module_class(name: str) -> Optional[type]:
    """The allowed nn.Module class called ``name`` (``torch.nn.modules.conv.Conv2d``), or None."""
    if name in _EXTRA_MODULE_TYPES:
        return _EXTRA_MODULE_TYPES[name]
    name = _current_name(name)
    library = _library_module_types()
    if name in library:
        return library[name]
    mod_name, _, cls_name = name.rpartition(".")
    if not (mod_name == "torch.nn.modules" or mod_name.startswith("torch.nn.modules.")) or not cls_name.isidentifier():
        return None
    try:
        cls = getattr(importlib.import_module(mod_name), cls_name, None)
    except ImportError:
        return None
    return cls if isinstance(cls, type) and issubclass(cls, nn.Module) else None


def _library_module_types() -> Dict[str, type]:
    """The module types of this library that graphs call: the slimmable attention and the
    masked RNNs of a channel-masked model."""
    from disparse_fx.passes.attention import MultiheadAttention
    from disparse_fx.passes.rules.rnn import MaskedGRU, MaskedLSTM, MaskedRNN

    return {_qualname(c): c for c in (MultiheadAttention, MaskedRNN, MaskedLSTM, MaskedGRU)}


# An RNN's flat weight list (its parameters, again) and weakrefs to them: state derived
# from the parameters, which save() leaves out and load() rebuilds (as torch's pickling does).
_RNN_DERIVED_ATTRS = ("_flat_weights", "_flat_weight_refs")


def _derived_attrs(mod: nn.Module) -> Tuple[str, ...]:
    return _RNN_DERIVED_ATTRS if isinstance(mod, nn.RNNBase) else ()


def _rebuild_derived(mod: nn.Module, path: str) -> None:
    """Rebuild the state :func:`_derived_attrs` left out of the file, once ``mod``'s
    parameters are registered: an RNN's flat weights, which must name its parameters."""
    if not _derived_attrs(mod):
        return
    names = mod.__dict__.get("_flat_weights_names")
    if not (isinstance(names, list) and names and all(isinstance(n, str) and n in mod._parameters for n in names)):
        raise CorruptFileError(f"module '{path}' ({type(mod).__name__}): its _flat_weights_names {names!r:.120} "
                               f"do not name its parameters")
    mod._init_flat_weights()


def _allowed_method(name: Any) -> bool:
    return (isinstance(name, str) and name.isidentifier() and not name.startswith("_")
            and name not in _METHOD_DENY and hasattr(torch.Tensor, name))


# ----------------------------------------------------------------------------- data codec
def _config_type():
    from .config import CompressConfig

    return CompressConfig


def _dataclass_types() -> Dict[str, type]:
    from disparse_fx.passes.channel_groups import ChannelGroup, ChannelGroups, Contraction, GroupMember

    from .budget import BudgetReport
    from .channel_decision import ChannelPlan
    from .plan import Plan

    return {_qualname(c): c for c in (Plan, _config_type(), ChannelPlan, ChannelGroups, ChannelGroup, GroupMember,
                                       Contraction, BudgetReport)}


class _Encoder:
    """Python data -> JSON-able data with ``$``-tagged containers; tensors go to ``tensors``."""

    def __init__(self, tensors: Optional[Dict[str, torch.Tensor]] = None, *, nodes: bool = False):
        self.tensors = tensors
        self.nodes = nodes
        self._ids: Dict[int, str] = {}
        self._dataclasses = _dataclass_types()

    def tensor_key(self, t: torch.Tensor) -> str:
        key = self._ids.get(id(t))
        if key is None:
            key = f"t{len(self.tensors)}"
            self.tensors[key] = t.detach()
            self._ids[id(t)] = key
        return key

    def __call__(self, v: Any, where: str) -> Any:  # noqa: C901 - one branch per type
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, int):
            return v
        if isinstance(v, float):
            return v if math.isfinite(v) else {"$float": repr(v)}
        if isinstance(v, fx.Node):
            if not self.nodes:
                raise UnserializableError(f"{where}: a graph node outside a graph")
            return {"$node": v.name}
        if isinstance(v, torch.Tensor):
            if self.tensors is None:
                raise UnserializableError(f"{where}: a tensor where only plain data is allowed")
            return {"$tensor": self.tensor_key(v)}
        if isinstance(v, torch.Size):
            return {"$size": [self(x, where) for x in v]}
        if isinstance(v, torch.dtype):
            return {"$dtype": str(v).rpartition(".")[2]}
        if isinstance(v, torch.device):
            return {"$device": str(v)}
        if isinstance(v, torch.memory_format):
            return {"$memory_format": str(v).rpartition(".")[2]}
        if isinstance(v, torch.layout):
            return {"$layout": str(v).rpartition(".")[2]}
        if isinstance(v, slice):
            return {"$slice": [self(v.start, where), self(v.stop, where), self(v.step, where)]}
        if v is Ellipsis:
            return {"$ellipsis": True}
        if isinstance(v, complex):
            return {"$complex": [repr(v.real), repr(v.imag)]}
        if isinstance(v, tuple) and not hasattr(v, "_fields"):
            return {"$tuple": [self(x, f"{where}[{i}]") for i, x in enumerate(v)]}
        if isinstance(v, list):
            return [self(x, f"{where}[{i}]") for i, x in enumerate(v)]
        if isinstance(v, (frozenset, set)):
            items = sorted((self(x, where) for x in v), key=lambda e: json.dumps(e, sort_keys=True))
            return {"$frozenset" if isinstance(v, frozenset) else "$set": items}
        if isinstance(v, (dict, types.MappingProxyType)):
            tag = {dict: "$dict", collections.OrderedDict: "$odict", types.MappingProxyType: "$mappingproxy",
                   fx.immutable_collections.immutable_dict: "$dict"}.get(type(v))
            if tag is None:
                raise UnserializableError(f"{where}: a mapping of type {type(v).__name__}")
            return {tag: [[self(k, f"{where} key"), self(x, f"{where}[{k!r}]")] for k, x in v.items()]}
        if isinstance(v, fx.immutable_collections.immutable_list):
            return [self(x, f"{where}[{i}]") for i, x in enumerate(v)]
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            name = _qualname(type(v))
            if name not in self._dataclasses:
                raise UnserializableError(f"{where}: a {type(v).__name__}, which save() does not know")
            fields = {}
            for f in dataclasses.fields(v):
                val = getattr(v, f.name)
                if isinstance(v, _config_type()) and f.name == "filter_fn" and val is not None:
                    warn(f"save: CompressConfig.filter_fn ({val!r}) is a callable and is saved as None; "
                         "the loaded plan records which parameters it chose (plan.prunable)")
                    val = None
                fields[f.name] = self(val, f"{where}.{f.name}")
            return {"$dataclass": name, "fields": fields}
        raise UnserializableError(f"{where}: cannot save a {type(v).__module__}.{type(v).__qualname__} "
                                  f"({v!r:.80}) without pickling it")


class _Decoder:
    def __init__(self, tensors: Optional[Mapping[str, torch.Tensor]] = None,
                 nodes: Optional[Mapping[str, fx.Node]] = None):
        self.tensors = tensors
        self.nodes = nodes
        self._dataclasses = _dataclass_types()

    def __call__(self, v: Any) -> Any:  # noqa: C901
        if v is None or isinstance(v, (bool, str, int, float)):
            return v
        if isinstance(v, list):
            return [self(x) for x in v]
        if not isinstance(v, dict) or len(v) not in (1, 2):
            raise CorruptFileError(f"unexpected value {v!r:.80}")
        tag, body = next(iter(v.items()))
        if tag == "$float":
            return float(body)
        if tag == "$node":
            if self.nodes is None or body not in self.nodes:
                raise CorruptFileError(f"a reference to graph node {body!r}, which is not defined before its use")
            return self.nodes[body]
        if tag == "$tensor":
            if self.tensors is None or body not in self.tensors:
                raise CorruptFileError(f"a reference to tensor {body!r}, which tensors.pt does not hold")
            return self.tensors[body]
        if tag == "$size":
            return torch.Size([self(x) for x in body])
        if tag in ("$dtype", "$memory_format", "$layout"):
            obj = getattr(torch, body, None) if isinstance(body, str) else None
            kind = {"$dtype": torch.dtype, "$memory_format": torch.memory_format, "$layout": torch.layout}[tag]
            if not isinstance(obj, kind):
                raise CorruptFileError(f"unknown {tag[1:]} {body!r}")
            return obj
        if tag == "$device":
            return torch.device(body)
        if tag == "$slice":
            return slice(*(self(x) for x in body))
        if tag == "$ellipsis":
            return Ellipsis
        if tag == "$complex":
            return complex(float(body[0]), float(body[1]))
        if tag == "$tuple":
            return tuple(self(x) for x in body)
        if tag in ("$frozenset", "$set"):
            return (frozenset if tag == "$frozenset" else set)(self(x) for x in body)
        if tag in ("$dict", "$odict", "$mappingproxy"):
            d = (collections.OrderedDict if tag == "$odict" else dict)((self(k), self(x)) for k, x in body)
            return types.MappingProxyType(d) if tag == "$mappingproxy" else d
        if tag == "$dataclass":
            cls = self._dataclasses.get(_current_name(body))
            if cls is None:
                raise DisallowedCallableError(f"the file names the data class {body!r}, which load() does not build "
                                              f"(known: {sorted(self._dataclasses)})")
            fields = {k: self(x) for k, x in v["fields"].items()}
            init = {f.name for f in dataclasses.fields(cls) if f.init}
            obj = cls(**{k: x for k, x in fields.items() if k in init})
            for k, x in fields.items():
                if k not in init:
                    object.__setattr__(obj, k, x)
            return obj
        raise CorruptFileError(f"unknown tag {tag!r}")


# ----------------------------------------------------------------------------- graph modules


def _encode_graph_module(gm: fx.GraphModule, tensors: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    if type(gm.graph._codegen) is not fx.graph.CodeGen:
        raise UnserializableError(f"the graph uses {type(gm.graph._codegen).__name__} (pytree inputs/outputs); "
                                  f"save() writes graphs with the default code generator only")
    enc = _Encoder(tensors, nodes=True)
    by_name, by_id = _registry()
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    attr_modules = set()
    for n in gm.graph.nodes:
        if n.op in ("get_attr", "call_module"):
            try:
                obj = _resolve_path(gm, n.target, n)
            except CorruptFileError as exc:
                raise UnserializableError(str(exc)) from None
            if n.op == "get_attr" and isinstance(obj, nn.Module):
                attr_modules.add(n.target)
    modules = []
    for path, mod in gm.named_modules(remove_duplicate=False):
        modules.append(_encode_module(path, mod, enc, must_exist=path in called or path in attr_modules))
    nodes = []
    for n in gm.graph.nodes:
        where = f"graph node '{n.name}' ({n.op} {_target_str(n)})"
        if n.op == "call_function":
            name = by_id.get(id(n.target)) or _aten_name(n.target)
            if name is None or _callable(name, by_name) is not n.target:
                raise UnserializableError(
                    f"{where}: its target {_qualname(n.target)} is not in save()'s allow-list of callables "
                    f"(torch ops, torch.nn.functional, operator, math, safe builtins); if it is pure, allow it "
                    f"with disparse_fx.serialize.register_callable(fn) before save() and load()")
            target = name
        elif n.op == "call_method":
            if not _allowed_method(n.target):
                raise UnserializableError(f"{where}: method {n.target!r} is not a public torch.Tensor method "
                                          f"that save() allows")
            target = n.target
        else:
            target = n.target
        spec = {"name": n.name, "op": n.op, "target": target,
                "args": enc(tuple(n.args), f"{where} args"), "kwargs": enc(dict(n.kwargs), f"{where} kwargs")}
        if isinstance(n.type, str):  # a string annotation (``from __future__ import annotations``)
            spec["type_str"] = n.type
        elif any(n.type is t for t in _SIMPLE_TYPES.values()):
            spec["type"] = next(k for k, t in _SIMPLE_TYPES.items() if t is n.type)
        meta = _encode_meta(n)
        if meta:
            spec["meta"] = meta
        nodes.append(spec)
    gm_meta = {}
    for k, v in getattr(gm, "meta", {}).items():
        try:
            gm_meta[k] = _Encoder()(v, k)
        except UnserializableError:
            log.debug("save: GraphModule.meta[%r] is not plain data; not saved", k)
    return {"class_name": type(gm).__name__, "modules": modules, "nodes": nodes, "meta": gm_meta}


_SIMPLE_TYPES = {"Tensor": torch.Tensor, "int": int, "float": float, "bool": bool, "str": str}


def _encode_meta(n: fx.Node) -> Dict[str, Any]:
    plain = _Encoder()
    out = {}
    for k, v in n.meta.items():
        if k == "stack_trace":  # the whole stack names the machine's folders: keep the user's frame
            frame = user_frame(n)
            if frame is None:
                continue
            path, line, func, code = frame
            v = f'File "{_portable_path(path)}", line {line}, in {func}\n    {code.strip()}'
        if k == "nn_module_stack" and isinstance(v, Mapping):
            v = collections.OrderedDict(
                (key, (val[0], val[1] if isinstance(val[1], str) else _qualname(val[1])))
                for key, val in v.items() if isinstance(val, tuple) and len(val) == 2)
        try:
            out[k] = plain(v, k)
        except UnserializableError:
            continue
    return out


def _machine_folders() -> List[Tuple[str, str]]:
    """(absolute folder, what replaces it) for the folders a saved file must not name:
    the current folder and sys.path entries (made relative), the Python installation
    and the home folder; deepest first."""
    folders = {}
    for f in (sys.prefix, sys.base_prefix, sys.exec_prefix):
        folders[f] = ""
    home = os.path.expanduser("~")
    if home and home != "~":
        folders[home] = "~" + os.sep
    for f in [p for p in sys.path if p] + [os.getcwd()]:
        folders[os.path.abspath(f)] = ""
    return sorted(((f.rstrip(os.sep), r) for f, r in folders.items() if len(f.rstrip(os.sep)) > 1),
                  key=lambda fr: len(fr[0]), reverse=True)


def _portable_path(path: str, folders: Optional[List[Tuple[str, str]]] = None) -> str:
    """``path`` relative to the deepest of the current folder and the sys.path entries
    holding it (``tests/zoo.py``, ``timm/models/convnext.py``); else its base name."""
    if not os.path.isabs(path):
        return path
    for folder, repl in folders if folders is not None else _machine_folders():
        if not repl and path.startswith(folder + os.sep):
            return path[len(folder) + 1:]
    return os.path.basename(path)


_QUOTED_FILE = re.compile(r'File "([^"]+)"')


def _portable(obj: Any, folders: Optional[List[Tuple[str, str]]] = None) -> Any:
    """A JSON tree with every string made free of the saving machine's absolute folders
    (quoted source files as :func:`_portable_path`, other mentions as relative)."""
    folders = _machine_folders() if folders is None else folders
    if isinstance(obj, str):
        if os.sep not in obj:
            return obj
        obj = _QUOTED_FILE.sub(lambda m: f'File "{_portable_path(m.group(1), folders)}"', obj)
        for folder, repl in folders:
            obj = obj.replace(folder + os.sep, repl)
        return obj
    if isinstance(obj, list):
        return [_portable(v, folders) for v in obj]
    if isinstance(obj, dict):
        return {_portable(k, folders): _portable(v, folders) for k, v in obj.items()}
    return obj


def _target_str(n: fx.Node) -> str:
    return n.target if isinstance(n.target, str) else _qualname(n.target)


def _resolve_path(root: nn.Module, path: str, node: Optional[fx.Node] = None) -> Any:
    """The submodule, parameter, buffer or tensor constant at ``path``, walking the module
    tree only (never arbitrary attributes: ``__class__`` and the like are not reachable)."""
    obj: Any = root
    parts = path.split(".") if path else []
    for i, part in enumerate(parts):
        found = _MISSING
        if isinstance(obj, nn.Module):
            for table in (obj._modules, obj._parameters, obj._buffers):
                if part in table:
                    found = table[part]
                    break
            else:
                if isinstance(obj.__dict__.get(part), torch.Tensor):
                    found = obj.__dict__[part]
        if found is _MISSING or (i < len(parts) - 1 and not isinstance(found, nn.Module)):
            what = f"graph node '{node.name}' ({node.op} {path})" if node is not None else repr(path)
            raise CorruptFileError(f"{what} names '{path}', which is not a submodule, parameter, buffer or tensor "
                                   f"constant of the module tree")
        obj = found
    return obj


_MISSING = object()


def _encode_module(path: str, mod: nn.Module, enc: _Encoder, *, must_exist: bool) -> Dict[str, Any]:
    where = f"module '{path or '<root>'}' ({type(mod).__name__})"
    hooks = module_hooks(mod)
    if hooks:
        raise UnserializableError(f"{where} has hooks ({', '.join(hooks)}); hooks are code and are not "
                                  f"saved - remove them before save()")
    if path == "":
        cls_name = None  # the GraphModule itself
    elif _module_class(_qualname(type(mod))) is type(mod):
        cls_name = _qualname(type(mod))
    elif must_exist:
        raise UnserializableError(
            f"{where} is called by the graph, but {_qualname(type(mod))} is not a torch.nn built-in module; "
            f"trace through it, or allow it with disparse_fx.serialize.register_module_type(cls)")
    else:
        log.debug("save: %s is a container the graph never calls; saved as a plain nn.Module", where)
        cls_name = "torch.nn.modules.module.Module"
    attrs = {}
    if cls_name not in (None, "torch.nn.modules.module.Module"):
        derived = _derived_attrs(mod)
        for k, v in mod.__dict__.items():
            if k in _BASE_MODULE_KEYS or k in derived:
                continue
            try:
                attrs[k] = _Encoder()(v, f"{where}.{k}")
            except UnserializableError as exc:
                raise UnserializableError(f"{exc}: {type(mod).__name__} keeps state save() cannot write "
                                          f"without pickling") from None
    constants = {}
    if path == "" or cls_name == "torch.nn.modules.module.Module":
        for k, v in mod.__dict__.items():
            if isinstance(v, torch.Tensor) and k not in _BASE_MODULE_KEYS:
                constants[k] = enc(v, f"{where}.{k}")  # tensor constants made by tracing
    params = [[k, None if p is None else enc.tensor_key(p), None if p is None else p.requires_grad]
              for k, p in mod._parameters.items()]
    buffers = [[k, None if b is None else enc.tensor_key(b), k not in mod._non_persistent_buffers_set]
               for k, b in mod._buffers.items()]
    return {"path": path, "class": cls_name, "training": mod.training, "attrs": attrs, "constants": constants,
            "params": params, "buffers": buffers, "children": list(mod._modules)}


def _decode_graph_module(spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> fx.GraphModule:
    plain = _Decoder()
    gm = fx.GraphModule(nn.Module(), fx.Graph(), class_name=str(spec["class_name"]))
    built: Dict[str, nn.Module] = {"": gm}
    params: Dict[str, nn.Parameter] = {}
    specs = {m["path"]: m for m in spec["modules"]}
    pending_children: List[Tuple[nn.Module, List[str], str]] = []
    for m in spec["modules"]:
        path = m["path"]
        if path == "":
            mod = gm
        else:
            cls = _module_class(m["class"])
            if cls is None:
                raise DisallowedCallableError(
                    f"module '{path}' has class {m['class']!r}, which is not a torch.nn built-in module "
                    f"(nor registered with register_module_type); load() does not build it")
            mod = cls.__new__(cls)
            nn.Module.__init__(mod)
            for k, v in m["attrs"].items():
                if k in _BASE_MODULE_KEYS or k in _derived_attrs(mod):
                    raise CorruptFileError(f"module '{path}' sets reserved attribute {k!r}")
                mod.__dict__[k] = plain(v)
        built[path] = mod
        mod.training = bool(m["training"])
        for k, key, rg in m["params"]:
            if key is None:
                mod.register_parameter(k, None)
                continue
            if key not in params:
                params[key] = nn.Parameter(tensors[key], requires_grad=bool(rg))
            mod.register_parameter(k, params[key])
        for k, key, persistent in m["buffers"]:
            mod.register_buffer(k, None if key is None else tensors[key], persistent=bool(persistent))
        _rebuild_derived(mod, path)
        dec = _Decoder(tensors)
        for k, v in m["constants"].items():
            setattr(mod, k, dec(v))
        pending_children.append((mod, list(m["children"]), path))
    for mod, children, path in pending_children:
        for child in children:
            child_path = f"{path}.{child}" if path else child
            if child_path not in built:
                raise CorruptFileError(f"module '{path or '<root>'}' lists child '{child}', which the file "
                                       f"does not describe")
            mod.add_module(child, built[child_path])
    del specs
    gm.graph = _decode_graph(spec["nodes"], gm, tensors)
    gm.meta.update({k: plain(v) for k, v in spec.get("meta", {}).items()})
    return gm


def _decode_graph(nodes: List[Mapping[str, Any]], gm: fx.GraphModule,
                  tensors: Mapping[str, torch.Tensor]) -> fx.Graph:
    by_name, _ = _registry()
    graph = fx.Graph(owning_module=gm)
    env: Dict[str, fx.Node] = {}
    dec = _Decoder(tensors, env)
    plain = _Decoder()
    for spec in nodes:
        op, name, target = spec["op"], spec["name"], spec["target"]
        where = f"graph node '{name}' ({op} {target})"
        if op == "call_function":
            fn = _callable(_current_name(target), by_name)
            if fn is None:
                raise DisallowedCallableError(
                    f"{where} calls {target!r}, which is not in load()'s allow-list of callables (torch ops, "
                    f"torch.nn.functional, operator, math, safe builtins, and register_callable additions); "
                    f"refusing to resolve it")
            target = fn
        elif op == "call_method":
            if not _allowed_method(target):
                raise DisallowedCallableError(f"{where} calls method {target!r}, which is not a public "
                                              f"torch.Tensor method that load() allows")
        elif op in ("call_module", "get_attr"):
            obj = _resolve_path(gm, target)
            if op == "call_module" and not isinstance(obj, nn.Module):
                raise CorruptFileError(f"{where}: '{target}' is not a module")
        elif op not in ("placeholder", "output"):
            raise CorruptFileError(f"{where}: unknown node op {op!r}")
        args = dec(spec["args"])
        kwargs = dec(spec["kwargs"])
        if target is torch.func.functional_call and not (
                args and isinstance(args[0], fx.Node) and args[0].op == "get_attr"
                and isinstance(_resolve_path(gm, args[0].target), nn.Module)):
            raise DisallowedCallableError(f"{where}: functional_call must call a module of the model")
        if target is getattr and (len(args) < 2 or not isinstance(args[1], str) or args[1].startswith("_")):
            raise DisallowedCallableError(f"{where} reads attribute {args[1:2]!r}; load() allows getattr of "
                                          f"public attribute names only")
        node = graph.create_node(op, target, tuple(args), dict(kwargs), name=name,
                                 type_expr=_type_expr(spec))
        if node.name != name:
            raise CorruptFileError(f"{where}: the node name is used twice")
        for k, v in spec.get("meta", {}).items():
            node.meta[k] = plain(v)
        env[name] = node
    try:
        graph.lint()
    except Exception as exc:  # noqa: BLE001
        raise CorruptFileError(f"the saved graph does not lint: {exc}") from exc
    return graph


def _type_expr(spec: Mapping[str, Any]) -> Any:
    if isinstance(spec.get("type_str"), str):
        return spec["type_str"]
    return _SIMPLE_TYPES.get(spec.get("type"))


# ----------------------------------------------------------------------------- save / load
def save(obj: Any, path: PathLike) -> None:
    """Write a GraphModule (e.g. ``dfx.slim(result)``) or a CompressionResult to ``path``.

    The file is a zip archive of JSON (graph, module tree, plan) and a ``torch.save``
    of the tensors (see the module docstring); no Python code is pickled. The write is
    atomic (a temporary file renamed into place); missing parent folders are created.
    ``CompressConfig.filter_fn`` is a callable and is saved as None (with a
    :class:`DisparseWarning`). Raises :class:`DisparseValueError` when ``path`` is a
    folder, and :class:`UnserializableError` (a ValueError) for anything that would need
    pickling: a graph calling a function outside the allow-list, a called module of a
    non-torch.nn class, hooks, or a module attribute that is not plain data.
    """
    from .result import CompressionResult

    tensors: Dict[str, torch.Tensor] = {}
    files: Dict[str, bytes] = {}
    if isinstance(obj, CompressionResult):
        kind = "compression_result"
        # inputs: a callable (batch -> model inputs), deliberately not saved (see CompressionResult)
        extra = {f.name for f in dataclasses.fields(obj)} - {"model", "plan", "inputs"}
        if extra:
            raise UnserializableError(f"CompressionResult has fields {sorted(extra)} that save() does not know")
        model = _encode_graph_module(obj.model, tensors)
        plan = _Encoder(tensors)(obj.plan, "plan")
        # masks/scores share the model's tensor keys only by identity; both live in tensors.pt
        files[_PLAN] = _json(plan)
    elif isinstance(obj, fx.GraphModule):
        kind = "graph_module"
        model = _encode_graph_module(obj, tensors)
    else:
        raise UnserializableError(
            f"save expects an fx.GraphModule (e.g. dfx.slim(result)) or a CompressionResult, got "
            f"{type(obj).__name__}; to save a plain nn.Module, save its state_dict with torch.save")
    from . import __version__

    files[_FORMAT] = _json({"format": FORMAT_NAME, "version": FORMAT_VERSION, "kind": kind,
                            "library_version": __version__, "torch_version": torch.__version__})
    files[_MODEL] = _json(model)
    buf = io.BytesIO()
    torch.save(tensors, buf)
    files[_TENSORS] = buf.getvalue()
    path = pathlib.Path(path)
    if path.is_dir():
        raise DisparseValueError(f"save: {str(path)!r} is a folder; give the file to write, e.g. "
                                 f"{str(path / 'result.dfx')!r}")
    path.parent.mkdir(parents=True, exist_ok=True)  # as export_onnx and write_report do
    tmp = path.with_name(path.name + ".tmp")
    try:
        with zipfile.ZipFile(tmp, "w") as zf:
            for name in (_FORMAT, _MODEL, _PLAN, _TENSORS):
                if name in files:
                    zf.writestr(name, files[name],
                                compress_type=zipfile.ZIP_STORED if name == _TENSORS else zipfile.ZIP_DEFLATED)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    log.info("saved %s (%d tensors, %d bytes) to %s", kind, len(tensors), path.stat().st_size, path)


def load(path: PathLike, *, map_location: Any = None):
    """Read what :func:`save` wrote: a trainable GraphModule or a CompressionResult.

    ``map_location``: as for ``torch.load`` (e.g. ``"cpu"`` for a file saved on GPU).
    Raises :class:`CorruptFileError` (not a zip, truncated, damaged), :class:`ForeignFileError`
    (a zip not written by save), :class:`UnsupportedVersionError` (written by a newer
    format version) or :class:`DisallowedCallableError` (the file names a callable or
    module class outside the allow-list) - all :class:`SerializationError`, a DisparseError.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise SerializationError(f"'{path}': no such file")
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if _FORMAT not in names:
                raise ForeignFileError(f"'{path}' is a zip archive but not a disparse_fx file (no {_FORMAT}); "
                                       f"it holds e.g. {sorted(names)[:3]}")
            header = _read_json(zf, _FORMAT, path)
            if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
                raise ForeignFileError(f"'{path}' is not a disparse_fx file: its format is "
                                       f"{header.get('format') if isinstance(header, dict) else header!r}, "
                                       f"expected {FORMAT_NAME!r}")
            version = header.get("version")
            if not isinstance(version, int) or version < 1:
                raise CorruptFileError(f"'{path}' has an invalid format version {version!r}")
            if version > FORMAT_VERSION:
                raise UnsupportedVersionError(
                    f"'{path}' was written in {FORMAT_NAME} version {version} (by disparse_fx "
                    f"{header.get('library_version', '?')}); this disparse_fx reads versions up to "
                    f"{FORMAT_VERSION} - upgrade disparse_fx")
            kind = header.get("kind")
            if kind not in ("graph_module", "compression_result"):
                raise CorruptFileError(f"'{path}' holds an unknown kind {kind!r}")
            for required in (_MODEL, _TENSORS) + ((_PLAN,) if kind == "compression_result" else ()):
                if required not in names:
                    raise CorruptFileError(f"'{path}' is missing {required} (truncated or damaged)")
            model_spec = _read_json(zf, _MODEL, path)
            plan_spec = _read_json(zf, _PLAN, path) if kind == "compression_result" else None
            raw = _read(zf, _TENSORS, path)
    except zipfile.BadZipFile as exc:
        raise CorruptFileError(f"'{path}' is not a readable disparse_fx file (truncated or damaged zip: {exc})") \
            from None
    try:
        tensors = torch.load(io.BytesIO(raw), weights_only=True, map_location=map_location)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CorruptFileError(f"'{path}': its tensors cannot be read ({type(exc).__name__}: {exc})".splitlines()[0]) \
            from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise CorruptFileError(f"'{path}': tensors.pt does not hold a dict of tensors")
    try:
        model = _decode_graph_module(model_spec, tensors)
        if kind == "graph_module":
            return model
        from .result import CompressionResult

        plan = _Decoder(tensors)(plan_spec)
        return CompressionResult(model=model, plan=plan)
    except SerializationError as exc:
        raise type(exc)(f"'{path}': {exc}") from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise CorruptFileError(f"'{path}' is damaged: {type(exc).__name__}: {exc}".splitlines()[0]) from None


def _json(obj: Any) -> bytes:
    return json.dumps(_portable(obj), separators=(",", ":")).encode()


def _read(zf: zipfile.ZipFile, name: str, path: pathlib.Path) -> bytes:
    try:
        return zf.read(name)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:  # bad CRC, zlib errors, short read
        raise CorruptFileError(f"'{path}': {name} is damaged ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # noqa: BLE001 - zlib.error and friends
        raise CorruptFileError(f"'{path}': {name} is damaged ({type(exc).__name__}: {exc})") from None


def _read_json(zf: zipfile.ZipFile, name: str, path: pathlib.Path) -> Any:
    try:
        return json.loads(_read(zf, name, path))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"'{path}': {name} is not valid JSON ({exc})") from None
