"""Cost of compress(): wall time and peak memory against the naive per-task loop (2 to 5
tasks, zoo DeepLab 'tiny', resnet50 and vit_b_16 trunks, element and channel
granularity, with compress's per-phase breakdown from Plan.timings and the memory of one
training step), and analysis time against Torch-Pruning's dependency-graph build.

The naive approach is the reference code's: a deep copy of the model per task, and per
batch one forward AND one backward per task on that copy. compress() does one forward
per batch and one backward per task. Both compute the same snip scores (checked here).
Runs are interleaved (naive, compress element, compress channel, naive, ...) and the
medians compared, since this machine is shared and noisy; peak memory is measured in a
fresh process per method.

Analysis: the structural analysis compress() runs before any scoring - trace
(passes.trace.trace_model) + ownership (passes.ownership.analyze_ownership) + channel
groups (passes.channel_groups.find_channel_groups) - against
``torch_pruning.DependencyGraph().build_dependency`` (a benchmark-only extra: ``pip
install torch-pruning``) on the same 3-task models (resnet50, densenet121, vit_b_16 and swin_t
trunks via disparse_fx.zoo.multitask_from_torchvision; CNNs at 128 px, transformers at
224), interleaved, medians, as a ratio.

    python benchmarks/compress_cost.py                 # writes benchmarks/results/compress_cost.md
        # (default: resnet50 trunk, 3 and 5 tasks, 20 batches of 8x3x96x96, 3 repeats, then the analysis)
    python benchmarks/compress_cost.py --models tiny resnet50 vit_b_16 --tasks 2 3 4 5 --no-analysis
    python benchmarks/compress_cost.py --smoke --out /tmp/c.md   # tiny configuration (used by the tests)
    python benchmarks/compress_cost.py --memory-only --score-dtypes float32 bfloat16   # peak memory only
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import itertools
import json
import os
import pathlib
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
from disparse_fx.config import SCORE_DTYPES  # noqa: E402
from disparse_fx.zoo import DEFAULT_TASKS, deeplab_resnet, multitask_from_torchvision  # noqa: E402
from disparse_fx.passes.channel_groups import find_channel_groups  # noqa: E402
from disparse_fx.passes.ownership import analyze_ownership  # noqa: E402
from disparse_fx.passes.trace import trace_model  # noqa: E402

RESULTS = _common.RESULTS


#: Heads of the compress-vs-naive models, cycled over the tasks: (kind, out_dim).
HEAD_KINDS = (("dense", 2), ("classify", 5), ("regress", 2))
#: Granularities compared, with their snip sparsity.
GRANULARITIES = (("element", 0.9), ("channel", 0.5))


def make_model(name: str, tasks, size: int):
    """'tiny'/'small'/...: the zoo DeepLab-ResNet; else a torchvision trunk (ViTs at ``image_size=size``)."""
    torch.manual_seed(0)
    if name in ("tiny", "small", "medium", "full"):
        return deeplab_resnet({t: ("dense", 2) for t in tasks}, size=name)
    kwargs = {"image_size": size} if name.startswith("vit_") else {}
    return multitask_from_torchvision(name, tasks, input_size=size, **kwargs)


def make_problem(n_tasks: int, batches: int, batch_size: int, size: int, model_name: str):
    """(model in train mode, batches, {task: loss}) - dense tasks on the zoo model, dense /
    classify / regress heads in turn on a torchvision trunk."""
    zoo = model_name in ("tiny", "small", "medium", "full")
    tasks = {f"task{i}": ("dense", 2) if zoo else HEAD_KINDS[i % len(HEAD_KINDS)] for i in range(n_tasks)}
    model = make_model(model_name, tasks, size).train()
    gen = torch.Generator().manual_seed(0)

    def target(kind, dim):
        if kind == "dense":
            return torch.randn(batch_size, dim, size, size, generator=gen)
        if kind == "classify":
            return torch.randint(0, dim, (batch_size,), generator=gen)
        return torch.randn(batch_size, dim, generator=gen)

    data = [{"input": torch.randn(batch_size, 3, size, size, generator=gen),
             **{t: target(*spec) for t, spec in tasks.items()}} for _ in range(batches)]

    def loss(key, kind):
        if kind == "classify":
            return lambda p, b: F.cross_entropy(p, b[key])
        return lambda p, b: F.mse_loss(p, b[key])

    losses = {t: loss(t, kind) for t, (kind, _) in tasks.items()}
    return model, data, losses


def compress_config(granularity: str, batches: int, score_dtype: str = "float32") -> "dfx.CompressConfig":
    sparsity = dict(GRANULARITIES)[granularity]
    return dfx.CompressConfig(sparsity=sparsity, criterion="snip", granularity=granularity, num_batches=batches,
                              progress=False, score_dtype=score_dtype)


def variants(args):
    """(granularity, score dtype) pairs measured, in the interleaving order."""
    return [(g, dt) for g, _ in GRANULARITIES if g in args.granularities for dt in args.score_dtypes]


def variant_label(g: str, dt: str) -> str:
    return f"{g} {dict(GRANULARITIES)[g]:.0%}" + ("" if dt == "float32" else f", {dt} scores")


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
        del m, params
        scores[task] = acc
    return scores


def train_step(model, data, losses):
    """One training step's memory: forward and backward of the summed task loss on one batch."""
    batch = data[0]
    out = model(batch["input"])
    sum(fn(out[t], batch) for t, fn in losses.items()).backward()


