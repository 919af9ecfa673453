"""Slimming: rebuild a GraphModule with the removed channels physically gone.

:func:`slim_channels` slices every member parameter and buffer of the channel groups
(conv weights on both dims, biases, BatchNorm weights and running stats, Linear input
blocks after a flatten, ...), lets each op's rule fix its module attributes and literal
arguments (``in_channels``, ``groups`` of depthwise convs, ``num_groups`` of group
norms, ``view`` sizes, ``split`` sizes, slice bounds), folds channel-mask nodes away and
removes dead code. It then checks, in code, that no mask node is left, that the graph
lints, and that in eval mode every output of the slim model matches the masked model
(:func:`passes.insert_channel_masks.insert_channel_masks`) on random inputs within
``1e-4`` of the output's scale - on the models' device, with TF32 off, in float32 (or
float64 copies for bfloat16 / float16 weights: :func:`check_parity`), so it measures
the rewrite and not the kernels' precision. Parameters keep their device and dtype.

>>> import torch, torch.nn as nn
>>> from disparse_fx.passes.channel_groups import find_channel_groups
>>> class Net(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
...         self.a, self.b = nn.Conv2d(8, 2, 1), nn.Linear(8, 3)
...     def forward(self, x):
...         h = self.bn(self.conv(x)).relu()
...         return {"a": self.a(h), "b": self.b(h.mean((2, 3)))}
>>> gm = torch.fx.symbolic_trace(Net())
>>> groups = find_channel_groups(gm, (torch.randn(2, 3, 8, 8),))
>>> slim = slim_channels(gm, groups, {0: torch.arange(8) % 2 == 0})
>>> slim.conv, slim.bn.num_features, slim.a, slim.b
(Conv2d(3, 4, kernel_size=(3, 3), stride=(1, 1)), 4, Conv2d(4, 2, kernel_size=(1, 1), stride=(1, 1)), Linear(in_features=4, out_features=3, bias=True))
>>> gm.conv.out_channels   # the input is untouched
8
"""
from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from .channel_groups import ChannelGroups
from .errors import DisparseValueError, PostconditionError
from .insert_channel_masks import (MASK_MODULE, fold_channel_masks, is_channel_mask, is_masked_norm,
                                   mask_plan, masked_view)
from .rules import SlimContext, describe, lookup_channel_rule  # SlimContext: re-exported (it lives with the rules)

__all__ = ["slim_channels", "slim", "channels_emptied_by", "keep_tied_names", "SlimContext", "check_parity",
           "full_precision", "parity_dtype"]

log = logging.getLogger(__name__)

PASS_NAME = "slim_channels"


