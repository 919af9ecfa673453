"""The registry of per-op channel rules used by :func:`passes.channel_groups.find_channel_groups`.

A *channel rule* tells the channel-group analysis how one op relates the channels of
its inputs to the channels of its output. The analysis gives every slice of every
channel dimension an integer *atom*; a rule

- reads the atoms of its inputs (``ctx.labels(x, dim)``),
- declares which slices must be removed together (``ctx.unify(a, b)``),
- declares slices that can never be removed (``ctx.pin(atoms, reason)``),
- declares that it *sums over* a channel dimension (``ctx.contract(x, dim)``: removed
  slices must be zero there; the channel-mask pass puts its masks in front of it), and
- returns the atoms of its output: ``{dim: LongTensor}`` (one atom per slice along
  ``dim``; dims left out carry no channels), a tuple of those for tuple outputs, or
  ``None`` for an output whose shape does not depend on any removable channel.

Rules are looked up by the node's target: the module *type* for ``call_module`` (exact
type; a subclass that does not override ``forward`` inherits its base's rule), the
function object for ``call_function``, the method name (a ``str``) for
``call_method``. A lookup miss raises :class:`~passes.errors.UnsupportedOpError`
naming the node, its target and its source line: an unknown op is never assumed to be
elementwise.

Registering your own rule (a leaf module that scales each channel)::

    import torch, torch.nn as nn
    from passes.rules import register_channel_rule

    class ChannelScale(nn.Module):          # traced as a leaf module
        def __init__(self, c):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(c))
        def forward(self, x):               # x: (N, C, H, W)
            return x * self.gain.view(1, -1, 1, 1)

    def _slim_channel_scale(sctx):           # optional: fix attributes after slicing
        pass                                 # (gain is sliced for you: it is a member)

    @register_channel_rule(ChannelScale, slim=_slim_channel_scale)
    def channel_scale_rule(ctx):
        x = ctx.arg(0)                       # the input's TensorInfo
        gain = ctx.param("gain", 0)          # atoms of ChannelScale.gain along dim 0
        ctx.join(ctx.labels(x, 1), gain)     # same channels as the input's dim 1
        return ctx.same_as(x)                # output channels = input channels

The ``ctx`` object (:class:`passes.channel_groups.RuleContext`) offers:

==================================  =====================================================
``ctx.node`` / ``ctx.gm``           the fx node and its GraphModule
``ctx.module``                      the called submodule (``call_module`` only)
``ctx.arg(pos, name)``              an argument: ``TensorInfo`` for tensors, else the value
``ctx.value(pos, name)``            the concrete argument value (ints, tuples, tensors)
``ctx.args`` / ``ctx.kwargs``       all arguments as the analysis sees them
``ctx.tensors()``                   every TensorInfo among the arguments
``ctx.out``                         the node's concrete output (from shape propagation)
``ctx.labels(x, dim)``              atoms of ``x`` along ``dim`` or ``None`` (no channels)
``ctx.param(name, dim, link=)``     atoms of a parameter/buffer dim; records a member
``ctx.fresh(n)``                    ``n`` new atoms (a new channel vector)
``ctx.unify(a, b)``                 slice ``i`` of ``a`` and of ``b`` go together
``ctx.join(*atoms)``                unify all given; pin all if one of them is ``None``
``ctx.pin(atoms, reason)``          these atoms can never be removed
``ctx.contract(x, dim, weight=)``   this op sums ``x`` over ``dim`` (zero-neutral)
``ctx.mix(x, dim)``                 this op mixes ``x`` over ``dim`` non-linearly: pin
``ctx.same_as(x)``                  the output carries exactly ``x``'s channels
``ctx.resolve(atoms)``              canonical atoms (for comparisons)
``ctx.normalize(x, dim)``           this op normalises ``x`` over ``dim`` (LayerNorm)
``ctx.internal(name, atoms)``       channels living inside this op (attention heads)
``ctx.attention_unit(kind, at)``     atoms ``at`` are attention heads or head dims (reports)
``ctx.attention``                   "heads" or "head_dims" (what an attention channel is)
``ctx.head_split``                  that policy if this reshape may split q/k/v into heads
==================================  =====================================================

A rule may also give a ``slim`` hook, called by :func:`passes.slim.slim_channels` on
the copied node after the members' parameters were sliced, to update module
attributes or literal arguments (see :class:`passes.slim.SlimContext`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.fx as fx

from ..errors import UnsupportedOpError, describe_node

__all__ = [
    "ChannelRule",
    "Labels",
    "register_channel_rule",
    "lookup_channel_rule",
    "registered_targets",
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


def _target_repr(node: fx.Node, gm: fx.GraphModule) -> str:
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


def lookup_channel_rule(node: fx.Node, gm: fx.GraphModule) -> ChannelRule:
    """The rule for ``node``, or :class:`UnsupportedOpError` saying how to add one."""
    key: Any = node.target
    if node.op == "call_module":
        mod_type = type(gm.get_submodule(node.target))
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
        raise UnsupportedOpError(
            f"no channel rule for {describe(node, gm)}.\n"
            f"  The channel-group analysis never guesses how an unknown op treats channels.\n"
            f"  Register a rule for it:\n"
            f"      from passes.rules import register_channel_rule\n"
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


def _first(*candidates: Any) -> Tuple[Any, ...]:
    """The candidates that exist (functions differ between torch versions)."""
    return tuple(c for c in candidates if c is not None)


def torch_attr(path: str) -> Any:
    """``torch_attr("nn.functional.relu")`` -> the object or None if this torch lacks it."""
    obj: Any = torch
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


# Built-in rules register themselves on import.
from . import attention, conv, elementwise, embedding, norm, pooling, shape, torchvision_ops  # noqa: E402,F401
