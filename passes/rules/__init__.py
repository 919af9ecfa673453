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
    from disparse_fx.passes.rules import register_channel_rule

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
``ctx.param(.., follow=atoms)``     the same, taking ``atoms`` (what the rule joins it
                                    with) where they decide its channels: fewer atoms
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
attributes or literal arguments (see :class:`passes.rules.SlimContext`).
"""
from __future__ import annotations

# The registry itself lives in .registry (rule modules import it from there, so they never
# import this package's __init__ back); these names are its public face.
from .registry import (_RULES, ChannelRule, Labels, SlimContext, describe,  # noqa: F401
                       lookup_channel_rule, op_name, register_channel_rule, registered_targets,
                       torch_attr)
from .registry import __all__  # noqa: F401 - the package's public names are the registry's

# Built-in rules register themselves on import.
from . import attention, conv, elementwise, embedding, norm, pooling, rnn, shape, torchvision_ops  # noqa: E402,F401
from . import aten  # noqa: E402,F401 - after the rules it reuses