def slim_channels(gm: fx.GraphModule, groups: ChannelGroups, keep: Mapping[int, torch.Tensor], *,
                  check: bool = True, tolerance: float = 1e-4) -> fx.GraphModule:
    """A new GraphModule with the channels ``keep`` removes physically gone.

    Args:
        gm: the GraphModule ``groups`` was found on, or its
            :func:`~passes.insert_channel_masks.insert_channel_masks` output (its masks
            must agree with ``keep``). Never modified. To slim a model whose weights were
            masked element-wise, apply the masks to the weights (or keep the mask
            buffers: they are sliced with their weights) and pass
            ``keep = channels_emptied_by(groups, masks)``.
        groups: :func:`passes.channel_groups.find_channel_groups` of ``gm``.
        keep: ``{group_id: bool tensor}`` (True = kept); groups left out keep everything.
        check: run the postconditions (no mask node, ``graph.lint()``, parity with the
            masked model in eval mode within ``tolerance`` x output scale, computed as
            :func:`check_parity` says: TF32 off, float32 or float64 copies).
        tolerance: a number in (0, 1): the largest relative difference the parity check
            accepts.

    Raises :class:`DisparseValueError` for a bad ``keep``, :class:`PostconditionError`
    (naming this pass) if a postcondition fails.
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < 1:
        raise DisparseValueError(f"tolerance must be a number in (0, 1), got {tolerance!r}")
    flat = groups.keep_vector(keep)
    had_masks = any(is_channel_mask(n) or is_masked_norm(n) for n in gm.graph.nodes)
    if had_masks:
        _check_masks_agree(gm, groups, flat)
    new = copy.deepcopy(gm)
    fold_channel_masks(new)
    _slice_members(new, groups, flat)
    _run_hooks(new, groups, flat)
    _eliminate_dead_code(new)
    named = [*new.named_parameters(remove_duplicate=False), *new.named_buffers(remove_duplicate=False)]
    new.delete_all_unused_submodules()
    keep_tied_names(new, named)  # a tied weight's names the graph does not read
    new.recompile()
    if check:
        leftover = [n.name for n in new.graph.nodes if is_channel_mask(n) or is_masked_norm(n)]
        if leftover:
            raise PostconditionError(f"{PASS_NAME}: mask nodes left in the slim graph: {leftover}")
        try:
            new.graph.lint()
        except Exception as exc:  # noqa: BLE001
            raise PostconditionError(f"{PASS_NAME}: the slim graph does not lint: {exc}") from exc
        reference = gm if had_masks else masked_view(gm, groups, flat)
        check_parity(reference, new, groups, tolerance=tolerance, what=PASS_NAME)
    log.debug("slimmed %d -> %d parameters", _numel(gm.parameters()), _numel(new.parameters()))
    return new


#: The name the design documents use.
slim = slim_channels


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def _check_masks_agree(gm: fx.GraphModule, groups: ChannelGroups, flat: torch.Tensor) -> None:
    plan = mask_plan(groups, flat)
    holder = getattr(gm, MASK_MODULE, None)
    present = dict(holder.named_buffers()) if holder is not None else {}
    for (arg, dim), kept in plan.items():
        buf = present.get(f"{arg}_dim{dim}")
        if buf is None or not torch.equal(buf.detach().reshape(-1).cpu() != 0, kept):
            raise DisparseValueError(
                f"the channel masks of the given model do not match keep at node '{arg}' dim {dim}; "
                f"pass the unmasked model, or the output of insert_channel_masks with this keep")


def _slice_members(gm: fx.GraphModule, groups: ChannelGroups, flat: torch.Tensor) -> None:
    owners: Dict[int, List[Tuple[nn.Module, str, bool]]] = {}
    for mod in gm.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((mod, name, True))
        for name, b in mod._buffers.items():
            if b is not None:
                owners.setdefault(id(b), []).append((mod, name, False))
    for name in groups.param_shapes:
        try:
            t = gm.get_parameter(name)
        except AttributeError:
            t = gm.get_buffer(name)
        new_t = t.detach()
        changed = False
        for dim, gids in sorted(groups.slice_channels(name).items()):
            kept = flat[gids]
            if bool(kept.all()):
                continue
            idx = kept.nonzero().flatten().to(new_t.device)
            new_t = new_t.index_select(dim, idx)
            changed = True
        if not changed:
            continue
        new_t = new_t.clone()
        if isinstance(t, nn.Parameter):
            new_t = nn.Parameter(new_t, requires_grad=t.requires_grad)
        for mod, attr, is_param in owners.get(id(t), []):  # tied weights stay tied
            if is_param:
                mod._parameters[attr] = new_t
            else:
                mod._buffers[attr] = new_t


def _touched(node: fx.Node, groups: ChannelGroups, flat: torch.Tensor) -> bool:
    def removed(ch) -> bool:
        if isinstance(ch, Mapping):
            return any(not bool(flat[g].all()) for g in ch.values())
        if isinstance(ch, (tuple, list)):
            return any(removed(c) for c in ch)
        return False

    if removed(groups.node_channels.get(node.name)):
        return True
    if any(not bool(flat[g].all()) for g in groups.internal_channels.get(node.name, {}).values()):
        return True
    return any(removed(groups.node_channels.get(n.name)) or n.name in groups.size_dependent
               for n in node.all_input_nodes)


def _run_hooks(gm: fx.GraphModule, groups: ChannelGroups, flat: torch.Tensor) -> None:
    for node in list(gm.graph.nodes):
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        if node.name not in groups.node_channels or node.name in groups.unknown_nodes or \
                not _touched(node, groups, flat):
            continue  # an op kept whole for lack of a rule has nothing to adapt
        rule = lookup_channel_rule(node, gm)
        if rule.slim is None:
            continue
        try:
            rule.slim(SlimContext(gm, node, groups, flat))
        except Exception as exc:
            raise PostconditionError(
                f"{PASS_NAME}: the slim hook of rule {rule.name} failed on {describe(node, gm)}: "
                f"{type(exc).__name__}: {exc}") from exc


def _impure(node: fx.Node) -> bool:
    if node.op in ("placeholder", "output"):
        return True
    if node.op in ("call_method", "call_function"):
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.startswith("__") or node.kwargs.get("inplace"):
            return True
        if node.op == "call_function":
            return node.is_impure()
    if node.op == "call_module":
        return node.is_impure()
    return False


def _eliminate_dead_code(gm: fx.GraphModule) -> None:
    gm.graph.eliminate_dead_code(is_impure_node=_impure)


# ----------------------------------------------------------------------------- parity
@contextlib.contextmanager
def _eval_mode(*modules: nn.Module) -> Iterator[None]:
    saved = [(m, m.training) for mod in modules for m in mod.modules()]
    try:
        for mod in modules:
            mod.eval()
        yield
    finally:
        for m, mode in saved:
            m.training = mode


def _precision_knobs() -> List[Tuple[Any, Any]]:
    """``(parent, leaf)`` pairs of the per-backend, per-op ``fp32_precision`` settings of
    torch >= 2.9 (none before): a leaf set to ``"none"`` inherits its parent's value (the
    backend's, then the generic one), and reading it reports the inherited value."""
    b = torch.backends
    if not hasattr(b, "fp32_precision"):
        return []
    pairs = [(b.cudnn, getattr(b.cuda, "matmul", None))]
    for backend in (b.cudnn, b.mkldnn):
        pairs += [(backend, getattr(backend, op, None)) for op in ("matmul", "conv", "rnn")]
    return [(parent, leaf) for parent, leaf in pairs if leaf is not None and hasattr(leaf, "fp32_precision")]


