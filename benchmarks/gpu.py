"""GPU: the speed and cost benchmarks on a CUDA device (CUDA events, warm-up).

Budgets (first): 3-task resnet50, vit_b_16 and convnext_tiny trunks (``--budget-models``)
compressed on the device at a 50% params / FLOPs / latency budget, with uniform width and
Torch-Pruning at the FLOPs budget's FLOPs, timed in fp32, bf16 and (``--compile``) bf16
under torch.compile at batch 1 and 64 (``--batches 1 64``); the header counts the cells
where a compact model is slower than its dense model.

Speed: the models of benchmarks/speed.py (resnet50, mobilenet_v3_large, convnext_tiny
trunks and the zoo DeepLab-ResNet) dense vs slim vs native (the same eager model at the
slim widths) at 30/50/70% channel sparsity, round_to 1 and 8, batch 1 and 64, fp32,
latency from CUDA events over interleaved rounds after warm-up (medians); with
``--compile``, also torch.compile of the dense and one slim model (50%, round_to 8) per
model. Cost: compress() vs the naive per-task loop (benchmarks/compress_cost.py) for 2
to 5 tasks on the device: time (medians) and peak allocated device memory, as ratios.

A time budget (``--budget-s``, default 420 s) keeps the whole run within 8 minutes on
one H100-class GPU: once exceeded, the remaining items are skipped and listed.

    python benchmarks/gpu.py                      # on a CUDA machine: benchmarks/results/gpu.md
    python benchmarks/gpu.py --compile            # plus torch.compile
    python benchmarks/gpu.py --smoke --out /tmp/g.md   # tiny; falls back to the CPU when no GPU
    python benchmarks/gpu.py --tests              # first `pytest -q -m cuda tests/test_cuda.py`

``--tests`` runs the CUDA correctness tests (compress / slim / finetune / DynamicSparsity /
export_onnx in fp32, bf16 and fp16, fused attention kernels) before the benchmark, within
``--tests-timeout-s``; their summary line goes into the results header, and the exit
status is pytest's. One prepared command for a GPU machine's short time budget.

Without a GPU (and without --smoke or --device cpu) it prints that there is none and
exits 0.
"""
from __future__ import annotations

import argparse
import datetime
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict

import torch
from tabulate import tabulate

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402
import compress_cost  # noqa: E402
import speed  # noqa: E402

import disparse_fx as dfx  # noqa: E402
from disparse_fx.passes.flops import count_flops  # noqa: E402
from disparse_fx.passes.trace import trace_model  # noqa: E402


