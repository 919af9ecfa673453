"""Channel masks: per-channel multiply nodes that make a model compute its slim version.

Removing a channel changes nothing for the channels that stay, except where an op sums
over channels (a conv's or linear's input, a sum over the channel dim): there the
removed channels must contribute nothing. So the masks sit right in front of those
consumers (each one gets ``channel_mask(x, mask)`` = ``x * mask``, the mask broadcast
along the channel dim), and not after the producing conv: a bias, a BatchNorm shift or
an activation would turn zeros back into values before the next conv reads them.

Two more kinds of op read every channel. A LayerNorm (or RMSNorm) over the last dim
takes statistics over its channels: it becomes ``masked_layer_norm(x, keep, ...)``,
which takes them over the kept channels only (the slim LayerNorm's statistics). An
attention module whose heads (internal channels) are removed becomes
:class:`passes.attention.MultiheadAttention` with head masks; an RNN whose hidden units
are removed becomes :class:`passes.rules.rnn.MaskedLSTM` (GRU, RNN), whose recurrence
ignores the removed units. Ops that mix channels in
any other way (softmax over channels, a mean over channels) have their channels pinned
by the analysis, so no mask is needed there. In eval mode the masked model computes,
for every task output, exactly what :func:`passes.slim.slim_channels` computes.

Mask buffers live in the submodule ``channel_masks``, named after the masked node and
dim (``channel_masks.relu_dim1``), so the model deep-copies, saves and trains like any
module. A mask is inserted only where some channel is removed.

>>> import torch, torch.nn as nn
>>> from disparse_fx.passes.channel_groups import find_channel_groups
>>> class Net(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)
...     def forward(self, x):
...         return {"y": self.head(self.bn(self.conv(x)).relu())}
>>> gm = torch.fx.symbolic_trace(Net())
>>> groups = find_channel_groups(gm, (torch.randn(1, 3, 8, 8),))
>>> print(gm.code.strip())  # before
def forward(self, x):
    conv = self.conv(x);  x = None
    bn = self.bn(conv);  conv = None
    relu = bn.relu();  bn = None
    head = self.head(relu);  relu = None
    return {'y': head}
>>> masked = insert_channel_masks(gm, groups, {0: torch.tensor([True, False, True, True])})
>>> print(masked.code.strip())  # after
def forward(self, x):
    conv = self.conv(x);  x = None
    bn = self.bn(conv);  conv = None
    relu = bn.relu();  bn = None
    channel_masks_relu_dim1 = self.channel_masks.relu_dim1
    channel_mask = passes_insert_channel_masks_channel_mask(relu, channel_masks_relu_dim1);  relu = channel_masks_relu_dim1 = None
    head = self.head(channel_mask);  channel_mask = None
    return {'y': head}
>>> masked.channel_masks.relu_dim1.flatten().tolist()
[1.0, 0.0, 1.0, 1.0]

A LayerNorm over tokens' channels, before and after:

>>> class Tokens(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.embed, self.ln, self.out = nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)
...     def forward(self, x):                       # x: (N, L, 3)
...         return {"y": self.out(self.ln(self.embed(x)))}
>>> gm = torch.fx.symbolic_trace(Tokens())
>>> groups = find_channel_groups(gm, (torch.randn(1, 5, 3),))
>>> (group, _), = groups.members_of("ln.weight")     # the LayerNorm's channel group
>>> masked = insert_channel_masks(gm, groups, {group.id: torch.tensor([True, True, False, True])})
>>> print(masked.code.strip())  # doctest: +NORMALIZE_WHITESPACE
def forward(self, x):
    embed = self.embed(x);  x = None
    channel_masks_ln_norm = self.channel_masks.ln_norm
    ln_weight = self.ln.weight
    ln_bias = self.ln.bias
    ln = passes_insert_channel_masks_masked_layer_norm(embed, channel_masks_ln_norm, (4,), ln_weight, ln_bias, 1e-05, 'ln');  embed = channel_masks_ln_norm = ln_weight = ln_bias = None
    channel_masks_ln_dim2 = self.channel_masks.ln_dim2
    channel_mask = passes_insert_channel_masks_channel_mask(ln, channel_masks_ln_dim2);  ln = channel_masks_ln_dim2 = None
    out = self.out(channel_mask);  channel_mask = None
    return {'y': out}
"""
from __future__ import annotations

