"""Channel groups: which channels of a network must be removed together.

:func:`find_channel_groups` runs the model once on example inputs (shape propagation)
and gives every slice of every channel dimension an integer *atom*. The per-op rules of
:mod:`passes.rules` then say which atoms are the same channel (a residual add unifies
its operands' channels; a conv's input channels are the same as its weight's dim 1; a
concat maps offsets; a channel shuffle permutes), which atoms can never go (channels
that reach a graph input or a task output, channels mixed by a LayerNorm or a softmax),
and where a tensor is summed over its channels (convs, linears: the places where the
channel-mask pass puts its masks). Every consumer of every tensor is followed, so all
heads of a multitask model take part.

The result is frozen data; the GraphModule is never modified (its modules run once in
eval mode under ``torch.no_grad``, on fake tensors where possible, and get their
training flags back).

>>> import torch, torch.nn as nn
>>> class Net(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.conv1, self.bn1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
...         self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
...         self.head_a, self.head_b = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 1, 1)
...     def forward(self, x):
...         h = self.bn1(self.conv1(x)).relu()
...         h = h + self.conv2(h)          # residual: conv1 and conv2 channels coupled
...         return {"a": self.head_a(h), "b": self.head_b(h)}
>>> gm = torch.fx.symbolic_trace(Net())
>>> groups = find_channel_groups(gm, (torch.randn(1, 3, 12, 12),))
>>> g = groups.groups[0]
>>> g.size, g.removable, sorted({(m.param_name, m.dim) for m in g.members})[:4]
(4, True, [('bn1.bias', 0), ('bn1.running_mean', 0), ('bn1.running_var', 0), ('bn1.weight', 0)])
>>> [(x.size, x.removable, x.reason) for x in groups.groups[1:]]  # doctest: +NORMALIZE_WHITESPACE
[(3, False, "node 'conv1' (call_module conv1 (Conv2d)) reads channels that are fixed
                (a graph input or a tensor made in forward)"),
 (2, False, "reaches task output 'a'"),
 (1, False, "reaches task output 'b'")]
"""
from __future__ import annotations

import functools
import inspect
import logging
import math
import numbers
import operator
import sys
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from .attention import shifted_window_attention
from .errors import DisparseValueError, UnsupportedOpError, warn
from .gc_pause import paused_gc
from .ownership import enclosing_modules
from .rules import ChannelRule, Labels, describe, lookup_channel_rule
from .rules._types import Const, LazyDim, TensorInfo
from .rules.attention import find_head_splits

__all__ = [
    "GroupMember",
    "ChannelGroup",
    "Contraction",
    "ChannelGroups",
    "RuleContext",
    "find_channel_groups",
    "ATTENTION_POLICIES",
    "UNKNOWN_OPS",
]

#: What a channel of an attention block is (see passes.rules.attention).
ATTENTION_POLICIES = ("heads", "head_dims")
#: What find_channel_groups does at an op without a channel rule.
UNKNOWN_OPS = ("raise", "keep")

log = logging.getLogger(__name__)

_MISSING = object()


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True, eq=False)
class GroupMember:
    """Parameter (or buffer) ``param_name`` is sliced along ``dim`` by the group.

    ``index[i]`` is the group channel that slice ``i`` belongs to, or -1 when slice
    ``i`` belongs to another group (a concat feeding a conv). Several slices may map to
    one channel (a depthwise multiplier, a Linear after a flatten: each channel owns a
    block of input features). ``is_buffer``: a buffer such as BatchNorm running stats.
    """

    param_name: str
    dim: int
    index: torch.Tensor
    is_buffer: bool = False

    def __repr__(self) -> str:
        n = int((self.index >= 0).sum())
        return f"GroupMember({self.param_name!r}, dim={self.dim}, {n}/{self.index.numel()} slices)"


@dataclass(frozen=True, eq=False)
class ChannelGroup:
    """Channels removed together: removing channel ``c`` of the group removes, from every
    member, the slices whose ``index`` is ``c``.

    ``removable`` is False when the channels reach a graph input or a task output, are
    mixed by an op that is not zero-neutral (LayerNorm over channels, softmax, mean), or
    belong to a parameter the ``prunable`` predicate excludes; ``reason`` says which.
    Any subset of a removable group's channels may be removed (grouped convs, group norms
    and channel shuffles are handled by coupling, so no divisibility constraint remains:
    ``round_multiple`` is 1), but at least one channel must stay, and at least one of
    each ``keep_one_of`` index set (a split piece that must not become empty).
    ``nodes`` are the fx nodes whose outputs carry the group's channels.
    """

    id: int
    size: int
    members: Tuple[GroupMember, ...]
    removable: bool
    reason: str = ""
    round_multiple: int = 1
    nodes: Tuple[str, ...] = ()
    keep_one_of: Tuple[torch.Tensor, ...] = ()

    @property
    def params(self) -> Tuple[str, ...]:
        """Names of the members (parameters and buffers), in order, without repeats."""
        return tuple(dict.fromkeys(m.param_name for m in self.members))

    def __repr__(self) -> str:
        state = "removable" if self.removable else f"fixed: {self.reason}"
        return f"ChannelGroup(id={self.id}, size={self.size}, {len(self.members)} members, {state})"


@dataclass(frozen=True, eq=False)
class Contraction:
    """Node ``consumer`` sums its argument ``arg`` over ``dim`` (a conv's input channels);
    ``weight`` = ``(param_name, dim)`` whose slices read those channels, if any."""

    consumer: str
    arg: str
    dim: int
    weight: Optional[Tuple[str, int]] = None