def _read(getter: Any) -> Any:
    """A legacy precision flag, or None where torch refuses to read it (it raises when the
    legacy and the torch >= 2.9 settings were mixed)."""
    try:
        return getter()
    except RuntimeError:
        return None


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """float32 matmuls and convolutions in full IEEE precision inside the block (TF32 off on
    cuBLAS and cuDNN, no bf16/TF32 in oneDNN), every setting restored afterwards whatever
    happens. PyTorch runs cuDNN convolutions in TF32 by default on Ampere and later GPUs:
    a relative error near 1e-3 that has nothing to do with what a graph rewrite changed.

    The legacy flags (``torch.backends.cuda.matmul.allow_tf32``,
    ``torch.backends.cudnn.allow_tf32``, ``torch.set_float32_matmul_precision``) and, on
    torch >= 2.9, every per-op ``fp32_precision`` are set together, so torch never sees
    the two APIs disagree (it raises when they do). A per-op setting that inherited its
    backend's value before the block inherits it again afterwards.

    >>> before = torch.backends.cudnn.allow_tf32
    >>> with full_precision():
    ...     torch.backends.cudnn.allow_tf32
    False
    >>> torch.backends.cudnn.allow_tf32 == before
    True
    """
    knobs = _precision_knobs()
    saved_new = [(parent.fp32_precision, leaf.fp32_precision) for parent, leaf in knobs]
    saved_matmul = _read(torch.get_float32_matmul_precision)
    saved_cudnn = _read(lambda: torch.backends.cudnn.allow_tf32)
    try:
        if saved_matmul is not None:
            torch.set_float32_matmul_precision("highest")  # also sets cuBLAS' legacy allow_tf32
        if saved_cudnn is not None:
            torch.backends.cudnn.allow_tf32 = False
        for _, leaf in knobs:
            leaf.fp32_precision = "ieee"
        yield
    finally:
        if saved_matmul is not None:
            torch.set_float32_matmul_precision(saved_matmul)
        if saved_cudnn is not None:
            torch.backends.cudnn.allow_tf32 = saved_cudnn
        for (_, leaf), (parent_value, value) in zip(knobs, saved_new):
            leaf.fp32_precision = "none" if value == parent_value else value


def parity_dtype(*models: nn.Module) -> torch.dtype:
    """The dtype :func:`check_parity` computes in: float32 when every floating parameter
    and buffer is float32, else float64 (bfloat16 / float16 weights are compared in
    float64 copies: their own rounding, ~1e-2, would swamp any tolerance that still
    catches a wrong rewrite)."""
    dtypes = {t.dtype for m in models for t in _tensors(m)
              if t.is_floating_point()}
    return torch.float32 if dtypes <= {torch.float32} else torch.float64


