"""The main job on the built-in default: train, compress per task, fine-tune, slim, export.

`make demo` (or `python -m disparse_fx demo`) runs, on 2 CPU cores and with nothing
downloaded:

1. the built-in real-image multitask dataset (photographs shipped inside scikit-image:
   edge, keypoint, segment and denoise tasks; split by source photograph; cached). The
   split is the same for every ``--seed`` (``DATA_SEED``): a seed changes the training,
   not which photographs are tested;
2. the paper's model family (DeepLab-style dilated ResNet trunk, one ASPP-like head
   per task), trained dense with a cosine learning rate to its settled end - the
   checkpoint is cached, so later runs skip this;
3. DiSparse at channel granularity (50% of prunable parameters by default), scored with
   each task's own loss; 4. fine-tuning; 5. slimming (channels physically removed);
6. ONNX export of the dense and slim models, verified with onnxruntime;

and prints a before/after table - parameters, FLOPs, CPU latency (PyTorch and
onnxruntime, interleaved medians), each task's test metrics and Delta_T - plus where
the report files were written.

Why the quality rows can be trusted across seeds: the dense model and the fine-tuned slim
model both end a cosine schedule (settled, not mid-descent), and the test split is fixed and
large (512 crops of two held-out photographs). ``benchmarks/demo_spread.py`` measures the
spread of Delta_T over seeds; the README quotes it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, TextIO

import torch
from tabulate import tabulate
from torch.utils.data import DataLoader

from disparse_fx.passes.flops import count_flops
from disparse_fx.passes.trace import trace_model

from .api import compress, slim
from .cli import positive_int
from .config import BUDGETS, CRITERIA, GRANULARITIES, CompressConfig
from .errors import DisparseValueError
from .data import HIGHER_IS_BETTER, TASK_METRICS, cache_dir, default_task_losses, delta_t, evaluate, make_splits
from .export import export_onnx
from .latency import interleaved_latency, onnxruntime_runner, torch_runner
from .overlap import mask_overlap
from .report import write_report
from .training import finetune
from .zoo import DEFAULT_TASKS, deeplab_resnet

__all__ = ["DemoOptions", "run_demo", "add_arguments", "run_from_args", "train_dense", "DATA_SEED"]

log = logging.getLogger(__name__)

#: The photo split and crops of every demo run, whatever its --seed: a seed that also
#: changed the test photographs would move Delta_T by what the photographs differ in.
DATA_SEED = 0


@dataclass(frozen=True)
class DemoOptions:
    sparsity: float = 0.5
    criterion: str = "taylor"  # the dense model is trained first: the "pretrained" setting
    granularity: str = "channel"
    budget: str = "flops"  # what users buy: compute removed, not parameters
    disentangle: bool = True
    size: str = "tiny"
    dense_steps: int = 1200
    finetune_steps: int = 400  # with 200 the slim model's Delta_T spread 3.5 points over seeds 0-2, with 400 0.74
    batch_size: int = 16
    importance_batches: int = 16
    lr: float = 2e-3
    seed: int = 0
    out: str = "out/demo"
    fast: bool = False  # a few steps on a few crops: for the test-suite
    latency_rounds: int = 30


def add_arguments(parser) -> None:
    d = DemoOptions()
    parser.add_argument("--sparsity", type=float, default=d.sparsity, help="fraction removed of what --budget counts")
    parser.add_argument("--budget", choices=BUDGETS, default=d.budget,
                        help="what --sparsity counts (channel granularity): prunable parameters, FLOPs per image "
                             "or CPU latency (a measured per-layer table)")
    parser.add_argument("--criterion", choices=CRITERIA, default=d.criterion, help="importance score")
    parser.add_argument("--granularity", choices=GRANULARITIES, default=d.granularity,
                        help="prune single weights or whole channels")
    parser.add_argument("--baseline", action="store_true", help="one score on the summed loss (disentangle=False)")
    parser.add_argument("--size", choices=("tiny", "small"), default=d.size, help="model size")
    parser.add_argument("--dense-steps", type=positive_int, default=d.dense_steps,
                        help="training steps of the dense model")
    parser.add_argument("--finetune-steps", type=positive_int, default=d.finetune_steps,
                        help="fine-tuning steps of the compressed model")
    parser.add_argument("--seed", type=int, default=d.seed, help="seeds data, training and compression")
    parser.add_argument("--out", default=d.out, help="output folder (report, ONNX files, plots)")
    parser.add_argument("--fast", action="store_true", help="a few steps on a few crops (smoke test)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch CPU threads (default 1: the tiny model gains little from more, and a "
                             "shared machine's busy cores stall multi-threaded runs many times over)")


def run_from_args(args, out: TextIO) -> int:
    if args.threads < 1:
        raise DisparseValueError(f"demo --threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    opts = DemoOptions(sparsity=args.sparsity, criterion=args.criterion, granularity=args.granularity,
                       budget=args.budget if args.granularity == "channel" else "params",
                       disentangle=not args.baseline, size=args.size, dense_steps=args.dense_steps,
                       finetune_steps=args.finetune_steps, seed=args.seed, out=args.out, fast=args.fast)
    if opts.fast:
        opts = DemoOptions(**{**asdict(opts), "dense_steps": min(opts.dense_steps, 4),
                              "finetune_steps": min(opts.finetune_steps, 2), "importance_batches": 2,
                              "batch_size": 4, "latency_rounds": 3})
    return run_demo(opts, out)


def train_dense(model: torch.nn.Module, loader, steps: int, lr: float, seed: int, checkpoint: Path, say) -> None:
    """Train ``model`` in place (Adam, lr cosine-annealed to 0 over ``steps``), or load the
    cached weights of an identical earlier run."""
    if checkpoint.exists():
        model.load_state_dict(torch.load(checkpoint, weights_only=True))
        say(f"dense model: loaded the cached checkpoint {checkpoint}")
        return
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    hist = finetune(model, default_task_losses(), loader, steps, lr=lr, progress=True, lr_schedule="cosine")
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    tmp = checkpoint.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(checkpoint)
    say(f"dense model: trained {steps} steps in {time.perf_counter() - t0:.0f} s "
        f"(loss {hist['loss'][0]:.3f} -> {hist['loss'][-1]:.3f}); cached at {checkpoint}")


def run_demo(opts: DemoOptions, out: TextIO) -> int:
    def say(msg: str = "") -> None:
        print(msg, file=out, flush=True)

    t_start = time.perf_counter()
    # validate every option before minutes of data building and training
    config = CompressConfig(sparsity=opts.sparsity, criterion=opts.criterion, granularity=opts.granularity,
                            disentangle=opts.disentangle, num_batches=opts.importance_batches, seed=opts.seed,
                            allow_fewer_batches=True, budget=opts.budget)
    for name in ("dense_steps", "finetune_steps"):
        if getattr(opts, name) < 1:
            raise DisparseValueError(f"demo --{name.replace('_', '-')} must be >= 1, got {getattr(opts, name)}")
    folder = Path(opts.out)
    folder.mkdir(parents=True, exist_ok=True)
    n = dict(n_train=32, n_val=8, n_test=16) if opts.fast else dict(n_train=512, n_val=64, n_test=512)
    splits = make_splits(seed=DATA_SEED, **n)
    say(f"data: {len(splits.train)} train / {len(splits.test)} test crops of 64x64 from scikit-image photographs "
        f"(test photographs {', '.join(splits.test.photos)}); tasks {list(DEFAULT_TASKS)}")
    def train_loader(stream: int) -> DataLoader:
        # one seeded batch order per stage, so results do not depend on whether the dense
        # checkpoint came from the cache (training would otherwise consume the generator)
        gen = torch.Generator().manual_seed(opts.seed * 1000 + stream)
        return DataLoader(splits.train, batch_size=opts.batch_size, shuffle=True, generator=gen, drop_last=True)

    test = DataLoader(splits.test, batch_size=32)
    losses = default_task_losses()

    torch.manual_seed(opts.seed)
    dense = deeplab_resnet(DEFAULT_TASKS, size=opts.size)
    key = hashlib.sha1(json.dumps(dict(size=opts.size, steps=opts.dense_steps, lr=opts.lr, seed=opts.seed,
                                       bs=opts.batch_size, data=n, v=3, schedule="cosine"), sort_keys=True).encode()).hexdigest()[:12]
    train_dense(dense, train_loader(0), opts.dense_steps, opts.lr, opts.seed, cache_dir() / f"demo-dense-{key}.pt", say)
    dense.eval()

    t0 = time.perf_counter()
    torch.manual_seed(opts.seed)
    result = compress(dense, losses, train_loader(1), config)
    say(f"compress: {opts.granularity} granularity, criterion {opts.criterion}, "
        f"{'DiSparse (per-task, unanimous)' if opts.disentangle else 'summed-loss baseline'}: sparsity "
        f"{result.plan.sparsity:.4f} of the prunable parameters in {time.perf_counter() - t0:.1f} s"
        + (f"; {result.plan.budget}" if result.plan.budget is not None else ""))
    t0 = time.perf_counter()
    finetune(result, losses, train_loader(2), opts.finetune_steps, lr=opts.lr / 2, progress=True,
             lr_schedule="cosine")
    say(f"fine-tune: {opts.finetune_steps} steps in {time.perf_counter() - t0:.0f} s")
    compact = slim(result)
    compact.eval()
    # The dense model with the identical fine-tuning (same steps, lr, schedule, batch order):
    # what the extra training alone does, so the slim model's own cost can be told apart.
    t0 = time.perf_counter()
    dense_ft = copy.deepcopy(dense)
    torch.manual_seed(opts.seed)
    finetune(dense_ft, losses, train_loader(2), opts.finetune_steps, lr=opts.lr / 2, progress=False,
             lr_schedule="cosine")
    dense_ft.eval()
    say(f"dense + same fine-tuning (reference): {time.perf_counter() - t0:.0f} s")

    example = next(iter(test))["input"][:1]
    onnx_dense = export_onnx(dense, example, folder / "dense.onnx")
    onnx_slim = export_onnx(compact, example, folder / "slim.onnx")

    metrics = {"dense": evaluate(dense, test, TASK_METRICS), "slim": evaluate(compact, test, TASK_METRICS),
               "dense_finetuned": evaluate(dense_ft, test, TASK_METRICS)}
    flops = {"dense": count_flops(trace_model(dense), (example,)), "slim": count_flops(compact, (example,))}
    params = {"dense": sum(p.numel() for p in dense.parameters()),
              "slim": sum(p.numel() for p in compact.parameters())}
    lat: Dict[str, Dict[str, float]] = {}
    for bs in (1, 8):
        x = example.repeat(bs, 1, 1, 1)
        runners = {"dense": torch_runner(dense, x), "slim": torch_runner(compact, x),
                   "dense_ort": onnxruntime_runner(folder / "dense.onnx", x),
                   "slim_ort": onnxruntime_runner(folder / "slim.onnx", x)}
        lat[bs] = interleaved_latency(runners, rounds=opts.latency_rounds)

    rows = [
        ["parameters", f"{params['dense']:,}", f"{params['slim']:,}", _ratio(params["slim"], params["dense"])],
        ["FLOPs / image (conv+linear)", f"{flops['dense'].total / 1e6:.1f} M", f"{flops['slim'].total / 1e6:.1f} M",
         _ratio(flops["slim"].total, flops["dense"].total)],
        ["ONNX file", f"{onnx_dense.size_bytes / 1e6:.2f} MB", f"{onnx_slim.size_bytes / 1e6:.2f} MB",
         _ratio(onnx_slim.size_bytes, onnx_dense.size_bytes)],
    ]
    for bs, v in lat.items():
        rows.append([f"CPU latency, PyTorch, batch {bs}", f"{v['dense'] * 1e3:.1f} ms", f"{v['slim'] * 1e3:.1f} ms",
                     f"{v['dense'] / v['slim']:.2f}x speed-up"])
        rows.append([f"CPU latency, onnxruntime, batch {bs}", f"{v['dense_ort'] * 1e3:.1f} ms",
                     f"{v['slim_ort'] * 1e3:.1f} ms", f"{v['dense_ort'] / v['slim_ort']:.2f}x speed-up"])
    for task, per in metrics["dense"].items():
        for name, value in per.items():
            arrow = "higher is better" if HIGHER_IS_BETTER.get(name, True) else "lower is better"
            rows.append([f"{task} {name} ({arrow})", f"{value:.4f}", f"{metrics['slim'][task][name]:.4f}", "",
                         f"{metrics['dense_finetuned'][task][name]:.4f}"])
    delta, dt = _delta_t(metrics["slim"], metrics["dense"])
    delta_ft, dt_ft = _delta_t(metrics["dense_finetuned"], metrics["dense"])
    delta_cost, dt_cost = _delta_t(metrics["slim"], metrics["dense_finetuned"])
    rows.append(["Delta_T vs dense (mean over tasks)", "0.00 %", dt, "", dt_ft])
    rows.append(["Delta_T vs dense + same fine-tuning (pruning's own cost)", "", dt_cost, "", "0.00 %"])
    rows = [row + [""] * (5 - len(row)) for row in rows]
    table = tabulate(rows, headers=["", "dense", "slim (DiSparse)", "change", "dense + same fine-tuning"],
                     tablefmt="github", disable_numparse=True)
    say()
    say(table)

    overlap = mask_overlap(result)
    written = write_report(result, folder, example_inputs=(example,), slim_model=compact)
    (folder / "summary.md").write_text(
        f"# disparse_fx demo\n\n{table}\n\n## Plan\n\n{result.summary()}\n\n## Mask overlap\n\n"
        f"{overlap.table()}\n\nwatershed: {overlap.watershed}\n")
    (folder / "metrics.json").write_text(json.dumps(dict(
        seed=opts.seed, options=asdict(opts), metrics=metrics, delta_t=delta, delta_t_dense_finetuned=delta_ft,
        delta_t_vs_dense_finetuned=delta_cost, params=params,
        flops={k: v.total for k, v in flops.items()},
        latency_s={str(bs): v for bs, v in lat.items()}), indent=1))
    say()
    say(f"written to {folder}/: summary.md (this table, the plan, the mask overlap), metrics.json, "
        + ", ".join(p.name for p in written.values())
        + f", dense.onnx, slim.onnx (onnxruntime parity {max(onnx_slim.max_abs_diff.values()):.1e})")
    say(f"total time {time.perf_counter() - t_start:.0f} s")
    return 0


def _delta_t(metrics, reference):
    """(Delta_T in %, its text); None and the reason when a reference metric is 0."""
    try:
        value = delta_t(metrics, reference)
    except ValueError as exc:  # a dense metric of 0 (an undertrained model) has no relative change
        return None, f"n/a ({exc})"
    return value, f"{value:+.2f} %"


def _ratio(after: float, before: float) -> str:
    return f"{100 * (after - before) / before:+.1f} %"