def peak_memory_mib(method: str, args, model_name: str, n_tasks: int) -> float:
    """Peak RSS growth of one run of ``method`` in a fresh process (MiB), set-up excluded."""
    return memory_run(method, args, model_name, n_tasks)["peak_mib"]


def memory_run(method: str, args, model_name: str, n_tasks: int) -> dict:
    """One run of ``method`` in a fresh process: {"peak_mib": peak RSS growth, set-up
    excluded} and, for compress, what the returned result holds (:func:`returned_mib`).
    With ``args.malloc_mmap_threshold`` the child runs under glibc's
    ``MALLOC_MMAP_THRESHOLD_`` (allocations from that size on are mapped and unmapped on
    their own instead of fragmenting the heap)."""
    cmd = [sys.executable, __file__, "--child", method, "--tasks", str(n_tasks), "--batches", str(args.batches),
           "--batch-size", str(args.batch_size), "--size", str(args.size), "--models", model_name,
           "--threads", str(args.threads)]
    env = dict(os.environ)
    if args.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def returned_mib(result, model) -> dict:
    """MiB held by what compress returns and the user's model does not: the per-task scores,
    the per-task and final masks, and the masked model's own tensors (its copy of the
    weights), each storage counted once."""
    seen = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}

    def mib(tensors) -> float:
        total = 0
        for t in tensors:
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total / 2 ** 20

    plan = result.plan
    scores = mib(t for per in plan.task_scores.values() for t in per.values())
    masks = mib(itertools.chain((t for per in plan.task_masks.values() for t in per.values()),
                                plan.masks.values()))
    model_copy = mib(itertools.chain(result.model.parameters(), result.model.buffers()))
    return {"scores_mib": scores, "masks_mib": masks, "model_mib": model_copy,
            "returned_mib": scores + masks + model_copy}


def child(method: str, args) -> None:
    model, data, losses = make_problem(args.tasks[0], args.batches, args.batch_size, args.size, args.models[0])
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
    elif method == "train":
        train_step(model, data, losses)
    else:
        _, granularity, score_dtype = method.split("-")
        result = dfx.compress(model, losses, data, compress_config(granularity, args.batches, score_dtype))
    peak = _status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    held = returned_mib(result, model) if method.startswith("compress") else {}
    print(json.dumps({"peak_mib": (peak - before) / 1024, **held}))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _max_score_diff(naive, plan) -> float:
    """Largest difference between compress's task scores and the naive ones (both normalised per task)."""
    worst = 0.0
    for t, acc in naive.items():
        per = plan.task_scores.get(t, {})
        total = sum(float(acc[p].sum()) for p in per) or 1.0
        for p, s in per.items():
            worst = max(worst, float((s - acc[p] / total).abs().max()))
    return worst