@dataclass(frozen=True, eq=False)
class ChannelGroups:
    """The channel groups of a GraphModule, plus what the mask and slim passes need.

    Group channel ``c`` of group ``g`` has the *global channel id*
    ``offsets[g] + c``; ``node_channels[node]`` gives, for every tensor a node outputs,
    ``{dim: LongTensor of global channel ids}`` (a tuple of those for tuple outputs).
    ``internal_channels[node]`` gives ``{name: global channel ids}`` for channels that
    live inside one op (the heads of an attention module: ``{"heads": ...}``);
    ``normalizations`` are the ops that normalise over a removable channel dim
    (LayerNorm over tokens' channels): the masked model computes their statistics over
    the kept channels only. ``attention``: "heads" or "head_dims", what a channel of an
    attention block is (see :mod:`passes.rules.attention`). ``attention_units``:
    ``(node, kind, global channel ids)`` for every place that splits attention into heads
    (kind "heads", "head_dims", "qk_dims" or "v_dims"), for reports. ``unknown_nodes``:
    the nodes without a channel rule that ``find_channel_groups(unknown_ops="keep")``
    kept whole (every channel they touch is in a fixed group; the slim pass leaves them
    as they are).
    """

    groups: Tuple[ChannelGroup, ...]
    offsets: Tuple[int, ...]
    node_channels: Mapping[str, Any]
    node_shapes: Mapping[str, Any]
    size_dependent: Mapping[str, Any]
    contractions: Tuple[Contraction, ...]
    nonempty: Tuple[torch.Tensor, ...]
    input_specs: Tuple[Any, ...]
    param_shapes: Mapping[str, Tuple[int, ...]]
    buffers: FrozenSet[str] = frozenset()
    internal_channels: Mapping[str, Mapping[str, torch.Tensor]] = field(default_factory=lambda: MappingProxyType({}))
    attention_units: Tuple[Tuple[str, str, torch.Tensor], ...] = ()
    normalizations: Tuple[Contraction, ...] = ()
    attention: str = "heads"
    unknown_nodes: Tuple[str, ...] = ()

    def __repr__(self) -> str:
        return (f"ChannelGroups({len(self.groups)} groups, {len(self.removable_groups())} removable, "
                f"{self.num_channels} channels)")

    # ---------------------------------------------------------------- conveniences
    @property
    def num_channels(self) -> int:
        return self.offsets[-1] + self.groups[-1].size if self.groups else 0

    def removable_groups(self) -> Tuple[ChannelGroup, ...]:
        return tuple(g for g in self.groups if g.removable)

    def members_of(self, param_name: str) -> Tuple[Tuple[ChannelGroup, GroupMember], ...]:
        """Every (group, member) that slices ``param_name``."""
        return self._by_param.get(param_name, ())

    @functools.cached_property
    def _by_param(self) -> Dict[str, Tuple[Tuple[ChannelGroup, GroupMember], ...]]:
        index: Dict[str, List[Tuple[ChannelGroup, GroupMember]]] = {}
        for g in self.groups:
            for m in g.members:
                index.setdefault(m.param_name, []).append((g, m))
        return {k: tuple(v) for k, v in index.items()}

    def keep_vector(self, keep: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """The keep flags of every global channel, after checking ``keep``.

        ``keep[group_id]`` is a bool tensor of the group's size (True = kept); groups not
        in ``keep`` keep everything. Raises :class:`DisparseValueError` for an unknown
        group, a wrong shape, removal in a fixed group, an emptied group, or an emptied
        ``keep_one_of`` / split piece.
        """
        flat = torch.ones(self.num_channels, dtype=torch.bool)
        for gid, k in keep.items():
            if isinstance(gid, numbers.Integral) and not isinstance(gid, bool):
                gid = int(gid)
            if not isinstance(gid, int) or not 0 <= gid < len(self.groups):
                raise DisparseValueError(
                    f"keep has an unknown group id {gid!r}; expected ints in [0, {len(self.groups)})")
            g = self.groups[gid]
            k = torch.as_tensor(k).detach().to("cpu")
            if k.dtype != torch.bool or k.shape != (g.size,):
                raise DisparseValueError(
                    f"keep[{gid}] must be a bool tensor of shape ({g.size},), but got "
                    f"{k.dtype} {tuple(k.shape)}")
            if not bool(k.all()):
                if not g.removable:
                    raise DisparseValueError(
                        f"keep[{gid}] removes channels of group {gid}, which is not removable ({g.reason})")
                if not bool(k.any()):
                    raise DisparseValueError(
                        f"keep[{gid}] removes every channel of group {gid}; keep at least one")
                for s in g.keep_one_of:
                    if not bool(k[s].any()):
                        raise DisparseValueError(
                            f"keep[{gid}] removes all of channels {s.tolist()} of group {gid}, which "
                            f"form one split piece (nodes {', '.join(g.nodes[:3])}...); keep at least one")
            o = self.offsets[gid]
            flat[o:o + g.size] = k
        for s in self.nonempty:
            if not bool(flat[s].any()):
                raise DisparseValueError(
                    f"keep removes every channel of a tensor (global channels {s.tolist()[:8]}...); "
                    f"keep at least one of them")
        return flat

    def element_masks(self, keep: Mapping[int, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Element-shaped keep masks (whole channels) of every member parameter/buffer."""
        flat = self.keep_vector(keep)
        out: Dict[str, torch.Tensor] = {}
        for name, shape in self.param_shapes.items():
            mask = torch.ones(shape, dtype=torch.bool)
            for dim, idx in self.slice_channels(name).items():
                kept = flat[idx]
                view = [1] * len(shape)
                view[dim] = shape[dim]
                mask &= kept.view(view)
            out[name] = mask
        return out

    def read_channels(self, c: Contraction) -> Optional[torch.Tensor]:
        """Global channel ids of the slices that contraction (or normalisation) ``c`` reads:
        those of node ``c.arg`` along ``c.dim``; None when that dim carries no channels."""
        ch = self.node_channels.get(c.arg)
        return ch.get(c.dim) if isinstance(ch, Mapping) else None

    def slice_channels(self, param_name: str) -> Dict[int, torch.Tensor]:
        """``{dim: global channel id of each slice}`` for a member parameter/buffer."""
        out: Dict[int, torch.Tensor] = {}
        for g, m in self.members_of(param_name):
            cur = out.setdefault(m.dim, torch.full((m.index.numel(),), -1, dtype=torch.long))
            sel = m.index >= 0
            cur[sel] = m.index[sel] + self.offsets[g.id]
        return out

    def params_after(self, keep: Mapping[int, torch.Tensor]) -> Dict[str, int]:
        """Number of elements of each member parameter/buffer after slimming with ``keep``."""
        flat = self.keep_vector(keep)
        out = {}
        for name, shape in self.param_shapes.items():
            sizes = list(shape)
            for dim, idx in self.slice_channels(name).items():
                sizes[dim] = int(flat[idx].sum())
            out[name] = math.prod(sizes)
        return out


# ----------------------------------------------------------------------------- engine
class _Atoms:
    """The atoms of the analysis and the classes ``unify`` makes of them.

    Rules unify whole vectors of atoms at a time, so unions are kept as pending edge
    vectors and merged in bulk (label propagation with pointer jumping over the classes
    they touch) only when classes are read: :meth:`resolve` and :meth:`roots`. Every
    class is represented by its smallest atom. The bookkeeping is numpy: these are many
    small integer operations, which torch's dispatcher and thread pool make slower.
    """

    __slots__ = ("count", "_root", "_ea", "_eb")

    def __init__(self):
        self.count = 0
        self._root = np.empty(0, dtype=np.int64)  # smallest atom of each atom's class
        self._ea: List[np.ndarray] = []
        self._eb: List[np.ndarray] = []

    def add(self, n: int) -> int:
        start = self.count
        self.count += n
        return start

    def union(self, a: Any, b: Any) -> None:
        self._ea.append(_np(a).reshape(-1))
        self._eb.append(_np(b).reshape(-1))

    def roots(self) -> np.ndarray:
        """The representative (smallest atom) of every atom's class."""
        root = self._root
        if root.size < self.count:
            root = self._root = np.concatenate([root, np.arange(root.size, self.count, dtype=np.int64)])
        if self._ea:
            ea, eb = root[np.concatenate(self._ea)], root[np.concatenate(self._eb)]
            self._ea, self._eb = [], []
            keep = ea != eb
            ea, eb = ea[keep], eb[keep]
            if not ea.size:
                pass
            elif 2 * ea.size < self.count:  # few edges: number the roots they touch 0..k-1
                nodes, inv = np.unique(np.concatenate([ea, eb]), return_inverse=True)
                inv = inv.reshape(-1)
                lab = _smallest_joined(inv[:ea.size], inv[ea.size:], nodes.size)
                # nodes are sorted, so the smallest index is the smallest root
                remap = np.arange(self.count, dtype=np.int64)
                remap[nodes] = nodes[lab]
                root = self._root = remap[root]
            else:
                root = self._root = _smallest_joined(ea, eb, self.count)[root]
        return root

    def resolve(self, atoms: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.roots()[_np(atoms)])


def _smallest_joined(ea: np.ndarray, eb: np.ndarray, n: int) -> np.ndarray:
    """For each of ``n`` items, the smallest item that the edges ``(ea[i], eb[i])`` join
    it to: label propagation with pointer jumping (labels only ever point to smaller
    items of the same class), in a few bulk passes."""
    lab = np.arange(n, dtype=np.int64)
    while True:
        m = np.minimum(lab[ea], lab[eb])
        new = lab.copy()
        np.minimum.at(new, ea, m)
        np.minimum.at(new, eb, m)
        new = new[new]  # pointer jumping
        if np.array_equal(new, lab):
            return lab
        lab = new


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """``np.unique(a)`` for a 1-d int array; ``a`` itself when it is already increasing
    (the common case: a vector of fresh atoms' channels)."""
    if a.size < 2 or bool((a[1:] > a[:-1]).all()):
        return a
    s = np.sort(a)
    return s[np.concatenate(([True], s[1:] != s[:-1]))]


def _np(atoms: Any) -> np.ndarray:
    """An atom vector as an int64 numpy array (a view of a CPU tensor's memory)."""
    if isinstance(atoms, torch.Tensor):
        return atoms.detach().numpy()
    return np.asarray(atoms, dtype=np.int64)


class RuleContext:
    """What a channel rule sees (see :mod:`passes.rules` for the table of methods)."""

    def __init__(self, engine: "_Analysis", node: fx.Node, args: tuple, kwargs: dict,
                 cargs: tuple, ckwargs: dict, out: Any):
        self._e = engine
        self.node = node
        self.gm = engine.module
        self._args, self._kwargs = args, kwargs
        self._cargs, self._ckwargs = cargs, ckwargs
        self.out = out
        self._description: Optional[str] = None

    # -- reading
    @property
    def module(self) -> nn.Module:
        return self._e.submodule(self.node.target)

    def describe(self) -> str:
        if self._description is None:  # rules name the node in every reason they record
            self._description = describe(self.node, self.gm)
        return self._description

    def _get(self, seq, kw, pos, name, default):
        if pos is not None and pos < len(seq):
            return seq[pos]
        if name is not None and name in kw:
            return kw[name]
        if default is _MISSING:
            raise UnsupportedOpError(
                f"{self.describe()}: expected argument {name or pos}, which is missing")
        return default

    def arg(self, pos: Optional[int], name: Optional[str] = None, default: Any = _MISSING) -> Any:
        """Argument as seen by the analysis: TensorInfo / Const / python value."""
        return self._get(self._args, self._kwargs, pos, name, default)

    def value(self, pos: Optional[int], name: Optional[str] = None, default: Any = _MISSING) -> Any:
        """The concrete argument value on the example inputs."""
        return self._get(self._cargs, self._ckwargs, pos, name, default)

    @property
    def args(self) -> tuple:
        """The positional arguments as the analysis sees them (TensorInfo / Const / values)."""
        return self._args

    @property
    def kwargs(self) -> dict:
        return self._kwargs

    @property
    def values(self) -> Tuple[tuple, dict]:
        """The concrete ``(args, kwargs)`` on the example inputs."""
        return self._cargs, self._ckwargs

    def tensors(self) -> List[TensorInfo]:
        """Every TensorInfo among the (flattened) arguments, in order."""
        out: List[TensorInfo] = []
        fx.node.map_aggregate((self._args, self._kwargs),
                              lambda a: out.append(a) if isinstance(a, TensorInfo) else None)
        return out

    @property
    def out_shape(self) -> Tuple[int, ...]:
        return tuple(self.out.shape)

    # -- atoms
    def labels(self, x: Any, dim: int) -> Optional[torch.Tensor]:
        """Atoms of ``x`` along ``dim`` (materialising parameter atoms), or None."""
        if not isinstance(x, TensorInfo):
            return None
        d = x.dim(dim)
        lab = x.labels.get(d)
        if lab is not None:
            return lab
        lz = x.lazy.get(d)
        if lz is not None:
            lab = self._e.materialize(lz)
            x.labels[d] = lab
            return lab
        return None

    def has_channels(self, x: Any, dim: int) -> bool:
        """Whether ``x`` carries (possibly lazy) channels along ``dim``."""
        if not isinstance(x, TensorInfo):
            return False
        d = x.dim(dim)
        return d in x.labels or d in x.lazy

    def param(self, name: str, dim: int, *, link: bool = False,
              follow: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Atoms of parameter/buffer ``name`` along ``dim`` (relative to the called module
        for ``call_module`` nodes). ``link``: these atoms define a channel vector of their
        own (a conv's output channels) rather than follow others. ``follow``: the atoms
        the rule will join these with; a parameter seen for the first time whose channels
        they fully decide (every one from a linked vector) takes them instead of atoms of
        its own - the same groups, without an atom and a union per slice."""
        if self.node.op == "call_module" and not name.startswith(self.node.target + "."):
            name = f"{self.node.target}.{name}"
        return self._e.param(name, dim, link=link, follow=follow)

    def has_param(self, name: str) -> bool:
        if self.node.op == "call_module":
            name = f"{self.node.target}.{name}"
        return self._e.tensor_of(name) is not None

    def fresh(self, n: int, *, link: bool = True) -> torch.Tensor:
        return self._e.fresh(n, link=link)

    def unify(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if a.numel() != b.numel():
            raise RuntimeError(
                f"channel rule for {self.describe()} unified {a.numel()} with {b.numel()} slices")
        self._e.unify(a, b)

    def join(self, *labels: Optional[torch.Tensor], reason: Optional[str] = None) -> Optional[torch.Tensor]:
        """Unify every given atom vector; if some are None (fixed channels) pin the rest."""
        present = [l for l in labels if l is not None]
        if not present:
            return None
        for l in present[1:]:
            if l is not present[0]:  # a parameter that took the atoms it follows
                self.unify(present[0], l)
        if len(present) < len(labels):
            self.pin(present[0], reason or f"combined by {self.describe()} with channels that are fixed "
                                            f"(a graph input or a constant)")
        return present[0]

    def pin(self, labels: Optional[torch.Tensor], reason: str) -> None:
        if labels is not None and labels.numel():
            self._e.pins.append((labels, reason))

    def mix(self, x: Any, dim: int, what: Optional[str] = None) -> None:
        lab = self.labels(x, dim)
        if lab is not None:
            self.pin(lab, f"{what or 'mixed'} along dim {x.dim(dim)} by {self.describe()}")

    def contract(self, x: Any, dim: int, weight: Optional[Tuple[str, int]] = None) -> None:
        """This op sums ``x`` over ``dim``: removed channels must be zero when it reads them."""
        if not isinstance(x, TensorInfo) or self.labels(x, dim) is None:
            return
        src = self._source_of(x)
        if src is None:
            return
        self._e.contractions.append((self.node.name, src.name, x.dim(dim), weight))

    def normalize(self, x: Any, dim: int) -> None:
        """This op normalises ``x`` over ``dim`` (LayerNorm statistics): removing a channel
        changes the others' values, so the masked model computes the statistics over the
        kept channels only (:func:`passes.insert_channel_masks.masked_layer_norm`)."""
        if not isinstance(x, TensorInfo) or self.labels(x, dim) is None:
            return
        src = self._source_of(x)
        if src is not None:
            self._e.norms.append((self.node.name, src.name, x.dim(dim), None))

    def attention_unit(self, kind: str, labels: torch.Tensor) -> None:
        """Record that ``labels`` are attention heads (or head dims) split here (reports)."""
        self._e.attention_units.append((self.node.name, kind, labels))

    def internal(self, name: str, labels: torch.Tensor) -> None:
        """Channels that live inside this op only (an attention module's heads): the
        mask and slim hooks of its rule read their keep flags by ``name``."""
        self._e.internals.setdefault(self.node.name, {})[name] = labels

    @property
    def attention(self) -> str:
        """What a channel of an attention block is: "heads" or "head_dims"."""
        return self._e.attention

    @property
    def head_split(self) -> Optional[str]:
        """The attention policy if this node may split q, k or v into heads (it feeds an
        attention product through shape ops only), else None."""
        return self._e.attention if self.node.name in self._e.head_splits else None

    def _source_of(self, x: TensorInfo) -> Optional[fx.Node]:
        for n in self.node.all_input_nodes:
            if self._e.infos.get(n) is x:
                return n
        return None

    def resolve(self, labels: torch.Tensor) -> torch.Tensor:
        return self._e.atoms.resolve(labels)

    def same_as(self, x: TensorInfo) -> Labels:
        return Labels(dict(x.labels), lazy=dict(x.lazy))

    def const(self, *sources: Any) -> Const:
        """A non-tensor result whose channel dependence is the union of ``sources``'."""
        deps = [s.deps for s in sources if isinstance(s, Const) and s.deps is not None]
        return Const(None, torch.cat(deps) if deps else None)

    def weight_name(self, w: Any, dim: int) -> Optional[Tuple[str, int]]:
        """``(param_name, dim)`` when ``w`` is exactly one parameter read by get_attr."""
        if isinstance(w, TensorInfo):
            lz = w.lazy.get(w.dim(dim))
            if lz is not None and len(lz.params) == 1 and not lz.parts:
                return lz.params[0]
        return None


def _same_dtype(x: torch.Tensor, *tensors: Optional[torch.Tensor]) -> bool:
    return all(t is None or t.dtype == x.dtype for t in tensors)


Shape = Tuple[int, ...]


def _linear_shape(m: nn.Linear, x: torch.Tensor) -> Optional[Shape]:
    if x.dim() < 1 or x.shape[-1] != m.in_features or not _same_dtype(x, m.weight, m.bias):
        return None
    return (*x.shape[:-1], m.out_features)


def _layer_norm_shape(m: nn.LayerNorm, x: torch.Tensor) -> Optional[Shape]:
    k = len(m.normalized_shape)
    if x.dim() < k or tuple(x.shape[x.dim() - k:]) != tuple(m.normalized_shape) or \
            not _same_dtype(x, m.weight, m.bias):
        return None
    return tuple(x.shape)


def _batch_norm_shape(m: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> Optional[Shape]:
    ranks = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}[type(m)]
    if x.dim() not in ranks or x.shape[1] != m.num_features or m.running_mean is None or \
            not _same_dtype(x, m.weight, m.bias, m.running_mean, m.running_var) or not x.is_contiguous():
        return None
    return tuple(x.shape)


def _conv_shape(m: nn.modules.conv._ConvNd, x: torch.Tensor) -> Optional[Shape]:
    n = len(m.kernel_size)
    if x.dim() != n + 2 or x.shape[1] != m.in_channels or not _same_dtype(x, m.weight, m.bias) or \
            not x.is_contiguous():  # a channels-last input gives a channels-last output
        return None
    if isinstance(m.padding, str):
        if m.padding != "valid":
            return None  # "same"
        padding = (0,) * n
    else:
        padding = m.padding
    size = []
    for i in range(n):
        eff = m.dilation[i] * (m.kernel_size[i] - 1) + 1
        full = x.shape[2 + i] + 2 * padding[i]
        if full < eff:
            return None  # the module raises
        size.append((full - eff) // m.stride[i] + 1)
    return (x.shape[0], m.out_channels, *size)


def _activation_shape(m: nn.Module, x: torch.Tensor) -> Union[Shape, torch.Tensor, None]:
    """An elementwise activation: in place it returns its input; else a new tensor shaped
    (and, for a contiguous input, laid out) like it."""
    if not x.is_floating_point():
        return None
    if getattr(m, "inplace", False):
        return x
    return tuple(x.shape) if x.is_contiguous() else None


def _identity(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode Dropout and Identity return their input itself."""
    return x


#: Modules whose fake output :meth:`_Analysis._shape_only` makes from the input's shape
#: (the function gives the output shape, dtype and device being the input's, or the
#: output tensor itself, or None: run the module). Exact types only: a subclass may
#: compute something else.
_SHAPE_ONLY: Dict[type, Callable[[Any, torch.Tensor], Union[Shape, torch.Tensor, None]]] = {
    nn.Linear: _linear_shape, nn.LayerNorm: _layer_norm_shape,
    nn.Conv1d: _conv_shape, nn.Conv2d: _conv_shape, nn.Conv3d: _conv_shape,
    nn.BatchNorm1d: _batch_norm_shape, nn.BatchNorm2d: _batch_norm_shape, nn.BatchNorm3d: _batch_norm_shape,
    **{t: _activation_shape for t in (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid,
                                      nn.Sigmoid, nn.Tanh, nn.Mish)},
    nn.Dropout: _identity, nn.Identity: _identity,
}


def _cat_shape(n: fx.Node, env: Dict[fx.Node, Any]) -> Optional[Tuple[Shape, torch.Tensor]]:
    """``torch.cat(tensors, dim)`` of contiguous tensors of one dtype, device and rank
    whose other dims agree: (output shape, first input), else None (run the op)."""
    if n.target is not torch.cat or not n.args or len(n.args) > 2 or set(n.kwargs) - {"dim"}:
        return None
    items = n.args[0]
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(a, fx.Node) for a in items):
        return None
    xs = [env[a] for a in items]
    first = xs[0]
    if not all(isinstance(x, torch.Tensor) for x in xs) or first.dim() == 0:
        return None
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    if type(dim) is not int or not -first.dim() <= dim < first.dim():
        return None
    dim %= first.dim()
    rest = [s for i, s in enumerate(first.shape) if i != dim]
    for x in xs:
        if x.dim() != first.dim() or x.dtype != first.dtype or x.device != first.device or \
                not x.is_contiguous() or [s for i, s in enumerate(x.shape) if i != dim] != rest:
            return None
    shape = list(first.shape)
    shape[dim] = sum(int(x.shape[dim]) for x in xs)
    return tuple(shape), first


def _add_shape(n: fx.Node, env: Dict[fx.Node, Any]) -> Optional[Tuple[Shape, torch.Tensor]]:
    """``a + b`` of two contiguous tensors of one shape, dtype and device (a residual)."""
    if len(n.args) != 2 or n.kwargs or not all(isinstance(a, fx.Node) for a in n.args):
        return None
    a, b = env[n.args[0]], env[n.args[1]]
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape or \
            a.dtype != b.dtype or a.device != b.device or not a.is_contiguous() or not b.is_contiguous():
        return None
    return tuple(a.shape), a


def _bound_args(n: fx.Node, env: Dict[fx.Node, Any]) -> Optional[Dict[str, Any]]:
    """The node's arguments by parameter name, with their values, or None."""
    try:
        sig = _signature(n.target)
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: env[a])
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    return bound.arguments


@functools.lru_cache(maxsize=None)
def _signature(fn: Callable) -> inspect.Signature:
    return inspect.signature(fn)


def _window_attention_shape(n: fx.Node, env: Dict[fx.Node, Any]) -> Optional[Tuple[Shape, torch.Tensor]]:
    """Swin window attention (torchvision's or :func:`passes.attention.shifted_window_attention`)
    of a ``(B, H, W, C)`` input with consistent weights: ``(B, H, W, proj_weight rows)``,
    contiguous. v2 (``logit_scale``) runs the op."""
    a = _bound_args(n, env)
    if a is None or a.get("logit_scale") is not None:
        return None
    x, wqkv, wproj, bias = a["input"], a["qkv_weight"], a["proj_weight"], a["relative_position_bias"]
    window, heads = a["window_size"], a["num_heads"]
    tensors = [t for t in (x, wqkv, wproj, bias, a["qkv_bias"], a["proj_bias"]) if t is not None]
    if not all(isinstance(t, torch.Tensor) and t.dtype == x.dtype for t in tensors) or x.dim() != 4 or \
            wqkv.dim() != 2 or wproj.dim() != 2 or type(heads) is not int or heads <= 0 or \
            not (isinstance(window, (list, tuple)) and len(window) == 2 and all(type(w) is int and w > 0 for w in window)):
        return None
    c = x.shape[3]
    head_dim = a.get("head_dim") or (c // heads if c % heads == 0 else 0)
    inner, out = heads * head_dim, wproj.shape[0]
    if not head_dim or tuple(wqkv.shape) != (3 * inner, c) or tuple(wproj.shape) != (out, inner) or \
            tuple(bias.shape) != (1, heads, window[0] * window[1], window[0] * window[1]) or \
            (a["qkv_bias"] is not None and tuple(a["qkv_bias"].shape) != (3 * inner,)) or \
            (a["proj_bias"] is not None and tuple(a["proj_bias"].shape) != (out,)):
        return None
    if "head_dim" not in a and out != c:
        return None  # torchvision's version reshapes the output to C channels
    return (*x.shape[:3], out), x


def _relative_position_bias_shape(n: fx.Node, env: Dict[fx.Node, Any]) -> Optional[Tuple[Shape, torch.Tensor]]:
    """torchvision Swin's ``_get_relative_position_bias(table (T, heads), index (N*N,),
    window)``: ``(1, heads, N, N)``, contiguous."""
    a = _bound_args(n, env)
    if a is None:
        return None
    table, index, window = a["relative_position_bias_table"], a["relative_position_index"], a["window_size"]
    if not isinstance(table, torch.Tensor) or not isinstance(index, torch.Tensor) or table.dim() != 2 or \
            index.dim() != 1 or index.dtype not in (torch.long, torch.int) or \
            not (isinstance(window, (list, tuple)) and len(window) == 2 and all(type(w) is int and w > 0 for w in window)):
        return None
    area = window[0] * window[1]
    if index.numel() != area * area:
        return None
    return (1, table.shape[1], area, area), table


def _shape_functions() -> Dict[Any, Callable[[fx.Node, Dict[fx.Node, Any]], Optional[Tuple[Shape, torch.Tensor]]]]:
    """Functions whose fake output :meth:`_Analysis._shape_only` makes from the argument
    shapes: ``fn(node, env) -> (output shape, tensor whose dtype and device it has)`` or
    None (run the op). torchvision's Swin functions count when torchvision's Swin module
    is loaded (a model that calls them has loaded it)."""
    table = {torch.cat: _cat_shape, operator.add: _add_shape, torch.add: _add_shape,
             shifted_window_attention: _window_attention_shape}
    swin = sys.modules.get("torchvision.models.swin_transformer")
    if swin is not None:
        table[getattr(swin, "shifted_window_attention", None)] = _window_attention_shape
        table[getattr(swin, "_get_relative_position_bias", None)] = _relative_position_bias_shape
        table.pop(None, None)
    return table


class _Analysis(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, attention: str = "heads", unknown_ops: str = "raise"):
        super().__init__(gm, garbage_collect_values=True)
        self.unknown_ops = unknown_ops
        self.unknown: List[Tuple[str, str]] = []  # (node name, description) kept whole for lack of a rule
        # errors of the analysis name the node and its source line themselves; the
        # Interpreter's "While executing ... Original traceback" would repeat it in torch's terms
        self.extra_traceback = False
        self.attention = attention
        self.head_splits = find_head_splits(gm)
        self.norms: List[Tuple[str, str, int, None]] = []
        self.internals: Dict[str, Dict[str, torch.Tensor]] = {}
        self.attention_units: List[Tuple[str, str, torch.Tensor]] = []
        self.atoms = _Atoms()
        self.sources: List[List[Any]] = []  # [start, n, link]
        self.atom_linked = bytearray()  # per atom: 1 when its source is linked
        self.member_src: Dict[Tuple[str, int], int] = {}
        self.members: Dict[Tuple[str, int], torch.Tensor] = {}
        self.pins: List[Tuple[torch.Tensor, str]] = []
        self.contractions: List[Tuple[str, str, int, Optional[Tuple[str, int]]]] = []
        self.infos: Dict[fx.Node, Any] = {}
        self.input_specs: List[Any] = []
        self.fake_mode: Any = None
        self.shape_functions = _shape_functions()
        # one walk of the module tree gives the submodules (rules ask for them often; a
        # get_submodule per node costs more) and the parameters and buffers, named and
        # ordered as named_parameters() / named_buffers() name them, which walk it again
        self.submodules: Dict[str, nn.Module] = {}
        params: List[Tuple[str, torch.Tensor]] = []
        buffers: List[Tuple[str, torch.Tensor]] = []
        for prefix, m in gm.named_modules(remove_duplicate=False):
            self.submodules[prefix] = m
            dot = prefix + "." if prefix else ""
            params.extend((dot + k, v) for k, v in m._parameters.items() if v is not None)
            buffers.extend((dot + k, v) for k, v in m._buffers.items() if v is not None)
        # canonical names of parameters and buffers (tied weights share one name)
        self.tensors: Dict[str, torch.Tensor] = {}
        self.alias: Dict[str, str] = {}
        self.buffer_names: set = set()
        first: Dict[int, str] = {}
        for kind, items in (("p", params), ("b", buffers)):
            for name, t in items:
                canon = first.setdefault(id(t), name)
                self.alias[name] = canon
                if canon == name:
                    self.tensors[name] = t
                    if kind == "b":
                        self.buffer_names.add(name)
        # modules that hold a parameter or buffer, themselves or below: asked of every
        # call_module node, and module.parameters() walks the tree each time
        self.tensor_owners = {module for name in self.alias for module in enclosing_modules(name)}

    def submodule(self, target: str) -> nn.Module:
        """The submodule ``target`` (looked up once: rules and checks ask for it often)."""
        m = self.submodules.get(target)
        if m is None:
            m = self.submodules[target] = self.module.get_submodule(target)
        return m

    # -- atoms
    def fresh(self, n: int, *, link: bool = True) -> torch.Tensor:
        start = self.atoms.add(n)
        self.sources.append([start, n, link])
        self.atom_linked += b"\x01" * n if link else bytes(n)
        return torch.arange(start, start + n, dtype=torch.long)

    def _link_source(self, i: int) -> None:
        start, n, _ = self.sources[i]
        self.sources[i][2] = True
        self.atom_linked[start:start + n] = b"\x01" * n

    def _all_linked(self, atoms: torch.Tensor) -> bool:
        """Whether every atom of ``atoms`` comes from a linked source. A parameter joined
        with such atoms adds nothing to the groups (result() groups an unlinked source's
        atoms only where no linked source took their class), so it may take them."""
        return bool(np.frombuffer(self.atom_linked, dtype=np.uint8)[_np(atoms)].all())

    def unify(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.atoms.union(a, b)

    def tensor_of(self, name: str) -> Optional[torch.Tensor]:
        return self.tensors.get(self.alias.get(name, name))

    def param(self, name: str, dim: int, *, link: bool = False,
              follow: Optional[torch.Tensor] = None) -> torch.Tensor:
        canon = self.alias.get(name, name)
        t = self.tensors.get(canon)
        if t is None:
            raise UnsupportedOpError(f"channel rule asked for '{name}', which is not a parameter or buffer")
        dim = dim % t.dim()
        key = (canon, dim)
        lab = self.members.get(key)
        if lab is None:
            if (follow is not None and not link and follow.dim() == 1 and follow.numel() == t.shape[dim]
                    and self._all_linked(follow)):
                self.members[key] = follow  # see RuleContext.param
                return follow
            lab = self.fresh(t.shape[dim], link=link)
            self.members[key] = lab
            self.member_src[key] = len(self.sources) - 1
        elif link:
            src = self.member_src.get(key)
            if src is None:  # it took the atoms it followed: now its own vector links them
                self.unify(self.fresh(t.shape[dim], link=True), lab)
                self.member_src[key] = len(self.sources) - 1
            else:
                self._link_source(src)
        return lab

    def materialize(self, lz: LazyDim) -> torch.Tensor:
        if lz.labels is None:
            labs = [self.param(n, d) for n, d in lz.params] + [self.materialize(p) for p in lz.parts]
            for other in labs[1:]:
                self.unify(labs[0], other)
            lz.labels = labs[0]
            for info, d in lz.carriers:
                info.labels.setdefault(d, lz.labels)
        return lz.labels

    # -- interpretation
    def run_node(self, n: fx.Node) -> Any:
        if self.fake_mode is not None:
            result = self._shape_only(n)
            if result is None:
                with self.fake_mode:  # only the op runs on fake tensors; rules use real ones
                    result = super().run_node(n)
        else:
            result = super().run_node(n)
        try:
            self.infos[n] = self._analyse(n, result)
        except UnsupportedOpError:
            raise
        except Exception as exc:  # a rule crashed: say where
            raise UnsupportedOpError(
                f"channel rule failed on {describe(n, self.module)}: {type(exc).__name__}: {exc}") from exc
        return result

    def _shape_only(self, n: fx.Node) -> Optional[torch.Tensor]:
        """The fake output of a module of :data:`_SHAPE_ONLY` (Linear, convolution,
        LayerNorm, eval-mode BatchNorm, activations, eval-mode Dropout) or of a function
        of :func:`_shape_functions` (``torch.cat``, a residual add, Swin window attention),
        made from its inputs' shapes, or None (run the op). On fake
        tensors these run as decompositions into many small ops (a cat of many inputs
        pays for hashing them all in the fake-tensor cache), which costs more than the
        rest of the analysis; their output shapes are known. The FakeTensor is built
        directly on a meta tensor (a tenth of the cost of ``torch.empty`` in the mode)."""
        if n.op == "call_function":
            try:
                shape_of_call = self.shape_functions.get(n.target)
            except TypeError:  # an unhashable callable
                shape_of_call = None
            found = shape_of_call(n, self.env) if shape_of_call is not None else None
            if found is None:
                return None
            shape, x = found
        elif n.op == "call_module":
            m = self.submodule(n.target)
            shape_of = _SHAPE_ONLY.get(type(m))
            if shape_of is None or len(n.args) != 1 or n.kwargs or not isinstance(n.args[0], fx.Node):
                return None
            x = self.env[n.args[0]]
            if not isinstance(x, torch.Tensor) or m.training:
                return None
            shape = shape_of(m, x)
            if shape is None:
                return None
        else:
            return None
        if not isinstance(x, FakeTensor) or x.fake_mode is not self.fake_mode:
            return None
        if isinstance(shape, torch.Tensor):
            return shape  # the module returns its input
        return FakeTensor(self.fake_mode, torch.empty(shape, dtype=x.dtype, device="meta"), x.device)

    def _analyse(self, n: fx.Node, result: Any) -> Any:
        if n.op == "placeholder":
            if isinstance(result, torch.Tensor):
                self.input_specs.append(("tensor", tuple(result.shape), result.dtype))
            else:
                self.input_specs.append(("value", result))
            return self._wrap(n, result, None)
        if n.op == "get_attr":
            if isinstance(result, torch.Tensor):
                info = TensorInfo(tuple(result.shape), result.dtype, n.name)
                canon = self.alias.get(n.target, n.target)
                if canon in self.tensors:
                    for d in range(result.dim()):
                        lz = LazyDim(params=((canon, d),))
                        lz.carriers.append((info, d))
                        info.lazy[d] = lz
                return info
            return Const(result)
        env_info = lambda a: self.infos[a]  # noqa: E731
        args = fx.node.map_arg(n.args, env_info)
        kwargs = fx.node.map_arg(n.kwargs, env_info)
        if n.op == "output":
            self._pin_outputs(n, args[0] if args else None)
            return None
        if not self._reads_channels(n, args, kwargs):
            # dtype info, masks built from shapes, arange, constant tensors: nothing the op
            # reads carries a channel, so nothing it computes does, whatever the op is
            return self._wrap(n, result, None)
        try:
            rule = lookup_channel_rule(n, self.module,
                                       module=self.submodule(n.target) if n.op == "call_module" else None)
        except UnsupportedOpError:
            if self.unknown_ops != "keep":
                raise
            rule = _KEEP_UNKNOWN
            self.unknown.append((n.name, describe(n, self.module)))
        cargs, ckwargs = self.fetch_args_kwargs_from_env(n)
        ctx = RuleContext(self, n, args, kwargs, cargs, ckwargs, result)
        out = rule.propagate(ctx)
        if not rule.handles_sizes:
            self._pin_size_args(ctx, args, kwargs)
        return self._wrap(n, result, out)

    def _reads_channels(self, n: fx.Node, args, kwargs) -> bool:
        """Whether ``n`` reads a channel: an argument with channel (or lazily labelled) dims,
        a count that depends on channels, or a called module's own tensors."""
        if n.op == "call_module":
            if n.target in self.tensor_owners:
                return True
        found = False

        def visit(a):
            nonlocal found
            if isinstance(a, TensorInfo) and (a.labels or a.lazy):
                found = True
            elif isinstance(a, Const) and (a.deps is not None or any(i is not None for i in a.items or ())):
                found = True
            return a

        fx.node.map_aggregate((args, kwargs), visit)
        return found

    def _pin_size_args(self, ctx: RuleContext, args, kwargs) -> None:
        def visit(a):
            if isinstance(a, Const):
                if a.deps is not None:
                    self.pins.append((a.deps, f"a channel count is used by {ctx.describe()}, "
                                              f"which cannot adapt it"))
            return a
        fx.node.map_aggregate((args, kwargs), visit)

    def _wrap(self, n: fx.Node, result: Any, out: Any) -> Any:
        if isinstance(result, torch.Tensor):
            info = TensorInfo(tuple(result.shape), result.dtype, n.name)
            if isinstance(out, TensorInfo):
                info.labels.update(out.labels)
                lazy = out.lazy
            elif isinstance(out, Mapping):
                for d, lab in out.items():
                    d = info.dim(d)
                    lab = torch.as_tensor(lab, dtype=torch.long).reshape(-1)
                    if lab.numel() != info.shape[d]:
                        raise RuntimeError(
                            f"rule returned {lab.numel()} atoms for dim {d} of size {info.shape[d]}")
                    info.labels[d] = lab
                lazy = getattr(out, "lazy", {})
            else:
                lazy = {}
            for d, lz in lazy.items():
                d = info.dim(d)
                if d in info.labels:
                    continue
                if lz.labels is not None:
                    info.labels[d] = lz.labels
                else:
                    info.lazy[d] = lz
                    lz.carriers.append((info, d))
            return info
        if isinstance(result, (tuple, list)) and not isinstance(result, torch.Size):
            outs = out if isinstance(out, (tuple, list)) else (None,) * len(result)
            return tuple(self._wrap(n, r, o) for r, o in zip(result, outs))
        if isinstance(result, dict):
            outs = out if isinstance(out, Mapping) else {}
            return {k: self._wrap(n, v, outs.get(k)) for k, v in result.items()}
        if isinstance(out, Const):
            return Const(result, out.deps, out.items)
        return Const(result)

    def _pin_outputs(self, n: fx.Node, structure: Any) -> None:
        def visit(info, path):
            if isinstance(info, TensorInfo):
                for d in range(info.ndim):
                    lab = info.labels.get(d)
                    if lab is None and d in info.lazy:
                        lab = self.materialize(info.lazy[d])
                    if lab is not None:
                        self.pins.append((lab, f"reaches task output {path}"))
            elif isinstance(info, Const):
                if info.deps is not None:
                    self.pins.append((info.deps, f"a channel count reaches output {path}"))
            elif isinstance(info, (tuple, list)):
                for i, v in enumerate(info):
                    visit(v, f"{path}[{i}]" if path else repr(i))
            elif isinstance(info, Mapping):
                for k, v in info.items():
                    visit(v, repr(k))

        if isinstance(structure, TensorInfo):
            visit(structure, "0")
        else:
            visit(structure, "")

    # -- result
    def result(self, prunable: Optional[Callable[[str, nn.Parameter], bool]]) -> ChannelGroups:
        n_atoms = self.atoms.count
        root = self.atoms.roots()
        # channels of one vector (a conv's outputs ...) form one group: link the roots.
        # Every atom comes from one source (a fresh() call), in order.
        starts = np.array([s[0] for s in self.sources], dtype=np.int64)
        counts = np.array([s[1] for s in self.sources], dtype=np.int64)
        links = np.array([bool(s[2]) for s in self.sources], dtype=bool)
        src = np.repeat(np.arange(len(self.sources), dtype=np.int64), counts)
        linked_atom = links[src]
        linked = np.zeros(n_atoms, dtype=bool)
        linked[root[linked_atom]] = True
        comp = _Atoms()
        comp.add(n_atoms)
        # a linked source: all its atoms' roots together
        comp.union(root[starts[src[linked_atom]]], root[linked_atom])
        # any other source: the roots no linked source took, together
        free = ~linked_atom & ~linked[root]
        free_root, free_src = root[free], src[free]
        first = np.full(len(self.sources), n_atoms, dtype=np.int64)
        np.minimum.at(first, free_src, free_root)
        comp.union(first[free_src], free_root)
        comp_root = comp.roots()  # the smallest root of each root's component
        is_root = np.zeros(n_atoms, dtype=bool)
        is_root[root] = True
        roots = np.flatnonzero(is_root)  # sorted; a root is its class's smallest atom
        # groups in the order of their smallest root, channels in creation order
        comp_of = comp_root[roots]
        order = np.argsort(comp_of * max(n_atoms, 1) + roots, kind="stable")
        gid_of_root = np.full(n_atoms, -1, dtype=np.int64)
        gid_of_root[roots[order]] = np.arange(roots.size, dtype=np.int64)
        sorted_comp = comp_of[order]
        starts_of_group = np.flatnonzero(np.concatenate([[True], sorted_comp[1:] != sorted_comp[:-1]])) \
            if sorted_comp.size else np.empty(0, dtype=np.int64)
        size_t = np.diff(np.append(starts_of_group, sorted_comp.size))
        group_t = np.repeat(np.arange(size_t.size, dtype=np.int64), size_t)  # group of each channel
        sizes = size_t.tolist()
        offsets = starts_of_group.tolist()
        gid_of_atom = gid_of_root[root]
        num_groups = len(sizes)

        def gids(lab: Any) -> np.ndarray:
            return gid_of_atom[_np(lab)]

        def groups_of(gl: np.ndarray) -> List[int]:
            """The groups of channels ``gl``, in increasing order."""
            grp = group_t[gl]
            if not grp.size:
                return []
            lo, hi = int(grp.min()), int(grp.max())
            if lo == hi:
                return [lo]
            if hi - lo < 4 * grp.size:  # a dense range of groups: count them (no sort)
                return (np.flatnonzero(np.bincount(grp - lo)) + lo).tolist()
            return _sorted_unique(grp).tolist()

        # members: every (parameter, dim) slice vector at once. A member in one group gets
        # its vector of group channels; one that spans k groups (a conv after a concat)
        # gets k rows, each with -1 where another group's slices sit. All index vectors
        # are views of two flat blocks, cut by one torch.split: ~4000 members (densenet121)
        # made one by one cost more than the rest of the result.
        members: List[List[GroupMember]] = [[] for _ in range(num_groups)]
        offsets_np = np.asarray(offsets, dtype=np.int64)
        member_keys = list(self.members)
        if member_keys:
            labs = [_np(lab) for lab in self.members.values()]
            lens = np.array([a.size for a in labs], dtype=np.int64)
            gl_all = gid_of_atom[np.concatenate(labs)]
            grp_all = group_t[gl_all]
            local_all = gl_all - offsets_np[grp_all]
            seg = np.repeat(np.arange(lens.size, dtype=np.int64), lens)
            # the (member, group) pairs, member-major and groups increasing: the distinct
            # keys of the runs (a member's slices come in runs of one group)
            pair_key = seg * max(num_groups, 1) + grp_all
            run_start = np.flatnonzero(np.concatenate(([True], pair_key[1:] != pair_key[:-1])))
            pairs = np.unique(pair_key[run_start])
            pair_member, pair_group = np.divmod(pairs, max(num_groups, 1))
            k = np.bincount(pair_member, minlength=lens.size)  # groups per member
            first_pair = np.concatenate(([0], np.cumsum(k)[:-1]))
            multi = k > 1
            # rows of the members in several groups, in one block filled with -1
            row_len = np.repeat(lens, k)  # one row per pair
            multi_rows = np.repeat(multi, k)
            row_base = np.concatenate(([0], np.cumsum(np.where(multi_rows, row_len, 0))[:-1]))
            block = np.full(int(row_len[multi_rows].sum()), -1, dtype=np.int64)
            in_multi = multi[seg]
            if in_multi.any():
                e = np.flatnonzero(in_multi)
                row = np.searchsorted(pairs, pair_key[e])  # the pair of each slice
                pos = e - (np.cumsum(lens) - lens)[seg[e]]  # the slice's place in its vector
                block[row_base[row] + pos] = local_all[e]
            single_views = torch.from_numpy(local_all).split(lens.tolist())
            multi_views = torch.from_numpy(block).split(row_len[multi_rows].tolist())
            is_buffer = [name in self.buffer_names for name, _ in member_keys]
            mv = iter(multi_views)
            pair_group_l, first_l, k_l = pair_group.tolist(), first_pair.tolist(), k.tolist()
            for m, ((name, dim), view) in enumerate(zip(member_keys, single_views)):
                if k_l[m] == 1:
                    members[pair_group_l[first_l[m]]].append(GroupMember(name, dim, view, is_buffer[m]))
                else:
                    for g in pair_group_l[first_l[m]:first_l[m] + k_l[m]]:
                        members[g].append(GroupMember(name, dim, next(mv), is_buffer[m]))
        # removability
        reasons: Dict[int, str] = {}
        for lab, why in self.pins:
            for g in groups_of(gids(lab)):
                reasons.setdefault(g, why)
        if prunable is not None:
            for g in range(num_groups):
                if g in reasons:
                    continue
                for m in members[g]:
                    if m.is_buffer:
                        continue
                    t = self.tensors[m.param_name]
                    if not prunable(m.param_name, t):
                        reasons[g] = f"parameter '{m.param_name}' is not prunable"
                        break
        # nodes, channel maps, non-empty constraints
        node_channels: Dict[str, Any] = {}
        node_shapes: Dict[str, Any] = {}
        size_dependent: Dict[str, Any] = {}
        group_nodes: List[List[str]] = [[] for _ in range(num_groups)]
        pieces: Dict[bytes, None] = {}  # the increasing channels of an atom vector, as int64 bytes

        known: Dict[int, Tuple[torch.Tensor, torch.Tensor, List[int]]] = {}  # id(atoms) -> their channels

        def channels(lab: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
            hit = known.get(id(lab))
            if hit is None or hit[0] is not lab:  # one atom vector is shared by many nodes
                gl = gids(lab)
                u = _sorted_unique(gl)
                pieces.setdefault(u.tobytes(), None)
                hit = known[id(lab)] = (lab, torch.from_numpy(gl), groups_of(u))
            return hit[1], hit[2]

        def convert(info, name):
            if isinstance(info, TensorInfo):
                ch = {}
                for d, lab in sorted(info.labels.items()):
                    ch[d], gs = channels(lab)
                    for g in gs:
                        if not group_nodes[g] or group_nodes[g][-1] != name:
                            group_nodes[g].append(name)
                return ch, info.shape
            if isinstance(info, Const):
                if info.deps is not None:
                    size_dependent[name] = info.value
                return None, info.value if isinstance(info.value, (int, float, tuple, list, torch.Size)) else None
            if isinstance(info, (tuple, list)):
                pairs = [convert(v, name) for v in info]
                return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
            if isinstance(info, Mapping):
                pairs = {k: convert(v, name) for k, v in info.items()}
                return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
            return None, None

        for node, info in self.infos.items():
            ch, shp = convert(info, node.name)
            node_channels[node.name] = ch
            node_shapes[node.name] = shp

        keep_one_of: List[List[torch.Tensor]] = [[] for _ in range(num_groups)]
        nonempty: List[torch.Tensor] = []
        for key in pieces:
            u = np.frombuffer(key, dtype=np.int64).copy()
            grp = group_t[u]  # increasing, as u is
            first_of_run = np.flatnonzero(np.concatenate(([True], grp[1:] != grp[:-1])))
            in_groups, count = grp[first_of_run], np.diff(np.append(first_of_run, grp.size))
            if bool((count == size_t[in_groups]).any()):
                continue  # holds a whole group, which keeps a channel anyway
            if in_groups.size == 1:
                g = int(in_groups[0])
                keep_one_of[g].append(torch.from_numpy(u - offsets[g]))
            else:
                nonempty.append(torch.from_numpy(u))

        groups = []
        for g in range(num_groups):
            groups.append(ChannelGroup(
                id=g, size=sizes[g], members=tuple(members[g]), removable=g not in reasons,
                reason=reasons.get(g, ""), round_multiple=1, nodes=tuple(group_nodes[g]),
                keep_one_of=tuple(keep_one_of[g])))
        contractions = []
        seen = set()
        for c in self.contractions:
            if c not in seen:
                seen.add(c)
                contractions.append(Contraction(*c))
        internal = {node: MappingProxyType({k: torch.from_numpy(gids(lab)) for k, lab in d.items()})
                    for node, d in self.internals.items()}
        norms = tuple(Contraction(*c) for c in dict.fromkeys(self.norms))
        param_shapes = {}
        for (name, _dim) in self.members:
            param_shapes[name] = tuple(self.tensors[name].shape)
        return ChannelGroups(
            groups=tuple(groups),
            offsets=tuple(offsets),
            node_channels=MappingProxyType(node_channels),
            node_shapes=MappingProxyType(node_shapes),
            size_dependent=MappingProxyType(size_dependent),
            contractions=tuple(contractions),
            nonempty=tuple(nonempty),
            input_specs=tuple(self.input_specs),
            param_shapes=MappingProxyType(param_shapes),
            buffers=frozenset(n for n in param_shapes if n in self.buffer_names),
            internal_channels=MappingProxyType(internal),
            normalizations=norms,
            attention=self.attention,
            attention_units=tuple((node, kind, torch.from_numpy(gids(lab))) for node, kind, lab in self.attention_units),
            unknown_nodes=tuple(name for name, _ in self.unknown),
        )


def _keep_unknown(ctx: RuleContext) -> None:
    """The stand-in rule of an op without one (``unknown_ops="keep"``): every channel it
    reads - of its tensor arguments, and of its module's parameters and buffers - is
    pinned, and its outputs carry no channels, so whatever reads them keeps its channels
    too. Never a guess: nothing around the op changes shape."""
    reason = f"{ctx.describe()} has no channel rule; its channels are kept (unknown_ops='keep')"
    for x in ctx.tensors():
        for d in range(x.ndim):
            ctx.pin(ctx.labels(x, d), reason)
    if ctx.node.op == "call_module":
        m = ctx.module
        for name, t in [*m.named_parameters(remove_duplicate=False), *m.named_buffers(remove_duplicate=False)]:
            for d in range(t.dim()):
                ctx.pin(ctx.param(name, d), reason)
    return None


_KEEP_UNKNOWN = ChannelRule(_keep_unknown, name="keep_unknown")


def _run(gm: fx.GraphModule, example_inputs: tuple, *, fake: bool, attention: str,
         unknown_ops: str) -> "_Analysis":
    analysis = _Analysis(gm, attention, unknown_ops)
    with torch.no_grad():
        if not fake:
            analysis.run(*example_inputs)
            return analysis
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        analysis.fake_mode = mode
        inputs = tuple(mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs)
        analysis.run(*inputs)
    return analysis


def find_channel_groups(
    gm: fx.GraphModule,
    example_inputs: Any,
    *,
    prunable: Optional[Callable[[str, nn.Parameter], bool]] = None,
    fake_tensors: bool = True,
    attention: str = "heads",
    unknown_ops: str = "raise",
) -> ChannelGroups:
    """Find the channel groups of ``gm`` (see the module docstring).

    Args:
        gm: the traced model; never modified.
        example_inputs: a tuple of positional inputs (a single tensor is accepted too),
            on the model's device. Small inputs suffice: only shapes matter.
        prunable: ``prunable(name, param) -> bool``; a parameter for which it returns
            False must keep its shape, so every group that would slice it is fixed (use it
            for layers to leave alone). Default None: any parameter may be sliced - biases,
            norm weights and running stats go with their channels, so do not pass an
            element-level "prunable weights" set here.
        fake_tensors: propagate shapes with fake tensors (no arithmetic, fast); if an op
            cannot run on fake tensors, the model runs for real (in eval mode, no grad).
        attention: what a channel of an attention block is: ``"heads"`` (a whole head:
            its q, k and v rows and its out-projection columns) or ``"head_dims"`` (one
            dimension of every head: the same position in each head, q and k together).
        unknown_ops: what an op without a channel rule does: ``"raise"`` (default: the
            analysis never guesses) or ``"keep"``: every channel the op reads (its tensor
            arguments, its module's parameters and buffers) is fixed, its outputs carry
            no channels, and a warning names each such node (name, target, source line).
            For analyses that only remove channels proven dead (an element slim); the
            groups list the nodes in ``unknown_nodes``.

    Raises :class:`UnsupportedOpError` for an op without a channel rule (unless
    ``unknown_ops="keep"``), :class:`DisparseValueError` for a bad argument.
    """
    if not isinstance(gm, fx.GraphModule):
        raise DisparseValueError(f"find_channel_groups expects an fx.GraphModule, got {type(gm).__name__}")
    if attention not in ATTENTION_POLICIES:
        raise DisparseValueError(f"attention must be one of {ATTENTION_POLICIES}, got {attention!r}")
    if unknown_ops not in UNKNOWN_OPS:
        raise DisparseValueError(f"unknown_ops must be one of {UNKNOWN_OPS}, got {unknown_ops!r}")
    if not isinstance(example_inputs, tuple):
        example_inputs = tuple(example_inputs) if isinstance(example_inputs, list) else (example_inputs,)
    modes = [(m, m.training) for m in gm.modules()]
    try:
        gm.eval()
        analysis = None
        if fake_tensors:
            try:
                with paused_gc():  # see passes/gc_pause.py; not around the real run below
                    analysis = _run(gm, example_inputs, fake=True, attention=attention, unknown_ops=unknown_ops)
            except UnsupportedOpError:
                raise
            except Exception as exc:  # noqa: BLE001 - an op fake tensors cannot run: run for real
                log.debug("fake-tensor shape propagation failed (%s: %s); running the model",
                          type(exc).__name__, exc)
        if analysis is None:
            analysis = _run(gm, example_inputs, fake=False, attention=attention, unknown_ops=unknown_ops)
    finally:
        for m, mode in modes:
            m.training = mode
    with paused_gc():
        result = analysis.result(prunable)
    if analysis.unknown:
        warn(f"no channel rule for {len(analysis.unknown)} node(s); every channel they read or write is kept:\n  "
             + "\n  ".join(text for _, text in analysis.unknown))
    log.debug("found %d channel groups (%d removable) in %s", len(result.groups),
              len(result.removable_groups()), type(gm).__name__)
    return result
