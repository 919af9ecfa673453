"""Capture a model as a torch.fx GraphModule: symbolic tracing or torch.export.

:func:`capture_model` is what ``compress`` calls. ``capture="fx"`` is
:func:`passes.trace.trace_model` (symbolic tracing: call_module nodes for layers);
``capture="export"`` is :func:`export_model` (torch.export, non-strict: the model runs
once on the example inputs, so Python control flow, mask building and attention
dispatch of current Hugging Face models need no tracing support); ``"auto"`` traces
and falls back to torch.export only when tracing fails.

An exported graph reads every parameter and buffer with ``get_attr`` under the user's
qualified names (``bert.encoder.layer.0.attention.self.query.weight``) and computes with
ATen ops (``torch.ops.aten.linear.default``, ``aten.layer_norm.default``,
``aten.scaled_dot_product_attention.default``, ``aten.transpose.int``, ...), the default
export IR without decompositions. :func:`export_model` turns ``ep.module()`` into a
plain GraphModule like a traced one: positional inputs, the model's own output
structure (a dict ``{task: node}`` or a tuple) on the output node, the export guards
removed, and the model's own parameters and buffers (shared, as symbolic tracing
shares them), so names and identities are the user's. It also rewrites:

- ops that take sizes into what symbolic tracing records (``x.size(d)``, ``x.view(...)``,
  ``x.expand(...)``, ``x[:, a:b]``, ``torch.arange(n)``), so slimming rewrites them with the
  existing rules and the ONNX exporter follows batch and sequence length;
- ``aten.dropout(x, p, False)`` of the (eval-mode) graph into ``nn.Dropout(p)`` modules,
  so dropout follows ``train()`` / ``eval()`` (BatchNorm stays in eval mode: a warning
  says so);
- hand-written RMSNorms into ``F.rms_norm`` (the residual width stays removable);
- ``diff`` / ``cumsum`` of packed-sequence masks into spellings ONNX has.

>>> import torch, torch.nn as nn
>>> class Tagger(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.embed, self.head = nn.Embedding(10, 8), nn.Linear(8, 2)
...     def forward(self, ids):
...         return (self.head(self.embed(ids).relu()),)
>>> m = Tagger()
>>> gm = export_model(m, (torch.randint(0, 10, (3, 5)),))
>>> [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
['aten.embedding.default', 'aten.relu.default', 'aten.linear.default']
>>> gm.get_parameter("head.weight") is m.head.weight
True
>>> gm(torch.randint(0, 10, (4, 7)))[0].shape    # batch and sequence stay dynamic
torch.Size([4, 7, 2])
"""
from __future__ import annotations

import contextlib
import io
import logging
import operator
import sys
import threading
from typing import Any, Dict, Iterable, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from .errors import DisparseValueError, TraceError, warn
from .fuse_rms_norms import fuse_rms_norms, fuse_rms_norms_
from .rules import register_channel_rule
from .rules.aten import along_dim as _along_dim
from .slim import keep_tied_names
from .trace import task_output_nodes, trace_model

__all__ = ["capture_model", "export_model", "CAPTURES"]

log = logging.getLogger(__name__)

#: How a model becomes a GraphModule (``capture=`` of :func:`capture_model`).
CAPTURES = ("auto", "fx", "export")