PHASES = ("trace", "ownership", "groups", "importance", "decision", "masks", "budget")


def run(args) -> str:
    rows = []
    grans = variants(args)
    for model_name in args.models:
        for n_tasks in args.tasks:
            model, data, losses = make_problem(n_tasks, args.batches, args.batch_size, args.size, model_name)
            params_m = sum(p.numel() for p in model.parameters()) / 1e6
            for g, dt in grans:  # warm-up
                dfx.compress(model, losses, data[:1], compress_config(g, 1, dt))
            t_naive, t_ours = [], {g: [] for g in grans}
            phases = {g: {k: [] for k in PHASES} for g in grans}
            results = {}
            for _ in range(args.repeats):  # interleaved: naive, element, channel, naive, ...
                t0 = time.perf_counter()
                naive = naive_snip(model, data, losses)
                t_naive.append(time.perf_counter() - t0)
                for g in grans:
                    t0 = time.perf_counter()
                    results[g] = dfx.compress(model, losses, data, compress_config(g[0], args.batches, g[1]))
                    t_ours[g].append(time.perf_counter() - t0)
                    for k in PHASES:
                        phases[g][k].append(results[g].plan.timings.get(k, 0.0))
            worst = {g: _max_score_diff(naive, results[g].plan) for g in grans}
            del naive, results
            med_naive = statistics.median(t_naive)
            mem_naive = peak_memory_mib("naive", args, model_name, n_tasks)
            mem_train = peak_memory_mib("train", args, model_name, n_tasks)
            for g in grans:
                med = statistics.median(t_ours[g])
                mem = peak_memory_mib(f"compress-{g[0]}-{g[1]}", args, model_name, n_tasks)
                ph = {k: statistics.median(v) for k, v in phases[g].items()}
                rows.append([model_name, f"{params_m:.1f}", n_tasks, variant_label(*g),
                             f"{med_naive:.2f}", f"{med:.2f}", f"{med / med_naive:.2f}",
                             " / ".join(f"{ph[k]:.2f}" for k in PHASES), f"{ph['decision'] / med:.1%}",
                             f"{mem_naive:.0f}", f"{mem:.0f}", f"{mem_train:.0f}",
                             f"{mem / mem_train:.2f}" if mem_train > 0 else "n/a",
                             f"{mem_naive / mem:.2f}x" if mem > 0 else "n/a", f"{worst[g]:.1e}"])
    table = tabulate(rows, headers=["model", "params M", "tasks", "granularity (snip)", "naive s", "compress s",
                                    "time ratio (compress / naive)",
                                    "trace / ownership / groups / importance / decision / masks / budget s",
                                    "decision share", "naive peak MiB", "compress peak MiB", "train step peak MiB",
                                    "compress / train step", "memory ratio (naive / compress)", "max score diff"],
                     tablefmt="github", disable_numparse=True)
    header = ("## compress() vs the naive per-task loop\n\n"
              f"Models: the zoo DeepLab-ResNet ('tiny', ...; dense heads) or torchvision trunks via "
              f"disparse_fx.zoo.multitask_from_torchvision (heads dense / classify / regress in turn; ViTs built "
              f"with image_size={args.size}); {args.batches} batches of {args.batch_size}x3x{args.size}x{args.size}, "
              f"criterion snip, element granularity at 90% and channel granularity at 50% sparsity, "
              f"{args.repeats} interleaved repeats (naive, compress element, compress channel, naive, ...; time: "
              "medians; the per-phase seconds are medians of Plan.timings). Memory: peak RSS above the RSS before "
              "the call, one run in a fresh process each, with the kernel's peak mark reset after the set-up "
              "(model and data built); 'train step' is one forward and backward of the summed task loss on one "
              "batch of the same model. Time ratio below 1: compress is faster than the naive loop; the naive "
              "loop runs T forwards and T backwards per batch on T model copies, compress one forward and T "
              "backwards, plus its analysis (trace, ownership, and at channel granularity the channel groups) and "
              "decision. The naive scores are the same at both granularities (element snip scores; the channel "
              "decision sums them per channel), so one naive timing serves both rows. Max score diff: compress's "
              "task scores against the naive ones, both normalised to sum 1 per task. Rows marked 'bfloat16 "
              "scores' run CompressConfig(score_dtype='bfloat16'): the T score tensors stored in 2 bytes an "
              "element instead of 4.\n\n")
    return header + table + "\n"


