"""Quality: DiSparse against non-disentangled baselines on the built-in data and model.

One dense DeepLab-ResNet 'tiny' (disparse_fx.zoo) is trained once on the built-in photo
dataset (disparse_fx.data: edge, keypoint, segment, denoise) and cached; every method
starts from that identical checkpoint, is compressed to the same target, fine-tuned with
the identical budget (same steps, batch size, learning rate, data order per seed) and
evaluated on the test split (photographs never seen in training).

The target is a fraction of a budget quantity removed: at element granularity the prunable
parameters (conv/linear weights); at channel granularity (``--channel-budgets``) either the
prunable parameters (``params``, as before) or the FLOPs per sample of the slim model
(``flops``: CompressConfig(budget="flops"), counted as passes.flops counts them), so the
FLOPs rows show what the speed costs in quality next to the parameter rows. Every channel
row reports both the prunable parameters removed and the FLOPs per sample removed.

Each cell is mean ± std over seeds; Delta_T is the mean over tasks of the mean relative
change of the task's metrics vs the dense model (sign-flipped for lower-is-better
metrics), in percent.

Methods (``--methods``):

- ``disparse-snip`` / ``disparse-taylor`` / ``disparse-magnitude``: compress() with
  disentangle=True (per-task scores, unanimous decision);
- ``summed-snip`` / ``summed-taylor`` / ``summed-magnitude``: the same criteria with
  disentangle=False - one score on the summed loss (SNIP on the summed loss, Taylor on
  the summed loss, global magnitude);
- ``random``: seeded uniform scores, global ranking;
- ``erk-random`` (element only): random masks with per-layer densities from
  disparse_fx.erk_densities (ERK);
- ``disparse-dynamic`` (element only): disparse-snip masks, then the fine-tuning budget
  is spent with disparse_fx.DynamicSparsity (prune by magnitude, regrow by per-task
  gradient) instead of fixed masks;
- ``tp-magnitude`` / ``tp-taylor`` (channel only): Torch-Pruning (``pip install
  torch-pruning``, a benchmark-only extra) MetaPruner with GroupMagnitudeImportance /
  GroupTaylorImportance on the summed loss, global pruning, the heads' output convs
  ignored; its channel ratio is bisected so that the removed fraction of the budget
  quantity matches the target (within 0.5 points): conv/linear weights for ``params``,
  FLOPs per sample (passes.flops.count_flops on the pruned model) for ``flops``.

Also reported: the dense model, and the dense model fine-tuned with the same budget
(separates what fine-tuning alone does from what pruning costs).

    python benchmarks/quality.py            # default sweep (3 seeds, 150 fine-tuning steps), ~1 h on 2 cores
    python benchmarks/quality.py --full     # 5 seeds, 4x the fine-tuning budget (600 steps)
    python benchmarks/quality.py --smoke --out /tmp/q.md   # seconds; used by the tests
    # channel rows at a 50% parameter and a 50% FLOPs budget only (~35 min on a busy 2-core machine):
    python benchmarks/quality.py --element --channel 0.5 --channel-budgets params flops \
        --methods-channel disparse-taylor summed-taylor disparse-magnitude summed-magnitude tp-magnitude \
        --out benchmarks/results/quality_budget.md

Raw per-run numbers go to a JSON file next to the table (``--out`` with suffix .json);
``--resume`` skips runs already in it, so an interrupted sweep can be continued (runs of
files written before ``--channel-budgets`` existed count as ``params`` runs).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import math
import pathlib
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch
from tabulate import tabulate
from torch.utils.data import DataLoader

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402

import disparse_fx as dfx  # noqa: E402
from disparse_fx.data import HIGHER_IS_BETTER, TASK_METRICS, cache_dir, default_task_losses, delta_t, evaluate, make_splits  # noqa: E402
from disparse_fx.demo import train_dense  # noqa: E402
from disparse_fx.zoo import DEFAULT_TASKS, deeplab_resnet  # noqa: E402
from disparse_fx.passes.flops import count_flops  # noqa: E402
from disparse_fx.passes.insert_masks import masked_params  # noqa: E402
from disparse_fx.passes.trace import trace_model  # noqa: E402

ELEMENT_METHODS = ["disparse-snip", "disparse-taylor", "disparse-magnitude", "disparse-dynamic",
                   "summed-snip", "summed-taylor", "summed-magnitude", "random", "erk-random"]
CHANNEL_METHODS = ["disparse-snip", "disparse-taylor", "disparse-magnitude",
                   "summed-snip", "summed-taylor", "summed-magnitude", "random", "tp-magnitude", "tp-taylor"]
CHANNEL_BUDGETS = ["params", "flops"]
BUDGET_WORDS = {"params": "prunable parameters", "flops": "FLOPs per sample"}
METRIC_COLUMNS = [(t, m) for t, ms in (("edge", ["f1"]), ("keypoint", ["l1", "rel_err"]),
                                       ("segment", ["miou", "pixel_acc"]), ("denoise", ["l1", "rel_err"]))
                  for m in ms]


def torch_pruning_available() -> Optional[str]:
    try:
        import torch_pruning  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


# ------------------------------------------------------------------ set-up
class Setup:
    def __init__(self, args):
        self.args = args
        n = dict(n_train=32, n_val=8, n_test=16) if args.smoke else dict(n_train=512, n_val=64, n_test=128)
        self.n = n
        self.splits = make_splits(seed=0, **n)
        self.losses = default_task_losses()
        self.test = DataLoader(self.splits.test, batch_size=32)
        torch.manual_seed(0)
        self.dense = deeplab_resnet(DEFAULT_TASKS, size="tiny")
        # the key covers the code that shapes the checkpoint (data, losses, model), so a library
        # change (e.g. a new task loss) never reuses a stale checkpoint
        import inspect
        import disparse_fx.data.multitask_photos as photos_mod
        import disparse_fx.zoo.deeplab as deeplab_mod
        src = hashlib.sha1((inspect.getsource(photos_mod) + inspect.getsource(deeplab_mod)).encode()).hexdigest()[:12]
        key = hashlib.sha1(json.dumps(dict(size="tiny", steps=args.dense_steps, lr=args.lr, seed=0,
                                           bs=args.batch_size, data=n, v="bench-quality-2", src=src),
                                      sort_keys=True).encode()).hexdigest()[:12]
        ckpt = (args.cache or cache_dir()) / f"bench-quality-dense-{key}.pt"
        gen = torch.Generator().manual_seed(0)
        loader = DataLoader(self.splits.train, batch_size=args.batch_size, shuffle=True, generator=gen, drop_last=True)
        t0 = time.perf_counter()
        train_dense(self.dense, loader, args.dense_steps, args.lr, 0, ckpt, lambda m: print(m, flush=True))
        self.dense_seconds = time.perf_counter() - t0
        self.checkpoint = ckpt
        self.dense.eval()
        self.dense_metrics = evaluate(self.dense, self.test, TASK_METRICS)
        # Delta_T needs a relative change: metrics whose dense value is 0 (or not finite) are left out
        self.excluded = [f"{t} {m}" for t, ms in self.dense_metrics.items() for m, v in ms.items()
                         if v == 0 or not math.isfinite(v)]
        kept = {t: {m: v for m, v in ms.items() if v != 0 and math.isfinite(v)} for t, ms in self.dense_metrics.items()}
        self.delta_dense = {t: ms for t, ms in kept.items() if ms}

    def loader(self, seed: int) -> DataLoader:
        gen = torch.Generator().manual_seed(1000 + seed)
        return DataLoader(self.splits.train, batch_size=self.args.batch_size, shuffle=True, generator=gen,
                          drop_last=True)

    def importance_batches(self, seed: int) -> list:
        it = iter(self.loader(seed))
        return [next(it) for _ in range(min(self.args.importance_batches, len(self.splits.train) // self.args.batch_size))]


def _prunable_elements(model: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.ConvTranspose2d)))


# ------------------------------------------------------------------ methods
def run_compress(setup: Setup, method: str, granularity: str, sparsity: float, seed: int, budget: str = "params"):
    if method in ("random", "erk-random"):
        family, criterion = "summed", "random"
    elif method == "disparse-dynamic":
        family, criterion = "disparse", "snip"
    else:
        family, criterion = method.split("-", 1)
    config = dfx.CompressConfig(sparsity=sparsity, criterion=criterion, disentangle=(family == "disparse"),
                                granularity=granularity, num_batches=setup.args.importance_batches, seed=seed,
                                allow_fewer_batches=True, progress=False, budget=budget)
    result = dfx.compress(setup.dense, setup.losses, setup.importance_batches(seed), config)
    if method == "erk-random":
        _erk_random_masks_(result, setup.dense, sparsity, seed)
    return result


@torch.no_grad()
def _erk_random_masks_(result, dense, sparsity: float, seed: int) -> None:
    """Replace the masks by seeded random ones with ERK per-layer densities; restore dense weights."""
    plan = result.plan
    shapes = {p: plan.shapes[p] for p in plan.prunable}
    dens = dfx.erk_densities(shapes, 1.0 - sparsity)
    bufs = masked_params(result.model)
    gen = torch.Generator().manual_seed(seed)
    for p in plan.prunable:
        mask = bufs[p]
        numel = mask.numel()
        k = max(1, int(round(dens[p] * numel)))
        flat = torch.zeros(numel, dtype=mask.dtype)
        flat[torch.randperm(numel, generator=gen)[:k]] = 1
        mask.copy_(flat.view_as(mask))
    ref = dict(dense.named_parameters())
    for n, q in result.model.named_parameters():
        if n in ref and ref[n].shape == q.shape:
            q.copy_(ref[n])


def _achieved_element_sparsity(result) -> float:
    bufs = masked_params(result.model)
    kept = sum(int(bufs[p].count_nonzero()) for p in result.plan.prunable if p in bufs)
    total = sum(bufs[p].numel() for p in result.plan.prunable if p in bufs)
    return 1.0 - kept / total


def _flops(model: torch.nn.Module, example: torch.Tensor) -> int:
    """FLOPs per sample (passes.flops: conv / linear / matmul multiply-adds x 2)."""
    return count_flops(trace_model(model), (example,)).total


def run_torch_pruning(setup: Setup, method: str, sparsity: float, seed: int, budget: str = "params"):
    """Torch-Pruning on the summed loss; channel ratio bisected so that the removed fraction
    of the budget quantity (prunable parameters or FLOPs per sample) meets ``sparsity``.
    Returns (model, parameter sparsity, FLOPs (dense, pruned), ratio)."""
    import torch_pruning as tp

    batches = setup.importance_batches(seed)
    base = copy.deepcopy(setup.dense).train()
    if method == "tp-taylor":
        base.zero_grad()
        for b in batches:  # summed loss, gradients accumulated over the importance batches
            out = base(b["input"])
            sum(fn(out[t], b) for t, fn in setup.losses.items()).backward()
    base.eval()
    dense_elems = _prunable_elements(base)
    example = batches[0]["input"][:1]
    dense_flops = _flops(base, example)

    grads = {n: q.grad.detach().clone() for n, q in base.named_parameters() if q.grad is not None}

    def prune(ratio: float):
        m = copy.deepcopy(base)
        for n, q in m.named_parameters():  # Parameter.__deepcopy__ drops .grad: put it back
            if n in grads:
                q.grad = grads[n].clone()
        imp = tp.importance.GroupTaylorImportance() if method == "tp-taylor" else tp.importance.GroupMagnitudeImportance(p=2)
        ignored = [br[-1] for h in m.heads.values() for br in h.branches]
        pruner = tp.pruner.MetaPruner(m, example, importance=imp, pruning_ratio=ratio, global_pruning=True,
                                      ignored_layers=ignored)
        pruner.step()
        flops = _flops(m, example)
        removed = 1.0 - (_prunable_elements(m) / dense_elems if budget == "params" else flops / dense_flops)
        return m, removed, 1.0 - _prunable_elements(m) / dense_elems, flops

    lo, hi = 0.0, 0.99
    best = None
    for _ in range(setup.args.tp_bisect_steps):
        mid = (lo + hi) / 2
        m, removed, s, flops = prune(mid)
        if best is None or abs(removed - sparsity) < abs(best[1] - sparsity):
            best = (m, removed, s, flops, mid)
        if abs(removed - sparsity) < 0.005:  # 0.5 percentage points
            break
        lo, hi = (mid, hi) if removed < sparsity else (lo, mid)
    model, _, achieved, flops, ratio = best
    model.zero_grad(set_to_none=True)
    return model, achieved, (dense_flops, flops), ratio


def one_run(setup: Setup, granularity: str, sparsity: float, method: str, seed: int, budget: str = "params") -> dict:
    """One compress + fine-tune + evaluate run. Channel runs also record the FLOPs per sample
    of the dense and the slim (or Torch-Pruning) model and the fraction removed."""
    args = setup.args
    t0 = time.perf_counter()
    extra = {}
    if method == "dense+finetune":
        model = copy.deepcopy(setup.dense)
        trainable, achieved = model, 0.0
    elif method.startswith("tp-"):
        model, achieved, flops, ratio = run_torch_pruning(setup, method, sparsity, seed, budget)
        trainable = model
        extra["tp_channel_ratio"] = ratio
        extra["flops_dense"], extra["flops_after"] = flops
    else:
        result = run_compress(setup, method, granularity, sparsity, seed, budget)
        trainable = result
        model = result.model
        achieved = _achieved_element_sparsity(result) if granularity == "element" else result.plan.sparsity
        if result.plan.budget is not None:  # channel plans: FLOPs of the slim model (passes.flops, exact)
            extra["flops_dense"], extra["flops_after"] = result.plan.budget.flops
    if "flops_dense" in extra:
        extra["flops_removed"] = 1.0 - extra["flops_after"] / extra["flops_dense"]
    if granularity == "channel":
        extra["budget"] = budget
    t_compress = time.perf_counter() - t0
    torch.manual_seed(seed)
    t1 = time.perf_counter()
    if method == "disparse-dynamic":
        opt = torch.optim.Adam(result.model.parameters(), lr=args.lr / 2)
        sched = dfx.DynamicSparsity(result, setup.losses, opt, end_step=max(2, int(0.75 * args.finetune_steps)),
                                    update_every=max(1, args.finetune_steps // 10), init="plan", seed=seed)
        dfx.finetune(result, setup.losses, setup.loader(seed), args.finetune_steps, dynamic=sched, progress=False)
        achieved = sched.sparsity
    else:
        dfx.finetune(trainable, setup.losses, setup.loader(seed), args.finetune_steps, lr=args.lr / 2, progress=False)
    t_ft = time.perf_counter() - t1
    model.eval()
    metrics = evaluate(model, setup.test, TASK_METRICS)
    dt = _delta(setup, metrics)
    return dict(granularity=granularity, sparsity=sparsity, method=method, seed=seed, metrics=metrics,
                delta_t=dt, achieved_sparsity=achieved, compress_s=t_compress, finetune_s=t_ft, **extra)


def _delta(setup: Setup, metrics) -> Optional[float]:
    dense = setup.delta_dense
    try:
        return delta_t({t: {m: metrics[t][m] for m in ms} for t, ms in dense.items()}, dense) if dense else None
    except ValueError:
        return None


# ------------------------------------------------------------------ report
def _fmt_metric(values: List[float]) -> str:
    return _common.mean_std(values, "{:.3f}")


def _budget(r: dict) -> str:
    """The budget a run was made at ("params" for element runs and files written before budgets)."""
    return r.get("budget") or "params"


def _settings(args):
    """(granularity, budget, sparsity) of every table section, in order."""
    out = [("element", "params", sp) for sp in args.element]
    out += [("channel", b, sp) for b in args.channel_budgets for sp in args.channel]
    return out


def _label(gran: str, budget: str, sp: float) -> str:
    return f"{gran} {sp:.0%} {budget}"


def _cell(runs: List[dict], gran: str, budget: str, sp: float, method: Optional[str] = None) -> List[dict]:
    return [r for r in runs if r["granularity"] == gran and r["sparsity"] == sp and _budget(r) == budget
            and (method is None or r["method"] == method)]


def _pct(values) -> str:
    return _common.mean_std([None if v is None else 100 * v for v in values], "{:.1f}%")


def report(setup: Setup, runs: List[dict], args, started: str, skipped: Dict[str, str]) -> str:
    extra = [
        f"model: DeepLab-ResNet 'tiny' (disparse_fx.zoo), tasks {list(DEFAULT_TASKS)}; data: built-in photo "
        f"dataset, {setup.n['n_train']} train / {setup.n['n_test']} test crops of 64x64 (test photographs "
        f"{', '.join(setup.splits.test.photos)})",
        f"dense: {args.dense_steps} Adam steps, batch {args.batch_size}, lr {args.lr} (checkpoint "
        f"`{setup.checkpoint.name}`, shared by every method and seed)",
        f"per run: importance from {args.importance_batches} batches, then {args.finetune_steps} fine-tuning Adam "
        f"steps at lr {args.lr / 2} (identical for every method); seeds {args.seeds} (seed drives the batch order, "
        "random masks and tie-breaking)",
        "Delta_T: mean over tasks of the mean relative change of the task's metrics vs dense, sign-flipped "
        "for lower-is-better metrics, in % (higher is better; 0 = dense)"
        + (f"; left out of Delta_T because the dense value is 0 (no relative change): {', '.join(setup.excluded)} "
           f"- over tasks {list(setup.delta_dense)}" if setup.excluded else ""),
        "channel budgets: 'params' removes the target fraction of the prunable parameters, 'flops' the target "
        "fraction of the FLOPs per sample of the slim model (CompressConfig(budget=...); Torch-Pruning's ratio "
        "bisected on the same quantity). 'params removed' = fraction of the prunable (conv/linear) weights removed; "
        "'FLOPs removed' = 1 - FLOPs per sample after / before (passes.flops, 64x64 input; n/a for runs stored "
        "before FLOPs were recorded)",
    ]
    extra += [f"PARTIAL SWEEP: {v}" for k, v in skipped.items() if k == "(partial sweep)"]
    text = _common.header("Quality: DiSparse vs non-disentangled baselines", extra, started=started)
    arrows = {f"{t} {m}": ("↑" if HIGHER_IS_BETTER.get(m, True) else "↓") for t, m in METRIC_COLUMNS}
    metric_headers = [f"{t} {m} {arrows[f'{t} {m}']}" for t, m in METRIC_COLUMNS]
    dense_metrics = [f"{setup.dense_metrics[t][m]:.3f}" for t, m in METRIC_COLUMNS]
    ref = [r for r in runs if r["method"] == "dense+finetune"]
    ref_metrics = ([_fmt_metric([r["metrics"][t][m] for r in ref]) for t, m in METRIC_COLUMNS]
                   + [_common.mean_std([r["delta_t"] for r in ref], "{:+.2f}"), ""]) if ref else None
    winners = []
    stats_by = {}
    for gran, budget, sp in _settings(args):
        cell = _cell(runs, gran, budget, sp)
        if not cell:
            continue
        chan = gran == "channel"
        lead = ["params removed", "FLOPs removed"] if chan else ["sparsity reached"]
        headers = ["method"] + lead + metric_headers + ["Delta_T % ↑", "compress s"]
        rows = [["dense (no pruning)"] + ["0"] * len(lead) + dense_metrics + ["0", ""]]
        if ref_metrics:
            rows.append(["dense + same fine-tuning"] + ["0"] * len(lead) + ref_metrics)
        stats = {}
        for method in (args.methods_channel if chan else args.methods_element):
            rs = [r for r in cell if r["method"] == method]
            if not rs:
                continue
            dts = [r["delta_t"] for r in rs if r["delta_t"] is not None]
            if dts:
                stats[method] = (statistics.mean(dts), statistics.stdev(dts) if len(dts) > 1 else 0.0, len(dts))
            reached = [_common.mean_std([r["achieved_sparsity"] for r in rs], "{:.3f}")]
            if chan:
                reached.append(_common.mean_std([r.get("flops_removed") for r in rs], "{:.3f}"))
            rows.append([method] + reached
                        + [_fmt_metric([r["metrics"][t][m] for r in rs]) for t, m in METRIC_COLUMNS]
                        + [_common.mean_std(dts, "{:+.2f}"),
                           _common.mean_std([r["compress_s"] for r in rs], "{:.1f}")])
        stats_by[(gran, budget, sp)] = stats
        head = f"## {gran} sparsity {sp:.0%}"
        if chan:
            head += f" (budget: {budget} - {sp:.0%} of the {BUDGET_WORDS[budget]} removed)"
        text += head + "\n\n" + tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True) + "\n\n"
        if stats:
            ranked = sorted(stats.items(), key=lambda kv: -kv[1][0])
            ours = [kv for kv in ranked if kv[0].startswith("disparse")]
            theirs = [kv for kv in ranked if not kv[0].startswith("disparse")]
            line = f"| {gran} | {budget} | {sp:.0%} | {ranked[0][0]} ({ranked[0][1][0]:+.2f} ± {ranked[0][1][1]:.2f}) |"
            if ours and theirs:
                (om, (o, os_, on)), (tm, (b, bs, bn)) = ours[0], theirs[0]
                diff = o - b
                noise = math.sqrt(os_ ** 2 + bs ** 2)
                verdict = ("one seed: no noise estimate" if min(on, bn) < 2 else
                           "DiSparse better" if diff > noise else "baseline better" if -diff > noise
                           else "within noise (|diff| <= combined std)")
                line += f" {om} ({o:+.2f} ± {os_:.2f}) | {tm} ({b:+.2f} ± {bs:.2f}) | {diff:+.2f} | {verdict} |"
            else:
                line += " | | | |"
            winners.append(line)
    text += _budget_comparison(runs, args)
    if winners:
        summary = ("## Summary: best Delta_T per setting\n\n"
                   "| granularity | budget | sparsity | best overall | best DiSparse | best baseline | DiSparse - baseline | reading |\n"
                   "|---|---|---|---|---|---|---|---|\n" + "\n".join(winners) + "\n\n"
                   "'within noise' means the difference of the means is not larger than the combined std of the "
                   "two (sqrt(std1^2 + std2^2)) over seeds.\n\n")
        text = text.replace("## ", summary + "## ", 1) if "## " in text else text + summary
    for k, v in skipped.items():
        if k != "(partial sweep)":
            text += f"- skipped {k}: {v}\n"
    text += (f"\nDense training took {setup.dense_seconds:.0f} s (0 when loaded from the cache). Raw per-run "
             "numbers: the JSON file next to this table.\n")
    return text


def _budget_comparison(runs: List[dict], args) -> str:
    """Per channel method: the params-budget row next to the FLOPs-budget row at each sparsity."""
    if not {"params", "flops"} <= set(args.channel_budgets):
        return ""
    text = ""
    for sp in args.channel:
        rows = []
        for method in args.methods_channel:
            p, f = _cell(runs, "channel", "params", sp, method), _cell(runs, "channel", "flops", sp, method)
            if not p or not f:
                continue
            dp = [r["delta_t"] for r in p if r["delta_t"] is not None]
            df = [r["delta_t"] for r in f if r["delta_t"] is not None]
            change = f"{statistics.mean(df) - statistics.mean(dp):+.2f}" if dp and df else "n/a"
            rows.append([method, _common.mean_std(dp, "{:+.2f}"), _pct([r["achieved_sparsity"] for r in p]),
                         _pct([r.get("flops_removed") for r in p]), _common.mean_std(df, "{:+.2f}"),
                         _pct([r["achieved_sparsity"] for r in f]), _pct([r.get("flops_removed") for r in f]), change])
        if not rows:
            continue
        a, b = _label("channel", "params", sp), _label("channel", "flops", sp)
        headers = ["method", f"Delta_T % ({a})", "params removed", "FLOPs removed",
                   f"Delta_T % ({b})", "params removed", "FLOPs removed", "Delta_T change (flops - params)"]
        text += (f"## What the speed costs: channel {sp:.0%} of the parameters vs {sp:.0%} of the FLOPs removed\n\n"
                 + tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True) + "\n\n"
                 "Same methods, seeds and fine-tuning; only what the target counts differs. Delta_T mean ± std over "
                 "seeds; the change is the difference of the means.\n\n")
    return text


def plot(runs: List[dict], args, path: pathlib.Path) -> None:
    """Delta_T (mean ± std over seeds): element against sparsity; channel against the FLOPs
    removed (achieved), one line per method and budget (against the parameter sparsity
    when no channel run recorded its FLOPs)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    channel_runs = [r for r in runs if r["granularity"] == "channel"]
    by_flops = any(r.get("flops_removed") is not None for r in channel_runs)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = ((axes[0], "element", args.methods_element, ["params"], args.element),
              (axes[1], "channel", args.methods_channel, args.channel_budgets, args.channel))
    for ax, gran, methods, budgets, sps in panels:
        for budget in budgets:
            for method in methods:
                xs, ys, es = [], [], []
                for sp in sps:
                    rs = [r for r in _cell(runs, gran, budget, sp, method) if r["delta_t"] is not None]
                    if gran == "channel" and by_flops:
                        rs = [r for r in rs if r.get("flops_removed") is not None]
                        x = statistics.mean(r["flops_removed"] for r in rs) if rs else None
                    else:
                        x = sp
                    if rs:
                        v = [r["delta_t"] for r in rs]
                        xs.append(x * 100)
                        ys.append(statistics.mean(v))
                        es.append(statistics.stdev(v) if len(v) > 1 else 0.0)
                if xs:
                    style = "-" if method.startswith("disparse") else "--"
                    marker = "s" if budget == "flops" else "o"
                    label = method if gran == "element" or len(budgets) == 1 else f"{method} ({budget})"
                    ax.errorbar(xs, ys, yerr=es, fmt=marker + style, capsize=3, label=label, lw=1.2, ms=4)
        ax.axhline(0, color="k", lw=0.6)
        if gran == "channel" and by_flops:
            ax.set_title("channel granularity (o: params budget, s: FLOPs budget)")
            ax.set_xlabel("FLOPs per sample removed (%, achieved)")
        else:
            ax.set_title(f"{gran} granularity")
            ax.set_xlabel("sparsity of prunable parameters (%)")
        ax.set_ylabel("Delta_T vs dense (%), higher is better")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="5 seeds, 4x the fine-tuning budget")
    ap.add_argument("--smoke", action="store_true", help="tiny configuration (seconds; used by the tests)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--element", type=float, nargs="*", default=[0.7, 0.9, 0.95], help="element sparsities")
    ap.add_argument("--channel", type=float, nargs="*", default=[0.3, 0.5, 0.7], help="channel sparsities")
    ap.add_argument("--channel-budgets", nargs="+", default=list(CHANNEL_BUDGETS), choices=CHANNEL_BUDGETS,
                    help="what a channel sparsity counts: 'params' (prunable parameters removed) and/or 'flops' "
                         "(FLOPs per sample of the slim model removed); default both, every channel method at each")
    ap.add_argument("--methods-element", nargs="*", default=ELEMENT_METHODS)
    ap.add_argument("--methods-channel", nargs="*", default=CHANNEL_METHODS)
    ap.add_argument("--dense-steps", type=int, default=600)
    ap.add_argument("--finetune-steps", type=int, default=None, help="default 150 (600 with --full)")
    ap.add_argument("--importance-batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--cache", type=pathlib.Path, default=None, help="dense checkpoint folder (default: cache_dir())")
    ap.add_argument("--tp-bisect-steps", type=int, default=12, help="bisection steps of Torch-Pruning's ratio")
    ap.add_argument("--resume", action="store_true", help="skip runs already in the JSON file")
    ap.add_argument("--report-only", action="store_true",
                    help="only rebuild the table from the JSON file (e.g. of an interrupted sweep)")
    ap.add_argument("--out", type=pathlib.Path, default=None)
    _common.add_threads_argument(ap)
    args = ap.parse_args(argv)
    _common.set_threads(args.threads)
    if args.seeds is None:
        args.seeds = [0, 1, 2, 3, 4] if args.full else [0, 1, 2]
    if args.finetune_steps is None:
        args.finetune_steps = 600 if args.full else 150
    if args.smoke:
        args.seeds, args.element, args.channel = [0], [0.9], [0.5]
        args.dense_steps, args.finetune_steps, args.importance_batches, args.batch_size = 3, 2, 2, 4
        args.methods_element = ["erk-random", "disparse-dynamic"]
        args.methods_channel = ["disparse-magnitude", "tp-taylor"]  # the section exists without torch-pruning too
        args.tp_bisect_steps = 2
        if args.cache is None and args.out is not None:
            args.cache = args.out.parent
    out = _common.out_path(args.out, args.smoke, "quality.md")
    raw_path = out.with_suffix(".json") if out is not None else None
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")

    skipped = {}
    why = torch_pruning_available()
    if why is not None:
        args.methods_channel = [m for m in args.methods_channel if not m.startswith("tp-")]
        skipped["tp-magnitude, tp-taylor"] = f"torch-pruning is not importable ({why}); `pip install torch-pruning`"

    setup = Setup(args)
    runs: List[dict] = []
    if (args.resume or args.report_only) and raw_path is not None and raw_path.exists():
        runs = json.loads(raw_path.read_text())["runs"]
    args.channel_budgets = list(dict.fromkeys(args.channel_budgets))
    # runs stored before --channel-budgets existed carry no "budget": they are params runs
    done = {(r["granularity"], _budget(r), r["sparsity"], r["method"], r["seed"]) for r in runs}
    jobs = [("none", "params", 0.0, "dense+finetune", s) for s in args.seeds]
    jobs += [("element", "params", sp, m, s) for sp in args.element for m in args.methods_element for s in args.seeds]
    # budgets next to each other per method, so an interrupted sweep still has both rows of a method
    jobs += [("channel", b, sp, m, s) for sp in args.channel for m in args.methods_channel
             for b in args.channel_budgets for s in args.seeds]
    t_all = time.perf_counter()
    missing = [j for j in jobs if j not in done]
    if args.report_only:
        for r in runs:  # Delta_T from the stored metrics, as defined now
            r["delta_t"] = _delta(setup, r["metrics"])
        if missing:
            skipped["(partial sweep)"] = (f"{len(missing)} of {len(jobs)} runs of this configuration "
                                          "are missing (interrupted); cells show the seeds that ran")
        jobs = []
    for i, (gran, budget, sp, method, seed) in enumerate(jobs):
        if (gran, budget, sp, method, seed) in done:
            continue
        t0 = time.perf_counter()
        r = one_run(setup, "element" if gran == "none" else gran, sp, method, seed, budget)
        r["granularity"] = gran
        runs.append(r)
        flops = f", FLOPs removed {r['flops_removed']:.3f}" if r.get("flops_removed") is not None else ""
        print(f"[{i + 1}/{len(jobs)}] {gran}{' ' + budget if gran == 'channel' else ''} {sp} {method} seed {seed}: "
              f"Delta_T {r['delta_t'] if r['delta_t'] is None else round(r['delta_t'], 2)}, sparsity "
              f"{r['achieved_sparsity']:.3f}{flops}, {time.perf_counter() - t0:.0f} s "
              f"(total {time.perf_counter() - t_all:.0f} s)", flush=True)
        if raw_path is not None:
            raw_path.parent.mkdir(parents=True, exist_ok=True)
            raw_path.write_text(json.dumps(dict(config={k: (str(v) if isinstance(v, pathlib.Path) else v)
                                                        for k, v in vars(args).items()},
                                                dense_metrics=setup.dense_metrics, runs=runs), indent=1))
    text = report(setup, runs, args, started, skipped)
    if out is not None:
        plot(runs, args, out.with_suffix(".png"))
        text += f"\n![Delta_T against sparsity]({out.with_suffix('.png').name})\n"
    _common.write(out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
