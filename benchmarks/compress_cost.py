"""Cost of compress(): wall time and peak memory against the naive per-task loop (2 to 5
tasks), and analysis time against Torch-Pruning's dependency-graph build.

The naive approach is the reference code's: a deep copy of the model per task, and per
batch one forward AND one backward per task on that copy. compress() does one forward
per batch and one backward per task. Both compute the same snip scores (checked here),
so the ratio is pure overhead. Runs are interleaved (naive, compress, naive, ...) and
the medians compared, since this machine is shared and noisy.

Analysis: the structural analysis compress() runs before any scoring - trace
(passes.trace.trace_model) + ownership (passes.ownership.analyze_ownership) + channel
groups (passes.channel_groups.find_channel_groups) - against
``torch_pruning.DependencyGraph().build_dependency`` (a benchmark-only extra: ``pip
install torch-pruning``) on the same 3-task models (resnet50, densenet121, vit_b_16 and swin_t
trunks via disparse_fx.zoo.multitask_from_torchvision; CNNs at 128 px, transformers at
224), interleaved, medians, as a ratio.

    python benchmarks/compress_cost.py                 # writes benchmarks/results/compress_cost.md
    python benchmarks/compress_cost.py --smoke --out /tmp/c.md   # tiny configuration (used by the tests)
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402

import disparse_fx as dfx  # noqa: E402
from disparse_fx.zoo import DEFAULT_TASKS, deeplab_resnet, multitask_from_torchvision  # noqa: E402
from passes.channel_groups import find_channel_groups  # noqa: E402
from passes.ownership import analyze_ownership  # noqa: E402
from passes.trace import trace_model  # noqa: E402

RESULTS = _common.RESULTS


def make_problem(n_tasks: int, batches: int, batch_size: int, size: int, model_size: str):
    torch.manual_seed(0)
    tasks = {f"task{i}": ("dense", 2) for i in range(n_tasks)}
    model = deeplab_resnet(tasks, size=model_size)
    gen = torch.Generator().manual_seed(0)
    data = [{"input": torch.randn(batch_size, 3, size, size, generator=gen),
             **{t: torch.randn(batch_size, 2, size, size, generator=gen) for t in tasks}}
            for _ in range(batches)]
    losses = {t: (lambda key: lambda p, b: F.mse_loss(p, b[key]))(t) for t in tasks}
    return model, data, losses


def naive_snip(model, data, losses):
    """Reference-code style: a copy per task, a full forward+backward per task per batch."""
    scores = {}
    for task, loss_fn in losses.items():
        m = copy.deepcopy(model).train()
        params = dict(m.named_parameters())
        acc = {n: torch.zeros_like(p) for n, p in params.items() if p.dim() > 1}
        for batch in data:
            m.zero_grad()
            loss_fn(m(batch["input"])[task], batch).backward()
            for n, a in acc.items():
                p = params[n]
                if p.grad is not None:
                    a += (p.grad * p.detach()).abs()
        scores[task] = acc
    return scores


def peak_memory_mib(method: str, args, n_tasks: int) -> float:
    """Peak RSS growth of one run of ``method`` in a fresh process (MiB), set-up excluded."""
    cmd = [sys.executable, __file__, "--child", method, "--tasks", str(n_tasks), "--batches", str(args.batches),
           "--batch-size", str(args.batch_size), "--size", str(args.size), "--model", args.model]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def child(method: str, args) -> None:
    model, data, losses = make_problem(args.tasks[0], args.batches, args.batch_size, args.size, args.model)
    config = dfx.CompressConfig(sparsity=0.9, criterion="snip", num_batches=args.batches, progress=False)
    import gc

    gc.collect()
    # Reset the kernel's peak-RSS mark (Linux: "5" > /proc/self/clear_refs), so the peak
    # of the set-up (imports, model, data) does not hide the run's own peak.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    before = _status_kib("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if method == "naive":
        naive_snip(model, data, losses)
    else:
        dfx.compress(model, losses, data, config)
    peak = _status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    print(json.dumps({"peak_mib": (peak - before) / 1024}))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def run(args) -> str:
    rows = []
    for n_tasks in args.tasks:
        model, data, losses = make_problem(n_tasks, args.batches, args.batch_size, args.size, args.model)
        config = dfx.CompressConfig(sparsity=0.9, criterion="snip", num_batches=args.batches, progress=False)
        t_naive, t_ours = [], []
        dfx.compress(model, losses, data[:1], dfx.CompressConfig(num_batches=1, progress=False))  # warm-up
        for _ in range(args.repeats):  # interleaved
            t0 = time.perf_counter()
            naive = naive_snip(model, data, losses)
            t_naive.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            result = dfx.compress(model, losses, data, config)
            t_ours.append(time.perf_counter() - t0)
        # same scores, up to normalisation (compress normalises per task)
        worst = 0.0
        for t, acc in naive.items():
            total = sum(float(acc[p].sum()) for p in result.plan.task_scores[t])
            for p, s in result.plan.task_scores[t].items():
                worst = max(worst, float((s - acc[p] / total).abs().max()))
        med_naive, med_ours = statistics.median(t_naive), statistics.median(t_ours)
        mem_naive, mem_ours = peak_memory_mib("naive", args, n_tasks), peak_memory_mib("compress", args, n_tasks)
        rows.append([n_tasks, f"{med_naive:.2f}", f"{med_ours:.2f}", f"{med_naive / med_ours:.2f}x",
                     f"{mem_naive:.0f}", f"{mem_ours:.0f}", (f"{mem_naive / mem_ours:.2f}x" if mem_ours > 0 else "n/a"),
                     f"{result.plan.sparsity:.4f}", f"{worst:.1e}"])
    table = tabulate(rows, headers=["tasks", "naive s", "compress s", "time ratio", "naive peak MiB",
                                    "compress peak MiB", "memory ratio", "sparsity (target 0.9)",
                                    "max score diff"], tablefmt="github")
    header = ("## compress() vs the naive per-task loop\n\n"
              f"DeepLab-ResNet '{args.model}' (disparse_fx.zoo), {args.batches} batches of "
              f"{args.batch_size}x3x{args.size}x{args.size}, criterion snip, {args.repeats} interleaved repeats "
              "(time: medians; memory: peak RSS above the RSS before the call, one run in a fresh process, with the "
              "kernel's peak mark reset after the set-up). "
              "Time ratio and memory ratio are naive / compress (above 1: compress is cheaper). The "
              "naive loop runs T forwards and T backwards per batch on T model copies; compress runs "
              "one forward and T backwards, so its time gain is bounded by 3T/(1+2T) when a backward "
              "costs two forwards, and compress adds a fixed O(N log N) ranking cost.\n\n")
    return header + table + "\n"


#: The heads of the torchvision analysis models: a dense, a classification and a regression task.
ANALYSIS_TASKS = {"seg": ("dense", 3), "cls": ("classify", 5), "reg": ("regress", 2)}
#: Models that need their native resolution (patch embeddings, window sizes).
NATIVE_224 = ("vit_", "swin_")


def build_analysis_model(name: str):
    torch.manual_seed(0)
    if name.startswith("deeplab-"):
        return deeplab_resnet(DEFAULT_TASKS, size=name.split("-", 1)[1]).eval()  # dense heads only
    return multitask_from_torchvision(name, ANALYSIS_TASKS).eval()


def _time_tp(tp, model, x):
    """Seconds of Torch-Pruning's dependency-graph build, its prunable group count, or
    (None, the error) when it fails on the model."""
    try:
        t0 = time.perf_counter()
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
        return time.perf_counter() - t0, sum(1 for _ in dg.get_all_groups())
    except Exception as exc:  # noqa: BLE001 - a peer's failure is a result
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"


def run_analysis(args) -> str:
    try:
        import torch_pruning as tp
    except Exception as exc:  # noqa: BLE001
        return (f"## Analysis time vs Torch-Pruning\n\nnot run: torch-pruning is not importable "
                f"({type(exc).__name__}: {exc}); `pip install torch-pruning`\n")
    import warnings

    rows = []
    for name in args.analysis_models:
        model = build_analysis_model(name)
        size = 224 if name.startswith(NATIVE_224) else args.analysis_size
        x = torch.randn(1, 3, size, size)
        ours, theirs, parts = [], [], {"trace": [], "ownership": [], "channel groups": []}
        n_groups = n_tp = None
        for _ in range(args.repeats):  # interleaved
            t0 = time.perf_counter()
            gm = trace_model(model)
            t1 = time.perf_counter()
            analyze_ownership(gm, reference=model)
            t2 = time.perf_counter()
            groups = find_channel_groups(gm, (x,))
            t3 = time.perf_counter()
            ours.append(t3 - t0)
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
                parts[k].append(v)
            if n_tp is None or theirs:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    seconds, n_tp = _time_tp(tp, model, x)
                if seconds is not None:
                    theirs.append(seconds)
            n_groups = len(groups.groups)
        med_ours = statistics.median(ours)
        med_tp = statistics.median(theirs) if theirs else None
        rows.append([name, f"{size}", f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}",
                     " / ".join(f"{statistics.median(v):.2f}" for v in parts.values()), f"{med_ours:.2f}",
                     f"{med_tp:.2f}" if med_tp else "failed",
                     f"{med_ours / med_tp:.2f}x" if med_tp else "-", n_groups, n_tp])
    table = tabulate(rows, headers=["model", "input px", "params M", "trace / ownership / channel groups s",
                                    "disparse_fx analysis s", "Torch-Pruning DependencyGraph s", "ratio (ours / TP)",
                                    "channel groups (ours)", "prunable groups (TP)"],
                     tablefmt="github", disable_numparse=True)
    return ("## Analysis time vs Torch-Pruning's dependency graph\n\n"
            f"3-task models (heads {ANALYSIS_TASKS}), input 1x3xPxP (P in the table), {args.repeats} interleaved "
            f"repeats, medians; torch-pruning {getattr(tp, '__version__', '?')}. Ratio below 1: our analysis is "
            "faster. Our channel groups run shape propagation on fake tensors (Linear, conv, LayerNorm and "
            "BatchNorm outputs made from their input shapes); Torch-Pruning runs a real forward and walks "
            "autograd's graph. The group counts are not the same notion (ours include fixed groups, e.g. the "
            "task outputs; TP's count prunable groups only), so compare them only loosely. 'failed': "
            "Torch-Pruning raised (the error is in the last column).\n\n" + table + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, nargs="+", default=[2, 3, 4, 5])
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--analysis-models", nargs="*", default=["resnet50", "densenet121", "vit_b_16", "swin_t"])
    ap.add_argument("--analysis-size", type=int, default=128, help="input size of the CNNs (transformers: 224)")
    ap.add_argument("--smoke", action="store_true", help="tiny configuration (seconds; used by the tests)")
    ap.add_argument("--out", type=pathlib.Path, default=None)
    ap.add_argument("--child", choices=["naive", "compress"], help=argparse.SUPPRESS)
    _common.add_threads_argument(ap)
    args = ap.parse_args(argv)
    _common.set_threads(args.threads)
    if args.child:
        child(args.child, args)
        return 0
    if args.smoke:
        args.tasks, args.batches, args.batch_size, args.size, args.repeats = [2], 1, 2, 32, 1
        args.analysis_models, args.analysis_size = ["deeplab-tiny"], 32
    out = _common.out_path(args.out, args.smoke, "compress_cost.md")
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    body = run(args) + "\n" + run_analysis(args)
    _common.write(out, _common.header("Cost of compress()", started=started) + body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
