"""Channel-group analysis: hand-written expectations, the rule registry, unknown ops,
user rules, and the analysis' purity."""
import pytest
import torch
import torch.nn as nn

import disparse_fx.passes.rules as rules
from disparse_fx.passes.channel_groups import find_channel_groups
from disparse_fx.passes.errors import UnsupportedOpError
from disparse_fx.passes.insert_masks import insert_masks
from disparse_fx.passes.slim import slim_channels
from disparse_fx.passes.trace import trace_model

from .cnn_zoo import CNN_ZOO, build
from .test_slim import random_keep


def summary(groups):
    """{frozenset of (param, dim)}: (size, removable) for every group."""
    return {frozenset((m.param_name, m.dim) for m in g.members): (g.size, g.removable) for g in groups.groups}


def member(groups, name, dim):
    found = [(g, m) for g in groups.groups for m in g.members if m.param_name == name and m.dim == dim]
    assert found, (name, dim)
    return found


BN = ("weight", "bias", "running_mean", "running_var")


def bn(prefix):
    return {(f"{prefix}.{p}", 0) for p in BN}


def test_residual_net_groups_match_hand_written_expectation():
    model, x = build("residual")
    groups = find_channel_groups(trace_model(model), (x,))
    trunk = ({("stem.0.weight", 0), ("b1.0.0.weight", 1), ("b1.1.weight", 0), ("b1.1.bias", 0),
              ("b2.0.0.weight", 1), ("b2.1.weight", 0), ("b2.1.bias", 0), ("seg.weight", 1),
              ("cls.weight", 1), ("reg.weight", 1)} | bn("stem.1") | bn("b1.2") | bn("b2.2"))
    expected = {
        frozenset(trunk): (8, True),
        frozenset({("b1.0.0.weight", 0), ("b1.1.weight", 1)} | bn("b1.0.1")): (8, True),
        frozenset({("b2.0.0.weight", 0), ("b2.1.weight", 1)} | bn("b2.0.1")): (16, True),
        frozenset({("stem.0.weight", 1)}): (3, False),
        frozenset({("seg.weight", 0), ("seg.bias", 0)}): (4, False),
        frozenset({("cls.weight", 0), ("cls.bias", 0)}): (5, False),
        frozenset({("reg.weight", 0), ("reg.bias", 0)}): (2, False),
    }
    assert summary(groups) == expected
    # flatten into a Linear: each channel owns a 2x2 block of in_features
    (g, m), = member(groups, "reg.weight", 1)
    assert m.index.tolist() == torch.arange(8).repeat_interleave(4).tolist()
    # the trunk's tensors: every node carrying its channels, through both heads
    assert {"stem_2", "add", "relu", "add_1", "relu_1", "mean", "pool", "flatten"} <= set(g.nodes)
    reasons = {g.size: g.reason for g in groups.groups if not g.removable}
    assert reasons[4] == "reaches task output 'seg'"
    assert "reads channels that are fixed" in reasons[3] and "cnn_zoo.py" in reasons[3]


