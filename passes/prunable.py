"""Which parameters are prunable by default, read off the graph.

Following the method (only conv/linear weights are pruned; biases and normalisation
parameters never are), a parameter is prunable by default when it is

- the ``weight`` of a Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear module that the
  graph calls, or
- read through ``get_attr`` and used by a functional conv / conv_transpose / linear /
  matmul only as its weight operand (a functional weight).

>>> import torch, torch.nn as nn, torch.nn.functional as F
>>> from passes.trace import trace_model
>>> class Net(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
...         self.kernel = nn.Parameter(torch.randn(4, 4, 1, 1))
...     def forward(self, x):
...         return {"y": F.conv2d(self.bn(self.conv(x)), self.kernel)}
>>> sorted(default_prunable_params(trace_model(Net())))
['conv.weight', 'kernel']
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .ownership import parameter_uses

__all__ = ["default_prunable_params", "PRUNABLE_MODULE_TYPES", "FUNCTIONAL_WEIGHT_OPS"]

PRUNABLE_MODULE_TYPES: Tuple[type, ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear,
)

# functional op -> position of its weight argument
FUNCTIONAL_WEIGHT_OPS: Dict[object, int] = {
    F.conv1d: 1, F.conv2d: 1, F.conv3d: 1,
    F.conv_transpose1d: 1, F.conv_transpose2d: 1, F.conv_transpose3d: 1,
    F.linear: 1,
    torch.conv1d: 1, torch.conv2d: 1, torch.conv3d: 1,
    torch.matmul: 1, torch.mm: 1, torch.bmm: 1,
}


def default_prunable_params(gm: fx.GraphModule, reference: Optional[nn.Module] = None) -> Tuple[str, ...]:
    """Names (canonical, see :func:`parameter_uses`) of the default-prunable parameters."""
    uses = parameter_uses(gm, reference)
    nodes = {n.name: n for n in gm.graph.nodes}
    out = []
    for name, users in uses.items():
        if users and all(_is_weight_use(gm, nodes[u], name) for u in users):
            out.append(name)
    return tuple(out)


def _is_weight_use(gm: fx.GraphModule, node: fx.Node, param_name: str) -> bool:
    leaf = param_name.rpartition(".")[2]
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), PRUNABLE_MODULE_TYPES) and leaf == "weight"
    # get_attr: every user must consume the value as the weight of a conv/linear op.
    if not node.users:
        return False
    for user in node.users:
        pos = FUNCTIONAL_WEIGHT_OPS.get(user.target) if user.op == "call_function" else None
        if user.op == "call_method" and user.target == "matmul":
            pos = 1
        if pos is None:
            return False
        weight = user.args[pos] if len(user.args) > pos else user.kwargs.get("weight")
        if weight is not node:
            return False
    return True
