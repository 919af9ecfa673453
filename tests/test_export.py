"""ONNX export verified by onnxruntime: masked and slim zoo models, names, batch axis, errors."""
import onnx
import pytest
import torch

import disparse_fx as dfx
from disparse_fx.export import onnx_output_name, verify_onnx

from .zoo import ZOO, example_input


@pytest.mark.parametrize("entry", ZOO, ids=lambda e: e.name)
def test_masked_and_slim_export_match_onnxruntime(entry, tmp_path):
    model = entry.build()
    result = dfx.compress(model, entry.task_losses, entry.batches(2), dfx.CompressConfig(
        sparsity=0.5, granularity="channel", num_batches=2, progress=False), inputs=entry.inputs)
    x = example_input(entry)
    masked = dfx.export_onnx(result.model, x, tmp_path / "masked.onnx")
    slim = dfx.export_onnx(dfx.slim(result), x, tmp_path / "slim.onnx")
    for rep in (masked, slim):
        assert rep.batch_sizes == (x.shape[0], 2 * x.shape[0])
        for name in rep.outputs:
            assert rep.max_abs_diff[name] <= 1e-4 * max(rep.scale[name], 1.0)
    tasks = list(result.plan.tasks)
    assert slim.outputs == tuple(onnx_output_name(t) for t in tasks)
    graph = onnx.load(str(tmp_path / "slim.onnx")).graph
    assert [o.name for o in graph.output] == list(slim.outputs)
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch
    assert slim.size_bytes < masked.size_bytes  # the file follows the slim parameter count
    assert result.model.training  # the model's mode is restored


def test_mismatch_names_the_output(tmp_path):
    entry = ZOO[0]
    a, b = entry.build(seed=0).eval(), entry.build(seed=1).eval()
    x = example_input(entry)
    dfx.export_onnx(a, x, tmp_path / "a.onnx")
    with pytest.raises(dfx.ExportMismatchError, match=r"output 'seg' differs between onnxruntime and PyTorch by"):
        verify_onnx(b, tmp_path / "a.onnx", (x,), ["seg", "cls"], batch_sizes=[4], rtol=1e-4)


def test_bad_example_inputs(tmp_path):
    with pytest.raises(dfx.DisparseValueError, match="example_inputs must be a Tensor or a tuple of Tensors"):
        dfx.export_onnx(ZOO[0].build(), [1, 2], tmp_path / "x.onnx")


def test_an_output_path_that_is_a_folder(tmp_path):
    with pytest.raises(dfx.DisparseValueError, match=r"is a folder; give the file to write, e.g. .*model.onnx"):
        dfx.export_onnx(ZOO[0].build(), example_input(ZOO[0]), tmp_path)


def test_static_batch(tmp_path):
    entry = ZOO[0]
    rep = dfx.export_onnx(entry.build(), example_input(entry), tmp_path / "s.onnx", dynamic_batch=False)
    assert rep.batch_sizes == (4,)
    graph = onnx.load(str(tmp_path / "s.onnx")).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4


class _BatchNormHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 8)
        self.bn = torch.nn.BatchNorm1d(8)
        self.frozen = torch.nn.BatchNorm1d(8)
        self.a, self.b = torch.nn.Linear(8, 2), torch.nn.Linear(8, 1)

    def forward(self, x):
        h = torch.relu(self.frozen(self.bn(self.fc(x))))
        return {"a": self.a(h), "b": self.b(h)}


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: m.training for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def _same_state(model, before):
    tensors, modes, grads = before
    now = _state(model)
    return all(torch.equal(v, now[0][k]) for k, v in tensors.items()) and modes == now[1] and grads == now[2]


@pytest.mark.parametrize("batch", [1, 3])
def test_export_leaves_the_model_untouched(batch, tmp_path):
    """A plain module in train mode (one submodule frozen in eval) is exported in eval
    mode: no train-mode forward (BatchNorm statistics, batch 1), every flag as before."""
    model = _BatchNormHeads()
    model.frozen.eval()
    model.a.weight.requires_grad_(False)
    x = torch.randn(batch, 4)
    x0, before = x.clone(), _state(model)
    rep = dfx.export_onnx(model, x, tmp_path / "m.onnx")
    assert rep.outputs == ("a", "b")
    assert _same_state(model, before) and torch.equal(x, x0)
    assert model.training and not model.frozen.training


class _BatchBaked(torch.nn.Module):
    """Reads the batch size through .data: the exported graph fixes it."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 6)

    def forward(self, x):
        b, c = x.data.size()
        return {"y": self.fc(x).view(b, 2, 3).sum(1)}


def test_export_errors_are_disparse_errors_that_name_the_fault(tmp_path, capfd):
    """Failures of the exporter, of onnxruntime and of the model itself come out as
    DisparseErrors naming what is at fault; the model is as before, errors included."""
    model = _BatchBaked()
    before = _state(model)
    capfd.readouterr()
    with pytest.raises(dfx.ExportMismatchError, match=r"onnxruntime rejects batch size 4 .*exported at batch size 2"):
        dfx.export_onnx(model, torch.randn(2, 4), tmp_path / "baked.onnx")
    assert "onnxruntime" not in capfd.readouterr().err  # no raw onnxruntime log line besides the error
    assert _same_state(model, before)
    dfx.export_onnx(model, torch.randn(2, 4), tmp_path / "baked.onnx", dynamic_batch=False)  # the advice works
    with pytest.raises(dfx.DisparseValueError, match=r"_BatchBaked raised RuntimeError on example_inputs \(\(2, 5\)"):
        dfx.export_onnx(model, torch.randn(2, 5), tmp_path / "wrong.onnx")
    assert _same_state(model, before)
    assert issubclass(dfx.ExportMismatchError, dfx.ExportError) and issubclass(dfx.ExportError, dfx.DisparseError)
