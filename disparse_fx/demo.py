"""The main job on the built-in default: `make demo` / `python -m disparse_fx demo`.

Builds the paper's model family (a DeepLab-style dilated ResNet trunk shared by
ASPP-like heads, at the "tiny" size) for the built-in tasks, compresses it with
DiSparse on generated batches and prints the per-layer summary, the achieved sparsity
and the time taken. Every line goes to the given stream (the CLI's stdout).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, TextIO

import torch
import torch.nn.functional as F

from .api import compress
from .config import CRITERIA, GRANULARITIES, CompressConfig
from .zoo import DEFAULT_TASKS, deeplab_resnet

__all__ = ["DemoOptions", "run_demo", "generated_batches", "default_task_losses"]


@dataclass(frozen=True)
class DemoOptions:
    sparsity: float = 0.9
    criterion: str = "snip"
    granularity: str = "element"
    disentangle: bool = True
    batches: int = 8
    batch_size: int = 8
    image_size: int = 64
    seed: int = 0
    size: str = "tiny"


def default_task_losses() -> Dict[str, object]:
    """Losses for the generated DEFAULT_TASKS targets."""
    return {
        "edge": lambda p, b: F.binary_cross_entropy_with_logits(p, b["edge"]),
        "keypoint": lambda p, b: F.mse_loss(p, b["keypoint"]),
        "segment": lambda p, b: F.cross_entropy(p, b["segment"]),
        "denoise": lambda p, b: F.l1_loss(p, b["denoise"]),
    }


def generated_batches(n: int, batch_size: int, size: int, seed: int) -> List[dict]:
    """Random images with targets of the right shapes for DEFAULT_TASKS."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.rand(batch_size, 3, size, size, generator=gen)
        out.append({
            "input": x + 0.1 * torch.randn(x.shape, generator=gen),
            "edge": (torch.rand(batch_size, 1, size, size, generator=gen) > 0.9).float(),
            "keypoint": torch.rand(batch_size, 1, size, size, generator=gen),
            "segment": torch.randint(0, DEFAULT_TASKS["segment"][1], (batch_size, size, size), generator=gen),
            "denoise": x,
        })
    return out


def add_arguments(parser) -> None:
    parser.add_argument("--sparsity", type=float, default=0.9, help="fraction of prunable parameters removed")
    parser.add_argument("--criterion", choices=CRITERIA, default="snip")
    parser.add_argument("--granularity", choices=GRANULARITIES, default="element")
    parser.add_argument("--baseline", action="store_true", help="one score on the summed loss (disentangle=False)")
    parser.add_argument("--batches", type=int, default=8, help="batches used for importance")
    parser.add_argument("--size", choices=("tiny", "small", "paper"), default="tiny", help="model size")
    parser.add_argument("--seed", type=int, default=0)


def run_from_args(args, out: TextIO) -> int:
    return run_demo(DemoOptions(sparsity=args.sparsity, criterion=args.criterion, granularity=args.granularity,
                                disentangle=not args.baseline, batches=args.batches, size=args.size,
                                seed=args.seed), out)


def run_demo(opts: DemoOptions, out: TextIO) -> int:
    torch.manual_seed(opts.seed)
    model = deeplab_resnet(DEFAULT_TASKS, size=opts.size)
    data = generated_batches(opts.batches, opts.batch_size, opts.image_size, opts.seed)
    config = CompressConfig(sparsity=opts.sparsity, criterion=opts.criterion, granularity=opts.granularity,
                            disentangle=opts.disentangle, num_batches=opts.batches, seed=opts.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: DeepLab-ResNet ({opts.size}), tasks {list(DEFAULT_TASKS)}, {n_params:,} parameters", file=out)
    print(f"data: {opts.batches} generated batches of {opts.batch_size}x3x{opts.image_size}x{opts.image_size}", file=out)
    t0 = time.perf_counter()
    result = compress(model, default_task_losses(), data, config)
    elapsed = time.perf_counter() - t0
    print(result.summary(), file=out)
    print(f"\nachieved sparsity {result.plan.sparsity:.4f} (target {opts.sparsity}) in {elapsed:.2f} s", file=out)
    print("not yet in the demo: training on the built-in photo dataset, channel slimming, ONNX export", file=out)
    return 0
