"""Mask insertion: every masked weight is used as ``weight * mask``.

The pass returns a NEW GraphModule (its input is deep-copied, never edited) in which

- a ``call_module`` of Linear / Conv / ConvTranspose becomes the functional op applied
  to ``weight * mask`` (so the multiply is a visible graph node);
- a ``get_attr`` of a masked parameter (functional conv/linear) is followed by a
  multiply that all its users read instead;
- any other leaf module holding a masked parameter is called through
  ``torch.func.functional_call`` with the masked tensor substituted.

Masks are bool buffers registered next to their weight (``conv1.weight`` ->
``conv1.weight_mask``), so the model deep-copies, saves its state_dict and trains
like any module: the effective weight of a pruned element is exactly zero and gets a
zero gradient. Pruned elements of the stored weights are zeroed too. (bool: one byte an
element where a float mask took four - the 3-task resnet50 trunk's masked copy holds
119 MiB instead of 189, benchmarks/results/compress_cost_memory.md; ``weight * mask``
promotes the mask to the weight's dtype, and ``model.half()`` and friends leave it alone.)

>>> import torch, torch.nn as nn
>>> from disparse_fx.passes.trace import trace_model
>>> class Net(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.fc = nn.Linear(3, 2)
...     def forward(self, x):
...         return {"y": self.fc(x)}
>>> gm = trace_model(Net())
>>> print(gm.code.strip())  # before
def forward(self, x):
    fc = self.fc(x);  x = None
    return {'y': fc}
>>> masked = insert_masks(gm, {"fc.weight": torch.tensor([[1, 0, 1], [0, 1, 1]]).bool()})
>>> print(masked.code.strip())  # after
def forward(self, x):
    fc_weight = self.fc.weight
    fc_weight_mask = self.fc.weight_mask
    mul = fc_weight * fc_weight_mask;  fc_weight = fc_weight_mask = None
    fc_bias = self.fc.bias
    linear = torch._C._nn.linear(x, mul, fc_bias);  x = mul = fc_bias = None
    return {'y': linear}
>>> bool(masked.fc.weight.detach()[0, 1] == 0), "weight_mask" in dict(gm.fc.named_buffers())
(True, False)
"""
from __future__ import annotations

import copy
import logging
import operator
from typing import Callable, Dict, List, Mapping, Type

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .errors import DisparseValueError, PostconditionError
from .ownership import parameter_uses

__all__ = ["insert_masks", "fold_masks", "mask_buffer_name", "masked_params", "MASKED_FORWARD_RULES",
           "register_masked_forward"]

log = logging.getLogger(__name__)

MASK_SUFFIX = "_mask"

# module type -> rule(graph, module_path, module, input_node, weight_nodes) -> output node,
# where weight_nodes maps the module's parameter names to the node holding its
# (possibly masked) value. One line per op kind: `module(x)` -> `F.op(x, w * m, ...)`.
MaskedForwardRule = Callable[[fx.Graph, nn.Module, fx.Node, Dict[str, fx.Node]], fx.Node]
MASKED_FORWARD_RULES: Dict[Type[nn.Module], MaskedForwardRule] = {}


def register_masked_forward(*module_types: Type[nn.Module]):
    """Register how a module type is expressed functionally on (masked) parameter nodes."""

    def deco(rule: MaskedForwardRule) -> MaskedForwardRule:
        for t in module_types:
            MASKED_FORWARD_RULES[t] = rule
        return rule

    return deco


@register_masked_forward(nn.Linear)
def _linear(g, m, x, w):  # linear(x) -> F.linear(x, weight * mask, bias)
    return g.call_function(F.linear, (x, w["weight"], w.get("bias")))


def _conv_rule(fn):
    def rule(g, m, x, w):  # conv(x) -> F.convNd(x, weight * mask, bias, ...)
        padding = m.padding
        if m.padding_mode != "zeros":  # the module pads explicitly, then convolves unpadded
            x = g.call_function(F.pad, (x, m._reversed_padding_repeated_twice), {"mode": m.padding_mode})
            padding = 0
        return g.call_function(fn, (x, w["weight"], w.get("bias"), m.stride, padding, m.dilation, m.groups))

    return rule


