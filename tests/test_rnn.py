"""Recurrent layers (nn.LSTM / nn.GRU / nn.RNN): channel rules, masked model, slim, FLOPs and the
report of their weights left dense; and an element slim that keeps the channels around an op
without a channel rule."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import disparse_fx as dfx
from disparse_fx.passes.channel_costs import flop_cost_model
from disparse_fx.passes.channel_groups import find_channel_groups
from disparse_fx.passes.errors import UnsupportedOpError
from disparse_fx.passes.flops import count_flops
from disparse_fx.passes.insert_channel_masks import fold_channel_masks, insert_channel_masks
from disparse_fx.passes.prunable import default_prunable_params, unpruned_weights
from disparse_fx.passes.rules.rnn import MaskedLSTM, is_masked_rnn
from disparse_fx.passes.slim import slim_channels
from disparse_fx.passes.trace import trace_model

from .rnn_zoo import CELLS, LOSSES, SeqNet, compress_channels, seq_data

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _assert_parity(a, b, x):
    a.eval(), b.eval()
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert ya.keys() == yb.keys()
    for k in ya:
        scale = float(ya[k].abs().max()) or 1.0
        assert float((ya[k] - yb[k]).abs().max()) <= 1e-5 * scale, k


def _hidden_group(groups, name="rnn"):
    (g, _), = [gm for gm in groups.members_of(f"{name}.weight_hh_l0") if gm[1].dim == 0]
    return g


def _keep_every_other(groups, gids=None):
    keep = {}
    for g in groups.removable_groups():
        if gids is None or g.id in gids:
            k = torch.arange(g.size) % 2 == 0
            keep[g.id] = k
    return keep


# ----------------------------------------------------------------------------- compress + slim
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_channel_compress_and_slim(cell, num_layers, bidirectional, batch_first):
    torch.manual_seed(0)
    model = SeqNet(cell, num_layers, bidirectional, batch_first)
    data = seq_data()
    result = compress_channels(model, data)
    assert abs(result.plan.sparsity - 0.5) <= 0.02
    groups = result.plan.channels.groups
    hidden = _hidden_group(groups)
    assert hidden.removable and hidden.size == 32
    kept = int(result.plan.channels.keep[hidden.id].sum()) if hidden.id in result.plan.channels.keep else 32
    if kept < 32:
        assert is_masked_rnn(result.model.rnn)  # the recurrence ignores the removed units
    slim = dfx.slim(result)
    assert type(slim.rnn) is CELLS[cell]
    assert slim.rnn.hidden_size == kept < 32
    assert slim.rnn.input_size == slim.conv.out_channels
    assert slim.proj.in_features == kept * (2 if bidirectional else 1)
    assert (slim.rnn.num_layers, slim.rnn.bidirectional, slim.rnn.batch_first) == \
        (num_layers, bidirectional, batch_first)
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())
    for x in (data[0]["input"], torch.randn(2, 6, 7)):
        _assert_parity(result.model, slim, x)


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_without_bias(cell):
    torch.manual_seed(1)
    model = SeqNet(cell, num_layers=2, bidirectional=True, bias=False)
    gm = trace_model(model)
    x = torch.randn(2, 6, 9)
    groups = find_channel_groups(gm, (x,))
    keep = _keep_every_other(groups)
    masked = insert_channel_masks(gm, groups, keep)
    slim = slim_channels(masked, groups, keep)  # checks parity with the masked model
    assert slim.rnn.hidden_size == 16 and not slim.rnn.bias
    _assert_parity(masked, slim, torch.randn(3, 6, 5))


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_element_compress_and_slim(cell, bidirectional):
    torch.manual_seed(0)
    model = SeqNet(cell, num_layers=2, bidirectional=bidirectional)
    data = seq_data()
    result = dfx.compress(model, LOSSES, data, dfx.CompressConfig(
        sparsity=0.9, criterion="snip", num_batches=3, progress=False))
    slim = dfx.slim(result)
    assert type(slim.rnn) is CELLS[cell]
    assert sum(p.numel() for p in slim.parameters()) <= sum(p.numel() for p in model.parameters())
    _assert_parity(result.model, slim, data[0]["input"])


# ----------------------------------------------------------------------------- the rule
def test_groups_of_a_two_layer_bidirectional_lstm():
    gm = trace_model(SeqNet("LSTM", num_layers=2, bidirectional=True))
    groups = find_channel_groups(gm, (torch.randn(2, 6, 5),))
    hidden = _hidden_group(groups)
    # one hidden unit index of every layer and direction: one nn.LSTM hidden_size
    params = {m.param_name for m in hidden.members}
    for layer in (0, 1):
        for s in ("", "_reverse"):
            assert {f"rnn.weight_ih_l{layer}{s}", f"rnn.weight_hh_l{layer}{s}", f"rnn.bias_ih_l{layer}{s}",
                    f"rnn.bias_hh_l{layer}{s}"} <= params
    assert "proj.weight" in params
    rows = next(m for m in hidden.members if m.param_name == "rnn.weight_ih_l1" and m.dim == 0)
    assert rows.index.tolist() == list(range(32)) * 4  # gate blocks i, f, g, o of unit j
    cols = next(m for m in hidden.members if m.param_name == "rnn.weight_ih_l1" and m.dim == 1)
    assert cols.index.tolist() == list(range(32)) * 2  # [forward units, backward units]
    # the input features are the conv's channels, read by both directions' weight_ih_l0
    (conv, _), = [gm_ for gm_ in groups.members_of("conv.weight") if gm_[1].dim == 0]
    assert {("rnn.weight_ih_l0", 1), ("rnn.weight_ih_l0_reverse", 1)} <= {(m.param_name, m.dim)
                                                                          for m in conv.members}
    assert set(groups.internal_channels[_rnn_node(gm)]) == {"hidden"}


def _rnn_node(gm, target="rnn"):
    return next(n.name for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


class StateNet(nn.Module):
    """Uses h_n (and c_n) of a multi-layer RNN; optional initial state from a graph input."""

    def __init__(self, cell="LSTM", num_layers=2, proj_size=0, bidirectional=False):
        super().__init__()
        self.cell = cell
        kw = {"proj_size": proj_size} if proj_size else {}
        self.rnn = CELLS[cell](8, 12, num_layers=num_layers, bidirectional=bidirectional, **kw)
        out = proj_size or 12
        self.a = nn.Linear(out * (2 if bidirectional else 1), 3)
        self.b = nn.Linear(out, 2)
        self.embed = nn.Linear(5, 8)

    def forward(self, x):  # x: (T, B, 5)
        y, state = self.rnn(self.embed(x))
        h = state[0] if self.cell == "LSTM" else state
        return {"a": self.a(y[-1]), "b": self.b(h[-1])}


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_final_state_carries_the_hidden_units(cell, bidirectional):
    torch.manual_seed(2)
    gm = trace_model(StateNet(cell, bidirectional=bidirectional))
    x = torch.randn(6, 3, 5)
    groups = find_channel_groups(gm, (x,))
    hidden = _hidden_group(groups)
    assert hidden.removable and "b.weight" in hidden.params
    keep = {hidden.id: torch.arange(12) % 3 != 0}
    masked = insert_channel_masks(gm, groups, keep)
    slim = slim_channels(masked, groups, keep)
    assert slim.rnn.hidden_size == 8 and slim.b.in_features == 8
    _assert_parity(masked, slim, torch.randn(4, 2, 5))


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_projected_lstm_keeps_hidden_units_and_slims_projections():
    torch.manual_seed(3)
    gm = trace_model(StateNet("LSTM", proj_size=6, bidirectional=True))
    x = torch.randn(6, 3, 5)
    groups = find_channel_groups(gm, (x,))
    hidden = _hidden_group(groups)
    assert not hidden.removable and "proj_size < hidden_size" in hidden.reason
    (proj, _), = [gm_ for gm_ in groups.members_of("rnn.weight_hr_l0") if gm_[1].dim == 0]
    assert proj.removable and {"rnn.weight_hh_l1_reverse", "a.weight", "b.weight"} <= set(proj.params)
    keep = {proj.id: torch.tensor([True, False, True, True, False, True])}
    masked = insert_channel_masks(gm, groups, keep)
    assert is_masked_rnn(masked.rnn)
    slim = slim_channels(masked, groups, keep)
    assert (slim.rnn.hidden_size, slim.rnn.proj_size) == (12, 4)
    _assert_parity(masked, slim, torch.randn(4, 2, 5))


class InitialStateNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.rnn, self.head = nn.Linear(5, 8), nn.GRU(8, 10), nn.Linear(10, 2)

    def forward(self, x, h0):  # x (T, B, 5), h0 (1, B, 10)
        return {"y": self.head(self.rnn(self.embed(x), h0)[0])}


def test_initial_state_from_a_graph_input_pins_the_hidden_units():
    gm = trace_model(InitialStateNet())
    groups = find_channel_groups(gm, (torch.randn(4, 2, 5), torch.randn(1, 2, 10)))
    hidden = _hidden_group(groups)
    assert not hidden.removable and "initial state h_0" in hidden.reason
    (embed, _), = [gm_ for gm_ in groups.members_of("embed.weight") if gm_[1].dim == 0]
    assert embed.removable  # the input features still go


def pack(x, lengths):  # fx.wrap'ed below: the graph calls it as one node
    return nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)


torch.fx.wrap("pack")


class PackedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.rnn, self.head = nn.Linear(4, 8), nn.GRU(8, 10, batch_first=True), nn.Linear(10, 3)

    def forward(self, x, lengths):
        _, h = self.rnn(pack(self.embed(x), lengths))
        return {"y": self.head(h[-1])}


@pytest.fixture
def registry_restored():
    from disparse_fx.passes import rules

    saved = dict(rules._RULES)
    yield rules
    rules._RULES.clear()
    rules._RULES.update(saved)


def test_packed_sequence_pins_everything(registry_restored):
    @registry_restored.register_channel_rule(pack)
    def pack_rule(ctx):  # the packed data (sum L, C) keeps x's channels
        return ({1: ctx.labels(ctx.arg(0), -1)}, None, None, None)

    gm = trace_model(PackedNet())
    groups = find_channel_groups(gm, (torch.randn(2, 5, 4), torch.tensor([5, 3])))
    hidden = _hidden_group(groups)
    (embed, _), = [gm_ for gm_ in groups.members_of("embed.weight") if gm_[1].dim == 0]
    for g in (hidden, embed):
        assert not g.removable and "PackedSequence" in g.reason


def test_masks_are_replaced_and_folded():
    torch.manual_seed(4)
    gm = trace_model(SeqNet("LSTM", num_layers=2))
    x = torch.randn(2, 6, 5)
    groups = find_channel_groups(gm, (x,))
    hidden = _hidden_group(groups)
    masked = insert_channel_masks(gm, groups, {hidden.id: torch.arange(32) < 20})
    assert isinstance(masked.rnn, MaskedLSTM) and type(gm.rnn) is nn.LSTM  # the input is untouched
    assert masked.rnn.weight_hh_l0 is not gm.rnn.weight_hh_l0
    # masks for another keep replace the old ones: hidden units all kept -> a plain LSTM again
    conv = next(g for g in groups.removable_groups() if "conv.weight" in g.params)
    remasked = insert_channel_masks(masked, groups, {conv.id: torch.arange(24) % 2 == 0})
    assert type(remasked.rnn) is nn.LSTM
    assert fold_channel_masks(masked) > 0 and type(masked.rnn) is nn.LSTM


def test_masked_lstm_trains_through_the_masks():
    torch.manual_seed(5)
    gm = trace_model(SeqNet("LSTM"))
    groups = find_channel_groups(gm, (torch.randn(2, 6, 5),))
    hidden = _hidden_group(groups)
    masked = insert_channel_masks(gm, groups, {hidden.id: torch.arange(32) < 16})
    out = masked(torch.randn(2, 6, 5))
    (out["tag"].sum() + out["cls"].sum()).backward()
    grad = masked.rnn.weight_hh_l0.grad
    assert grad is not None and bool((grad[:, 16:] == 0).all()) and bool((grad[:, :16] != 0).any())


# ----------------------------------------------------------------------------- unknown ops
class Opaque(nn.Module):
    """A leaf module without a channel rule."""

    def __init__(self, c):
        super().__init__()
        self.gain = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return x * self.gain.view(1, -1, 1)


class OpaqueNet(SeqNet):
    def __init__(self):
        super().__init__("GRU")
        self.pre = nn.Conv1d(6, 6, 1)
        self.opaque = Opaque(6)

    def forward(self, x):
        return super().forward(self.opaque(F.relu(self.pre(x))))


def test_element_slim_keeps_the_channels_around_an_op_without_a_rule():
    torch.manual_seed(6)
    model = OpaqueNet()
    data = seq_data()
    config = dfx.CompressConfig(sparsity=0.98, criterion="snip", num_batches=3, progress=False)
    result = dfx.compress(model, LOSSES, data, config, leaf_modules=(Opaque,))
    with pytest.warns(dfx.DisparseWarning) as caught:
        slim = dfx.slim(result)
    warnings = [str(w.message) for w in caught]
    assert any("no channel rule" in w and "node 'opaque'" in w and "Opaque" in w and "test_rnn.py" in w
               and "self.opaque(F.relu(self.pre(x)))" in w for w in warnings), warnings
    # (element results call conv / linear functionally: the weights' shapes tell)
    assert slim.pre.weight.shape[0] == 6 and slim.opaque.gain.shape == (6,)  # kept around the op
    assert slim.proj.weight.shape[0] < 32  # channels elsewhere still go
    _assert_parity(result.model, slim, data[0]["input"])
    with pytest.raises(UnsupportedOpError, match="node 'opaque'"):  # channel granularity still raises
        dfx.compress(model, LOSSES, data, dfx.CompressConfig(
            sparsity=0.5, granularity="channel", num_batches=3, progress=False), leaf_modules=(Opaque,))


def test_unknown_ops_argument():
    gm = trace_model(OpaqueNet(), leaf_modules=(Opaque,))
    x = torch.randn(2, 6, 5)
    with pytest.raises(UnsupportedOpError):
        find_channel_groups(gm, (x,))
    with pytest.raises(dfx.DisparseValueError, match="unknown_ops must be one of"):
        find_channel_groups(gm, (x,), unknown_ops="guess")
    groups = find_channel_groups(gm, (x,), unknown_ops="keep")
    assert groups.unknown_nodes == ("opaque",)
    (pre, _), = [gm_ for gm_ in groups.members_of("pre.weight") if gm_[1].dim == 0]
    assert not pre.removable and "node 'opaque'" in pre.reason and "no channel rule" in pre.reason
    (gain, _), = groups.members_of("opaque.gain")
    assert not gain.removable


# ----------------------------------------------------------------------------- FLOPs
RNN_SHAPES = [("LSTM", 1, False, {}), ("LSTM", 2, True, {}), ("GRU", 2, False, {}), ("RNN", 2, True, {}),
              ("LSTM", 2, True, {"proj_size": 12})]
RNN_IDS = ["lstm", "lstm-2-bi", "gru-2", "rnn-2-bi", "lstm-2-bi-proj"]


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("cell, num_layers, bidirectional, kw", RNN_SHAPES, ids=RNN_IDS)
def test_rnn_flops_by_hand(cell, num_layers, bidirectional, kw):
    gm = trace_model(SeqNet(cell, num_layers, bidirectional, **kw))
    x = torch.randn(2, 6, 12)  # 12 steps per sample
    steps, d, h = 12, 2 if bidirectional else 1, 32
    u = kw.get("proj_size") or h
    rows = GATES[cell] * h
    # per sample, per direction: layer 0 reads 24 features, layer k >= 1 the d * u units
    # below; every layer reads its u units back; projections: u x h per layer
    macs = rows * (24 + u) + (num_layers - 1) * rows * (d * u + u) + (num_layers * h * u if u != h else 0)
    assert count_flops(gm, (x,)).per_node[_rnn_node(gm)] == 2 * steps * d * macs


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("cell, num_layers, bidirectional, kw", RNN_SHAPES, ids=RNN_IDS)
def test_flop_cost_model_predicts_the_slim_rnn_exactly(cell, num_layers, bidirectional, kw):
    """The FLOP terms' channel factors (input features, hidden and projected units) give
    the FLOPs of any slim model: what a FLOPs budget relies on."""
    torch.manual_seed(7)
    gm = trace_model(SeqNet(cell, num_layers, bidirectional, **kw))
    x = torch.randn(2, 6, 12)
    groups = find_channel_groups(gm, (x,))
    costs = flop_cost_model(gm, groups, (x,))
    assert costs.dense_cost() == count_flops(gm, (x,)).total
    gen = torch.Generator().manual_seed(0)
    for fraction in (0.5, 0.8):
        keep = {}
        for g in groups.removable_groups():
            k = torch.rand(g.size, generator=gen) < fraction
            k[0] = True
            keep[g.id] = k
        assert (_hidden_group(groups).id in keep) == (not kw)  # projected: the hidden units stay, proj units go
        slim = slim_channels(insert_channel_masks(gm, groups, keep), groups, keep)
        assert float(costs.cost(groups.keep_vector(keep))) == pytest.approx(count_flops(slim, (x,)).total, rel=1e-12)


# ----------------------------------------------------------------------------- weights left dense
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_rnn_weights_are_reported_as_not_element_pruned(cell):
    torch.manual_seed(0)
    model = SeqNet(cell, num_layers=2, bidirectional=True)
    data = seq_data()
    with pytest.warns(dfx.DisparseWarning) as caught:
        result = dfx.compress(model, LOSSES, data, dfx.CompressConfig(
            sparsity=0.5, criterion="snip", num_batches=3, progress=False))
    expected = {f"rnn.weight_{kind}_l{layer}{s}" for kind in ("ih", "hh") for layer in (0, 1)
                for s in ("", "_reverse")}
    assert set(result.plan.unpruned) == expected  # biases are never pruned: not reported
    assert set(result.plan.prunable) == {"conv.weight", "proj.weight", "tag.weight", "cls.weight"}
    for why in result.plan.unpruned.values():
        assert why == f"nn.{cell} weights are not element-pruned (channel granularity removes hidden units)"
    (message,) = [str(w.message) for w in caught if "stay dense" in str(w.message)]
    assert "'rnn.weight_ih_l0'" in message and f"nn.{cell} weights are not element-pruned" in message


def test_rnn_weights_are_not_reported_at_channel_granularity(recwarn):
    """There the hidden units go, so the RNN's weights shrink: nothing stays dense."""
    torch.manual_seed(0)
    result = dfx.compress(SeqNet("LSTM"), LOSSES, seq_data(), dfx.CompressConfig(
        sparsity=0.5, granularity="channel", criterion="taylor", num_batches=3, progress=False))
    assert dict(result.plan.unpruned) == {}
    assert not [w for w in recwarn if "stay dense" in str(w.message)]


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_projection_weights_and_masked_rnns_are_reported():
    gm = trace_model(StateNet("LSTM", num_layers=1, proj_size=6))
    assert set(unpruned_weights(gm, default_prunable_params(gm))) == {
        "rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.weight_hr_l0"}
    # the masked model of a channel plan: a MaskedLSTM is an nn.LSTM to the report
    groups = find_channel_groups(gm, (torch.randn(6, 3, 5),))
    (proj, _), = [gm_ for gm_ in groups.members_of("rnn.weight_hr_l0") if gm_[1].dim == 0]
    masked = insert_channel_masks(gm, groups, {proj.id: torch.arange(6) < 4})
    assert is_masked_rnn(masked.rnn)
    reasons = unpruned_weights(masked, default_prunable_params(masked))
    assert reasons["rnn.weight_hr_l0"].startswith("nn.LSTM weights are not element-pruned")


@pytest.mark.xfail(strict=True, raises=TypeError, reason=(
    "element-pruning RNN weights chosen with filter_fn: compress masks them through torch.func.functional_call, "
    "but dfx.slim's channel analysis runs that node in an fx Interpreter, which hands functional_call an "
    "immutable_dict that torch mutates ('immutable_dict' object does not support mutation)"))
def test_element_slim_after_pruning_rnn_weights_chosen_by_a_filter():
    torch.manual_seed(0)
    data = seq_data()
    result = dfx.compress(SeqNet("LSTM"), LOSSES, data, dfx.CompressConfig(
        sparsity=0.8, criterion="snip", num_batches=3, progress=False, filter_fn=lambda name, p: p.dim() >= 2))
    assert "rnn.weight_hh_l0" in result.plan.prunable
    _assert_parity(result.model, dfx.slim(result), data[0]["input"])
