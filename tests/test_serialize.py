"""save / load: bitwise round trips on the zoo (both granularities, slim models) and
one clear error per kind of bad file."""
import json
import zipfile

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import disparse_fx as dfx
from disparse_fx.serialize import (CorruptFileError, DisallowedCallableError, ForeignFileError, SerializationError,
                                   UnserializableError, UnsupportedVersionError, load, register_callable, save)
from disparse_fx.passes.trace import trace_model

from .zoo import ZOO, ZOO_BY_NAME, example_input, outputs_by_task


def _compress(entry, granularity, **cfg):
    config = dfx.CompressConfig(sparsity=0.5, granularity=granularity, num_batches=2, progress=False, **cfg)
    return dfx.compress(entry.build(), entry.task_losses, entry.batches(2), config, inputs=entry.inputs)


def _run(model, x):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # dropout in train mode draws the same numbers
        return outputs_by_task(model(x))


def _assert_bitwise(a, b, x):
    out_a, out_b = _run(a, x), _run(b, x)
    assert out_a.keys() == out_b.keys()
    for k in out_a:
        assert torch.equal(out_a[k], out_b[k]), k


def _assert_same_module(a: fx.GraphModule, b: fx.GraphModule):
    assert type(b).__name__ == type(a).__name__
    assert b.code == a.code
    assert [(n, p.shape, p.requires_grad) for n, p in a.named_parameters()] == \
        [(n, p.shape, p.requires_grad) for n, p in b.named_parameters()]
    assert [n for n, _ in a.named_buffers()] == [n for n, _ in b.named_buffers()]
    assert a.state_dict().keys() == b.state_dict().keys()
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert [m.training for m in a.modules()] == [m.training for m in b.modules()]
    b.graph.lint()


def _assert_same_plan(p, q):
    assert q.owners == p.owners and q.tasks == p.tasks and q.prunable == p.prunable
    assert q.sparsity == p.sparsity and q.keep_ratio == p.keep_ratio and q.batches == p.batches
    assert q.config == p.config and q.shapes == p.shapes and q.input_specs == p.input_specs
    assert dict(q.timings) == dict(p.timings) and "total" in p.timings
    assert q.masks.keys() == p.masks.keys() and all(torch.equal(q.masks[k], p.masks[k]) for k in p.masks)
    for t in p.tasks:
        for field in ("task_masks", "task_scores"):
            a, b = getattr(p, field).get(t, {}), getattr(q, field).get(t, {})
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (field, t)
    assert (p.channels is None) == (q.channels is None)
    if p.channels is not None:
        assert q.channels.keep.keys() == p.channels.keep.keys()
        assert all(torch.equal(q.channels.keep[g], p.channels.keep[g]) for g in p.channels.keep)
        assert [g.size for g in q.channels.groups.groups] == [g.size for g in p.channels.groups.groups]


@pytest.mark.parametrize("granularity", ["element", "channel"])
@pytest.mark.parametrize("entry", ZOO, ids=lambda e: e.name)
def test_result_round_trip_is_bitwise(entry, granularity, tmp_path):
    result = _compress(entry, granularity)
    path = tmp_path / "result.dfx"
    save(result, path)
    back = load(path)
    assert isinstance(back, dfx.CompressionResult)
    x = example_input(entry)
    _assert_same_module(result.model, back.model)
    _assert_bitwise(result.model, back.model, x)
    _assert_same_plan(result.plan, back.plan)
    assert back.summary() == result.summary()
    # the loaded result is as good as the fresh one: it slims to the same model
    _assert_bitwise(dfx.slim(result).eval(), dfx.slim(back).eval(), x)


@pytest.mark.parametrize("name", ["two_heads_dict", "residual_tuple", "tied_heads"])
def test_slim_channel_model_round_trip_is_bitwise(name, tmp_path):
    entry = ZOO_BY_NAME[name]
    slim = dfx.slim(_compress(entry, "channel"))
    save(slim, tmp_path / "slim.dfx")
    back = load(tmp_path / "slim.dfx")
    assert isinstance(back, fx.GraphModule)
    _assert_same_module(slim, back)
    _assert_bitwise(slim, back, example_input(entry))
    assert sum(p.numel() for p in back.parameters()) < sum(p.numel() for p in entry.build().parameters())


def test_loaded_model_trains_and_keeps_ties_and_masks(tmp_path):
    result = _compress(ZOO_BY_NAME["tied_heads"], "element")
    save(result, tmp_path / "r.dfx")
    model = load(tmp_path / "r.dfx").model
    assert model.head_a.weight is model.head_b.weight  # tied weights stay tied
    assert {n for n, _ in model.named_buffers()} == {n for n, _ in result.model.named_buffers()}
    assert any(n.endswith("weight_mask") for n, _ in model.named_buffers())
    out = model(torch.randn(4, 12))
    sum(v.sum() for v in out.values()).backward()
    grad, mask = model.trunk.weight.grad, model.trunk.weight_mask
    assert grad is not None and bool((grad[mask == 0] == 0).all())