def _conv_transpose_rule(fn):
    def rule(g, m, x, w):  # deconv(x) -> F.conv_transposeNd(x, weight * mask, bias, ...)
        return g.call_function(
            fn, (x, w["weight"], w.get("bias"), m.stride, m.padding, m.output_padding, m.groups, m.dilation)
        )

    return rule


for _t, _fn in ((nn.Conv1d, F.conv1d), (nn.Conv2d, F.conv2d), (nn.Conv3d, F.conv3d)):
    register_masked_forward(_t)(_conv_rule(_fn))
for _t, _fn in ((nn.ConvTranspose1d, F.conv_transpose1d), (nn.ConvTranspose2d, F.conv_transpose2d),
                (nn.ConvTranspose3d, F.conv_transpose3d)):
    register_masked_forward(_t)(_conv_transpose_rule(_fn))


def mask_buffer_name(param_name: str) -> str:
    """``'layer1.0.conv1.weight'`` -> ``'layer1.0.conv1.weight_mask'``."""
    return param_name + MASK_SUFFIX


def masked_params(gm: fx.GraphModule) -> Dict[str, torch.Tensor]:
    """{param name: mask buffer} of a GraphModule produced by :func:`insert_masks`."""
    params = dict(gm.named_parameters(remove_duplicate=False))
    return {
        name[: -len(MASK_SUFFIX)]: buf
        for name, buf in gm.named_buffers()
        if name.endswith(MASK_SUFFIX) and name[: -len(MASK_SUFFIX)] in params
    }


def insert_masks(gm: fx.GraphModule, masks: Mapping[str, torch.Tensor]) -> fx.GraphModule:
    """Return a copy of ``gm`` in which each parameter named in ``masks`` is used masked.

    ``masks``: {param name (as in ``gm.named_parameters()``): bool keep-mask of the
    parameter's shape}. Raises DisparseValueError for an unknown name or a bad shape.
    """
    out = copy.deepcopy(gm)
    params = dict(out.named_parameters(remove_duplicate=False))
    for name, mask in masks.items():
        if name not in params:
            raise DisparseValueError(
                f"mask given for '{name}', which is not a parameter of the model; "
                f"parameters are e.g. {list(params)[:5]}"
            )
        if tuple(mask.shape) != tuple(params[name].shape):
            raise DisparseValueError(
                f"mask for '{name}' has shape {tuple(mask.shape)}, the parameter has "
                f"{tuple(params[name].shape)}"
            )
    # Register buffers and zero the pruned weights.
    id_to_mask: Dict[int, str] = {}
    for name, mask in masks.items():
        p = params[name]
        owner_path, _, leaf = name.rpartition(".")
        owner = out.get_submodule(owner_path)
        buf = mask.to(device=p.device, dtype=torch.bool, copy=True)
        owner.register_buffer(leaf + MASK_SUFFIX, buf)
        with torch.no_grad():
            p.mul_(buf)
        id_to_mask[id(p)] = name

    graph = out.graph
    uses = parameter_uses(out)
    touched = {n for name in masks for n in uses.get(name, ())}
    n_mul = 0
    for node in list(graph.nodes):
        if node.name not in touched:
            continue
        if node.op == "get_attr":
            n_mul += _mask_get_attr(out, node, id_to_mask)
        elif node.op == "call_module":
            n_mul += _mask_call_module(out, node, id_to_mask)
    graph.eliminate_dead_code()
    graph.lint()
    out.recompile()
    _check_postconditions(out, [name for name in masks if uses.get(name)])
    log.debug("insert_masks: %d masked parameters, %d multiply nodes", len(masks), n_mul)
    return out


