"""Trace a multitask model into a torch.fx GraphModule and find its task outputs.

A multitask model's ``forward`` returns either a dict ``{task_name: Tensor}`` or a
tuple/list of Tensors (task ``i`` is position ``i``). After tracing, the graph's output
node returns the same structure, and :func:`task_output_nodes` maps every task to the
fx node that produces its output - the anchor of the ownership analysis.

>>> import torch, torch.nn as nn
>>> class TwoHeads(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.trunk = nn.Linear(4, 8)
...         self.a, self.b = nn.Linear(8, 1), nn.Linear(8, 2)
...     def forward(self, x):
...         h = self.trunk(x).relu()
...         return {"a": self.a(h), "b": self.b(h)}
>>> gm = trace_model(TwoHeads())
>>> {task: node.name for task, node in task_output_nodes(gm).items()}
{'a': 'a', 'b': 'b'}
"""
from __future__ import annotations

import functools
import linecache
import logging
import operator
import os
import sys
import traceback
from typing import Any, Dict, Hashable, Iterable, Mapping, Optional, Set, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.utils._traceback import CapturedTraceback

from .errors import TraceError, warn
from .gc_pause import paused_gc

try:  # torch >= 2.2: the code is generated on first call or on reading .code
    from torch.fx._lazy_graph_module import _LazyGraphModule
except ImportError:  # pragma: no cover - older torch
    _TracedGraphModule = fx.GraphModule
else:
    class _TracedGraphModule(_LazyGraphModule):
        """The module trace_model returns: its Python code is generated on first call or
        on reading ``.code``, as the analyses only read the graph. Its deep copies - what
        the passes rewrite and hand to users - are plain GraphModules: torch.jit.script
        rejects the lazy class, and its forward has no signature until first called."""

        def __deepcopy__(self, memo):
            new = super().__deepcopy__(memo)
            # the copy's own class (GraphModule gives each instance one) becomes a plain
            # GraphModule's; the instance state of both classes is the same
            new.__class__ = type(type(new).__name__, (fx.GraphModule,), {"__qualname__": "GraphModuleImpl"})
            new.recompile()
            return new