def test_filter_fn_is_saved_as_none_with_a_warning(tmp_path):
    entry = ZOO_BY_NAME["with_unused"]
    result = _compress(entry, "element", filter_fn=lambda name, p: name.endswith("weight"))
    with pytest.warns(dfx.DisparseWarning, match=r"filter_fn .* saved as None"):
        save(result, tmp_path / "r.dfx")
    back = load(tmp_path / "r.dfx")
    assert back.plan.config.filter_fn is None and back.plan.prunable == result.plan.prunable


# ----------------------------------------------------------------------------- bad files
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "slim.dfx"
    save(dfx.slim(_compress(ZOO_BY_NAME["two_heads_dict"], "channel")), path)
    return path


def _rewrite(src, dst, edit):
    """Copy the archive, passing each JSON member through ``edit(name, obj) -> obj``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name.endswith(".json"):
                data = json.dumps(edit(name, json.loads(data))).encode()
            zout.writestr(name, data)
    return dst


def test_truncated_file(saved, tmp_path):
    data = saved.read_bytes()
    (tmp_path / "cut.dfx").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="truncated or damaged"):
        load(tmp_path / "cut.dfx")


def test_corrupt_file(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    with zipfile.ZipFile(saved) as zf:
        info = zf.getinfo("disparse_fx/tensors.pt")
    start = info.header_offset + 30 + len(info.filename) + 200  # inside the stored tensors
    data[start:start + 64] = bytes(64)
    (tmp_path / "bad.dfx").write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="tensors.pt is damaged"):
        load(tmp_path / "bad.dfx")
    (tmp_path / "junk.dfx").write_bytes(b"not a zip at all" * 10)
    with pytest.raises(CorruptFileError, match="not a readable disparse_fx file"):
        load(tmp_path / "junk.dfx")


def test_foreign_zip(tmp_path):
    torch.save(nn.Linear(2, 2), tmp_path / "pickled.pt")  # a torch.save zip: never unpickled
    with pytest.raises(ForeignFileError, match="not a disparse_fx file"):
        load(tmp_path / "pickled.pt")


def test_newer_format_version(saved, tmp_path):
    def bump(name, obj):
        return {**obj, "version": 99} if name.endswith("format.json") else obj

    with pytest.raises(UnsupportedVersionError, match="version 99.*upgrade disparse_fx"):
        load(_rewrite(saved, tmp_path / "new.dfx", bump))


@pytest.mark.parametrize("target, error, message", [
    ("os.system", DisallowedCallableError, "calls 'os.system', which is not in load\\(\\)'s allow-list"),
    ("builtins.eval", DisallowedCallableError, "calls 'builtins.eval'"),
    ("operator.attrgetter", DisallowedCallableError, "calls 'operator.attrgetter'"),
])
def test_callable_outside_the_allow_list(saved, tmp_path, target, error, message):
    def evil(name, obj):
        if name.endswith("model.json"):
            node = next(n for n in obj["nodes"] if n["op"] == "call_function")
            node["target"] = target
        return obj

    with pytest.raises(error, match=message) as info:
        load(_rewrite(saved, tmp_path / "evil.dfx", evil))
    assert isinstance(info.value, dfx.DisparseError)


def test_module_class_and_method_outside_the_allow_list(saved, tmp_path):
    def evil_class(name, obj):
        if name.endswith("model.json"):
            obj["modules"][1]["class"] = "subprocess.Popen"
        return obj

    with pytest.raises(DisallowedCallableError, match="class 'subprocess.Popen'"):
        load(_rewrite(saved, tmp_path / "a.dfx", evil_class))

    def evil_getattr(name, obj):
        if name.endswith("model.json"):
            node = next(n for n in obj["nodes"] if n["op"] == "call_function")
            node["target"] = "builtins.getattr"
            node["args"] = {"$tuple": [node["args"]["$tuple"][0], "__class__"]}
        return obj

    with pytest.raises(DisallowedCallableError, match="public attribute names only"):
        load(_rewrite(saved, tmp_path / "b.dfx", evil_getattr))


def test_save_refuses_code_it_would_have_to_pickle(tmp_path):
    class Custom(nn.Module):
        def forward(self, x):
            return x + 1

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.custom = Custom()

        def forward(self, x):
            return {"y": self.custom(self.fc(x))}

    class Leafy(fx.Tracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, Custom) or super().is_leaf_module(m, name)

    net = Net()
    gm = fx.GraphModule(net, Leafy().trace(net))
    with pytest.raises(UnserializableError, match="is not a torch.nn built-in module") as info:
        save(gm, tmp_path / "x.dfx")
    assert isinstance(info.value, ValueError)
    with pytest.raises(UnserializableError, match="expects an fx.GraphModule"):
        save(net, tmp_path / "x.dfx")
    with pytest.raises(SerializationError, match="no such file"):
        load(tmp_path / "missing.dfx")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_register_callable_extends_the_allow_list(tmp_path):
    def double(x):
        return x * 2

    gm = fx.GraphModule(nn.Module(), fx.Graph())
    x = gm.graph.placeholder("x")
    gm.graph.output({"y": gm.graph.call_function(double, (x,))})
    gm.recompile()
    with pytest.raises(UnserializableError, match="register_callable"):
        save(gm, tmp_path / "d.dfx")
    register_callable(double, "tests.double")
    save(gm, tmp_path / "d.dfx")
    assert torch.equal(load(tmp_path / "d.dfx")(torch.ones(2))["y"], torch.full((2,), 2.0))


def test_traced_torchvision_style_graph_round_trips(tmp_path):
    """getattr / getitem / interpolate nodes, BatchNorm buffers, eval mode."""
    from disparse_fx.zoo import deeplab_resnet, DEFAULT_TASKS

    model = deeplab_resnet(DEFAULT_TASKS, size="tiny").eval()
    gm = trace_model(model)
    save(gm, tmp_path / "deeplab.dfx")
    back = load(tmp_path / "deeplab.dfx")
    _assert_same_module(gm, back)
    _assert_bitwise(gm, back, torch.randn(2, 3, 32, 32))


def test_crafted_attribute_paths_are_refused(saved, tmp_path):
    def evil(name, obj):
        if name.endswith("model.json"):
            node = next(n for n in obj["nodes"] if n["op"] == "get_attr" or n["op"] == "call_module")
            node["op"], node["target"] = "get_attr", "stem.__class__.__init__.__globals__"
        return obj

    with pytest.raises(CorruptFileError, match="not a submodule, parameter, buffer or tensor constant"):
        load(_rewrite(saved, tmp_path / "c.dfx", evil))


def test_transformer_channel_result_round_trips(tmp_path):
    """A channel result on a transformer (head-dim channels inside MultiheadAttention,
    masked LayerNorms) saves and loads; the loaded result slims to the same model."""
    import torch.nn.functional as F

    from .transformer_zoo import build

    model, x = build("mha")
    with torch.no_grad():
        targets = {t: torch.randn_like(v) for t, v in model(x).items()}
    losses = {t: (lambda key: lambda p, b: F.mse_loss(p, b[key]))(t) for t in targets}
    result = dfx.compress(model, losses, [{"input": x, **targets}], dfx.CompressConfig(
        sparsity=0.5, granularity="channel", attention="head_dims", num_batches=1, progress=False))
    save(result, tmp_path / "r.dfx")
    back = load(tmp_path / "r.dfx")
    groups = back.plan.channels.groups
    assert back.plan.config.attention == groups.attention == "head_dims"
    assert groups.normalizations and set(groups.internal_channels) == set(result.plan.channels.groups.internal_channels)
    from disparse_fx.report import attention_table

    assert attention_table(back.plan) == attention_table(result.plan) is not None
    with torch.no_grad():
        want, got = dfx.slim(result).eval()(x), dfx.slim(back).eval()(x)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_saved_file_names_no_absolute_path_of_this_machine(tmp_path):
    """Stack traces and the plan's quoted source lines keep the user's file relative to
    the project; nothing in the file names this machine's folders."""
    import os
    import sys

    from disparse_fx.passes.errors import describe_node

    result = _compress(ZOO[0], "channel")
    reasons = [g.reason for g in result.plan.channels.groups.groups if not g.removable]
    assert any(os.getcwd() in r for r in reasons)  # the in-memory plan quotes absolute source lines
    path = tmp_path / "r.dfx"
    save(result, path)
    save(dfx.slim(result), tmp_path / "s.dfx")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    private = {os.getcwd(), sys.prefix, sys.base_prefix, os.path.expanduser("~"), here, str(tmp_path)}
    for file in (path, tmp_path / "s.dfx"):
        with zipfile.ZipFile(file) as zf:
            for name in zf.namelist():
                text = zf.read(name)
                for folder in private:
                    assert folder.encode() not in text, (file.name, name, folder)
    back = load(path)
    assert any('File "tests/zoo.py", line' in g.reason for g in back.plan.channels.groups.groups if not g.removable)
    lines = [describe_node(n, back.model) for n in back.model.graph.nodes if n.op == "call_module"]
    assert lines and all('at File "tests/zoo.py", line' in line for line in lines)  # errors still quote the source