def fold_masks(gm: fx.GraphModule) -> fx.GraphModule:
    """The inverse of :func:`insert_masks`: a copy with every ``w * mask`` folded into ``w``.

    Each mask is multiplied into its weight, the multiply nodes are removed, and the
    mask buffers are deleted; ops that were made functional stay functional. The result
    computes exactly what ``gm`` computes (pruned weights are stored as zeros).

    >>> import torch, torch.nn as nn
    >>> from disparse_fx.passes.trace import trace_model
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(2, 2)
    ...     def forward(self, x):
    ...         return {"y": self.fc(x)}
    >>> masked = insert_masks(trace_model(Net()), {"fc.weight": torch.eye(2).bool()})
    >>> print(fold_masks(masked).code.strip())
    def forward(self, x):
        fc_weight = self.fc.weight
        fc_bias = self.fc.bias
        linear = torch._C._nn.linear(x, fc_weight, fc_bias);  x = fc_weight = fc_bias = None
        return {'y': linear}
    """
    out = copy.deepcopy(gm)
    graph = out.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not operator.mul or len(node.args) != 2:
            continue
        weight, mask = node.args
        if not (isinstance(mask, fx.Node) and mask.op == "get_attr" and str(mask.target).endswith(MASK_SUFFIX)
                and isinstance(weight, fx.Node) and weight.op == "get_attr"):
            continue
        with torch.no_grad():
            out.get_parameter(weight.target).mul_(out.get_buffer(mask.target))
        node.replace_all_uses_with(weight)
        graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "get_attr" and str(node.target).endswith(MASK_SUFFIX) and not node.users:
            graph.erase_node(node)
    for name in list(masked_params(out)):
        owner_path, _, leaf = name.rpartition(".")
        delattr(out.get_submodule(owner_path), leaf + MASK_SUFFIX)
    graph.lint()
    out.recompile()
    left = [n.name for n in graph.nodes if n.op == "get_attr" and str(n.target).endswith(MASK_SUFFIX)]
    if left:
        raise PostconditionError(f"fold_masks: mask nodes {left} are still read by the graph")
    return out


def _mask_node(graph: fx.Graph, weight: fx.Node, param_name: str) -> fx.Node:
    mask = graph.get_attr(mask_buffer_name(param_name))
    mask.meta.update(weight.meta)
    mul = graph.call_function(operator.mul, (weight, mask))
    mul.meta.update(weight.meta)
    return mul


def _mask_get_attr(gm: fx.GraphModule, node: fx.Node, id_to_mask: Mapping[int, str]) -> int:
    obj = gm.get_parameter(node.target)
    name = id_to_mask.get(id(obj))
    if name is None:
        return 0
    with gm.graph.inserting_after(node):
        mask = gm.graph.get_attr(mask_buffer_name(name))
    with gm.graph.inserting_after(mask):
        mul = gm.graph.call_function(operator.mul, (node, mask))
    mask.meta.update(node.meta)
    mul.meta.update(node.meta)
    node.replace_all_uses_with(mul, delete_user_cb=lambda user: user is not mul)
    return 1


def _mask_call_module(gm: fx.GraphModule, node: fx.Node, id_to_mask: Mapping[int, str]) -> int:
    module = gm.get_submodule(node.target)
    graph = gm.graph
    with graph.inserting_before(node):
        weights: Dict[str, fx.Node] = {}
        n_mul = 0
        for pname, p in module.named_parameters(recurse=True):
            qual = f"{node.target}.{pname}"
            w = graph.get_attr(qual)
            w.meta.update(node.meta)
            masked_name = id_to_mask.get(id(p))
            if masked_name is not None:
                w = _mask_node(graph, w, masked_name)
                n_mul += 1
            weights[pname] = w
        rule = MASKED_FORWARD_RULES.get(type(module))
        if rule is not None and len(node.args) == 1 and not node.kwargs:
            new = rule(graph, module, node.args[0], weights)
        else:
            # Generic path: call the module itself with the masked tensors swapped in.
            mod_node = graph.get_attr(node.target)
            overrides = {k: v for k, v in weights.items() if id(module.get_parameter(k)) in id_to_mask}
            new = graph.call_function(
                torch.func.functional_call, (mod_node, overrides, tuple(node.args), dict(node.kwargs))
            )
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return n_mul


def _check_postconditions(gm: fx.GraphModule, expected_reads: List[str]) -> None:
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    unread = [name for name in expected_reads if mask_buffer_name(name) not in read]
    if unread:
        raise PostconditionError(f"insert_masks: the masks of {unread} were registered but no node reads them")
