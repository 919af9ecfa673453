"""Which parameters are prunable by default, read off the graph.

Following the method (only conv/linear weights are pruned; biases and normalisation
parameters never are), a parameter is prunable by default when it is

- the ``weight`` of a Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear module that the
  graph calls, or
- an input projection weight of ``nn.MultiheadAttention`` (``in_proj_weight``, or
  ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight``; its ``out_proj`` is a
  Linear), or
- read through ``get_attr`` and used by a functional conv / conv_transpose / linear /
  matmul only as its weight operand (a functional weight; Swin's window attention
  takes two: ``qkv_weight`` and ``proj_weight``).

>>> import torch, torch.nn as nn, torch.nn.functional as F
>>> from disparse_fx.passes.trace import trace_model
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

import re
from typing import Dict, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .attention import MultiheadAttention, shifted_window_attention
from .ownership import parameter_uses
from .rules.rnn import plain_rnn_type

__all__ = ["default_prunable_params", "unpruned_weights", "PRUNABLE_MODULE_TYPES", "FUNCTIONAL_WEIGHT_OPS"]

PRUNABLE_MODULE_TYPES: Tuple[type, ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear,
)

# functional op -> positions of its weight arguments
FUNCTIONAL_WEIGHT_OPS: Dict[object, Tuple[int, ...]] = {
    F.conv1d: (1,), F.conv2d: (1,), F.conv3d: (1,),
    F.conv_transpose1d: (1,), F.conv_transpose2d: (1,), F.conv_transpose3d: (1,),
    F.linear: (1,),
    torch.conv1d: (1,), torch.conv2d: (1,), torch.conv3d: (1,),
    torch.matmul: (1,), torch.mm: (1,), torch.bmm: (1,),
}
# the ATen ops of a graph captured by torch.export (passes.capture): addmm(bias, x, weight)
_ATEN = torch.ops.aten
FUNCTIONAL_WEIGHT_OPS.update({_ATEN.linear.default: (1,), _ATEN.addmm.default: (2,), _ATEN.matmul.default: (1,),
                              _ATEN.mm.default: (1,), _ATEN.bmm.default: (1,)})
for _packet in ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):
    _op = getattr(_ATEN, _packet)
    FUNCTIONAL_WEIGHT_OPS.update({getattr(_op, o): (1,) for o in _op.overloads()})
# Swin's window attention: (input, qkv_weight, proj_weight, ...)
_WINDOW_ATTENTION_WEIGHTS = ("qkv_weight", "proj_weight")


def _register_window_attention() -> None:
    targets = [shifted_window_attention]
    try:
        from torchvision.models.swin_transformer import shifted_window_attention as tv_swa
        targets.append(tv_swa)
    except Exception:  # noqa: BLE001 - torchvision is optional
        pass
    for t in targets:
        FUNCTIONAL_WEIGHT_OPS[t] = (1, 2)


_register_window_attention()
_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


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
        mod = gm.get_submodule(node.target)
        if isinstance(mod, (nn.MultiheadAttention, MultiheadAttention)):
            return param_name.startswith(node.target + ".") and param_name[len(node.target) + 1:] in _MHA_WEIGHTS
        return isinstance(mod, PRUNABLE_MODULE_TYPES) and leaf == "weight"
    # get_attr: every user must consume the value as the weight of a conv/linear op.
    if not node.users:
        return False
    for user in node.users:
        positions = FUNCTIONAL_WEIGHT_OPS.get(user.target) if user.op == "call_function" else None
        if user.op == "call_method" and user.target == "matmul":
            positions = (1,)
        if positions is None:
            return False
        names = _WINDOW_ATTENTION_WEIGHTS if len(positions) == 2 else ("weight",)
        weights = [user.args[p] if len(user.args) > p else user.kwargs.get(n) for p, n in zip(positions, names)]
        if node not in weights:
            return False
    return True


def unpruned_weights(gm: fx.GraphModule, prunable: Tuple[str, ...],
                     reference: Optional[nn.Module] = None) -> Dict[str, str]:
    """Conv / ConvTranspose / Linear weights and RNN weight matrices the graph uses that
    are not in ``prunable``, each with the reason read off the graph: ``{name: reason}``.

    The default filter only accepts weights it can see used as weights; a leaf module
    (``leaf_modules=``, or a type the tracer does not enter) hides its layers inside one
    ``call_module`` node, so its weights stay dense. An ``nn.LSTM`` / ``nn.GRU`` /
    ``nn.RNN`` is such a node too: its ``weight_ih_l*`` / ``weight_hh_l*`` / ``weight_hr_l*``
    are never element-pruned by default (channel granularity removes its hidden units).
    Callers report them so a missed weight is never silent.

    >>> import torch.nn as nn
    >>> from disparse_fx.passes.trace import trace_model
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         return self.fc(x)
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.block, self.gru, self.head = Block(), nn.GRU(4, 4), nn.Linear(4, 2)
    ...     def forward(self, x):
    ...         return {"y": self.head(self.gru(self.block(x))[0])}
    >>> gm = trace_model(Net(), leaf_modules=(Block,))
    >>> for name, why in unpruned_weights(gm, default_prunable_params(gm)).items():
    ...     print(f"{name}: {why}")
    block.fc.weight: inside leaf module 'block' (Block), which the graph calls as one op
    gru.weight_ih_l0: nn.GRU weights are not element-pruned (channel granularity removes hidden units)
    gru.weight_hh_l0: nn.GRU weights are not element-pruned (channel granularity removes hidden units)
    """
    root = reference if reference is not None else gm
    modules = dict(root.named_modules())
    nodes = {n.name: n for n in gm.graph.nodes}
    chosen = set(prunable)
    out: Dict[str, str] = {}
    for name, users in parameter_uses(gm, reference).items():
        owner, _, leaf = name.rpartition(".")
        if not users or name in chosen or not _is_layer_weight(modules.get(owner), leaf):
            continue
        reasons = []
        for u in users:
            node = nodes[u]
            called = gm.get_submodule(node.target) if node.op == "call_module" else None
            if isinstance(called, nn.RNNBase) and owner == node.target:
                reasons.append(f"nn.{plain_rnn_type(called).__name__} weights are not element-pruned "
                               f"(channel granularity removes hidden units)")
            elif called is not None and not isinstance(called, PRUNABLE_MODULE_TYPES):
                reasons.append(f"inside leaf module '{node.target}' ({type(called).__name__}), "
                               f"which the graph calls as one op")
            elif not _is_weight_use(gm, node, name):
                reasons.append(f"also used by node '{node.name}' ({node.op} {getattr(node.target, '__name__', node.target)}), "
                               f"not as a conv / linear weight")
        out[name] = "; ".join(dict.fromkeys(reasons)) or "not accepted as a weight by every use"
    return out


_RNN_WEIGHT = re.compile(r"weight_(ih|hh|hr)_l\d+(_reverse)?")


def _is_layer_weight(module: Optional[nn.Module], leaf: str) -> bool:
    """Whether ``module``'s parameter ``leaf`` is a layer's weight matrix: a conv's /
    linear's ``weight``, an RNN's ``weight_ih_l*`` / ``weight_hh_l*`` / ``weight_hr_l*``."""
    if isinstance(module, nn.RNNBase):
        return _RNN_WEIGHT.fullmatch(leaf) is not None
    return isinstance(module, PRUNABLE_MODULE_TYPES) and leaf == "weight"