# ----------------------------------------------------------------------------- recurrent layers
RNN_CASES = [("LSTM", {}), ("GRU", {"num_layers": 2, "bidirectional": True}), ("RNN", {"batch_first": False}),
             ("LSTM", {"num_layers": 2, "bidirectional": True, "proj_size": 16})]


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("cell, kw", RNN_CASES, ids=["lstm", "gru-2-bi", "rnn-seq-first", "lstm-proj"])
def test_rnn_channel_result_and_slim_model_round_trip(cell, kw, tmp_path):
    """A channel result holds a masked RNN (MaskedLSTM / GRU / RNN: the same parameters, a
    hidden_keep buffer); its slim model a plain, smaller RNN. Both come back bitwise, with
    their flat weight lists rebuilt from the loaded parameters."""
    from disparse_fx.passes.rules.rnn import is_masked_rnn

    from .rnn_zoo import CELLS, SeqNet, compress_channels, seq_data

    torch.manual_seed(0)
    model, data = SeqNet(cell, **kw), seq_data()
    result = compress_channels(model, data)
    assert is_masked_rnn(result.model.rnn)
    save(result, tmp_path / "r.dfx")
    back = load(tmp_path / "r.dfx")
    assert type(back.model.rnn) is type(result.model.rnn)
    x = data[0]["input"]
    _assert_same_module(result.model, back.model)
    _assert_bitwise(result.model, back.model, x)
    _assert_same_plan(result.plan, back.plan)
    rnn = back.model.rnn
    assert all(w is getattr(rnn, n) for w, n in zip(rnn._flat_weights, rnn._flat_weights_names, strict=True))
    slim = dfx.slim(result).eval()
    _assert_bitwise(slim, dfx.slim(back).eval(), x)  # the loaded result slims to the same model
    save(slim, tmp_path / "s.dfx")
    loaded = load(tmp_path / "s.dfx")
    assert type(loaded.rnn) is CELLS[cell] and loaded.rnn.hidden_size == slim.rnn.hidden_size
    assert slim.rnn.hidden_size < 32 or slim.rnn.proj_size < 16
    _assert_same_module(slim, loaded)
    _assert_bitwise(slim, loaded, x)
    _assert_bitwise(slim, loaded, torch.randn(3, 6, 7))