def capture_model(
    model: nn.Module,
    example_inputs: Optional[Sequence[Any]] = None,
    *,
    capture: str = "auto",
    leaf_modules: Iterable[type] = (),
    concrete_args: Optional[Dict[str, Any]] = None,
) -> fx.GraphModule:
    """``model`` as a GraphModule, by symbolic tracing (``"fx"``), torch.export
    (``"export"``, needs ``example_inputs``) or tracing with a torch.export fallback
    (``"auto"``: torch.export runs only when tracing raises, and only with example
    inputs). Hand-written RMSNorms become ``F.rms_norm`` on every path
    (:func:`passes.fuse_rms_norms.fuse_rms_norms`); a GraphModule without one is returned
    as it is."""
    if capture not in CAPTURES:
        raise DisparseValueError(f"capture must be one of {CAPTURES}, got {capture!r}")
    if isinstance(model, fx.GraphModule) or capture == "fx":
        return fuse_rms_norms(trace_model(model, leaf_modules=leaf_modules, concrete_args=concrete_args))
    if capture == "export":
        if example_inputs is None:
            raise DisparseValueError("capture='export' needs example inputs (one batch of data); got none")
        return export_model(model, example_inputs)
    try:
        return fuse_rms_norms(trace_model(model, leaf_modules=leaf_modules, concrete_args=concrete_args))
    except TraceError as traced:
        if example_inputs is None:
            raise
        log.info("torch.fx could not trace %s; capturing it with torch.export instead (%s)",
                 type(model).__name__, str(traced).splitlines()[0])
        try:
            return export_model(model, example_inputs)
        except TraceError as exported:
            raise TraceError(f"{traced}\n  torch.export failed too: {exported}") from exported