import copy
import logging
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from .attention import MultiheadAttention, mha_sizes
from .channel_groups import ChannelGroups
from .rules import SlimContext, lookup_channel_rule, op_name, register_channel_rule
from .rules.elementwise import elementwise
from .rules.norm import masked_layer_norm_rule, masked_rms_norm_rule
from .rules.rnn import is_masked_rnn, unmasked_rnn

__all__ = ["insert_channel_masks", "channel_mask", "is_channel_mask", "fold_channel_masks", "MASK_MODULE",
           "masked_layer_norm", "masked_rms_norm", "is_masked_norm"]

log = logging.getLogger(__name__)

MASK_MODULE = "channel_masks"
META_KEY = "disparse_channel_mask"


def channel_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x * mask``: the target of every channel-mask node (kept as one call when retraced)."""
    return x * mask


torch.fx.wrap("channel_mask")
# a model that already holds channel masks can be analysed too: a mask keeps channels
register_channel_rule(channel_mask)(elementwise)


def masked_layer_norm(x: torch.Tensor, keep: torch.Tensor, normalized_shape, weight: Optional[torch.Tensor] = None,
                      bias: Optional[torch.Tensor] = None, eps: float = 1e-5, module: Optional[str] = None) -> torch.Tensor:
    """``layer_norm`` over the last dim with statistics over the kept channels only
    (``keep``: 0/1 per channel), so the kept channels get exactly what the slim model's
    narrower LayerNorm gives them. ``module``: the LayerNorm module this call replaces
    (None for a functional ``layer_norm``), so the pass can be undone. Half and bfloat16
    inputs are normalised in float32, as ``layer_norm`` does (a bfloat16 sum of more than
    256 ones is not exact)."""
    dtype = x.dtype
    x, keep = _stats_precision(x), _stats_precision(keep)
    n = keep.sum()
    mean = (x * keep).sum(-1, keepdim=True) / n
    centred = (x - mean) * keep
    var = (centred * centred).sum(-1, keepdim=True) / n
    y = centred * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.to(dtype)


def _stats_precision(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def masked_rms_norm(x: torch.Tensor, keep: torch.Tensor, normalized_shape, weight: Optional[torch.Tensor] = None,
                    eps: Optional[float] = None, module: Optional[str] = None) -> torch.Tensor:
    """``rms_norm`` over the last dim with the mean square over the kept channels only
    (in float32 for half and bfloat16 inputs, as ``rms_norm`` does)."""
    dtype = x.dtype
    if eps is None:
        eps = torch.finfo(dtype).eps
    x, keep = _stats_precision(x), _stats_precision(keep)
    ms = (x * x * keep).sum(-1, keepdim=True) / keep.sum()
    y = x * keep * torch.rsqrt(ms + eps)
    return (y * weight if weight is not None else y).to(dtype)


torch.fx.wrap("masked_layer_norm")
torch.fx.wrap("masked_rms_norm")
_MASKED_NORMS = (masked_layer_norm, masked_rms_norm)
# a masked model can be analysed too; the shape is restored by fold, so sizes are handled
register_channel_rule(masked_layer_norm, handles_sizes=True)(masked_layer_norm_rule)
register_channel_rule(masked_rms_norm, handles_sizes=True)(masked_rms_norm_rule)


def is_masked_norm(node: fx.Node) -> bool:
    """Whether ``node`` is a LayerNorm / RMSNorm rewritten to masked statistics."""
    return node.op == "call_function" and node.target in _MASKED_NORMS


def is_channel_mask(node: fx.Node) -> bool:
    """Whether ``node`` is a channel-mask multiply inserted by :func:`insert_channel_masks`."""
    return node.op == "call_function" and node.target is channel_mask


def insert_channel_masks(gm: fx.GraphModule, groups: ChannelGroups,
                         keep: Mapping[int, torch.Tensor]) -> fx.GraphModule:
    """A new GraphModule computing ``gm`` with the channels ``keep`` removes zeroed where read.

    Args:
        gm: the GraphModule ``groups`` was found on (it may already hold channel masks:
            they are replaced). Never modified; the result owns deep copies of its modules.
        groups: :func:`passes.channel_groups.find_channel_groups` of ``gm``.
        keep: ``{group_id: bool tensor of the group's size}`` (True = kept); groups left out
            keep every channel. Checked by :meth:`ChannelGroups.keep_vector`.
    """
    flat = groups.keep_vector(keep)
    new = copy.deepcopy(gm)
    fold_channel_masks(new)
    add_channel_masks_(new, groups, flat)
    return new


def fold_channel_masks(gm: fx.GraphModule) -> int:
    """Remove every channel-mask node of ``gm`` IN PLACE (a pass-internal helper); returns
    how many were removed."""
    count = 0
    for node in list(gm.graph.nodes):
        if is_channel_mask(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            count += 1
        elif is_masked_norm(node):
            _restore_norm(gm, node)
            count += 1
    count += _unmask_modules(gm)
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and str(node.target).startswith(MASK_MODULE + ".") and not node.users:
            gm.graph.erase_node(node)
    if hasattr(gm, MASK_MODULE):
        delattr(gm, MASK_MODULE)
    if count:
        gm.recompile()
    return count


def _restore_norm(gm: fx.GraphModule, node: fx.Node) -> None:
    """masked_layer_norm(x, keep, shape, w, b, eps, module=m) -> m(x) or layer_norm(x, shape, w, b, eps).

    The node holds positional arguments only (:func:`_mask_norms` writes it so)."""
    args = list(node.args)
    rms = node.target is masked_rms_norm
    if rms:  # (x, keep, shape, weight, eps, module)
        x, _keep, shape, weight, eps, module = args[:6]
        bias = None
    else:
        x, _keep, shape, weight, bias, eps, module = args[:7]
    if module is not None:
        node.op, node.target, node.args, node.kwargs = "call_module", module, (x,), {}
    elif rms:
        node.target, node.args, node.kwargs = torch.nn.functional.rms_norm, (x, shape, weight, eps), {}
    else:
        node.target, node.args, node.kwargs = torch.nn.functional.layer_norm, (x, shape, weight, bias, eps), {}


def _unmask_modules(gm: fx.GraphModule) -> int:
    """Attention modules carrying head masks, and masked RNNs, get a mask-free twin (same
    parameters)."""
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        if is_masked_rnn(m):
            gm.add_submodule(node.target, unmasked_rnn(m))
            count += 1
            continue
        if isinstance(m, MultiheadAttention) and any(
                getattr(m, b, None) is not None for b in ("head_keep", "qk_dim_keep", "v_dim_keep")):
            h, dqk, dv, scale = mha_sizes(m)
            gm.add_submodule(node.target, MultiheadAttention.rebuild(
                m, num_heads=h, head_dim=dqk, v_head_dim=dv, scale=scale))
            count += 1
    return count


def _mask_norms(gm: fx.GraphModule, groups: ChannelGroups, flat: torch.Tensor, holder: nn.Module,
                nodes: Dict[str, fx.Node], device, dtype) -> int:
    """Rewrite every LayerNorm / RMSNorm over removed channels to masked statistics."""
    count = 0
    for c in groups.normalizations:
        gids = groups.read_channels(c)
        node = nodes.get(c.consumer)
        if gids is None or node is None or bool(flat[gids].all()):
            continue
        name = norm_mask_name(c.consumer)
        holder.register_buffer(name, flat[gids].to(device=device, dtype=dtype))
        rms = _is_rms(gm.get_submodule(node.target)) if node.op == "call_module" else _is_rms_fn(node.target)
        with gm.graph.inserting_before(node):
            keep = gm.graph.get_attr(f"{MASK_MODULE}.{name}")
            if node.op == "call_module":
                m = gm.get_submodule(node.target)
                params = [gm.graph.get_attr(f"{node.target}.{p}") if getattr(m, p, None) is not None else None
                          for p in (("weight",) if rms else ("weight", "bias"))]
                x = node.args[0] if node.args else node.kwargs["input"]
                shape = tuple(m.normalized_shape)
                args = (x, keep, shape, *params, m.eps, node.target)
                node.op = "call_function"
            else:
                a = list(node.args)
                names = ("input", "normalized_shape", "weight", "eps") if rms else \
                    ("input", "normalized_shape", "weight", "bias", "eps")
                vals = [a[i] if i < len(a) else node.kwargs.get(n) for i, n in enumerate(names)]
                if vals[-1] is None and not rms:
                    vals[-1] = 1e-5
                args = (vals[0], keep, *vals[1:], None)
        node.target = masked_rms_norm if rms else masked_layer_norm
        node.args, node.kwargs = args, {}
        count += 1
    return count


def norm_mask_name(consumer: str) -> str:
    """The buffer (in ``channel_masks``) of the keep mask of masked LayerNorm ``consumer``."""
    return f"{consumer}_norm"


def _is_rms(m: nn.Module) -> bool:
    return type(m).__name__ == "RMSNorm"


def _is_rms_fn(fn) -> bool:
    return op_name(fn) == "rms_norm"


def mask_plan(groups: ChannelGroups, flat: torch.Tensor) -> Dict[Tuple[str, int], torch.Tensor]:
    """``{(node name, dim): keep flags of its slices}`` for every masked (node, dim)."""
    plan: Dict[Tuple[str, int], torch.Tensor] = {}
    for c in groups.contractions:
        gids = groups.read_channels(c)
        if gids is None:
            continue
        kept = flat[gids]
        if bool(kept.all()):
            continue
        plan[(c.arg, c.dim)] = kept
    return plan


def add_channel_masks_(gm: fx.GraphModule, groups: ChannelGroups, flat: torch.Tensor) -> int:
    """Insert mask nodes into ``gm`` IN PLACE (``gm`` must hold no masks); returns their count."""
    plan = mask_plan(groups, flat)
    nodes = {n.name: n for n in gm.graph.nodes}
    ref = next((t for t in list(gm.parameters()) + list(gm.buffers()) if t.is_floating_point()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None else torch.float32
    holder = nn.Module()
    names: Dict[Tuple[str, int], str] = {}
    for (arg, dim), kept in plan.items():
        shape = groups.node_shapes[arg]
        view = [1] * len(shape)
        view[dim] = shape[dim]
        name = f"{arg}_dim{dim}"
        holder.register_buffer(name, kept.to(device=device, dtype=dtype).view(view))
        names[(arg, dim)] = name
    gm.add_submodule(MASK_MODULE, holder)
    count = _mask_norms(gm, groups, flat, holder, nodes, device, dtype)
    count += _mask_internal(gm, groups, flat, nodes)
    for c in groups.contractions:
        key = (c.arg, c.dim)
        if key not in names or c.consumer not in nodes or c.arg not in nodes:
            continue
        consumer, arg = nodes[c.consumer], nodes[c.arg]
        if arg not in consumer.all_input_nodes:
            continue  # already masked for another dim, or rewritten
        with gm.graph.inserting_before(consumer):
            attr = gm.graph.get_attr(f"{MASK_MODULE}.{names[key]}")
            masked = gm.graph.call_function(channel_mask, (arg, attr))
        masked.meta[META_KEY] = {"node": c.arg, "dim": c.dim}
        consumer.replace_input_with(arg, masked)
        count += 1
    if not count and not len(holder._buffers):
        delattr(gm, MASK_MODULE)
    gm.graph.lint()
    gm.recompile()
    log.debug("inserted %d channel-mask nodes (%d mask buffers)", count, len(names))
    return count


def _mask_internal(gm: fx.GraphModule, groups: ChannelGroups, flat: torch.Tensor, nodes: Dict[str, fx.Node]) -> int:
    """Ops with removed internal channels (attention heads) get masked by their rule."""
    count = 0
    for name, internal in groups.internal_channels.items():
        node = nodes.get(name)
        if node is None or all(bool(flat[g].all()) for g in internal.values()):
            continue
        rule = lookup_channel_rule(node, gm)
        if rule.mask is None:
            continue  # masked through the weight arguments it contracts (Swin's window attention)
        rule.mask(SlimContext(gm, node, groups, flat))
        count += 1
    return count


def masked_view(gm: fx.GraphModule, groups: ChannelGroups, flat: torch.Tensor) -> fx.GraphModule:
    """A masked GraphModule that SHARES ``gm``'s modules (for internal checks only)."""
    graph = copy.deepcopy(gm.graph)
    view = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    fold_channel_masks(view)
    add_channel_masks_(view, groups, flat)
    return view