def test_loaded_masked_lstm_trains_through_its_masks(tmp_path):
    from .rnn_zoo import SeqNet, compress_channels, seq_data

    torch.manual_seed(0)
    data = seq_data()
    result = compress_channels(SeqNet(), data)
    save(result, tmp_path / "r.dfx")
    model = load(tmp_path / "r.dfx").model
    removed = model.rnn.hidden_keep == 0
    assert bool(removed.any())
    out = model(data[0]["input"])
    (out["tag"].sum() + out["cls"].sum()).backward()
    grad = model.rnn.weight_hh_l0.grad  # the loaded parameter, not a stale flat-weight copy
    assert grad is not None and bool((grad[:, removed] == 0).all()) and bool((grad[:, ~removed] != 0).any())


@pytest.fixture(scope="module")
def saved_lstm(tmp_path_factory):
    from .rnn_zoo import SeqNet, compress_channels, seq_data

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("saved") / "lstm.dfx"
    save(dfx.slim(compress_channels(SeqNet(), seq_data())), path)
    return path


def _edit_rnn(edit):
    def rewrite(name, obj):
        if name.endswith("model.json"):
            edit(next(m for m in obj["modules"] if m["path"] == "rnn"))
        return obj
    return rewrite


def test_crafted_rnn_state_is_refused(saved_lstm, tmp_path):
    with zipfile.ZipFile(saved_lstm) as zf:
        spec = json.loads(zf.read("disparse_fx/model.json"))
    attrs = next(m for m in spec["modules"] if m["path"] == "rnn")["attrs"]
    assert "_flat_weights" not in attrs and "_flat_weight_refs" not in attrs  # derived: not written

    def names(m):
        m["attrs"]["_flat_weights_names"] = ["weight_ih_l0", "forward"]

    with pytest.raises(CorruptFileError, match="_flat_weights_names .* do not name its parameters"):
        load(_rewrite(saved_lstm, tmp_path / "a.dfx", _edit_rnn(names)))

    def weights(m):
        m["attrs"]["_flat_weights"] = []

    with pytest.raises(CorruptFileError, match="reserved attribute '_flat_weights'"):
        load(_rewrite(saved_lstm, tmp_path / "b.dfx", _edit_rnn(weights)))


def test_save_creates_missing_folders_and_refuses_a_folder(saved, tmp_path):
    model = load(saved)
    deep = tmp_path / "a" / "b" / "slim.dfx"
    save(model, deep)  # as export_onnx and write_report do
    assert deep.is_file() and not list(deep.parent.glob("*.tmp"))
    with pytest.raises(dfx.DisparseValueError, match=r"is a folder; give the file to write, e.g. .*result.dfx"):
        save(model, tmp_path)