def pick_device(name: str, smoke: bool):
    """(device, note): cuda when asked for or available; the CPU only with --smoke or --device cpu."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            return None, "--device cuda, but torch.cuda.is_available() is False"
        return torch.device("cuda"), ""
    if name == "cpu" or smoke:
        return torch.device("cpu"), "no CUDA GPU available: ran on the CPU (smoke / --device cpu)"
    return None, "no CUDA GPU available (torch.cuda.is_available() is False): nothing to run"


def device_name(device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    return f"CPU ({_common.machine()})"


def timed_latency(runners: Dict[str, Callable[[], object]], device, rounds: int, warmup: int) -> Dict[str, float]:
    """{name: median seconds}; CUDA events on a GPU, perf_counter on the CPU; interleaved rounds."""
    names = list(runners)
    with torch.no_grad():
        for _ in range(warmup):
            for n in names:
                runners[n]()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples: Dict[str, list] = {n: [] for n in names}
        for r in range(rounds):
            for n in names[r % len(names):] + names[: r % len(names)]:
                if device.type == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    runners[n]()
                    end.record()
                    end.synchronize()
                    samples[n].append(start.elapsed_time(end) / 1e3)
                else:
                    t0 = time.perf_counter()
                    runners[n]()
                    samples[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in samples.items()}


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds, self.skipped = time.perf_counter(), seconds, []

    def left(self) -> bool:
        return time.perf_counter() - self.t0 < self.seconds

    def skip(self, what: str) -> None:
        self.skipped.append(what)


def bench_speed(args, device, budget: Budget) -> str:
    rows = []
    for name in args.models:
        if not budget.left():
            budget.skip(f"speed: {name}")
            continue
        dense = speed.build_model(name)
        x = torch.randn(1, 3, args.size, args.size)
        variants = {"dense": dense}
        meta = {"dense": (0.0, None)}
        for sp in args.sparsities:
            for rt in args.round_to:
                cfg = dfx.CompressConfig(sparsity=sp, criterion="magnitude", granularity="channel", round_to=rt,
                                         num_batches=1, progress=False)
                result = dfx.compress(dense, speed.dummy_losses(dense), [{"input": x}], cfg)
                compact = dfx.slim(result).eval()
                variants[f"slim {sp:.0%} r{rt}"] = compact
                meta[f"slim {sp:.0%} r{rt}"] = (result.plan.sparsity, rt)
                try:
                    variants[f"native {sp:.0%} r{rt}"] = speed.build_native(dense, compact)
                    meta[f"native {sp:.0%} r{rt}"] = (result.plan.sparsity, rt)
                except Exception as exc:  # noqa: BLE001
                    print(f"{name} {sp} r{rt}: native not built: {exc}", flush=True)
        flops = {k: count_flops(m if isinstance(m, torch.fx.GraphModule) else trace_model(m), (x,)).total
                 for k, m in variants.items()}
        for m in variants.values():
            m.to(device).eval()
        if args.compile:
            key = f"slim 50% r{args.round_to[-1]}"
            for k in ("dense", key):
                if k in variants and budget.left():
                    variants[f"{k} compiled"] = torch.compile(variants[k])
                    meta[f"{k} compiled"], flops[f"{k} compiled"] = meta[k], flops[k]
        lat = {}
        for bs in args.batches:
            xb = torch.randn(bs, 3, args.size, args.size, device=device)
            runners = {k: (lambda m=m, xb=xb: m(xb)) for k, m in variants.items()}
            lat[bs] = timed_latency(runners, device, args.rounds, args.warmup)
        for k in variants:
            sp, rt = meta[k]
            nat = k.replace("slim", "native")
            rows.append([name, k, f"{sp:.3f}", f"{flops['dense'] / flops[k]:.2f}x"]
                        + [f"{lat[bs][k] * 1e3:.2f}" for bs in args.batches]
                        + [f"{lat[bs]['dense'] / lat[bs][k]:.2f}x" for bs in args.batches]
                        + [" / ".join(f"{lat[bs][k] / lat[bs][nat]:.3f}" for bs in args.batches)
                           if k.startswith("slim") and not k.endswith("compiled") and nat in variants else ""])
        print(f"speed {name}: done ({time.perf_counter() - budget.t0:.0f} s)", flush=True)
        del variants
        if device.type == "cuda":
            torch.cuda.empty_cache()
    headers = (["model", "variant", "sparsity", "FLOPs red."] + [f"b{bs} ms" for bs in args.batches]
               + [f"b{bs} speed-up" for bs in args.batches] + ["slim / native (" + " / ".join(f"b{bs}" for bs in args.batches) + ")"])
    return (f"## Speed (input {args.size}x{args.size}, fp32, {args.rounds} interleaved rounds after {args.warmup} "
            f"warm-up, medians{', CUDA events' if device.type == 'cuda' else ', perf_counter'})\n\n"
            + tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True) + "\n")


def bench_budget(args, device, budget: Budget) -> str:
    """3-task models at a 50% params / FLOPs / latency budget (compress on the device, so
    round_to and the latency table follow it), uniform width and Torch-Pruning at the
    FLOPs budget's FLOPs; fp32, bf16 and (with --compile) bf16 compiled at each batch."""
    import copy

    rows, slower = [], []
    precisions = ["fp32", "bf16"] + (["bf16 compiled"] if args.compile else [])
    for name in args.budget_models:
        if not budget.left():
            budget.skip(f"budget: {name}")
            continue
        dense = speed.build_budget_model(name, args.size).to(device)
        x1 = torch.randn(1, 3, args.size, args.size, device=device)
        xl = torch.randn(max(args.batches), 3, args.size, args.size, device=device)
        with torch.no_grad():
            losses = {t: (lambda p, b: p.float().mean()) for t in dense(x1)}
        variants, notes, flops_result = {"dense": dense}, {}, None
        for kind in args.budgets:
            cfg = dfx.CompressConfig(sparsity=args.target, budget=kind, criterion="magnitude", granularity="channel",
                                     num_batches=1, progress=False, latency_time_limit_s=60)
            try:
                result = dfx.compress(dense, losses, [{"input": xl if kind == "latency" else x1}], cfg)
                variants[f"slim {kind}"] = dfx.slim(result).eval()
                notes[f"slim {kind}"] = f"planned {result.plan.budget.achieved:.3f}"
                flops_result = result if kind == "flops" else flops_result
            except dfx.DisparseError as exc:
                notes[f"slim {kind}"] = f"{type(exc).__name__}: {str(exc)[:120]}"
        cpu = lambda m: copy.deepcopy(m).cpu()  # noqa: E731 - the FLOPs count and the peers run on the CPU
        flops = {k: count_flops(m if isinstance(m, torch.fx.GraphModule) else trace_model(m), (x1.cpu(),)).total
                 for k, m in ((k, cpu(m)) for k, m in variants.items())}
        if flops_result is not None:
            target = flops["slim flops"]
            dense_cpu = cpu(dense)
            variants["uniform width"], _ = speed.uniform_width(dense_cpu, flops_result, target, x1.cpu())
            try:
                variants["torch-pruning"], _ = speed.torch_pruning_at(dense_cpu, flops_result, target, x1.cpu())
            except Exception as exc:  # noqa: BLE001 - reported
                notes["torch-pruning"] = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
            for k in ("uniform width", "torch-pruning"):
                if k in variants:
                    flops[k] = count_flops(trace_model(variants[k]), (x1.cpu(),)).total
                    variants[k] = variants[k].to(device).eval()
        lat: Dict[str, Dict[int, Dict[str, float]]] = {}
        for prec in precisions:
            models = {k: (m if prec == "fp32" else copy.deepcopy(m).to(torch.bfloat16)) for k, m in variants.items()}
            if prec.endswith("compiled"):
                models = {k: torch.compile(m) for k, m in models.items()}
            lat[prec] = {}
            for bs in args.batches:
                xb = torch.randn(bs, 3, args.size, args.size, device=device,
                                 dtype=torch.float32 if prec == "fp32" else torch.bfloat16)
                runners = {k: (lambda m=m, xb=xb: m(xb)) for k, m in models.items()}
                lat[prec][bs] = timed_latency(runners, device, args.rounds, args.warmup)
        for k in variants:
            row = [name, k, f"{flops['dense'] / flops[k]:.2f}x"]
            for prec in precisions:
                for bs in args.batches:
                    t = lat[prec][bs][k]
                    up = lat[prec][bs]["dense"] / t
                    row.append(f"{t * 1e3:.2f} ms ({up:.2f}x)")
                    if k != "dense" and up < 1.0:
                        slower.append(f"{name} {k} {prec} b{bs} ({up:.2f}x)")
            rows.append(row + [notes.get(k, "")])
        for k, note in notes.items():
            if k not in variants:
                rows.append([name, k, ""] + [""] * (len(precisions) * len(args.batches)) + [note])
        print(f"budget {name}: done ({time.perf_counter() - budget.t0:.0f} s)", flush=True)
        del variants
        if device.type == "cuda":
            torch.cuda.empty_cache()
    headers = ["model", "variant", "FLOPs red."] + [f"{p} b{bs}" for p in precisions for bs in args.batches] + ["note"]
    return (f"## Budgets (3-task models, {args.target:.0%} removed; input {args.size}x{args.size}; "
            f"{args.rounds} interleaved rounds after {args.warmup} warm-up, medians; latency table at batch "
            f"{max(args.batches)} fp32)\n\n"
            f"- cells where a compact model is slower than its dense model: {len(slower)}"
            + (f" ({'; '.join(slower[:10])})" if slower else "") + "\n\n"
            + tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True) + "\n")


