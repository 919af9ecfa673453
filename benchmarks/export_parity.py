"""ONNX export of dense and slim multitask models: onnxruntime parity and file sizes.

    python benchmarks/export_parity.py            # writes benchmarks/results/export_parity.md
    python benchmarks/export_parity.py --smoke    # the zoo model only (used by the tests)

Each model is compressed at 50% channel sparsity (criterion magnitude: no data needed),
slimmed, and both the dense and the slim model are exported with dfx.export_onnx,
which checks onnxruntime against PyTorch on two batch sizes.
"""
from __future__ import annotations

import pathlib
import sys
import tempfile

import torch
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402

import disparse_fx as dfx  # noqa: E402
from disparse_fx.zoo import DEFAULT_TASKS, deeplab_resnet, multitask_from_torchvision

TASKS3 = {"seg": ("dense", 3), "cls": ("classify", 5), "reg": ("regress", 1)}


def models(smoke: bool):
    yield "DeepLab-ResNet tiny (4 tasks)", lambda: deeplab_resnet(DEFAULT_TASKS, size="tiny"), 64
    if smoke:
        return
    yield "resnet50 trunk (3 tasks)", lambda: multitask_from_torchvision("resnet50", TASKS3), 64
    yield "mobilenet_v3_large trunk (3 tasks)", lambda: multitask_from_torchvision("mobilenet_v3_large", TASKS3), 64


def run(args) -> str:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, factory, size in models(args.smoke):
            torch.manual_seed(0)
            model = factory().eval()
            x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                targets = {t: torch.randn_like(v) for t, v in model(x).items()}
            losses = {t: (lambda k: lambda p, b: F.mse_loss(p, b[k]))(t) for t in targets}
            result = dfx.compress(model, losses, [{"input": x, **targets}], dfx.CompressConfig(
                sparsity=0.5, granularity="channel", criterion="magnitude", progress=False))
            slim = dfx.slim(result)
            reps = {kind: dfx.export_onnx(m, x, pathlib.Path(tmp) / f"{kind}.onnx")
                    for kind, m in (("dense", model), ("slim", slim))}
            for kind, rep in reps.items():
                worst = max(rep.max_abs_diff[o] / max(rep.scale[o], 1.0) for o in rep.outputs)
                n = sum(p.numel() for p in (model if kind == "dense" else slim).parameters())
                rows.append([name, kind, f"{n:,}", f"{rep.size_bytes / 1e6:.2f}",
                             " ".join(f"{o}={rep.max_abs_diff[o]:.1e}" for o in rep.outputs), f"{worst:.1e}",
                             ",".join(map(str, rep.batch_sizes))])
    table = tabulate(rows, headers=["model", "variant", "parameters", "ONNX MB", "max |ort - torch| per output",
                                    "worst / scale", "batch sizes"], tablefmt="github", disable_numparse=True)
    extra = ["allowed: max abs diff <= 1e-4 x max(output scale, 1); onnxruntime CPU"]
    return _common.header("ONNX export parity and size, dense vs slim (50% channel sparsity)", extra) + table + "\n"


def main(argv=None) -> int:
    return _common.smoke_main(run, "export_parity.md", __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