def run_memory(args) -> str:
    """Peak memory only (no timing): compress per granularity and score dtype against one
    training step, each in a fresh process, with what compress's result holds."""
    rows = []
    for model_name in args.models:
        for n_tasks in args.tasks:
            model, _, _ = make_problem(n_tasks, 1, 1, args.size, model_name)
            params_m = sum(p.numel() for p in model.parameters()) / 1e6
            del model
            mem_train = peak_memory_mib("train", args, model_name, n_tasks)
            for g, dt in variants(args):
                run = memory_run(f"compress-{g}-{dt}", args, model_name, n_tasks)
                mem, held = run["peak_mib"], run["returned_mib"]
                rows.append([model_name, f"{params_m:.1f}", n_tasks, f"{args.batch_size}x{args.size}px",
                             variant_label(g, dt), f"{mem_train:.0f}", f"{mem:.0f}", f"{mem / mem_train:.2f}",
                             f"{held:.0f} = {run['scores_mib']:.0f} + {run['masks_mib']:.0f} + {run['model_mib']:.0f}",
                             f"{held / mem_train:.2f}"])
    table = tabulate(rows, headers=["model", "params M", "tasks", "batch", "granularity (snip)",
                                    "train step peak MiB", "compress peak MiB", "compress / train step",
                                    "result MiB = scores + masks + model copy", "result / train step"],
                     tablefmt="github", disable_numparse=True)
    threshold = args.malloc_mmap_threshold
    allocator = (f"Every child ran with MALLOC_MMAP_THRESHOLD_={threshold} (glibc: allocations from that many "
                 "bytes on are mapped and returned to the system when freed, instead of staying in the heap). "
                 if threshold else "glibc's default allocator settings. ")
    return ("## Peak memory: compress() against one training step\n\n"
            f"{args.batches} batches; peak RSS above the RSS before the call, one fresh process each, kernel "
            "peak mark reset after the set-up (as above). 'train step': one forward and backward of the summed "
            "task loss on one batch (its gradients: 4 bytes per parameter). 'result': what the returned "
            "CompressionResult holds that the user's model does not, each storage once - plan.task_scores "
            "(one score tensor per task over its domain, api.md), plan.task_masks and plan.masks (1 byte an "
            "element), and the masked model's copy of the weights (the user's model is not mutated). It is a "
            "floor of compress's peak: the result exists at the end of the call. " + allocator + "\n\n"
            + table + "\n")


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
        gc.collect(0)  # as on our side
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
            gc.collect()  # neither side pays for the other's garbage
            t0 = time.perf_counter()
            gm = trace_model(model)
            t1 = time.perf_counter()
            analyze_ownership(gm, reference=model)
            t2 = time.perf_counter()
            groups = find_channel_groups(gm, (x,))
            # the young generation the analysis leaves (it runs with the collector paused, so
            # everything it made is there): the collection it deferred. A full collection
            # would walk the whole heap (about 220 ms here), whoever left the garbage
            gc.collect(0)
            t3 = time.perf_counter()
            ours.append(t3 - t0)
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
                parts[k].append(v)
            if n_tp is None or theirs:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    gc.collect()
                    seconds, n_tp = _time_tp(tp, model, x)
                if seconds is not None:
                    theirs.append(seconds)
            n_groups = len(groups.groups)
        med_ours = statistics.median(ours)
        med_tp = statistics.median(theirs) if theirs else None
        rows.append([name, f"{size}", f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}",
                     " / ".join(f"{statistics.median(v) * 1e3:.0f}" for v in parts.values()), f"{med_ours * 1e3:.0f}",
                     f"{med_tp * 1e3:.0f}" if med_tp else "failed",
                     f"{med_ours / med_tp:.2f}x" if med_tp else "-", n_groups, n_tp])
    table = tabulate(rows, headers=["model", "input px", "params M", "trace / ownership / channel groups ms",
                                    "disparse_fx analysis ms", "Torch-Pruning DependencyGraph ms", "ratio (ours / TP)",
                                    "channel groups (ours)", "prunable groups (TP)"],
                     tablefmt="github", disable_numparse=True)
    return ("## Analysis time vs Torch-Pruning's dependency graph\n\n"
            f"3-task models (heads {ANALYSIS_TASKS}), input 1x3xPxP (P in the table), {args.repeats} interleaved "
            f"repeats (a full garbage collection before each timed side, and a collection of the young "
            f"generation inside it at its end: our analysis runs with the cyclic collector paused, so the "
            f"collection it deferred counts), "
            f"medians; torch-pruning "
            f"{getattr(tp, '__version__', '?')}. Ratio below 1: our analysis is faster. Our trace returns a "
            "lazily compiled GraphModule (its Python code is generated when it is first called or read; the "
            "analyses only read the graph; the copies the passes hand to users are plain GraphModules). Our "
            "channel groups run shape propagation on fake tensors, with the outputs of the common ops made from their input shapes instead of running them (Linear, conv, LayerNorm, BatchNorm, "
            "activations, eval-mode Dropout and Identity, cat, residual adds of same-shaped tensors, Swin "
            "window attention); Torch-Pruning runs a real forward and walks "
            "autograd's graph. The group counts are not the same notion (ours include fixed groups, e.g. the "
            "task outputs; TP's count prunable groups only), so compare them only loosely. 'failed': "
            "Torch-Pruning raised (the error is in the last column).\n\n" + table + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet50"],
                    help="compress-vs-naive models: zoo DeepLab sizes (tiny, small, ...) or torchvision names "
                         "(resnet50, vit_b_16, ...); default resnet50")
    ap.add_argument("--tasks", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--granularities", nargs="+", choices=[g for g, _ in GRANULARITIES],
                    default=[g for g, _ in GRANULARITIES])
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--size", type=int, default=96, help="input side in px (and the ViTs' image_size)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-naive", action="store_true", help="skip the compress-vs-naive section")
    ap.add_argument("--no-analysis", action="store_true", help="skip the analysis-vs-Torch-Pruning section")
    ap.add_argument("--analysis-models", nargs="*", default=["resnet50", "densenet121", "vit_b_16", "swin_t"])
    ap.add_argument("--analysis-size", type=int, default=128, help="input size of the CNNs (transformers: 224)")
    ap.add_argument("--smoke", action="store_true", help="tiny configuration (seconds; used by the tests)")
    ap.add_argument("--out", type=pathlib.Path, default=None)
    ap.add_argument("--score-dtypes", nargs="+", choices=list(SCORE_DTYPES), default=["float32"],
                    help="CompressConfig.score_dtype values to measure (a row each)")
    ap.add_argument("--memory-only", action="store_true",
                    help="only the peak memory of compress against a training step (no timing)")
    ap.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                    help="run the memory children with glibc's MALLOC_MMAP_THRESHOLD_=BYTES (e.g. 1048576)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    _common.add_threads_argument(ap)
    args = ap.parse_args(argv)
    _common.set_threads(args.threads)
    if args.child:
        child(args.child, args)
        return 0
    if args.smoke:
        args.models, args.tasks, args.batches, args.batch_size, args.size, args.repeats = ["tiny"], [2], 1, 2, 32, 1
        args.analysis_models, args.analysis_size = ["deeplab-tiny"], 32
        args.score_dtypes = list(SCORE_DTYPES)
    out = _common.out_path(args.out, args.smoke, "compress_cost.md")
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    if args.memory_only:
        body = run_memory(args)
    else:
        body = ("" if args.no_naive else run(args) + "\n") + ("" if args.no_analysis else run_analysis(args))
    _common.write(out, _common.header("Cost of compress()", started=started) + body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
