"""CUDA correctness end to end (issue #12 item 4): compress, slim, DynamicSparsity,
finetune and export_onnx with model and data on a CUDA device, in float32 (TF32 on, as
PyTorch's cuDNN convolutions are by default), bfloat16 and float16; slim attention still
runs on the fused scaled-dot-product kernels.

Every test carries the ``cuda`` marker and skips cleanly without a CUDA device. On a GPU
machine, one prepared command runs them before the GPU benchmark:
``python benchmarks/gpu.py --tests`` (or ``pytest -q -m cuda tests/test_cuda.py``).
``DISPARSE_FX_TEST_DEVICE=cpu`` runs them on the CPU instead, to check the tests
themselves on a machine without a GPU.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import disparse_fx as dfx
from disparse_fx.passes.errors import PostconditionError
from disparse_fx.passes.slim import check_parity

from .test_precision import cast
from .transformer_zoo import IMAGE, ViTNet
from .zoo import ZOO_BY_NAME

CUDA = torch.device(os.environ.get("DISPARSE_FX_TEST_DEVICE", "cuda"))
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def on_cuda(batch, dtype):
    return cast(_to(batch, CUDA), dtype)


def _to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


@pytest.fixture
def tf32_on():
    """TF32 for cuBLAS matmuls and cuDNN convolutions, as many training scripts set it."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def mse_losses(tasks):
    return {t: (lambda t: lambda pred, batch: F.mse_loss(pred.float(), batch[t].float()))(t) for t in tasks}


def regression_batches(model, xs):
    """Batches {input, task: random target shaped like the model's output}."""
    with torch.no_grad():
        out = model(xs[0])
    gen = torch.Generator().manual_seed(0)
    return [{"input": x, **{t: torch.randn(v.shape, generator=gen).to(v) for t, v in out.items()}} for x in xs]


def test_resnet50_trunk_slims_under_tf32(tf32_on):
    """The reported failure: a 3-task torchvision resnet50 trunk on the GPU, TF32 on, channel
    compress (taylor, 50%, round_to 8) then slim raised PostconditionError (relative 2e-4)."""
    from disparse_fx.zoo import multitask_from_torchvision

    model = multitask_from_torchvision(
        "resnet50", {"seg": ("dense", 5), "cls": ("classify", 10), "reg": ("regress", 3)}).to(CUDA)
    gen = torch.Generator().manual_seed(0)
    data = regression_batches(model, [torch.randn(4, 3, 64, 64, generator=gen).to(CUDA) for _ in range(2)])
    config = dfx.CompressConfig(granularity="channel", sparsity=0.5, criterion="taylor", round_to=8, num_batches=2,
                                progress=False)
    result = dfx.compress(model, mse_losses(["seg", "cls", "reg"]), data, config)
    slim = dfx.slim(result)
    assert {p.device.type for p in slim.parameters()} == {CUDA.type}
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32  # restored
    wrong = dfx.slim(result)
    with torch.no_grad():
        w = next(p for n, p in wrong.named_parameters() if p.dim() == 4)
        w.view(-1)[w.abs().argmax()] *= 1.01
    with pytest.raises(PostconditionError, match="relative"):
        check_parity(result.model, wrong, result.plan.channels.groups)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("granularity", ["channel", "element"])
@pytest.mark.parametrize("name", ["two_heads_dict", "residual_tuple", "functional_conv"])
def test_compress_slim_train_on_cuda(name, granularity, dtype, tf32_on):
    entry = ZOO_BY_NAME[name]
    model = entry.build().to(CUDA, dtype)
    data = [on_cuda(b, dtype) for b in entry.batches(2)]
    config = dfx.CompressConfig(sparsity=0.5, granularity=granularity, num_batches=2, progress=False, round_to=1,
                                criterion="taylor")
    result = dfx.compress(model, entry.task_losses, data, config, inputs=entry.inputs)
    tensors = list(result.model.parameters()) + list(result.model.buffers())
    assert {t.device.type for t in tensors} == {CUDA.type}
    assert {t.dtype for t in tensors if t.is_floating_point()} == {dtype}
    dfx.slim(result)
    opt = torch.optim.SGD(result.model.parameters(), lr=1e-3)
    dynamic = dfx.DynamicSparsity(result, entry.task_losses, opt, end_step=4, update_every=1, inputs=entry.inputs)
    history = dfx.finetune(result, entry.task_losses, data, 3, progress=False, inputs=entry.inputs, dynamic=dynamic)
    assert all(torch.isfinite(torch.tensor(history["loss"])))
    slim = dfx.slim(result)
    assert {(p.device.type, p.dtype) for p in slim.parameters()} == {(CUDA.type, dtype)}


def test_export_onnx_of_a_cuda_slim_model(tmp_path, tf32_on):
    entry = ZOO_BY_NAME["two_heads_dict"]
    data = [on_cuda(b, torch.float32) for b in entry.batches(2)]
    config = dfx.CompressConfig(sparsity=0.5, granularity="channel", num_batches=2, progress=False, round_to=1)
    slim = dfx.slim(dfx.compress(entry.build().to(CUDA), entry.task_losses, data, config))
    report = dfx.export_onnx(slim, data[0]["input"], tmp_path / "slim.onnx")
    assert report.path.exists()


@pytest.mark.xfail(strict=True, reason="export_onnx feeds onnxruntime float32 inputs and compares at rtol 1e-4 "
                                       "in the model's dtype; onnxruntime's CPU provider has no bfloat16 Conv "
                                       "(disparse_fx/export.py)")
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
def test_export_onnx_of_a_reduced_precision_cuda_slim_model(dtype, tmp_path):
    entry = ZOO_BY_NAME["two_heads_dict"]
    data = [on_cuda(b, dtype) for b in entry.batches(2)]
    config = dfx.CompressConfig(sparsity=0.5, granularity="channel", num_batches=2, progress=False, round_to=1)
    slim = dfx.slim(dfx.compress(entry.build().to(CUDA, dtype), entry.task_losses, data, config))
    dfx.export_onnx(slim, data[0]["input"], tmp_path / "slim.onnx")


@pytest.mark.parametrize("kind", ["sdpa", "mha"])
def test_slim_attention_runs_on_fused_kernels(kind):
    """ViT-like zoo model (torch MultiheadAttention or F.scaled_dot_product_attention), 4
    heads of width 32, bfloat16: dense and slim models both run with only the flash and
    memory-efficient SDPA backends allowed (a shape they reject raises 'No available
    kernel'), and the slim model removed heads."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ViTNet(kind, dim=128, heads=4).eval().to(CUDA, torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(8, 3, IMAGE, IMAGE, generator=gen).to(CUDA, torch.bfloat16) for _ in range(2)]
    data = regression_batches(model, xs)
    config = dfx.CompressConfig(sparsity=0.5, granularity="channel", attention="heads", num_batches=2, round_to=1,
                                progress=False)
    result = dfx.compress(model, mse_losses(["tokens", "pooled", "mid"]), data, config)
    slim = dfx.slim(result).eval()
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        dense_out, slim_out = model(xs[0]), slim(xs[0])
    assert {t: v.dtype for t, v in slim_out.items()} == {t: torch.bfloat16 for t in dense_out}
