"""One test per bad input: error type, message content, and the user's model untouched."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import disparse_fx as dfx

from .zoo import ZOO_BY_NAME

ENTRY = ZOO_BY_NAME["two_heads_dict"]


def snapshot(model):
    return (copy.deepcopy(model.state_dict()), [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()])


@pytest.fixture
def model():
    m = ENTRY.build()
    m.eval()  # a non-default mode, to check it is restored
    m.stem.weight.requires_grad_(False)  # a frozen layer, to check flags are restored
    return m


def assert_untouched(model, snap):
    sd, modes, flags = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags


def call(model, losses=None, data=None, **cfg):
    cfg.setdefault("num_batches", 2)
    cfg.setdefault("progress", False)
    kwargs = {k: cfg.pop(k) for k in list(cfg) if k == "inputs"}
    return dfx.compress(model, losses if losses is not None else ENTRY.task_losses,
                        data if data is not None else ENTRY.batches(2), dfx.CompressConfig(**cfg), **kwargs)


@pytest.mark.parametrize("value", [1.0, 1.5, -0.1, math.nan, "0.5", True])
def test_sparsity_outside_range(value):
    with pytest.raises(dfx.DisparseValueError, match=r"sparsity must be a number in \[0, 1\), got"):
        dfx.CompressConfig(sparsity=value)
    with pytest.raises(ValueError):  # also a ValueError, per api.md
        dfx.CompressConfig(sparsity=value)


def test_unknown_criterion():
    with pytest.raises(dfx.DisparseValueError, match=r"criterion must be one of \('snip', 'taylor', 'magnitude', 'random'\), got 'l1'"):
        dfx.CompressConfig(criterion="l1")


@pytest.mark.parametrize("field,value,text", [
    ("granularity", "block", "granularity must be one of"),
    ("num_batches", 0, "num_batches must be an integer >= 1 or None \\(up to 50\\), got 0"),
    ("min_layer_density", 0.5, r"CompressConfig\(sparsity=0.9\) keeps 0.1 of the weights, less than the floor every "
                               r"layer keeps, min_layer_density=0.5: lower min_layer_density to at most 0.1"),
    ("round_to", 0, r"round_to must be None \(follow the device\) or an integer >= 1, got 0"),
    ("budget", "macs", r"budget must be one of \('params', 'flops', 'latency'\), got 'macs'"),
    ("best_effort", 1, "best_effort must be True or False"),
    ("latency_time_limit_s", 0, "latency_time_limit_s must be a number of seconds > 0"),
    ("filter_fn", "conv", "filter_fn must be None or a callable"),
])
def test_other_config_fields(field, value, text):
    with pytest.raises(dfx.DisparseValueError, match=text):
        dfx.CompressConfig(**{field: value})


def test_a_sparsity_above_the_default_layer_floor_says_to_lower_the_floor():
    """The user set only the sparsity: the message names the default floor and the fix."""
    with pytest.raises(dfx.DisparseValueError, match=r"sparsity=0.999\) keeps 0.001 of the weights.*"
                                                     r"min_layer_density=0.01 \(the default\).*min_layer_density=0\)"):
        dfx.CompressConfig(sparsity=0.999)
    dfx.CompressConfig(sparsity=0.999, min_layer_density=0)  # the advice works


def test_flops_budget_needs_channel_granularity():
    with pytest.raises(dfx.DisparseValueError, match=r"budget must be 'params' with granularity='element'.*"
                                                     r"granularity='channel'"):
        dfx.CompressConfig(budget="flops")


def test_task_losses_names_do_not_match(model):
    snap = snapshot(model)
    losses = {"seg": ENTRY.task_losses["seg"], "depth": ENTRY.task_losses["cls"]}
    with pytest.raises(dfx.TaskMismatchError) as info:
        call(model, losses)
    msg = str(info.value)
    assert "['seg', 'depth']" in msg and "['seg', 'cls']" in msg  # both sides listed
    assert "no loss for ['cls']" in msg and "no output for ['depth']" in msg
    assert isinstance(info.value, ValueError)
    assert_untouched(model, snap)


def test_task_losses_list_for_dict_output(model):
    with pytest.raises(dfx.TaskMismatchError, match=r"names tasks \[0, 1\] but the model outputs \['seg', 'cls'\]"):
        call(model, [ENTRY.task_losses["seg"], ENTRY.task_losses["cls"]])


def test_loss_not_scalar(model):
    snap = snapshot(model)
    losses = dict(ENTRY.task_losses, cls=lambda p, b: F.cross_entropy(p, b["cls"], reduction="none"))
    with pytest.raises(dfx.LossError, match=r"loss of task 'cls' on batch 0 is \(4,\), expected a scalar"):
        call(model, losses)
    assert_untouched(model, snap)


def test_loss_nan_names_task_and_batch(model):
    snap = snapshot(model)
    calls = {"n": 0}

    def flaky(p, b):
        calls["n"] += 1
        return p.sum() * (math.nan if calls["n"] == 2 else 1.0)

    with pytest.raises(dfx.LossError, match=r"loss of task 'seg' on batch 1 is nan \(not finite\)"):
        call(model, dict(ENTRY.task_losses, seg=flaky))
    assert_untouched(model, snap)


def test_loss_inf(model):
    with pytest.raises(dfx.LossError, match=r"loss of task 'cls' on batch 0 is inf"):
        call(model, dict(ENTRY.task_losses, cls=lambda p, b: p.sum() * math.inf))


def test_task_with_zero_gradient(model):
    snap = snapshot(model)
    with pytest.raises(dfx.ZeroGradientError, match=r"gradient of task 'cls' is zero on every prunable parameter"):
        call(model, dict(ENTRY.task_losses, cls=lambda p, b: (p * 0.0).sum()))
    assert_untouched(model, snap)


def test_loss_detached_from_prediction(model):
    with pytest.raises(dfx.ZeroGradientError, match=r"loss of task 'seg' on batch 0 does not depend"):
        call(model, dict(ENTRY.task_losses, seg=lambda p, b: torch.tensor(1.0)))


class _Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.seg, self.cls = nn.Conv2d(8, 2, 1), nn.Linear(8, 3)


class _NoGradHead(_Heads):
    def forward(self, x):
        h = self.trunk(x)
        with torch.no_grad():
            c = self.cls(h.mean((2, 3)))
        return {"seg": self.seg(h), "cls": c}


class _FrozenTrunk(_Heads):
    def forward(self, x):
        with torch.no_grad():
            h = self.trunk(x)
        return {"seg": self.seg(h), "cls": self.cls(h.mean((2, 3)))}


_HEADS_LOSSES = {"seg": lambda p, b: F.cross_entropy(p, b["seg"]), "cls": lambda p, b: F.cross_entropy(p, b["cls"])}


def _heads_data():
    g = torch.Generator().manual_seed(0)
    return [{"input": torch.randn(2, 3, 8, 8, generator=g), "seg": torch.randint(0, 2, (2, 8, 8), generator=g),
             "cls": torch.randint(0, 3, (2,), generator=g)} for _ in range(2)]


def test_a_task_computed_under_no_grad_is_named_as_gradient_free():
    """The task's output carries no gradient in the user's own forward: say that, not
    that the loss ignores the prediction."""
    model = _NoGradHead()
    snap = snapshot(model)
    with pytest.raises(dfx.ZeroGradientError, match=r"the output of task 'cls' \(batch 0\) depends on no parameter"
                                                     r".*torch.no_grad\(\)"):
        call(model, _HEADS_LOSSES, _heads_data())
    assert_untouched(model, snap)


def test_parameters_without_gradient_are_named_in_a_warning():
    """A frozen trunk (no_grad in forward) gets zero snip scores: compress goes on, but
    says which parameters and what to do."""
    with pytest.warns(dfx.DisparseWarning) as caught:
        result = call(_FrozenTrunk(), _HEADS_LOSSES, _heads_data())
    messages = [str(w.message) for w in caught if "zero gradient" in str(w.message)]
    assert len(messages) == 2  # one per task
    assert all("'trunk.0.weight', 'trunk.2.weight'" in m and "filter_fn" in m and "magnitude" in m
               for m in messages)
    assert float(result.plan.task_scores["seg"]["trunk.0.weight"].abs().sum()) == 0.0


def test_no_gradient_warning_when_every_parameter_gets_one(recwarn):
    call(ENTRY.build())
    assert not [w for w in recwarn if "zero gradient" in str(w.message)]


def test_a_loss_failing_on_a_later_batch_names_the_batch(model):
    calls = {"n": 0}

    def fails_second(p, b):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyError("target")
        return p.sum()

    with pytest.raises(dfx.LossError, match=r"on batch 1: task_losses\['seg'\] raised KeyError"):
        call(model, dict(ENTRY.task_losses, seg=fails_second))


def test_loss_errors_are_value_errors():
    """Errors about a bad argument also derive from ValueError (api.md): the losses are one."""
    assert issubclass(dfx.LossError, ValueError) and issubclass(dfx.ZeroGradientError, ValueError)


def test_fewer_batches_than_requested(model):
    snap = snapshot(model)
    with pytest.raises(dfx.NotEnoughBatchesError, match=r"yielded 2 batches, fewer than config.num_batches=5.*allow_fewer_batches=True"):
        call(model, num_batches=5)
    assert_untouched(model, snap)
    result = call(model, num_batches=5, allow_fewer_batches=True)
    assert result.plan.batches == 2


def test_no_batches_at_all(model):
    with pytest.raises(dfx.NotEnoughBatchesError, match="yielded no batch"):
        call(model, data=[], allow_fewer_batches=True)


def test_no_prunable_parameter():
    class NormOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(4)

        def forward(self, x):
            h = self.ln(x)
            return {"a": h, "b": h * 2}

    with pytest.raises(dfx.NoPrunableParametersError, match="no prunable parameter.*filter_fn"):
        dfx.compress(NormOnly(), {"a": lambda p, b: p.sum(), "b": lambda p, b: p.sum()}, [torch.randn(2, 4)])


def test_filter_fn_accepting_nothing(model):
    with pytest.raises(dfx.NoPrunableParametersError, match="filter_fn accepted none"):
        call(model, filter_fn=lambda name, p: False)


def test_filter_fn_that_raises_names_the_parameter(model):
    snap = snapshot(model)
    with pytest.raises(dfx.DisparseValueError, match=r"CompressConfig.filter_fn raised ZeroDivisionError: division by "
                                                     r"zero on parameter '.*' \(shape .*must return True to prune it"):
        call(model, filter_fn=lambda name, p: 1 / 0)
    assert_untouched(model, snap)


def test_inputs_rejected_by_model(model):
    snap = snapshot(model)
    with pytest.raises(dfx.InputError) as info:
        call(model, inputs=lambda b: b["input"][:, :2])  # 2 channels, the stem wants 3
    msg = str(info.value)
    assert "rejected inputs(batch) on batch 0" in msg and "Tensor(4, 2, 8, 8)" in msg
    assert_untouched(model, snap)


def test_default_inputs_on_dict_without_input_key(model):
    data = [{"image": b["input"], "seg": b["seg"], "cls": b["cls"]} for b in ENTRY.batches(2)]
    with pytest.raises(dfx.InputError, match=r"no 'input'; pass inputs=lambda batch"):
        call(model, data=data)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            x = x * 2
        return {"a": self.fc(x), "b": self.fc(x)}


def test_untraceable_model_names_line_and_remedy():
    with pytest.raises(dfx.TraceError) as info:
        dfx.compress(DataDependent(), {"a": None, "b": None}, [])
    msg = str(info.value)
    assert "could not trace DataDependent" in msg
    assert "test_errors.py" in msg and "if x.sum() > 0" in msg  # the failing source line
    assert "leaf_modules" in msg and "concrete_args" in msg


def test_the_torch_export_fallback_leaves_stderr_to_our_error(capfd):
    """capture='auto' tries torch.export when fx fails; torch prints its partial graph to
    stderr when that fails too (twice). The TraceError says what to do; stderr stays clean."""
    data = [{"input": torch.randn(2, 4), "a": torch.randn(2, 4), "b": torch.randn(2, 4)}]
    losses = {t: (lambda t: lambda p, b: F.mse_loss(p, b[t]))(t) for t in "ab"}
    with pytest.raises(dfx.TraceError, match=r"(?s)could not trace DataDependent.*torch.export failed too"):
        dfx.compress(DataDependent(), losses, data, dfx.CompressConfig(num_batches=1, progress=False))
    assert "def forward" not in capfd.readouterr().err


def test_trace_advice_fits_the_failure():
    """Iterating a traced tensor (ultralytics' list(x.chunk(2, 1))) gets the fix that keeps
    the weights prunable - unpack a fixed number - not the leaf-module advice."""
    class Chunks(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 8)

        def forward(self, x):
            y = list(self.fc(x).chunk(2, 1))
            return {"a": y[0], "b": y[1]}

    with pytest.raises(dfx.TraceError) as info:
        dfx.compress(Chunks(), {"a": None, "b": None}, [])
    advice = str(info.value).split("what to do:")[1]
    assert "list(self.fc(x).chunk(2, 1))" in str(info.value)
    assert "a, b = x.chunk(2, 1)" in advice and "not pruned" in advice and "concrete_args" not in advice


def test_output_is_not_tasks():
    class Scalarish(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return {"a": self.fc(x), "b": 3}

    with pytest.raises(dfx.TraceError, match=r"output for task 'b' is int"):
        dfx.compress(Scalarish(), {"a": None, "b": None}, [])


def test_bad_argument_types(model):
    with pytest.raises(dfx.DisparseValueError, match="model must be a torch.nn.Module"):
        dfx.compress("resnet", {}, [])
    with pytest.raises(dfx.DisparseValueError, match="config must be a CompressConfig"):
        dfx.compress(model, ENTRY.task_losses, [], config={"sparsity": 0.5})
    with pytest.raises(dfx.DisparseValueError, match=r"task_losses\['seg'\] must be callable"):
        call(model, dict(ENTRY.task_losses, seg="ce"))


def test_all_errors_share_one_base():
    for name in ("TraceError", "UnsupportedOpError", "TaskMismatchError", "LossError", "ZeroGradientError",
                 "NotEnoughBatchesError", "NoPrunableParametersError", "InputError", "PostconditionError"):
        assert issubclass(getattr(dfx, name), dfx.DisparseError), name



def test_node_descriptions_name_the_users_line_not_torchs():
    from disparse_fx.passes.errors import describe_node
    from disparse_fx.passes.trace import trace_model

    gm = trace_model(ENTRY.build())
    stem = next(n for n in gm.graph.nodes if n.name == "stem")
    text = describe_node(stem, gm)
    assert "tests/zoo.py" in text and "self.stem(x)" in text and "/torch/" not in text


def test_the_default_num_batches_uses_what_a_small_dataset_has():
    """CompressConfig() reads up to 50 batches, fewer without complaint; an explicit
    num_batches still asks for that many (#16: the default failed on README-sized data)."""
    result = dfx.compress(ENTRY.build(), ENTRY.task_losses, ENTRY.batches(3), dfx.CompressConfig(progress=False))
    assert result.plan.batches == 3
    assert dfx.CompressConfig().num_batches is None and dfx.CompressConfig().batch_limit == 50
    assert dfx.CompressConfig(num_batches=7).batch_limit == 7
    with pytest.raises(dfx.NotEnoughBatchesError, match=r"fewer than config.num_batches=5"):
        dfx.compress(ENTRY.build(), ENTRY.task_losses, ENTRY.batches(3),
                     dfx.CompressConfig(num_batches=5, progress=False))
    with pytest.raises(dfx.DisparseValueError, match=r"num_batches must be an integer >= 1 or None"):
        dfx.CompressConfig(num_batches=0)


@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_compressing_a_masked_model_again_says_what_to_do(granularity):
    first = call(ENTRY.build(), granularity=granularity, sparsity=0.5)
    with pytest.raises(dfx.DisparseValueError, match=r"already a compress result's masked model .*compress the "
                                                     r"original model again.*dfx.slim\(result\)"):
        call(first.model, granularity=granularity, sparsity=0.8)
    call(dfx.slim(first), granularity=granularity, sparsity=0.5)  # the advice works


def test_data_on_the_meta_device_is_named(model):
    data = ENTRY.batches(2)
    for batch in data:
        batch["input"] = batch["input"].to("meta")
    with pytest.raises(dfx.InputError, match=r"data holds a tensor on the meta device .* shape \(4, 3, 8, 8\)"):
        call(model, data=data)