def export_model(model: nn.Module, example_inputs: Sequence[Any], *, dynamic: bool = True) -> fx.GraphModule:
    """Capture ``model`` with ``torch.export.export(..., strict=False)`` on positional
    tensor ``example_inputs`` (see the module docstring). ``dynamic``: the batch and
    sequence dims are ``Dim.AUTO`` (dynamic unless the model fixes them; see
    :func:`_dynamic_dims`). The model's modes are as before."""
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected an nn.Module, got {type(model).__name__}")
    example = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    for i, x in enumerate(example):
        if not isinstance(x, torch.Tensor):
            raise TraceError(
                f"capture='export' takes positional tensor inputs only; input {i} is {type(x).__name__}. "
                f"Pass inputs=lambda batch: (tensor, ...) to compress, or wrap the model so its forward "
                f"takes tensors")
    shapes = tuple({d: torch.export.Dim.AUTO for d in _dynamic_dims(x)} for x in example) if dynamic else None
    modes = [(m, m.training) for m in model.modules()]
    try:
        # the eval graph: a train-mode export would bake dropout in for good (train=True is
        # a constant of aten.dropout); its dropouts become modules that follow the mode
        model.eval()
        with _partial_graph_dumps_to_debug_log(type(model).__name__):
            ep = torch.export.export(model, example, dynamic_shapes=shapes, strict=False)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise TraceError(f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
    finally:
        for m, mode in modes:
            m.training = mode
    gm = _plain(ep.module(), model, len(example))
    task_output_nodes(gm)
    log.debug("exported %s:\n%s", type(model).__name__, gm.code)
    return gm


@contextlib.contextmanager
def _partial_graph_dumps_to_debug_log(name: str):
    """torch.export prints its partial graph to stderr when it fails (twice: two nested
    wrappers); the user reads our TraceError instead, and the dump goes to the debug log.
    Everything else printed meanwhile (warnings, other threads' output) is written out
    as it would have been. sys.stderr is process-wide, so it is swapped only on the main
    thread (elsewhere the dump is printed as torch prints it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            yield
    except BaseException as exc:
        text = printed.getvalue()
        dump = getattr(exc, "partial_fx_graph", None) or getattr(exc.__cause__, "partial_fx_graph", None)
        if dump is not None:
            text = text.replace(f"{dump}\n", "")
            log.debug("torch.export's partial graph of %s:\n%s", name, dump)
        sys.stderr.write(text)
        raise
    else:
        sys.stderr.write(printed.getvalue())


def _dynamic_dims(x: torch.Tensor) -> range:
    """The dims of an example input left dynamic: every dim of token inputs (integer:
    batch, sequence), batch and sequence of float ``(N, L, C)`` inputs, the batch of
    images. An image's spatial size stays static: dynamic, it makes torch.export reason
    symbolically through every resize and patch unfold (minutes for timm's mobilevit)."""
    if not (x.is_floating_point() or x.is_complex()):
        return range(x.dim())
    return range(min(x.dim(), 2 if x.dim() == 3 else 1))


def _plain(gm: fx.GraphModule, model: nn.Module, n_inputs: int) -> fx.GraphModule:
    """``ep.module()`` as a plain GraphModule: positional placeholders, the model's
    output structure on the output node, no guard call, the model's own tensors."""
    graph = gm.graph
    info = getattr(graph._codegen, "pytree_info", None)
    for n in list(graph.nodes):
        if n.op == "call_module" and n.target == "_guards_fn":
            graph.erase_node(n)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != n_inputs:
        raise TraceError(f"torch.export made {len(placeholders)} inputs of {n_inputs} example inputs")
    output = next(n for n in graph.nodes if n.op == "output")
    flat = output.args[0]
    if info is not None and info.out_spec is not None:
        flat = flat if isinstance(flat, (tuple, list)) else (flat,)
        structure = pytree.tree_unflatten(list(flat), info.out_spec)
    else:
        structure = flat
    if isinstance(structure, dict) and type(structure) is not dict:
        structure = dict(structure)  # an OrderedDict or a ModelOutput: its items
    output.args = (structure,)
    graph.set_codegen(fx.graph.CodeGen())
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target in _CHECKS:
            graph.erase_node(n)  # metadata asserts name channel sizes that slimming changes
        elif n.op == "call_function" and n.target in _SIZES:
            # x.size(d): what symbolic tracing records, and what the ONNX exporter follows
            # (it reads aten.sym_size as a constant)
            n.op, n.target = "call_method", _SIZES[n.target]
        elif n.op == "call_function" and n.target in _FACTORIES:
            n.target = _FACTORIES[n.target]  # takes a size the ONNX exporter traces as a tensor
        elif n.op == "call_function" and n.target in _SIZED_METHODS:
            n.op, n.target = "call_method", _SIZED_METHODS[n.target]  # x.view(sizes): likewise
        elif n.op == "call_function" and n.target is _aten.slice.Tensor:
            _slice_to_getitem(n)
        elif n.op == "call_function" and n.target in _ONNX_SPELLINGS:
            n.target = _ONNX_SPELLINGS[n.target]  # packed-sequence masks: see diff / cumsum
    fuse_rms_norms_(graph)
    graph.eliminate_dead_code()
    # a fresh GraphModule: ep.module()'s class refuses train() / eval()
    plain = fx.GraphModule(gm, graph, type(model).__name__)
    _dropout_modules(plain)
    _share_tensors(plain, model)
    plain.train(model.training)
    plain.graph.lint()
    frozen = [n.name for n in plain.graph.nodes if n.target is _aten.batch_norm.default]
    if frozen:
        warn(f"{type(model).__name__}: {len(frozen)} BatchNorm layer(s) are captured as in eval mode (running "
             f"statistics, not updated), also after .train() - e.g. node '{frozen[0]}'; fine-tune with frozen "
             "BatchNorm, or use capture='fx' when the model traces")
    return plain


_CHECKS = tuple(op for op in (getattr(torch.ops.aten, "_assert_tensor_metadata", None),)
                if op is not None for op in [op.default])
_SIZES = {torch.ops.aten.sym_size.int: "size", torch.ops.aten.sym_numel.default: "numel"}
_aten = torch.ops.aten
# ATen factories -> the torch functions of the same signature
_FACTORIES = {_aten.arange.default: torch.arange, _aten.arange.start: torch.arange, _aten.arange.start_step: torch.arange,
              _aten.full.default: torch.full, _aten.zeros.default: torch.zeros, _aten.ones.default: torch.ones,
              _aten.empty.memory_format: torch.empty, _aten.scalar_tensor.default: torch.scalar_tensor}
# ATen ops that take sizes -> the tensor methods of the same arguments
_SIZED_METHODS = {_aten.view.default: "view", _aten.reshape.default: "reshape", _aten._unsafe_view.default: "reshape",
                  _aten.expand.default: "expand", _aten.repeat.default: "repeat"}
DROPOUT_MODULE = "export_dropout"


def diff(x: torch.Tensor, n: int = 1, dim: int = -1, prepend: Optional[torch.Tensor] = None,
         append: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``torch.diff`` written with cat, narrow and sub (ops the ONNX exporter has)."""
    parts = [t for t in (prepend, x, append) if t is not None]
    x = torch.cat(parts, dim) if len(parts) > 1 else x
    for _ in range(n):
        x = x.narrow(dim, 1, x.size(dim) - 1) - x.narrow(dim, 0, x.size(dim) - 1)
    return x


def cumsum(x: torch.Tensor, dim: int, *, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``torch.cumsum`` with a bool or integer input summed as int64 explicitly (what
    torch does implicitly; the ONNX exporter would emit a CumSum of bools)."""
    if dtype is None and not x.is_floating_point() and not x.is_complex():
        x = x.to(torch.int64)
    return torch.cumsum(x, dim, dtype=dtype)


_ONNX_SPELLINGS = {_aten.diff.default: diff, _aten.cumsum.default: cumsum}
register_channel_rule(diff)(_along_dim)  # in case a channel reaches them: pinned along dim
register_channel_rule(cumsum)(_along_dim)


def _slice_to_getitem(n: fx.Node) -> None:
    """``aten.slice.Tensor(x, dim, start, end, step)`` -> ``x[:, ..., start:end:step]``."""
    x, dim, start, end, step = (list(n.args) + [0, None, None, 1][len(n.args) - 1:])[:5]
    dim = n.kwargs.get("dim", dim)
    start, end, step = n.kwargs.get("start", start), n.kwargs.get("end", end), n.kwargs.get("step", step)
    if isinstance(end, int) and end >= 2 ** 62:
        end = None
    if dim < 0:
        dim += len(n.meta["val"].shape)
    n.target = operator.getitem
    n.args, n.kwargs = (x, (slice(None),) * dim + (slice(None if isinstance(start, int) and start == 0 else start, end, None if step == 1 else step),)), {}


def _dropout_modules(gm: fx.GraphModule) -> None:
    """``aten.dropout(x, p, False)`` of the eval graph -> a call of an ``nn.Dropout(p)``
    submodule (``export_dropout.<node>``), so dropout follows ``train()`` / ``eval()``
    as the model's own did (dropout inside ``scaled_dot_product_attention`` stays off)."""
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target is torch.ops.aten.dropout.default:
            p = n.args[1] if len(n.args) > 1 else n.kwargs.get("p", 0.5)
            gm.add_submodule(f"{DROPOUT_MODULE}.{n.name}", nn.Dropout(float(p)))
            n.op, n.target, n.args, n.kwargs = "call_module", f"{DROPOUT_MODULE}.{n.name}", (n.args[0],), {}
    gm.recompile()


def _share_tensors(gm: fx.GraphModule, model: nn.Module) -> None:
    """Point gm's parameters and buffers at the model's own (export copies them).

    A tied tensor (an LM head's weight that IS the input embedding's) is read by the
    graph under one of its names; its other names are kept too, as the same tensor
    (as symbolic tracing keeps them), so the state dict has every name and slimming,
    which narrows a tensor under all its names, keeps the tie."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in named:
        owner, _, leaf = name.rpartition(".")
        try:
            sub = gm.get_submodule(owner) if owner else gm
        except AttributeError:
            continue  # not read by the graph
        if leaf in sub._parameters:
            sub._parameters[leaf] = t
        elif leaf in sub._buffers:
            sub._buffers[leaf] = t
    keep_tied_names(gm, named)
