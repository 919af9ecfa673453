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


def test_static_batch(tmp_path):
    entry = ZOO[0]
    rep = dfx.export_onnx(entry.build(), example_input(entry), tmp_path / "s.onnx", dynamic_batch=False)
    assert rep.batch_sizes == (4,)
    graph = onnx.load(str(tmp_path / "s.onnx")).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4
