"""The channel-rule registry: what a rule is, how it is registered and looked up, and
the context its ``slim`` / ``mask`` hooks see (:class:`SlimContext`).

Rule modules (``passes/rules/*.py``) and the passes that run rules (channel groups,
channel masks, slim) all import from here; this module imports no pass and no rule
module, so the registry is the bottom of ``passes.rules``. ``passes.rules`` re-exports
these names and registers the built-in rules; see its docstring for how to write one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import UnsupportedOpError, describe_node

__all__ = [
    "ChannelRule",
    "Labels",
    "SlimContext",
    "register_channel_rule",
    "lookup_channel_rule",
    "registered_targets",
    "describe",
    "torch_attr",
    "op_name",
]

Rule = Callable[[Any], Any]


class Labels(dict):
    """``{dim: LongTensor of atoms}`` for one tensor output of a rule.

    ``lazy`` maps a dim to parameters whose atoms will be created only if a consumer
    needs that dim (a reshaped or scaled ``get_attr`` value); rules rarely set it.
    """

    __slots__ = ("lazy",)

    def __init__(self, *args, lazy: Optional[Dict[int, Any]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})


@dataclass(frozen=True)
class ChannelRule:
    """A registered rule: ``propagate(ctx)`` -> output atoms; optional ``slim(sctx)``;
    optional ``mask(sctx)``, called by the channel-mask pass on nodes with internal
    channels (``ctx.internal``) of which some are removed, to make the op compute its
    slim version (an attention module gets head masks).

    ``handles_sizes``: the rule rewrites (or does not depend on) size arguments that are
    computed from channel counts (``x.size(1) // 2``); for any other rule the analysis
    pins the channels such sizes come from.
    """

    propagate: Rule
    slim: Optional[Callable[[Any], None]] = None
    handles_sizes: bool = False
    name: str = ""
    mask: Optional[Callable[[Any], None]] = None


_RULES: Dict[Any, ChannelRule] = {}


def register_channel_rule(*targets: Any, slim: Optional[Callable[[Any], None]] = None,
                          handles_sizes: bool = False, mask: Optional[Callable[[Any], None]] = None):
    """Decorator: ``rule(ctx)`` becomes the channel rule of every target.

    A target is a module type (``call_module``), a function (``call_function``) or a
    method name string (``call_method``). Registering a target again replaces its rule
    (so users may override a built-in one).
    """
    if not targets:
        raise TypeError("register_channel_rule needs at least one target")

    def deco(fn: Rule) -> Rule:
        rule = ChannelRule(fn, slim, handles_sizes, getattr(fn, "__qualname__", repr(fn)), mask)
        for t in targets:
            if t is None:
                continue
            _RULES[t] = rule
        return fn

    return deco


def registered_targets() -> Tuple[Any, ...]:
    """Every target with a rule (for reports and tests)."""
    return tuple(_RULES)


def op_name(target: Any) -> str:
    """The bare name of an op: a method name as is, ``relu`` for ``torch.relu`` and for
    ``torch.ops.aten.relu.default`` (an ATen overload: its packet's name)."""
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return target._opname
    return getattr(target, "__name__", "")


def _target_repr(node: fx.Node, gm: fx.GraphModule) -> str:
    if isinstance(node.target, torch._ops.OpOverload):
        return f"torch.ops.{node.target.namespace}.{node.target._opname}.{node.target._overloadname}"
    if node.op == "call_module":
        t = type(gm.get_submodule(node.target))
        return f"{t.__module__}.{t.__qualname__}"
    if node.op == "call_method":
        return repr(node.target)
    t = node.target
    mod = getattr(t, "__module__", None) or "?"
    return f"{mod}.{getattr(t, '__qualname__', getattr(t, '__name__', repr(t)))}"


# One way to name a node in messages, with the user's source line (passes.errors).
describe = describe_node


def lookup_channel_rule(node: fx.Node, gm: fx.GraphModule, *, module: Optional[nn.Module] = None) -> ChannelRule:
    """The rule for ``node``, or :class:`UnsupportedOpError` saying how to add one.
    ``module``: the module a ``call_module`` node calls, when the caller has it at hand."""
    key: Any = node.target
    if node.op == "call_module":
        mod_type = type(module if module is not None else gm.get_submodule(node.target))
        rule = _RULES.get(mod_type)
        if rule is None:
            # a subclass that keeps its base's forward computes what the base computes
            for base in mod_type.__mro__[1:]:
                if base in _RULES and getattr(mod_type, "forward", None) is getattr(base, "forward", None):
                    rule = _RULES[base]
                    break
        key = mod_type
    else:
        rule = _RULES.get(key) if _hashable(key) else None
    if rule is None:
        leaf = ""
        if node.op == "call_module" and next(gm.get_submodule(node.target).children(), None) is not None:
            leaf = (f"  '{node.target}' is a leaf module: the tracer did not enter it, so its layers are one op "
                    f"here. Leave its type out of leaf_modules (if you put it there) so its layers are traced, "
                    f"or register a rule for the whole module.\n")
        raise UnsupportedOpError(
            f"no channel rule for {describe(node, gm)}.\n" + leaf +
            f"  The channel-group analysis never guesses how an unknown op treats channels.\n"
            f"  Register a rule for it:\n"
            f"      from disparse_fx.passes.rules import register_channel_rule\n"
            f"      @register_channel_rule({_target_repr(node, gm)})\n"
            f"      def my_rule(ctx):\n"
            f"          x = ctx.arg(0)\n"
            f"          return ctx.same_as(x)   # e.g. for an op that keeps every channel\n"
            f"  (see the passes.rules docstring), or make the module a leaf that has a rule."
        )
    return rule


def _hashable(x: Any) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


def existing(*candidates: Any) -> Tuple[Any, ...]:
    """The candidates that exist (functions differ between torch versions): the ones
    :func:`torch_attr` did not answer None for."""
    return tuple(c for c in candidates if c is not None)


def torch_attr(path: str) -> Any:
    """``torch_attr("nn.functional.relu")`` -> the object or None if this torch lacks it."""
    obj: Any = torch
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


_MISSING = object()


class SlimContext:
    """What a rule's ``slim`` hook sees: the node of the NEW graph, after slicing (and
    what its ``mask`` hook sees: the node of the masked graph). ``groups`` is the
    :class:`passes.channel_groups.ChannelGroups` the plan was made on; ``keep`` the keep
    flag of every global channel."""

    def __init__(self, gm: fx.GraphModule, node: fx.Node, groups: Any, keep: torch.Tensor):
        self.gm = gm
        self.node = node
        self.groups = groups
        self.keep = keep  # keep flag of every global channel

    @property
    def module(self) -> nn.Module:
        return self.gm.get_submodule(self.node.target)

    def _name(self, n: Any) -> str:
        return n.name if isinstance(n, fx.Node) else str(n)

    def channels(self, n: Any) -> Any:
        """``{dim: global channel ids}`` of a tensor node (a tuple for tuple outputs)."""
        ch = self.groups.node_channels.get(self._name(n))
        return {} if ch is None else ch

    def shape(self, n: Any) -> Any:
        """The node's output shape on the example inputs (before slimming)."""
        return self.groups.node_shapes.get(self._name(n))

    def internal(self, name: str) -> torch.Tensor:
        """Keep flags of this node's internal channels ``name`` (e.g. an attention
        module's ``"heads"``)."""
        return self.keep[self.groups.internal_channels[self.node.name][name]]

    def kept_count(self, n: Any, dim: int, default: Optional[int] = None) -> int:
        ch = self.channels(n)
        gids = ch.get(dim) if isinstance(ch, Mapping) else None
        if gids is None:
            return default if default is not None else self.shape(n)[dim]
        return int(self.keep[gids].sum())

    def arg(self, pos: Optional[int], name: Optional[str] = None, default: Any = None) -> Any:
        if pos is not None and pos < len(self.node.args):
            return self.node.args[pos]
        if name is not None and name in self.node.kwargs:
            return self.node.kwargs[name]
        return default

    def value(self, pos: Optional[int], name: Optional[str] = None, default: Any = None) -> Any:
        """A literal argument, or the example-input value of a node argument."""
        a = self.arg(pos, name, _MISSING)
        if a is _MISSING:
            return default
        return self.concrete_index(a)

    def concrete_index(self, a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: self.groups.node_shapes.get(n.name))

    def is_size_dependent(self, a: Any) -> bool:
        """Whether ``a`` holds a node whose value was computed from a channel count."""
        found = []
        fx.node.map_arg(a, lambda n: found.append(n.name in self.groups.size_dependent))
        return any(found)

    def set_arg(self, pos: int, name: Optional[str], value: Any) -> None:
        if pos is not None and pos < len(self.node.args):
            args = list(self.node.args)
            args[pos] = value
            self.node.args = tuple(args)
        elif name is not None:
            self.set_kwarg(name, value)

    def set_kwarg(self, name: str, value: Any) -> None:
        kwargs = dict(self.node.kwargs)
        kwargs[name] = value
        self.node.kwargs = kwargs