def bench_cost(args, device, budget: Budget) -> str:
    rows = []
    for n_tasks in args.tasks:
        if not budget.left():
            budget.skip(f"cost: {n_tasks} tasks")
            continue
        model, data, losses = compress_cost.make_problem(n_tasks, args.cost_batches, args.cost_batch_size,
                                                         args.cost_size, args.cost_model)
        model = model.to(device)
        data = [{k: v.to(device) for k, v in b.items()} for b in data]
        config = dfx.CompressConfig(sparsity=0.9, criterion="snip", num_batches=len(data), progress=False)
        dfx.compress(model, losses, data[:1], dfx.CompressConfig(num_batches=1, progress=False))  # warm-up
        times = {"naive": [], "compress": []}
        peaks = {}
        for _ in range(args.repeats):
            for method in ("naive", "compress"):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                out = compress_cost.naive_snip(model, data, losses) if method == "naive" else dfx.compress(model, losses, data, config)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    peaks[method] = (torch.cuda.max_memory_allocated() - base) / 2**20
                times[method].append(time.perf_counter() - t0)
                del out
        tn, tc = statistics.median(times["naive"]), statistics.median(times["compress"])
        row = [n_tasks, f"{tn:.3f}", f"{tc:.3f}", f"{tn / tc:.2f}x"]
        if device.type == "cuda":
            row += [f"{peaks['naive']:.0f}", f"{peaks['compress']:.0f}", f"{peaks['naive'] / max(peaks['compress'], 1e-9):.2f}x"]
        rows.append(row)
    headers = ["tasks", "naive s", "compress s", "time ratio (naive / compress)"]
    if device.type == "cuda":
        headers += ["naive peak MiB", "compress peak MiB", "memory ratio"]
    return (f"## Cost: compress() vs the naive per-task loop (DeepLab-ResNet '{args.cost_model}', {args.cost_batches} "
            f"batches of {args.cost_batch_size}x3x{args.cost_size}x{args.cost_size}, snip, {args.repeats} interleaved "
            "repeats, medians; peak = max allocated device memory above the set-up)\n\n"
            + tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True) + "\n")


ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_cuda_tests(timeout_s: float):
    """(pytest's exit status, its summary line) for ``pytest -q -m cuda tests/test_cuda.py``."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests/test_cuda.py"]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        print(out, end="")
        return 124, f"cuda tests: timed out after {timeout_s:.0f} s"
    print(done.stdout + done.stderr, end="", flush=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.strip()]
    return done.returncode, "cuda tests: " + (lines[-1].strip("= ") if lines else f"pytest exited {done.returncode}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--models", nargs="+", default=speed.MODELS)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--round-to", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also torch.compile the dense and one slim model")
    ap.add_argument("--tasks", type=int, nargs="+", default=[2, 3, 4, 5])
    ap.add_argument("--cost-model", default="small")
    ap.add_argument("--cost-batches", type=int, default=20)
    ap.add_argument("--cost-batch-size", type=int, default=16)
    ap.add_argument("--cost-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip what is left after this many seconds")
    ap.add_argument("--smoke", action="store_true", help="tiny configuration; falls back to the CPU")
    ap.add_argument("--out", type=pathlib.Path, default=None)
    ap.add_argument("--tests", action="store_true", help="first run `pytest -q -m cuda tests/test_cuda.py`")
    ap.add_argument("--tests-timeout-s", type=float, default=180.0)
    ap.add_argument("--budget-models", nargs="*", default=["resnet50", "vit_b_16", "convnext_tiny"],
                    help="models of the budget section (speed.build_budget_model); none to skip it")
    ap.add_argument("--budgets", nargs="+", default=["params", "flops", "latency"],
                    choices=["params", "flops", "latency"])
    ap.add_argument("--target", type=float, default=0.5, help="budget target (fraction removed)")
    _common.add_threads_argument(ap)
    args = ap.parse_args(argv)
    _common.set_threads(args.threads)
    device, note = pick_device(args.device, args.smoke)
    if device is None:
        print(f"benchmarks/gpu.py: {note}" + (" (the cuda tests need one too)" if args.tests else ""))
        return 0
    tests_rc, tests_line = 0, None
    if args.tests:
        if device.type != "cuda":
            tests_line = "cuda tests: not run (no CUDA device)"
        else:
            t0 = time.perf_counter()
            tests_rc, tests_line = run_cuda_tests(args.tests_timeout_s)
            args.budget_s = max(args.budget_s - (time.perf_counter() - t0), 0.0)
        print(f"benchmarks/gpu.py: {tests_line}", flush=True)
    if args.smoke:
        args.models, args.sparsities, args.round_to, args.batches, args.size = ["deeplab-tiny"], [0.5], [8], [1, 2], 32
        args.rounds, args.warmup, args.tasks, args.cost_model = 2, 1, [2], "tiny"
        args.cost_batches, args.cost_batch_size, args.cost_size, args.repeats = 1, 2, 32, 1
        args.budget_models = ["deeplab-tiny"]
    out = _common.out_path(args.out, args.smoke, "gpu.md")
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    budget = Budget(args.budget_s)
    body = bench_budget(args, device, budget) + "\n" if args.budget_models else ""
    body += bench_speed(args, device, budget) + "\n" + bench_cost(args, device, budget)
    extra = [f"device: {device_name(device)}" + (f" - {note}" if note else ""),
             f"total time {time.perf_counter() - budget.t0:.0f} s (budget {args.budget_s:.0f} s)"]
    if budget.skipped:
        extra.append("skipped for time: " + ", ".join(budget.skipped))
    if tests_line:
        extra.append(tests_line)
    _common.write(out, _common.header("GPU: speed and cost on a CUDA device", extra, started=started) + body)
    return tests_rc


if __name__ == "__main__":
    raise SystemExit(main())