def _in_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` itself when every floating tensor already has ``dtype``, else a converted
    deep copy (on the same device): the check never edits the models it compares."""
    if all(t.dtype == dtype for t in _tensors(model) if t.is_floating_point()):
        return model
    return copy.deepcopy(model).to(dtype)


def _tensors(model: nn.Module) -> List[torch.Tensor]:
    return list(model.parameters()) + list(model.buffers())


def _device_of(model: nn.Module) -> torch.device:
    ref = next(iter(_tensors(model)), None)
    return ref.device if ref is not None else torch.device("cpu")


def random_inputs(groups: ChannelGroups, device: torch.device, seed: int = 0,
                  dtype: Optional[torch.dtype] = None) -> Tuple[Any, ...]:
    """Random inputs shaped like the example inputs ``groups`` was found with, on ``device``:
    floating ones standard normal in ``dtype`` (default float32; drawn in float32 on the
    CPU, so every device and dtype sees the same values), others zeros of their dtype."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for spec in groups.input_specs:
        if spec[0] == "tensor":
            _, shape, spec_dtype = spec
            if spec_dtype.is_floating_point or spec_dtype.is_complex:
                out.append(torch.randn(shape, generator=gen).to(device=device, dtype=dtype or torch.float32))
            else:
                out.append(torch.zeros(shape, dtype=spec_dtype, device=device))
        else:
            out.append(spec[1])
    return tuple(out)


def _seeded(model: nn.Module, inputs: Tuple[Any, ...], device: torch.device, seed: int) -> Any:
    """``model(*inputs)`` with the global RNG (CPU, and ``device``'s if an accelerator)
    forked and seeded."""
    if device.type == "cpu":
        fork = torch.random.fork_rng(devices=[])
    else:
        index = device.index if device.index is not None else getattr(torch, device.type).current_device()
        fork = torch.random.fork_rng(devices=[index], device_type=device.type)
    with fork:
        torch.manual_seed(seed)
        return model(*inputs)


def _leaves(obj: Any, path: str = "") -> Iterator[Tuple[str, Any]]:
    if isinstance(obj, torch.Tensor):
        yield path or "output", obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _leaves(v, f"{path}[{k!r}]")
    elif isinstance(obj, (tuple, list)):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{path}[{i}]")


def check_parity(reference: fx.GraphModule, slim_gm: fx.GraphModule, groups: ChannelGroups, *,
                 tolerance: float = 1e-4, what: str = PASS_NAME, seed: int = 0) -> float:
    """Raise :class:`PostconditionError` unless ``slim_gm`` matches ``reference`` in eval mode
    on random inputs: every output within ``tolerance`` x its scale. Returns the worst
    relative difference.

    The check measures the rewrite, not the kernels' precision: both models run on the
    device they live on, under :func:`full_precision` (no TF32), in
    :func:`parity_dtype` - float32 models as they are, bfloat16 / float16 (or mixed)
    models as float64 copies. The models themselves are never modified (their train /
    eval flags are restored).
    """
    device = _device_of(reference)
    dtype = parity_dtype(reference, slim_gm)
    reference, slim_gm = _in_dtype(reference, dtype), _in_dtype(slim_gm, dtype)
    inputs = random_inputs(groups, device, seed, dtype)
    with full_precision(), _eval_mode(reference, slim_gm), torch.no_grad():
        # same random stream for both: a graph traced in train mode keeps random ops
        # (stochastic depth with training=True baked in) even in eval mode
        expected = _seeded(reference, inputs, device, seed)
        got = _seeded(slim_gm, inputs, device, seed)
    exp_leaves, got_leaves = dict(_leaves(expected)), dict(_leaves(got))
    if exp_leaves.keys() != got_leaves.keys():
        raise PostconditionError(f"{what}: the slim model returns {sorted(got_leaves)}, the masked model "
                                 f"{sorted(exp_leaves)}")
    worst = 0.0
    for path, e in exp_leaves.items():
        g = got_leaves[path]
        if tuple(e.shape) != tuple(g.shape):
            raise PostconditionError(f"{what}: output {path} has shape {tuple(g.shape)} in the slim model, "
                                     f"{tuple(e.shape)} in the masked model")
        if not e.is_floating_point():
            if not torch.equal(e, g):
                raise PostconditionError(f"{what}: output {path} differs (non-float)")
            continue
        e64, g64 = e.detach().to("cpu", torch.float64), g.detach().to("cpu", torch.float64)
        nan_e, nan_g = torch.isnan(e64), torch.isnan(g64)
        if not torch.equal(nan_e, nan_g):
            raise PostconditionError(f"{what}: output {path} has NaNs in one model only")
        diff = (e64 - g64).abs().masked_fill(nan_e, 0)
        scale = max(float(e64.masked_fill(nan_e, 0).abs().max()) if e64.numel() else 0.0, 1e-6)
        rel = float(diff.max()) / scale if diff.numel() else 0.0
        worst = max(worst, rel)
        if rel > tolerance:
            raise PostconditionError(
                f"{what}: output {path} of the slim model differs from the masked model by "
                f"{float(diff.max()):.3g} (scale {scale:.3g}, relative {rel:.3g} > {tolerance}; compared in "
                f"{str(dtype).replace('torch.', '')} on {device}, TF32 off)")
    return worst


# ----------------------------------------------------------------------------- elements
def keep_tied_names(gm: fx.GraphModule, named: Iterable[Tuple[str, torch.Tensor]]) -> None:
    """Register each ``(name, tensor)`` whose tensor ``gm`` holds under another name but
    whose name it lacks (bare ``nn.Module`` containers on the way), in place: a tied
    tensor (an LM head's weight that IS the input embedding's) keeps all its names when
    the graph reads it under one."""
    named = list(named)
    held = {id(t) for t in [*gm.parameters(), *gm.buffers()]}
    for name, t in named:
        if id(t) not in held:
            continue
        owner, _, leaf = name.rpartition(".")
        sub = gm
        for part in owner.split(".") if owner else ():
            if not hasattr(sub, part):
                sub.add_module(part, nn.Module())
            sub = getattr(sub, part)
        if not isinstance(sub, nn.Module) or leaf in sub._parameters or leaf in sub._buffers or hasattr(sub, leaf):
            continue
        if isinstance(t, nn.Parameter):
            sub.register_parameter(leaf, t)
        else:
            sub.register_buffer(leaf, t)


def channels_emptied_by(groups: ChannelGroups, element_masks: Mapping[str, torch.Tensor]) -> Dict[int, torch.Tensor]:
    """``keep`` that removes exactly the channels element masks already made dead.

    A channel is emptied when every op that sums over it reads it through weight slices
    that the masks zero entirely (e.g. ``conv2.weight[:, c]`` fully masked): the
    channel's values then reach nothing, whatever its producer, bias or BatchNorm do, so
    removing it is exact. Channels summed by ops without a weight (a sum over channels,
    an activation-by-activation product) are never emptied. Fixed groups keep every
    channel; a group keeps at least its first channel, and at least one channel of each
    ``keep_one_of`` set and of each non-empty constraint.

    ``element_masks``: ``{param_name: bool tensor of the parameter's shape}`` (True = kept).
    """
    n = groups.num_channels
    read = torch.zeros(n, dtype=torch.bool)       # read by some weightless contraction
    live = torch.zeros(n, dtype=torch.bool)       # read through some unmasked weight slice
    for c in groups.contractions:
        gids = groups.read_channels(c)
        if gids is None:
            continue
        if c.weight is None:
            read[gids] = True
            continue
        pname, pdim = c.weight
        w_gids = groups.slice_channels(pname).get(pdim)
        mask = element_masks.get(pname)
        if w_gids is None:
            read[gids] = True
            continue
        if mask is None:
            live[w_gids] = True
            continue
        mask = torch.as_tensor(mask).to("cpu").bool()
        nonzero_slice = mask.movedim(pdim, 0).reshape(mask.shape[pdim], -1).any(dim=1)
        live[w_gids[nonzero_slice]] = True
        # channels of the arg that the weight does not cover at all stay live
        covered = torch.zeros(n, dtype=torch.bool)
        covered[w_gids] = True
        live[gids[~covered[gids]]] = True
    for c in groups.normalizations:  # statistics read every channel
        gids = groups.read_channels(c)
        if gids is not None:
            read[gids] = True
    for internal in groups.internal_channels.values():  # read inside one op (attention heads)
        for gids in internal.values():
            read[gids] = True
    emptied = ~(read | live)
    keep: Dict[int, torch.Tensor] = {}
    for g in groups.groups:
        if not g.removable:
            continue
        o = groups.offsets[g.id]
        k = ~emptied[o:o + g.size]
        if bool(k.all()):
            continue
        if not bool(k.any()):
            k[0] = True
        for s in g.keep_one_of:
            if not bool(k[s].any()):
                k[s[0]] = True
        keep[g.id] = k
    flat = torch.ones(n, dtype=torch.bool)
    for gid, k in keep.items():
        flat[groups.offsets[gid]:groups.offsets[gid] + k.numel()] = k
    for s in groups.nonempty:
        if not bool(flat[s].any()):
            first = int(s[0])
            gid = max(i for i, o in enumerate(groups.offsets) if o <= first)
            keep[gid][first - groups.offsets[gid]] = True
            flat[first] = True
    return keep