__all__ = ["trace_model", "task_output_nodes", "task_names", "keep_unused_tensors", "module_hooks", "NN_MODULE_KEYS",
           "detach_leaves", "TRACED_THROUGH"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- torch's transformer layers
# torch.nn.TransformerEncoder(Layer) / TransformerDecoder(Layer) are leaves for torch.fx
# (they live in torch.nn) and their forwards cannot be traced anyway: a fast path checks
# tensors in Python. The tracer goes through them with these equivalents of their
# standard (non-fast) path instead, so the graph shows their attention, norms and
# feed-forward layers, each a call_module node of the original submodule.
def _attend(attn, dropout, x, memory, mask, pad, causal):
    return dropout(attn(x, memory, memory, attn_mask=mask, key_padding_mask=pad, need_weights=False,
                        is_causal=bool(causal))[0])


def _feed_forward(layer, x, dropout):
    return dropout(layer.linear2(layer.dropout(layer.activation(layer.linear1(x)))))


def _encoder_layer(layer, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
    def self_attention(x):
        return _attend(layer.self_attn, layer.dropout1, x, x, src_mask, src_key_padding_mask, is_causal)

    x = src
    if layer.norm_first:
        x = x + self_attention(layer.norm1(x))
        return x + _feed_forward(layer, layer.norm2(x), layer.dropout2)
    x = layer.norm1(x + self_attention(x))
    return layer.norm2(x + _feed_forward(layer, x, layer.dropout2))


def _encoder(encoder, src, mask=None, src_key_padding_mask=None, is_causal=None):
    out = src
    for layer in encoder.layers:
        out = layer(out, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal))
    return encoder.norm(out) if encoder.norm is not None else out


def _decoder_layer(layer, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                   memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False):
    def self_attention(x):
        return _attend(layer.self_attn, layer.dropout1, x, x, tgt_mask, tgt_key_padding_mask, tgt_is_causal)

    def cross_attention(x):
        return _attend(layer.multihead_attn, layer.dropout2, x, memory, memory_mask, memory_key_padding_mask,
                       memory_is_causal)

    x = tgt
    if layer.norm_first:
        x = x + self_attention(layer.norm1(x))
        x = x + cross_attention(layer.norm2(x))
        return x + _feed_forward(layer, layer.norm3(x), layer.dropout3)
    x = layer.norm1(x + self_attention(x))
    x = layer.norm2(x + cross_attention(x))
    return layer.norm3(x + _feed_forward(layer, x, layer.dropout3))


def _decoder(decoder, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
             memory_key_padding_mask=None, tgt_is_causal=None, memory_is_causal=False):
    out = tgt
    for layer in decoder.layers:
        out = layer(out, memory, tgt_mask=tgt_mask, memory_mask=memory_mask, tgt_key_padding_mask=tgt_key_padding_mask,
                    memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=bool(tgt_is_causal),
                    memory_is_causal=memory_is_causal)
    return decoder.norm(out) if decoder.norm is not None else out


TRACED_THROUGH = {
    nn.TransformerEncoderLayer: _encoder_layer,
    nn.TransformerEncoder: _encoder,
    nn.TransformerDecoderLayer: _decoder_layer,
    nn.TransformerDecoder: _decoder,
}


class _Tracer(fx.Tracer):
    """A symbolic tracer that records source lines, honours extra leaf modules and goes
    through torch's transformer layers (:data:`TRACED_THROUGH`)."""

    def __init__(self, leaf_modules: Iterable[type] = (), record_stack_traces: bool = True):
        super().__init__()
        self.record_stack_traces = record_stack_traces
        self._extra_leaves = tuple(leaf_modules)
        self.traced_types: Set[type] = set()  # module classes whose forward was traced through

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._extra_leaves and isinstance(m, self._extra_leaves):
            return True
        leaf = super().is_leaf_module(m, module_qualified_name)
        if not leaf:
            self.traced_types.add(type(m))
        return leaf

    def call_module(self, m: nn.Module, forward, args, kwargs):
        through = TRACED_THROUGH.get(type(m))
        if through is not None and not (self._extra_leaves and isinstance(m, self._extra_leaves)):
            return through(m, *args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def trace(self, root, concrete_args=None):
        """The graph, with the forward's no-grad blocks detached where they leave
        (:func:`_detach_no_grad_regions`). fx does not record grad mode: a block's ops
        run here with gradients off and land in the graph like any other, so they are
        marked as they are made; gradients are on around the whole trace, whatever the
        caller's mode, so that only the forward's own blocks are marked."""
        with torch.inference_mode(False), torch.enable_grad():
            graph = super().trace(root, concrete_args)
        self.detached = _detach_no_grad_regions(graph, self.root)
        return graph

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:
        node = self._create_node(kind, target, args, kwargs, name, type_expr)
        if kind in _COMPUTATIONS:
            off = not torch.is_grad_enabled() or torch.is_inference_mode_enabled()
            if (off and _may_carry_grad(node)) or _part_of_no_grad_value(node):
                node.meta[NO_GRAD] = True
        return node

    def _create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:
        """A node whose ``stack_trace`` is the user's frame only (what :mod:`passes.errors`
        and the save files read): torch records and formats the whole Python stack of
        every node, a third of the cost of tracing. Where the quick look cannot name
        the frame torch would end in, torch records the stack as it does."""
        if not self.record_stack_traces or getattr(self, "_record_forward_stack_traces_only", False):
            return super().create_node(kind, target, args, kwargs, name, type_expr)
        self.record_stack_traces = False
        try:
            node = super().create_node(kind, target, args, kwargs, name, type_expr)
        finally:
            self.record_stack_traces = True
        if not node.stack_trace:
            trace = _user_frame_trace(sys._getframe(1))
            if trace is None:  # torch's own recording (proxy.TracerBase.create_node)
                summary = self._filter_traceback_frames(CapturedTraceback.extract().summary())
                trace = "".join(summary.format()).strip() if summary else ""
            if trace:
                node.stack_trace = trace
        return node


#: node.meta key of an op traced while the forward had gradients off (torch.no_grad(),
#: set_grad_enabled(False), inference_mode()).
NO_GRAD = "disparse_fx_no_grad"
_COMPUTATIONS = ("call_function", "call_method", "call_module")


#: Tensor methods whose value is never a tensor (sizes, flags, Python numbers).
_NON_TENSOR_METHODS = frozenset({
    "size", "dim", "ndimension", "numel", "nelement", "item", "tolist", "stride", "element_size",
    "is_contiguous", "is_floating_point", "is_complex", "get_device", "data_ptr", "__len__"})


def _may_carry_grad(node: fx.Node) -> bool:
    """Whether a node traced inside a no-grad block may produce a tensor (only those are
    detached where they leave it): a module call, a torch function or tensor method,
    or Python arithmetic on such a value. Sizes and the numbers computed from them are
    not tensors (``.detach()`` on them would fail)."""
    if node.op == "call_module":
        return True
    if node.op == "call_method":
        return node.target not in _NON_TENSOR_METHODS
    module = getattr(node.target, "__module__", None) or ""
    if node.target is getattr:
        return node.args[1] not in _METADATA
    if node.target is len or module in ("builtins", "math"):
        return False
    if module in ("_operator", "operator"):  # a + b: a tensor iff an operand may be one
        return any(a.meta.get(NO_GRAD) for a in node.all_input_nodes)
    return True


#: Attributes of a tensor that are not tensors.
_METADATA = frozenset({"shape", "dtype", "device", "ndim", "layout", "is_cuda", "requires_grad", "is_leaf",
                       "is_sparse", "is_quantized", "is_meta", "names"})
#: Ops whose value may be a tuple of tensors (torch.return_types or plain tuples): their
#: value is detached leaf by leaf where it leaves a no-grad block whole.
_TUPLE_OPS = frozenset({"chunk", "split", "split_with_sizes", "tensor_split", "unbind", "topk", "sort",
                        "kthvalue", "mode", "aminmax", "unique", "frexp", "svd", "qr",
                        "slogdet", "histogram", "std_mean", "var_mean", "unique_consecutive", "meshgrid",
                        "broadcast_tensors", "lstm", "gru", "rnn_tanh", "rnn_relu"})


def detach_leaves(value: Any) -> Any:
    """``value`` with every tensor in it detached (a tuple or a torch.return_types value
    leaving a no-grad block whole)."""
    return pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, value)


def _part_of_no_grad_value(node: fx.Node) -> bool:
    """``value[i]`` or ``value.values`` of a no-grad value, taken anywhere: still no-grad
    (the element is detached, not the tuple)."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if not node.args[0].meta.get(NO_GRAD):
        return False
    return node.target is operator.getitem or (node.target is getattr and node.args[1] not in _METADATA)


def _may_be_tuple(node: fx.Node, root: nn.Module) -> bool:
    if node.op == "call_module":
        return isinstance(root.get_submodule(node.target), (nn.RNNBase, nn.MultiheadAttention))
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name in _REDUCTIONS_WITH_INDICES:  # x.max(): a tensor; x.max(1): (values, indices)
        return "dim" in node.kwargs or any(isinstance(a, int) and not isinstance(a, bool) for a in node.args[1:2])
    return name in _TUPLE_OPS


#: Reductions that return (values, indices) when given a dim, a tensor otherwise.
_REDUCTIONS_WITH_INDICES = frozenset({"max", "min", "median", "nanmedian"})


def _detach_no_grad_regions(graph: fx.Graph, root: nn.Module) -> int:
    """Give the graph the forward's gradient flow where it turned gradients off.

    torch.fx records the ops of a ``with torch.no_grad():`` block but not the mode, so the
    traced graph would backpropagate through values the user made gradient-free. Every
    value leaving such a block (used by an op traced with gradients on, or returned) is
    detached where it leaves, which gives the same values and the same gradients::

        # forward                              # traced graph
        with torch.no_grad():                  trunk = self.trunk(x)
            h = self.trunk(x)                  detach = trunk.detach()
        return {"a": self.a(h)}                a = self.a(detach)

    Returns the number of detach nodes inserted; the graph is edited in place (it is the
    tracer's fresh graph).
    """
    cut = 0
    for n in list(graph.nodes):
        if not n.meta.get(NO_GRAD):
            continue
        leaving = [u for u in n.users if not u.meta.get(NO_GRAD)]
        if not leaving:
            continue
        with graph.inserting_after(n):
            if _may_be_tuple(n, root):  # detach its tensor leaves, whatever it holds
                detached = graph.call_function(detach_leaves, (n,))
            else:
                detached = graph.call_method("detach", (n,))
        detached.meta["stack_trace"] = n.meta.get("stack_trace")
        for u in leaving:
            u.replace_input_with(n, detached)
        cut += 1
    return cut


def keep_unused_tensors(gm: fx.GraphModule, model: nn.Module) -> int:
    """Give ``gm`` the parameters and buffers of ``model`` that its graph never reads.

    fx's GraphModule copies only the submodules and attributes the graph uses, so an
    unused head or a spare parameter vanished from the compressed and slim models and
    their state_dicts: a checkpoint of the user's model no longer loaded strictly. An
    unused submodule is attached whole (shared, as the used ones are) unless it holds a
    module ``gm`` already has (a second name for a used block: one module under two
    paths breaks ``torch.func.functional_call``) or hooks (code ``save`` refuses); then
    plain Modules hold its tensors, as fx builds the paths of ``get_attr``. A tensor of
    a module fx rebuilt is registered on it, a buffer as persistent as it was. Returns
    the number of tensors added.
    """
    def names(m):
        return {n for n, _ in m.named_parameters(remove_duplicate=False)} | \
            {n for n, _ in m.named_buffers(remove_duplicate=False)}

    def attachable(m: nn.Module) -> bool:
        return not any(id(sub) in present or module_hooks(sub) for sub in m.modules())

    have = names(gm)
    present = {id(m) for m in gm.modules()}
    added = 0
    for kind in ("parameter", "buffer"):
        items = model.named_parameters(remove_duplicate=False) if kind == "parameter" else \
            model.named_buffers(remove_duplicate=False)
        for name, tensor in list(items):
            if name in have:
                continue
            path, _, leaf = name.rpartition(".")
            holder, parts = gm, path.split(".") if path else []
            for i, part in enumerate(parts):
                child = holder._modules.get(part)
                if child is None:  # the first missing level
                    theirs = model.get_submodule(".".join(parts[: i + 1]))
                    if attachable(theirs):
                        holder.add_module(part, theirs)
                        present.update(id(m) for m in theirs.modules())
                        have = names(gm)
                        break
                    child = nn.Module()  # a plain holder: never one of the user's modules
                    holder.add_module(part, child)
                holder = child
            else:
                if kind == "parameter":
                    holder.register_parameter(leaf, tensor)
                else:
                    persistent = leaf not in model.get_submodule(path)._non_persistent_buffers_set
                    holder.register_buffer(leaf, tensor, persistent=persistent)
                have.add(name)
            added += 1
    return added


#: The attributes every nn.Module has (its hook dicts among them).
NN_MODULE_KEYS = frozenset(nn.Module().__dict__)


def module_hooks(m: nn.Module) -> Tuple[str, ...]:
    """The names of ``m``'s non-empty hook dicts (forward, backward, state-dict ...): code
    attached to a module, which ``save`` refuses and :func:`keep_unused_tensors` does not
    carry over."""
    return tuple(sorted(k for k in NN_MODULE_KEYS if "hook" in k and isinstance(m.__dict__.get(k), Mapping)
                        and m.__dict__[k]))


def _user_frame_trace(frame) -> Optional[str]:
    """The innermost user frame of the stack above ``frame`` (not torch's, not this
    module's), formatted as torch formats a stack, "" when torch's recording would
    name no user frame (no ``forward`` call at or above it), or None when the frame's
    source line is unknown (torch's formatting of such a stack is left to torch)."""
    user = None
    while frame is not None:
        code = frame.f_code
        if user is None and _is_user_file(code.co_filename):
            user = (code.co_filename, frame.f_lineno, code.co_name)
        if user is not None and code.co_name == "forward":
            break
        frame = frame.f_back
    else:
        return ""
    path, line, func = user
    text = linecache.getline(path, line).strip()
    if not text:
        return None
    return f'File "{path}", line {line}, in {func}\n    {text}'


@functools.lru_cache(maxsize=None)
def _is_user_file(path: str) -> bool:
    """Whether frames of ``path`` are the user's: not torch's, not exec'd code (torch's
    ``uninteresting_files()`` for stack traces are its own modules and "<string>";
    loading that list costs half a second) and not this module's."""
    if "/torch/" in path.replace("\\", "/") or path == "<string>":
        return False
    return os.path.abspath(path) != _THIS_FILE


_THIS_FILE = os.path.abspath(__file__)


def trace_model(
    model: nn.Module,
    *,
    leaf_modules: Iterable[type] = (),
    concrete_args: Optional[Dict[str, Any]] = None,
) -> fx.GraphModule:
    """Trace ``model`` with torch.fx; a GraphModule is returned as it is.

    The returned GraphModule shares its submodules and parameters with ``model`` (as
    ``torch.fx.symbolic_trace`` does); callers that will modify it copy it first.
    Values the forward computes under ``torch.no_grad()`` are detached where they leave
    that block (:func:`_detach_no_grad_regions`), as fx does not record grad mode.
    Raises :class:`TraceError` naming the failing module and source line, with the
    remedy that fits the failure (unpack a fixed number of values when a traced tensor
    was iterated; ``concrete_args`` or a leaf module for data-dependent control flow).
    """
    if isinstance(model, fx.GraphModule):
        task_output_nodes(model)  # validates the output structure
        return model
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected an nn.Module or fx.GraphModule, got {type(model).__name__}")
    tracer = _Tracer(leaf_modules)
    try:
        with paused_gc():
            graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # noqa: BLE001 - re-raised with context below
        where = _user_frame(exc)
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}"
            + (f"\n  failing code: {where}" if where else "")
            + "\n  what to do: " + _trace_advice(exc)
        ) from exc
    name = model.__class__.__name__
    cut = tracer.detached
    if cut:
        log.info("%s: %d value(s) computed under torch.no_grad() in forward are detached where they leave "
                 "the block (torch.fx does not record grad mode)", name, cut)
    # lazily compiled: the analyses read the graph and never call the traced module, and
    # generating and compiling its Python code is a third of the cost of tracing
    # (densenet121: 31 ms of GraphModule() against 7 ms); reading gm.code or calling gm
    # compiles it as usual
    with paused_gc():
        gm = _TracedGraphModule(tracer.root, graph, name)
    keep_unused_tensors(gm, model)
    task_output_nodes(gm)
    # trace again in the other mode only if some traced code reads the mode
    if _reads_mode(tracer.traced_types | {type(model)}) and \
            _depends_on_mode(model, graph, leaf_modules, concrete_args):
        mode = "train" if model.training else "eval"
        warn(
            f"{name} computes differently in train and eval mode in a way torch.fx fixes at trace time "
            "(functional dropout or stochastic depth called with training=self.training): the traced graph "
            f"is the {mode}-mode graph and stays so after .train() / .eval(). Trace (compress) the model in the "
            "mode it will run in.")
    log.debug("traced %s:\n%s", name, _LazyCode(gm))
    return gm


# (what the tracer's message says, what to do): the first match wins; the last is the default
_TRACE_ADVICE = (
    ("cannot be iterated",
     "a traced tensor was iterated (list(...), a for loop, *args, or unpacking into a number of names the "
     "tracer cannot know). Unpack a fixed number of values instead: a, b = x.chunk(2, 1) (then y = [a, b]), "
     "or index x.chunk(2, 1)[0]. Marking the module a leaf also traces, but its weights are then not pruned."),
    ("cannot be used as inputs to control flow",
     "an if/while or bool() reads a traced tensor (data-dependent control flow). Fix input-dependent flags with "
     "concrete_args={'flag': value}, or move the branch into a submodule and mark it a leaf "
     "(leaf_modules=(ThatModule,)); a leaf's weights are not pruned."),
    ("",
     "mark the module whose forward has data-dependent control flow as a leaf (leaf_modules=(ThatModule,); "
     "its weights are then not pruned), or fix input-dependent arguments with concrete_args={'flag': value}."),
)


def _trace_advice(exc: BaseException) -> str:
    """The remedy that fits the tracer's failure (see _TRACE_ADVICE)."""
    text = str(exc)
    return next(advice for pattern, advice in _TRACE_ADVICE if pattern in text)


def _reads_mode(types: Iterable[type]) -> bool:
    """Whether code of these module classes (methods, properties, nested functions) reads
    an attribute named ``training``: only then can tracing depend on the train/eval mode
    (leaf modules run at call time, so their reads do not count). A helper outside the
    classes that reads a module's flag is not seen."""
    for cls in types:
        for klass in cls.__mro__:
            if klass in (nn.Module, fx.GraphModule, object):
                continue
            for value in vars(klass).values():
                if isinstance(value, property):
                    value = value.fget
                value = getattr(value, "__func__", value)  # static and class methods
                code = getattr(value, "__code__", None)
                if code is not None and _code_reads(code, "training"):
                    return True
    return False


def _code_reads(code, name: str) -> bool:
    if name in code.co_names:
        return True
    return any(_code_reads(c, name) for c in code.co_consts if hasattr(c, "co_names"))


def _depends_on_mode(model: nn.Module, graph: fx.Graph, leaf_modules, concrete_args) -> bool:
    """Whether tracing ``model`` in the other train/eval mode gives other code (the mode
    was read as a Python bool during tracing). The model's modes are restored."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.train(not model.training)
        other = _Tracer(leaf_modules, record_stack_traces=False).trace(model, concrete_args=concrete_args)
    except Exception:  # noqa: BLE001 - the other mode need not trace; nothing to compare
        return False
    finally:
        for m, mode in modes:
            m.training = mode
    return other.python_code("self").src != graph.python_code("self").src


def task_output_nodes(gm: fx.GraphModule) -> Dict[Hashable, fx.Node]:
    """Map each task (dict key, or position for tuple/list outputs) to its output node.

    A single Tensor output is one task named ``0``. Raises :class:`TraceError` for any
    other output structure (nested containers, constants, duplicated tasks).
    """
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    if len(outputs) != 1:
        raise TraceError(f"graph has {len(outputs)} output nodes, expected exactly one")
    result = outputs[0].args[0]
    if isinstance(result, fx.Node):
        pairs: Iterable = [(0, result)]
    elif isinstance(result, Mapping):
        pairs = result.items()
    elif isinstance(result, (tuple, list)):
        pairs = enumerate(result)
    else:
        raise TraceError(
            f"the model returns {type(result).__name__}; expected a dict {{task: Tensor}} "
            "or a tuple/list of Tensors (one per task)"
        )
    mapping: Dict[Hashable, fx.Node] = {}
    for task, node in pairs:
        if not isinstance(node, fx.Node):
            raise TraceError(
                f"output for task {task!r} is {type(node).__name__} ({node!r}), not a tensor "
                "computed by the graph; each task output must be one Tensor"
            )
        mapping[task] = node
    if not mapping:
        raise TraceError("the model returns no task outputs")
    return mapping


def task_names(gm: fx.GraphModule) -> tuple:
    """The tasks of a traced model, in output order."""
    return tuple(task_output_nodes(gm))


def _user_frame(exc: BaseException) -> str:
    """The last traceback frame outside torch: the user's line that failed to trace."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f'File "{f.filename}", line {f.lineno}, in {f.name}: {f.line or ""}'.strip()


class _LazyCode:
    """Formats the generated code only if the DEBUG message is actually emitted."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm

    def __str__(self) -> str:
        return self.gm.code