def test_concat_net_maps_offsets():
    model, x = build("concat")
    groups = find_channel_groups(trace_model(model), (x,))
    stem = {("stem.0.weight", 0)} | bn("stem.1") | {("l1.0.weight", 1), ("early.weight", 1), ("l2.0.weight", 1),
                                                     ("trans.2.weight", 1)} | bn("trans.0")
    l1 = {("l1.0.weight", 0), ("early.weight", 1), ("l2.0.weight", 1), ("trans.2.weight", 1)} | bn("l1.1") | bn("trans.0")
    l2 = {("l2.0.weight", 0), ("trans.2.weight", 1)} | bn("l2.1") | bn("trans.0")
    trans = {("trans.2.weight", 0), ("trans.2.bias", 0), ("seg.weight", 1), ("cls.weight", 1)}
    s = summary(groups)
    for members, size in ((stem, 6), (l1, 6), (l2, 6), (trans, 12)):
        assert s[frozenset(members)] == (size, True)
    assert len(groups.groups) == 8  # + input, three task outputs
    idx = {g.id: m.index.tolist() for g, m in member(groups, "trans.0.weight", 0)}
    offsets = sorted(idx.values(), key=lambda v: [i for i, c in enumerate(v) if c >= 0][0])
    assert offsets == [list(range(6)) + [-1] * 12, [-1] * 6 + list(range(6)) + [-1] * 6,
                       [-1] * 12 + list(range(6))]


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = self.c1(x)
        n, c, hh, ww = h.shape
        h = h.view(n, 2, c // 2, hh, ww).transpose(1, 2).reshape(n, c, hh, ww)
        return (self.c2(h),)


def test_channel_shuffle_couples_positions_across_groups():
    groups = find_channel_groups(trace_model(Shuffle()), (torch.randn(2, 3, 4, 4),))
    (g, m0), = member(groups, "c1.weight", 0)
    (g2, m1), = member(groups, "c2.weight", 1)
    assert g is g2 and g.size == 4 and g.removable
    assert m0.index.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert m1.index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    gm = trace_model(Shuffle())
    groups = find_channel_groups(gm, (torch.randn(2, 3, 4, 4),))
    slim = slim_channels(gm, groups, {g.id: torch.tensor([True, False, False, True])})
    assert slim.c1.out_channels == 4 and slim.c2.in_channels == 4


def test_grouped_conv_couples_positions_and_depthwise_whole_groups():
    model, x = build("grouped")
    groups = find_channel_groups(trace_model(model), (x,))
    # gc: groups=4 over 16 channels: positions j, j+4, j+8, j+12 are one channel
    (g, m), = member(groups, "gc.0.weight", 0)
    assert g.size == 4 and m.index.tolist() == list(range(4)) * 4
    # dw: multiplier 2: output channels 2k, 2k+1 follow input channel k (the stem); gc
    # then couples dw outputs j, j+4, ...: stem channels k and k+2 are one channel
    (gs, md), = member(groups, "dw.0.weight", 0)
    assert gs.size == 2 and md.index.tolist() == [0, 0, 1, 1] * 4
    (_, ms), = member(groups, "stem.0.weight", 0)
    assert ms.index.tolist() == [0, 1] * 4


def test_layer_norm_over_the_last_dim_is_a_normalisation_not_a_pin():
    model, x = build("norm")
    groups = find_channel_groups(trace_model(model), (x,))
    (g, _), = member(groups, "ln.weight", 0)
    assert g.removable
    # the masked model will take the LayerNorm's statistics over the kept channels
    assert [(c.consumer, c.dim) for c in groups.normalizations] == [("ln", 3)]
    (g, _), = member(groups, "inorm.weight", 0)
    assert g.removable


def test_layer_norm_over_several_dims_pins_their_channels():
    class TwoDimNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.ln, self.out = nn.Linear(4, 6), nn.LayerNorm((3, 6)), nn.Linear(6, 2)

        def forward(self, x):  # x (N, 3, 4)
            return {"y": self.out(self.ln(self.fc(x)))}

    groups = find_channel_groups(trace_model(TwoDimNorm()), (torch.randn(2, 3, 4),))
    (g, _), = member(groups, "ln.weight", 1)
    assert not g.removable and "statistics over dims (1, 2)" in g.reason and "LayerNorm" in g.reason
    assert groups.normalizations == ()


def test_prunable_predicate_fixes_groups():
    model, x = build("residual")
    gm = trace_model(model)
    groups = find_channel_groups(gm, (x,), prunable=lambda name, p: not name.startswith("b1.1"))
    (g, _), = member(groups, "b1.0.0.weight", 0)
    assert not g.removable and "b1.1.weight" in g.reason


def test_analysis_never_mutates_the_graph_module():
    model, x = build("se")
    gm = trace_model(model)
    gm.train()
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    metas = [dict(n.meta) for n in gm.graph.nodes]
    code = gm.code
    find_channel_groups(gm, (x,))
    assert gm.training and all(m.training for m in gm.modules())
    assert all(torch.equal(state[k], v) for k, v in gm.state_dict().items())
    assert [dict(n.meta) for n in gm.graph.nodes] == metas and gm.code == code


@pytest.mark.parametrize("name", sorted(CNN_ZOO))
def test_every_group_is_consistent(name):
    """Member indices cover their dims; every slice of a member dim is in one group."""
    model, x = build(name)
    gm = trace_model(model)
    groups = find_channel_groups(gm, (x,))
    params = dict(gm.named_parameters()) | dict(gm.named_buffers())
    for pname, shape in groups.param_shapes.items():
        assert tuple(params[pname].shape) == shape
        for dim, gids in groups.slice_channels(pname).items():
            assert gids.numel() == shape[dim] and bool((gids >= 0).all()), (pname, dim)
    for g in groups.groups:
        for m in g.members:
            assert m.index.max() < g.size


# ----------------------------------------------------------------------------- registry
def scale_by_two(x):
    return x * 2


torch.fx.wrap("scale_by_two")


class UsesUnknownOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return {"y": self.c2(scale_by_two(self.c1(x)))}


@pytest.fixture
def registry_restored():
    saved = dict(rules._RULES)
    yield
    rules._RULES.clear()
    rules._RULES.update(saved)


def test_unknown_op_raises_with_node_target_source_and_remedy():
    gm = trace_model(UsesUnknownOp())
    with pytest.raises(UnsupportedOpError) as info:
        find_channel_groups(gm, (torch.randn(1, 3, 4, 4),))
    msg = str(info.value)
    assert "node 'scale_by_two'" in msg and "scale_by_two" in msg
    assert "test_channel_groups.py" in msg and "return {\"y\": self.c2(scale_by_two(self.c1(x)))}" in msg
    assert "register_channel_rule(tests.test_channel_groups.scale_by_two)" in msg
    assert "never guesses" in msg


def test_user_registered_function_rule(registry_restored):
    rules.register_channel_rule(scale_by_two)(lambda ctx: ctx.same_as(ctx.arg(0)))
    gm = trace_model(UsesUnknownOp())
    x = torch.randn(1, 3, 4, 4)
    groups = find_channel_groups(gm, (x,))
    (g, _), = member(groups, "c1.weight", 0)
    assert g.removable
    slim = slim_channels(gm, groups, {g.id: torch.tensor([True, False, True, False])})
    assert slim.c2.in_channels == 2


class ChannelScale(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gain = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return x * self.gain.view(1, -1, 1, 1)


class UsesLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.s, self.c2 = nn.Conv2d(3, 4, 1), ChannelScale(4), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return {"y": self.c2(self.s(self.c1(x)))}


def test_user_registered_leaf_module_rule(registry_restored):
    gm = trace_model(UsesLeaf(), leaf_modules=(ChannelScale,))
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(UnsupportedOpError, match="ChannelScale"):
        find_channel_groups(gm, (x,))

    @rules.register_channel_rule(ChannelScale)
    def channel_scale_rule(ctx):
        x = ctx.arg(0)
        ctx.join(ctx.labels(x, 1), ctx.param("gain", 0))
        return ctx.same_as(x)

    groups = find_channel_groups(gm, (x,))
    (g, _), = member(groups, "s.gain", 0)
    assert g.removable and {m.param_name for m in g.members} >= {"c1.weight", "c1.bias", "c2.weight"}
    slim = slim_channels(gm, groups, {g.id: torch.tensor([False, True, True, False])})
    assert slim.s.gain.shape == (2,)


def test_element_masked_model_from_insert_masks_is_analysed_and_slimmed():
    """The core pass's ``w * mask`` nodes: masks become members and are sliced too."""
    model, x = build("residual")
    gm = trace_model(model)
    masks = {n: torch.rand(p.shape) > 0.3 for n, p in gm.named_parameters() if n.endswith("weight") and p.dim() > 1}
    masked = insert_masks(gm, masks)
    groups = find_channel_groups(masked, (x,))
    (g, _), = [(g, m) for g, m in member(groups, "b1.0.0.weight", 0)]
    assert any(m.param_name == "b1.0.0.weight_mask" and m.dim == 0 for m in g.members)
    slim = slim_channels(masked, groups, random_keep(groups))
    assert slim.get_buffer("b1.0.0.weight_mask").shape == slim.get_parameter("b1.0.0.weight").shape


class Reused(nn.Module):
    """One conv applied at two depths and a weight tied between two heads."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.shared = nn.Conv2d(6, 6, 3, padding=1)
        self.a, self.b = nn.Conv2d(6, 2, 1), nn.Conv2d(6, 2, 1)
        self.b.weight = self.a.weight

    def forward(self, x):
        h = self.stem(x).relu()
        h2 = self.shared(self.shared(h).relu()).relu()
        return {"a": self.a(h), "b": self.b(h2)}


def test_reused_modules_and_tied_weights():
    gm = trace_model(Reused())
    x = torch.randn(2, 3, 8, 8)
    groups = find_channel_groups(gm, (x,))
    (g, _), = member(groups, "stem.weight", 0)
    # shared's input and output channels are one (it reads its own output), and so is stem's
    assert {("shared.weight", 0), ("shared.weight", 1), ("a.weight", 1)} <= {(m.param_name, m.dim) for m in g.members}
    assert not any(m.param_name == "b.weight" for gg in groups.groups for m in gg.members)  # tied: one name
    slim = slim_channels(gm, groups, {g.id: torch.tensor([True, False, True, True, False, True])})
    assert slim.b.weight is slim.a.weight and slim.a.weight.shape == (2, 4, 1, 1)


def test_fake_and_real_shape_propagation_agree():
    model, x = build("shuffle")
    gm = trace_model(model)
    fake = find_channel_groups(gm, (x,))
    real = find_channel_groups(gm, (x,), fake_tensors=False)
    assert summary(fake) == summary(real)
    assert [c.__dict__ for c in fake.contractions] == [c.__dict__ for c in real.contractions]
    assert fake.input_specs == real.input_specs


@pytest.mark.parametrize("seed", range(5))
def test_atom_classes_match_a_plain_union_find(seed):
    """The bulk label propagation of the analysis gives every atom its class's smallest
    atom, with unions added in several rounds (rules resolve atoms between rules), few
    (the touched roots are numbered first) or many (propagation over all atoms)."""
    from disparse_fx.passes.channel_groups import _Atoms

    gen = torch.Generator().manual_seed(seed)
    atoms, parent = _Atoms(), []

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for _ in range(4):
        start = atoms.add(200)
        parent.extend(range(start, start + 200))
        for _ in range(int(torch.randint(1, 6, (1,), generator=gen))):
            n = int(torch.randint(0, 40, (1,), generator=gen)) * (1 if len(parent) % 400 else 30)  # few or many edges
            a = torch.randint(0, atoms.count, (n,), generator=gen)
            b = torch.randint(0, atoms.count, (n,), generator=gen)
            atoms.union(a, b)
            for x, y in zip(a.tolist(), b.tolist()):
                rx, ry = find(x), find(y)
                parent[max(rx, ry)] = min(rx, ry)
        expected = [find(a) for a in range(atoms.count)]  # a class's root is its smallest atom
        assert atoms.roots().tolist() == expected
        assert atoms.resolve(torch.arange(atoms.count)).tolist() == expected


def _fake_outputs(gm, x, monkeypatch, shape_path: bool):
    """(node, shape, stride, dtype) of every tensor the analysis' fake run produces."""
    from disparse_fx.passes import channel_groups as cg

    seen = []
    run_node = cg._Analysis.run_node

    def recording(self, n):
        out = run_node(self, n)
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                seen.append((n.name, tuple(t.shape), t.stride(), t.dtype, t.is_contiguous()))
        return out

    with monkeypatch.context() as m:
        m.setattr(cg._Analysis, "run_node", recording)
        if not shape_path:
            m.setattr(cg._Analysis, "_shape_only", lambda self, n: None)
        groups = find_channel_groups(gm, (x,))
    return seen, groups


def _zoo_and_torchvision():
    from .transformer_zoo import TRANSFORMER_ZOO
    from .transformer_zoo import build as build_transformer

    for name in sorted(CNN_ZOO):
        yield f"cnn:{name}", lambda name=name: build(name)
    for name in sorted(TRANSFORMER_ZOO):
        yield f"transformer:{name}", lambda name=name: build_transformer(name)
    for name, size in (("swin_t", 64), ("vit_b_16", 224), ("resnet18", 32), ("mobilenet_v3_small", 32)):
        def tv(name=name, size=size):
            torchvision = pytest.importorskip("torchvision")
            torch.manual_seed(0)
            return torchvision.models.get_model(name).eval(), torch.randn(1, 3, size, size)
        yield f"torchvision:{name}", tv


@pytest.mark.parametrize("name,make", list(_zoo_and_torchvision()), ids=[n for n, _ in _zoo_and_torchvision()])
def test_shape_path_outputs_match_running_the_ops(name, make, monkeypatch):
    """The fake outputs the analysis makes from input shapes (Linear, conv, norms,
    activations, eval Dropout, cat, residual adds, Swin window attention) have the shape,
    strides and dtype that running the op on fake tensors gives, so the groups agree."""
    model, x = make()
    gm = trace_model(model)
    fast, groups_fast = _fake_outputs(gm, x, monkeypatch, shape_path=True)
    slow, groups_slow = _fake_outputs(gm, x, monkeypatch, shape_path=False)
    assert fast == slow
    assert [(g.size, g.removable, g.reason, g.nodes) for g in groups_fast.groups] == \
        [(g.size, g.removable, g.reason, g.nodes) for g in groups_slow.groups]
    assert [[(m.param_name, m.dim, m.index.tolist()) for m in g.members] for g in groups_fast.groups] == \
        [[(m.param_name, m.dim, m.index.tolist()) for m in g.members] for g in groups_slow.groups]


def _plain(value):
    """A comparable form of ChannelGroups' fields (tensors as lists, dataclasses as tuples)."""
    import dataclasses
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return tuple(_plain(getattr(value, f.name)) for f in dataclasses.fields(value))
    if hasattr(value, "items"):  # dicts and MappingProxyType
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


class _ConcatOfParameters(nn.Module):
    """A BatchNorm over the concat of two parameters: its channels come from two unlinked
    vectors, which the BatchNorm's own vector makes one group of 8 (taking the concat's
    atoms instead would give two groups, 3 and 5)."""

    def __init__(self):
        super().__init__()
        self.p1, self.p2 = nn.Parameter(torch.randn(1, 3, 1, 1)), nn.Parameter(torch.randn(1, 5, 1, 1))
        self.bn, self.head = nn.BatchNorm2d(8), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = torch.cat([self.p1, self.p2], 1).expand(x.shape[0], 8, 4, 4)
        return {"a": self.head(self.bn(h)), "b": x.mean()}


def _zoo_models():
    from .transformer_zoo import TRANSFORMER_ZOO
    from .transformer_zoo import build as build_transformer
    return ([(f"cnn:{n}", lambda n=n: build(n)) for n in sorted(CNN_ZOO)]
            + [(f"transformer:{n}", lambda n=n: build_transformer(n)) for n in sorted(TRANSFORMER_ZOO)]
            + [("concat_of_parameters", lambda: (_ConcatOfParameters().eval(), torch.randn(2, 3, 4, 4)))])


@pytest.mark.parametrize("name,make", _zoo_models(), ids=[n for n, _ in _zoo_models()])
def test_parameters_that_follow_linked_atoms_give_the_same_groups(name, make, monkeypatch):
    """A parameter first seen where a rule joins it with atoms of linked vectors (a
    BatchNorm after a conv, a conv's weight and bias) takes those atoms instead of its
    own (passes/channel_groups.py, _Analysis.param): every field of the result is what
    the analysis with an atom vector per parameter gives."""
    from disparse_fx.passes import channel_groups as cg

    model, x = make()
    gm = trace_model(model)
    decide = cg._Analysis._all_linked
    followed = []
    monkeypatch.setattr(cg._Analysis, "_all_linked", lambda self, atoms: followed.append(decide(self, atoms))
                        or followed[-1])
    fast = find_channel_groups(gm, (x,))
    if name != "concat_of_parameters":  # every zoo model has a conv, linear or norm after a linked vector
        assert any(followed)
    else:
        assert [len(g.members) for g in fast.groups if g.size == 8] == [7]
    monkeypatch.setattr(cg._Analysis, "_all_linked", lambda self, atoms: False)
    own = find_channel_groups(gm, (x,))
    assert _plain(fast) == _plain(own)
