"""Latency measurement that survives a shared, noisy machine: interleaved runs, medians.

Each round runs every candidate once, in a rotating order, so background load hits all
of them alike; the median over rounds is reported. Used by the demo and benchmarks.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Mapping

import torch

__all__ = ["interleaved_latency", "torch_runner", "onnxruntime_runner"]


def interleaved_latency(runners: Mapping[str, Callable[[], object]], *, rounds: int = 20,
                        warmup: int = 3) -> Dict[str, float]:
    """{name: median seconds per call} over ``rounds`` interleaved rounds."""
    names = list(runners)
    for _ in range(warmup):
        for n in names:
            runners[n]()
    samples: Dict[str, list] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            runners[n]()
            samples[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in samples.items()}


def torch_runner(model: torch.nn.Module, *inputs: torch.Tensor) -> Callable[[], object]:
    """A no-grad eval-mode forward of ``model`` (CUDA-synchronised when on a GPU)."""
    model.eval()
    cuda = any(t.is_cuda for t in inputs)

    def run():
        with torch.no_grad():
            out = model(*inputs)
        if cuda:
            torch.cuda.synchronize()
        return out

    return run


def onnxruntime_runner(path, *inputs: torch.Tensor, threads: int = 0) -> Callable[[], object]:
    """An onnxruntime CPU session run on ``inputs`` (``threads=0``: onnxruntime's default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs)}
    return lambda: session.run(None, feed)
