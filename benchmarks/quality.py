"""Quality: does per-task importance pay? DiSparse against one-score baselines, in the
regime where pruning hurts, with paired statistics.

Set-up. A dense DeepLab-ResNet 'tiny' (disparse_fx.zoo) is trained on the built-in photo
dataset (disparse_fx.data: edge, keypoint, segment, denoise; test photographs never seen
in training) with Adam and a cosine learning-rate schedule; its validation loss is
recorded along the way (the curve is in the report) and "dense + same fine-tuning" shows
whether it had reached a plateau. One dense model per task weighting (``--weightings``):

- ``equal``: every task loss weight 1 (the losses' own scales still differ: BCE edge
  about 1, keypoint L1 about 0.05);
- ``taskonomy``: the paper's Tiny-Taskonomy weights by task type (segmentation 1, depth
  2, keypoint 7, edge 7; our denoise is the dense regression, weighted as depth).

The weighted losses are what the dense model was trained on, what every method scores
with and what it is fine-tuned on. Every method starts from the same checkpoint, gets the
same importance batches and the same fine-tuning (steps, batch order, Adam, cosine lr from
lr/2 to 0) for a seed, and is evaluated on the same test crops. A seed drives the batch
order, random masks and tie-breaking; seeds pair the runs: every comparison is the
per-seed difference DiSparse - baseline, with a 95% Student-t confidence interval of its
mean over seeds.

Targets: element granularity removes that fraction of the prunable (conv/linear) weights;
channel granularity (``--channel-budgets``) that fraction of the FLOPs per sample of the
slim model (``flops``, what users buy) or of the prunable parameters (``params``).

Methods (``--methods-element`` / ``--methods-channel``):

- ``disparse-snip`` / ``disparse-taylor`` / ``disparse-magnitude``: compress() with
  disentangle=True (per-task scores, unanimous decision);
- ``summed-snip`` / ``summed-taylor`` / ``summed-magnitude``: the same criterion on the
  summed (weighted) loss, disentangle=False (``summed-magnitude`` is global magnitude);
- ``disparse-dynamic`` (element): disparse-snip masks, then the fine-tuning budget is spent
  with disparse_fx.DynamicSparsity (prune by magnitude, regrow by per-task gradient);
- ``imp`` (element): iterative magnitude pruning (Han et al. 2015; the paper's "IMP
  (pretrained)" row): ``--imp-rounds`` rounds of global magnitude pruning to a geometric
  schedule 1 - (1 - s)^(r/R), each followed by an equal share of the same fine-tuning
  budget (cosine per round, i.e. lr rewinding); pruned weights stay pruned;
- ``random``: seeded uniform scores; ``erk-random`` (element): random masks with ERK
  per-layer densities (disparse_fx.erk_densities);
- ``tp-magnitude`` / ``tp-taylor`` (channel): Torch-Pruning (``pip install torch-pruning``,
  a benchmark-only extra) MetaPruner, GroupMagnitudeImportance / GroupTaylorImportance on
  the summed loss, global pruning, heads' output convs ignored; its channel ratio bisected
  so the removed fraction of the budget quantity matches the target within 0.5 points.

Delta_T: mean over tasks of the mean relative change of the task's metrics vs the dense
model (sign-flipped for lower-is-better metrics), in percent.

    python benchmarks/quality.py             # default: 5 seeds, both weightings, 60 fine-tuning steps, element 90/98/99.5%
                                             # (disparse-snip, summed-snip, imp), channel 50/80% of FLOPs
                                             # (disparse-taylor, summed-taylor); about an hour with 2 jobs
    python benchmarks/quality.py --full      # 200 steps, element 90/95/98/99/99.5%, channel 50/70/80/90% of FLOPs
                                             # and of parameters, every method (hours)
    python benchmarks/quality.py --smoke --out /tmp/q.md   # seconds; used by the tests

Raw per-run numbers go to a JSON file next to the table; ``--resume`` skips runs already
in it; ``--report-only`` rebuilds the table and plots from it. ``--jobs N`` runs N
single-threaded worker processes (results do not depend on N).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import copy
import datetime
import hashlib
import inspect
import json
import math
import multiprocessing
import pathlib
import statistics
import sys
import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from tabulate import tabulate
from torch.utils.data import DataLoader

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402

import disparse_fx as dfx  # noqa: E402
from disparse_fx.data import (HIGHER_IS_BETTER, TASK_METRICS, cache_dir, default_task_losses, delta_t,  # noqa: E402
                              evaluate, make_splits, task_deltas)
from disparse_fx.zoo import DEFAULT_TASKS, deeplab_resnet  # noqa: E402
from disparse_fx.passes.flops import count_flops  # noqa: E402
from disparse_fx.passes.insert_masks import masked_params  # noqa: E402
from disparse_fx.passes.trace import trace_model  # noqa: E402

ELEMENT_METHODS = ["disparse-snip", "disparse-taylor", "disparse-magnitude", "disparse-dynamic",
                   "summed-snip", "summed-taylor", "summed-magnitude", "imp", "random", "erk-random"]
CHANNEL_METHODS = ["disparse-snip", "disparse-taylor", "disparse-magnitude",
                   "summed-snip", "summed-taylor", "summed-magnitude", "random", "tp-magnitude", "tp-taylor"]
DEFAULT_ELEMENT_METHODS = ["disparse-snip", "summed-snip", "imp"]
DEFAULT_CHANNEL_METHODS = ["disparse-taylor", "summed-taylor"]
CHANNEL_BUDGETS = ["params", "flops"]
BUDGET_WORDS = {"params": "prunable parameters", "flops": "FLOPs per sample"}
#: Task loss weights. 'taskonomy': the DiSparse paper's Tiny-Taskonomy weights by task type
#: (seg 1, normals 3, depth 2, keypoint 7, edge 7); denoise is our dense regression (as depth).
WEIGHTINGS: Dict[str, Optional[Dict[str, float]]] = {
    "equal": None,
    "taskonomy": {"segment": 1.0, "denoise": 2.0, "keypoint": 7.0, "edge": 7.0},
}
METRIC_COLUMNS = [(t, m) for t, ms in (("edge", ["f1"]), ("keypoint", ["l1", "rel_err"]),
                                       ("segment", ["miou", "pixel_acc"]), ("denoise", ["l1", "rel_err"]))
                  for m in ms]
#: A summed-loss baseline "loses" once its mean Delta_T is at or below this (percent).
LOSS_THRESHOLD = -5.0


def torch_pruning_available() -> Optional[str]:
    try:
        import torch_pruning  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


def weighted_losses(weighting: str):
    """The built-in task losses, each multiplied by its weight under ``weighting``."""
    base = default_task_losses()
    weights = WEIGHTINGS[weighting]
    if not weights:
        return base
    return {t: (lambda pred, batch, f=f, w=weights[t]: w * f(pred, batch)) for t, f in base.items()}


# ------------------------------------------------------------------ set-up
class Setup:
    """Data, losses and the dense model (trained or loaded from the cache) of one weighting."""

    def __init__(self, args, weighting: str):
        self.args = args
        self.weighting = weighting
        n = dict(n_train=32, n_val=8, n_test=16) if args.smoke else dict(n_train=512, n_val=64, n_test=512)
        self.n = n
        self.splits = make_splits(seed=0, **n)
        self.losses = weighted_losses(weighting)
        self.test = DataLoader(self.splits.test, batch_size=64)
        torch.manual_seed(0)
        self.dense = deeplab_resnet(DEFAULT_TASKS, size="tiny")
        # the key covers the code that shapes the checkpoint (data, losses, model), so a library
        # change never reuses a stale checkpoint
        import disparse_fx.data.multitask_photos as photos_mod
        import disparse_fx.zoo.deeplab as deeplab_mod
        src = hashlib.sha1((inspect.getsource(photos_mod) + inspect.getsource(deeplab_mod)).encode()).hexdigest()[:12]
        key = hashlib.sha1(json.dumps(dict(size="tiny", steps=args.dense_steps, lr=args.lr, seed=0,
                                           bs=args.batch_size, data=n, v="bench-quality-3", src=src,
                                           weights=WEIGHTINGS[weighting], schedule="cosine"),
                                      sort_keys=True).encode()).hexdigest()[:12]
        folder = args.cache or cache_dir()
        self.checkpoint = folder / f"bench-quality-dense-{weighting}-{key}.pt"
        curve_path = self.checkpoint.with_suffix(".json")
        t0 = time.perf_counter()
        if self.checkpoint.exists() and curve_path.exists():
            self.dense.load_state_dict(torch.load(self.checkpoint, weights_only=True))
            self.curve = json.loads(curve_path.read_text())
        else:
            self.curve = self._train_dense()
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(self.dense.state_dict(), self.checkpoint)
            curve_path.write_text(json.dumps(self.curve))
        self.dense_seconds = time.perf_counter() - t0
        self.dense.eval()
        self.dense_metrics = evaluate(self.dense, self.test, TASK_METRICS)
        # Delta_T needs a relative change: metrics whose dense value is 0 (or not finite) are left out
        self.excluded = [f"{t} {m}" for t, ms in self.dense_metrics.items() for m, v in ms.items()
                         if v == 0 or not math.isfinite(v)]
        kept = {t: {m: v for m, v in ms.items() if v != 0 and math.isfinite(v)} for t, ms in self.dense_metrics.items()}
        self.delta_dense = {t: ms for t, ms in kept.items() if ms}

    def _train_dense(self) -> dict:
        """Adam with a cosine lr over --dense-steps; the validation losses every --eval-every steps."""
        args = self.args
        val = DataLoader(self.splits.val, batch_size=64)

        def val_losses(model):
            sums, n = {t: 0.0 for t in self.losses}, 0
            for b in val:
                out = model(b["input"])
                for t, f in self.losses.items():
                    sums[t] += float(f(out[t], b)) * len(b["input"])
                n += len(b["input"])
            return {"loss": {t: v / n for t, v in sums.items()}, "metrics": evaluate(model, val, TASK_METRICS)}

        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        loader = DataLoader(self.splits.train, batch_size=args.batch_size, shuffle=True, generator=gen,
                            drop_last=True)
        t0 = time.perf_counter()
        hist = dfx.finetune(self.dense, self.losses, loader, args.dense_steps, lr=args.lr, lr_schedule="cosine",
                            progress=False, eval_fn=val_losses,
                            eval_every=max(1, min(args.eval_every, args.dense_steps)))
        print(f"dense ({self.weighting}): trained {args.dense_steps} steps in {time.perf_counter() - t0:.0f} s",
              flush=True)
        return {"steps": [s for s, _ in hist["eval"]], "val": [v for _, v in hist["eval"]],
                "seconds": time.perf_counter() - t0}

    def loader(self, seed: int) -> DataLoader:
        gen = torch.Generator().manual_seed(1000 + seed)
        return DataLoader(self.splits.train, batch_size=self.args.batch_size, shuffle=True, generator=gen,
                          drop_last=True)

    def importance_batches(self, seed: int) -> list:
        it = iter(self.loader(seed))
        return [next(it) for _ in range(min(self.args.importance_batches, len(self.splits.train) // self.args.batch_size))]

    def finetune(self, trainable, seed: int, steps: int, **kw):
        torch.manual_seed(seed)
        return dfx.finetune(trainable, self.losses, self.loader(seed), steps, lr=self.args.lr / 2,
                            lr_schedule="cosine", progress=False, **kw)


def _prunable_elements(model: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.ConvTranspose2d)))


# ------------------------------------------------------------------ methods
def run_compress(setup: Setup, method: str, granularity: str, sparsity: float, seed: int, budget: str = "params",
                 model: Optional[torch.nn.Module] = None):
    if method in ("random", "erk-random"):
        family, criterion = "summed", "random"
    elif method == "disparse-dynamic":
        family, criterion = "disparse", "snip"
    elif method == "imp":
        family, criterion = "summed", "magnitude"
    else:
        family, criterion = method.split("-", 1)
    # the default per-layer floor (1% kept) cannot hold above 99% sparsity: half of what is kept
    floor = min(dfx.CompressConfig.min_layer_density, (1.0 - sparsity) / 2)
    config = dfx.CompressConfig(sparsity=sparsity, criterion=criterion, disentangle=(family == "disparse"),
                                granularity=granularity, num_batches=setup.args.importance_batches, seed=seed,
                                allow_fewer_batches=True, progress=False, budget=budget, min_layer_density=floor)
    result = dfx.compress(setup.dense if model is None else model, setup.losses, setup.importance_batches(seed),
                          config)
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


@torch.no_grad()
def _effective_dense(setup: Setup, result) -> torch.nn.Module:
    """A copy of the dense model holding the masked model's effective weights (w * mask) and
    its buffers (the fine-tuned BatchNorm statistics)."""
    model = copy.deepcopy(setup.dense)
    masks = masked_params(result.model)
    own = dict(model.named_parameters())
    for n, q in result.model.named_parameters():
        own[n].copy_(q * masks[n] if n in masks else q)
    own_buffers = dict(model.named_buffers())
    for n, b in result.model.named_buffers():
        if n in own_buffers:
            own_buffers[n].copy_(b)
    return model


def run_imp(setup: Setup, sparsity: float, seed: int):
    """Iterative magnitude pruning: R rounds of (global magnitude to 1 - (1 - s)^(r/R), then an
    equal share of the fine-tuning steps). Returns the last round's result (fine-tuned)."""
    rounds = max(1, setup.args.imp_rounds)
    steps = setup.args.finetune_steps
    shares = [steps // rounds + (1 if r < steps % rounds else 0) for r in range(rounds)]
    result = None
    for r in range(1, rounds + 1):
        target = 1.0 - (1.0 - sparsity) ** (r / rounds)
        start = setup.dense if result is None else _effective_dense(setup, result)
        result = run_compress(setup, "imp", "element", target, seed, model=start)
        if shares[r - 1] > 0:
            setup.finetune(result, seed * 100 + r, shares[r - 1])
    return result


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
    extra: dict = {}
    if method == "dense+finetune":
        model = copy.deepcopy(setup.dense)
        trainable, achieved = model, 0.0
    elif method.startswith("tp-"):
        model, achieved, flops, ratio = run_torch_pruning(setup, method, sparsity, seed, budget)
        trainable = model
        extra["tp_channel_ratio"] = ratio
        extra["flops_dense"], extra["flops_after"] = flops
    elif method == "imp":
        result = run_imp(setup, sparsity, seed)
        trainable, model = None, result.model  # fine-tuned inside, round by round
        achieved = _achieved_element_sparsity(result)
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
    t1 = time.perf_counter()
    if method == "disparse-dynamic":
        opt = torch.optim.Adam(result.model.parameters(), lr=args.lr / 2)
        sched = dfx.DynamicSparsity(result, setup.losses, opt, end_step=max(2, int(0.75 * args.finetune_steps)),
                                    update_every=max(1, args.finetune_steps // 10), init="plan", seed=seed)
        setup.finetune(result, seed, args.finetune_steps, dynamic=sched)
        achieved = sched.sparsity
    elif trainable is not None:
        setup.finetune(trainable, seed, args.finetune_steps)
    t_ft = time.perf_counter() - t1
    model.eval()
    metrics = evaluate(model, setup.test, TASK_METRICS)
    return dict(weighting=setup.weighting, granularity=granularity, sparsity=sparsity, method=method, seed=seed,
                metrics=metrics, delta_t=_delta(setup, metrics), task_deltas=_task_deltas(setup, metrics),
                achieved_sparsity=achieved, compress_s=t_compress, finetune_s=t_ft, **extra)


def _restrict(setup: Setup, metrics):
    return {t: {m: metrics[t][m] for m in ms} for t, ms in setup.delta_dense.items()}


def _delta(setup: Setup, metrics) -> Optional[float]:
    try:
        return delta_t(_restrict(setup, metrics), setup.delta_dense) if setup.delta_dense else None
    except ValueError:
        return None


def _task_deltas(setup: Setup, metrics) -> Optional[Dict[str, float]]:
    try:
        return task_deltas(_restrict(setup, metrics), setup.delta_dense) if setup.delta_dense else None
    except ValueError:
        return None


# ------------------------------------------------------------------ statistics
def t_interval(values: Sequence[float], level: float = 0.95) -> Tuple[float, float, float]:
    """Mean and the two-sided Student-t confidence interval of the mean: (mean, low, high).
    With one value the interval is unbounded (nan)."""
    n = len(values)
    mean = statistics.mean(values)
    if n < 2:
        return mean, float("nan"), float("nan")
    from scipy import stats  # scikit-image's dependency: always installed with disparse_fx

    half = stats.t.ppf(0.5 + level / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return mean, mean - half, mean + half


def paired(runs: List[dict], a: str, b: str) -> Optional[Tuple[float, float, float, int]]:
    """Per-seed Delta_T differences a - b over the seeds both ran: (mean, low, high, n)."""
    da = {r["seed"]: r["delta_t"] for r in runs if r["method"] == a and r["delta_t"] is not None}
    db = {r["seed"]: r["delta_t"] for r in runs if r["method"] == b and r["delta_t"] is not None}
    seeds = sorted(set(da) & set(db))
    if not seeds:
        return None
    mean, lo, hi = t_interval([da[s] - db[s] for s in seeds])
    return mean, lo, hi, len(seeds)


def _reading(lo: float, hi: float) -> str:
    if math.isnan(lo):
        return "one seed"
    return "DiSparse ahead" if lo > 0 else "baseline ahead" if hi < 0 else "CI includes 0"


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


def _cell(runs: List[dict], weighting: str, gran: str, budget: str, sp: float,
          method: Optional[str] = None) -> List[dict]:
    return [r for r in runs if r.get("weighting", "equal") == weighting and r["granularity"] == gran
            and r["sparsity"] == sp and _budget(r) == budget and (method is None or r["method"] == method)]


def _ci_text(mean: float, lo: float, hi: float) -> str:
    return f"{mean:+.2f} [{lo:+.2f}, {hi:+.2f}]" if not math.isnan(lo) else f"{mean:+.2f}"


def _methods(args, gran: str) -> List[str]:
    return args.methods_channel if gran == "channel" else args.methods_element


#: The issue's goal is judged at these sparsities and above.
GOAL_SPARSITY = {"element": 0.98, "channel": 0.8}


def _decides_goal(gran: str, sp: float) -> bool:
    return gran in GOAL_SPARSITY and sp >= GOAL_SPARSITY[gran]


def _ours_and_theirs(args, gran: str, cell: List[dict]) -> Tuple[List[str], List[str]]:
    """The DiSparse methods and the baselines with runs in ``cell``, in --methods order."""
    ran = [m for m in _methods(args, gran) if any(r["method"] == m for r in cell)]
    return [m for m in ran if m.startswith("disparse")], [m for m in ran if not m.startswith("disparse")]


def _summary(runs: List[dict], args) -> Tuple[str, List[str]]:
    """The paired comparison tables (one row per setting) and the findings' lines."""
    text, findings = "", []
    for weighting in args.weightings:
        rows = []
        for gran, budget, sp in _settings(args):
            cell = _cell(runs, weighting, gran, budget, sp)
            ours, theirs = _ours_and_theirs(args, gran, cell)
            for o in ours:
                for b in theirs:
                    p = paired(cell, o, b)
                    if p is None:
                        continue
                    mean, lo, hi, n = p
                    rows.append([f"{gran} {sp:.1%} {budget if gran == 'channel' else ''}".strip(), o, b,
                                 _ci_text(mean, lo, hi), n, _reading(lo, hi)])
        if rows:
            text += (f"### Weighting '{weighting}': paired Delta_T difference DiSparse - baseline\n\n"
                     + tabulate(rows, headers=["setting", "DiSparse", "baseline", "mean diff [95% CI] (points)",
                                               "seeds", "reading"], tablefmt="github", disable_numparse=True)
                     + "\n\n")
        # where each summed-loss baseline first loses >= 5% Delta_T
        for gran in ("element", "channel"):
            budgets = ["params"] if gran == "element" else args.channel_budgets
            for budget in budgets:
                sps = sorted(sp for g, b, sp in _settings(args) if g == gran and b == budget)
                for m in [m for m in _methods(args, gran) if m.startswith("summed")]:
                    means = {sp: [r["delta_t"] for r in _cell(runs, weighting, gran, budget, sp, m)
                                  if r["delta_t"] is not None] for sp in sps}
                    means = {sp: statistics.mean(v) for sp, v in means.items() if v}
                    if not means:
                        continue
                    first = next((sp for sp in sorted(means) if means[sp] <= LOSS_THRESHOLD), None)
                    where = (f"first at {first:.1%} (mean Delta_T {means[first]:+.2f}%)" if first is not None
                             else f"never in {', '.join(f'{sp:.1%}' for sp in sorted(means))} "
                                  f"(lowest mean {min(means.values()):+.2f}%)")
                    findings.append(f"'{weighting}', {gran}{' ' + budget if gran == 'channel' else ''}: "
                                    f"{m} loses >= {-LOSS_THRESHOLD:.0f}% Delta_T {where}")
    return text, findings


def _goal(runs: List[dict], args) -> List[str]:
    """The issue's goal, checked: at >= 98% element / >= 80% channel, is some DiSparse variant
    ahead of every baseline with a CI above zero?"""
    lines = []
    for weighting in args.weightings:
        for gran, budget, sp in _settings(args):
            if not _decides_goal(gran, sp):
                continue
            cell = _cell(runs, weighting, gran, budget, sp)
            ours, theirs = _ours_and_theirs(args, gran, cell)
            if not ours or not theirs:
                continue
            winners = [o for o in ours if all((p := paired(cell, o, b)) is not None and p[1] > 0 for b in theirs)]
            label = f"'{weighting}' {gran} {sp:.1%}{' ' + budget if gran == 'channel' else ''}"
            lines.append(f"{label}: " + (f"met by {', '.join(winners)}" if winners else
                                         "NOT met (no DiSparse variant has a CI above zero against every baseline)"))
    return lines


def report(setups: Mapping[str, Setup], runs: List[dict], args, started: str, skipped: Dict[str, str]) -> str:
    any_setup = next(iter(setups.values()))
    extra = [
        f"model: DeepLab-ResNet 'tiny' (disparse_fx.zoo), tasks {list(DEFAULT_TASKS)}; data: built-in photo "
        f"dataset, {any_setup.n['n_train']} train / {any_setup.n['n_val']} val / {any_setup.n['n_test']} test crops "
        f"of 64x64 (test photographs {', '.join(any_setup.splits.test.photos)})",
        f"dense: {args.dense_steps} Adam steps, batch {args.batch_size}, lr {args.lr} cosine to 0, one model per "
        "weighting (" + ", ".join(f"'{w}': `{s.checkpoint.name}`" for w, s in setups.items()) + ")",
        f"weightings: " + "; ".join(f"'{w}' " + ("all 1" if not WEIGHTINGS[w] else
                                                 ", ".join(f"{t} {v:g}" for t, v in WEIGHTINGS[w].items()))
                                    for w in args.weightings),
        f"per run: importance from {args.importance_batches} batches of {args.batch_size}, then {args.finetune_steps} "
        f"fine-tuning Adam steps, lr {args.lr / 2} cosine to 0 (identical for every method; IMP spends them over "
        f"{args.imp_rounds} rounds); seeds {args.seeds}",
        "Delta_T: mean over tasks of the mean relative change of the task's metrics vs dense, sign-flipped "
        "for lower-is-better metrics, in % (higher is better; 0 = dense). Paired differences: per seed, "
        "DiSparse - baseline; mean and 95% Student-t CI over seeds",
        f"{args.jobs} worker process(es), 1 torch thread each",
    ]
    extra += [f"PARTIAL SWEEP: {v}" for k, v in skipped.items() if k == "(partial sweep)"]
    text = _common.header("Quality: DiSparse vs one-score baselines where pruning hurts", extra, started=started)

    summary, findings = _summary(runs, args)
    goal = _goal(runs, args)
    text += "## Summary\n\n"
    if goal:
        text += ("Goal (DiSparse ahead of every baseline with a 95% CI above zero at >= 98% element and >= 80% "
                 "channel sparsity):\n\n" + "\n".join(f"- {g}" for g in goal) + "\n\n")
    if findings:
        text += (f"Where the summed-loss baseline first loses >= {-LOSS_THRESHOLD:.0f}% Delta_T (mean over seeds):\n\n"
                 + "\n".join(f"- {f}" for f in findings) + "\n\n")
    text += summary

    text += _curve_table(setups)
    arrows = {f"{t} {m}": ("↑" if HIGHER_IS_BETTER.get(m, True) else "↓") for t, m in METRIC_COLUMNS}
    metric_headers = [f"{t} {m} {arrows[f'{t} {m}']}" for t, m in METRIC_COLUMNS]
    for weighting in args.weightings:
        setup = setups[weighting]
        dense_metrics = [f"{setup.dense_metrics[t][m]:.3f}" for t, m in METRIC_COLUMNS]
        ref = [r for r in runs if r["method"] == "dense+finetune" and r.get("weighting", "equal") == weighting]
        for gran, budget, sp in _settings(args):
            cell = _cell(runs, weighting, gran, budget, sp)
            if not cell:
                continue
            chan = gran == "channel"
            lead = ["params removed", "FLOPs removed"] if chan else ["sparsity reached"]
            headers = ["method"] + lead + metric_headers + ["Delta_T % ↑", "compress s"]
            rows = [["dense (no pruning)"] + ["0"] * len(lead) + dense_metrics + ["0", ""]]
            if ref:
                rows.append(["dense + same fine-tuning"] + ["0"] * len(lead)
                            + [_fmt_metric([r["metrics"][t][m] for r in ref]) for t, m in METRIC_COLUMNS]
                            + [_common.mean_std([r["delta_t"] for r in ref], "{:+.2f}"), ""])
            for method in _methods(args, gran):
                rs = [r for r in cell if r["method"] == method]
                if not rs:
                    continue
                reached = [_common.mean_std([r["achieved_sparsity"] for r in rs], "{:.3f}")]
                if chan:
                    reached.append(_common.mean_std([r.get("flops_removed") for r in rs], "{:.3f}"))
                rows.append([method] + reached
                            + [_fmt_metric([r["metrics"][t][m] for r in rs]) for t, m in METRIC_COLUMNS]
                            + [_common.mean_std([r["delta_t"] for r in rs], "{:+.2f}"),
                               _common.mean_std([r["compress_s"] for r in rs], "{:.1f}")])
            head = f"## '{weighting}' weights: {gran} sparsity {sp:.1%}"
            if chan:
                head += f" (budget: {budget} - {sp:.0%} of the {BUDGET_WORDS[budget]} removed)"
            text += head + "\n\n" + tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True) + "\n\n"
    for k, v in skipped.items():
        if k != "(partial sweep)":
            text += f"- skipped {k}: {v}\n"
    text += ("\nCells: mean ± std over seeds. Raw per-run numbers (metrics, per-task deltas, times): the JSON file "
             "next to this table.\n")
    return text


def _curve_table(setups: Mapping[str, Setup]) -> str:
    text = ""
    for w, s in setups.items():
        curve = s.curve
        if not curve.get("steps"):
            continue
        tasks = list(curve["val"][0]["loss"])
        cols = [(t, m) for t, m in METRIC_COLUMNS if t in tasks]
        rows = [[step, f"{sum(v['loss'].values()):.4f}"] + [f"{v['loss'][t]:.4f}" for t in tasks]
                + [f"{v['metrics'][t][m]:.3f}" for t, m in cols]
                for step, v in zip(curve["steps"], curve["val"])]
        headers = (["step", "val loss"] + [f"{t} loss" for t in tasks]
                   + [f"{t} {m} {'↑' if HIGHER_IS_BETTER.get(m, True) else '↓'}" for t, m in cols])
        text += (f"### Dense training ('{w}' weights): validation loss (weighted) and metrics against steps\n\n"
                 + tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)
                 + f"\n\n({curve.get('seconds', 0):.0f} s to train; validation photographs "
                   f"{', '.join(s.splits.val.photos)}; cosine lr, so the last row is the settled model. Whether "
                   "more training would still pay shows in 'dense + same fine-tuning' below.)\n\n")
    return text


# ------------------------------------------------------------------ plots
def _x_of(runs: List[dict], gran: str) -> float:
    """x position: the target sparsity; for channel runs the FLOPs removed when recorded."""
    if gran == "channel":
        f = [r.get("flops_removed") for r in runs if r.get("flops_removed") is not None]
        if f:
            return statistics.mean(f)
    return runs[0]["sparsity"]


def _xscale(ax, gran: str, ticks: Sequence[float] = ()) -> None:
    if gran == "element":  # 90 .. 99.5%: spread the high end (log of the density)
        ax.set_xscale("function", functions=(lambda x: -_log10(100 - x), lambda y: 100 - 10 ** (-y)))
        if ticks:  # one tick per swept sparsity (the default locator crowds 90..98)
            ax.set_xticks([100 * t for t in ticks], [f"{100 * t:g}" for t in ticks])


def _log10(v):
    import numpy as np

    return np.log10(np.clip(v, 1e-6, None))


def plot(runs: List[dict], args, path: pathlib.Path) -> None:
    """Delta_T against sparsity, one line per method, with the 95% t band of the mean over
    seeds; rows: weightings, columns: element / channel (FLOPs removed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grans = [g for g in ("element", "channel") if any(r["granularity"] == g for r in runs)]
    fig, axes = plt.subplots(len(args.weightings), max(1, len(grans)), figsize=(6 * max(1, len(grans)),
                                                                                   4 * len(args.weightings)),
                             squeeze=False)
    for i, weighting in enumerate(args.weightings):
        for j, gran in enumerate(grans):
            ax = axes[i][j]
            budgets = ["params"] if gran == "element" else args.channel_budgets
            for budget in budgets:
                for method in _methods(args, gran):
                    pts = []
                    for g, b, sp in _settings(args):
                        if g != gran or b != budget:
                            continue
                        rs = [r for r in _cell(runs, weighting, gran, budget, sp, method) if r["delta_t"] is not None]
                        if rs:
                            mean, lo, hi = t_interval([r["delta_t"] for r in rs])
                            pts.append((100 * _x_of(rs, gran), mean, lo, hi))
                    if not pts:
                        continue
                    pts.sort()
                    xs, ys, los, his = zip(*pts)
                    style = "-" if method.startswith("disparse") else "--"
                    label = method if len(budgets) == 1 else f"{method} ({budget})"
                    line, = ax.plot(xs, ys, style, marker="o" if budget == "params" else "s", ms=4, lw=1.3,
                                    label=label)
                    if not any(math.isnan(v) for v in los):
                        ax.fill_between(xs, los, his, color=line.get_color(), alpha=0.15, lw=0)
            ax.axhline(0, color="k", lw=0.6)
            ax.axhline(LOSS_THRESHOLD, color="grey", lw=0.6, ls=":")
            _xscale(ax, gran, args.element)
            ax.set_title(f"'{weighting}' weights, {gran} granularity")
            ax.set_xlabel("FLOPs per sample removed (%)" if gran == "channel" else "weights removed (%)")
            ax.set_ylabel("Delta_T vs dense (%), mean and 95% CI")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_tasks(runs: List[dict], args, path: pathlib.Path) -> None:
    """Each task's own change vs dense (%, mean over seeds) against sparsity, per method:
    which task collapses under which method. Rows: weighting x granularity; columns: tasks."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(w, g) for w in args.weightings for g in ("element", "channel")
              if any(r["granularity"] == g and r.get("weighting", "equal") == w for r in runs)]
    tasks = list(DEFAULT_TASKS)
    fig, axes = plt.subplots(max(1, len(panels)), len(tasks), figsize=(3.6 * len(tasks), 3.0 * max(1, len(panels))),
                             squeeze=False)
    for i, (weighting, gran) in enumerate(panels):
        budget = "params" if gran == "element" else args.channel_budgets[0]
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            for method in _methods(args, gran):
                pts = []
                for g, b, sp in _settings(args):
                    if g != gran or b != budget:
                        continue
                    rs = [r for r in _cell(runs, weighting, gran, budget, sp, method) if r.get("task_deltas")]
                    if rs:
                        pts.append((100 * _x_of(rs, gran), statistics.mean(r["task_deltas"][task] for r in rs)))
                if pts:
                    pts.sort()
                    ax.plot(*zip(*pts), "-" if method.startswith("disparse") else "--", marker="o", ms=3, lw=1.2,
                            label=method)
            ax.axhline(0, color="k", lw=0.6)
            _xscale(ax, gran, args.element)
            ax.set_title(f"{task} ('{weighting}', {gran})", fontsize=9)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("task change vs dense (%)")
            if i == len(panels) - 1:
                ax.set_xlabel("FLOPs removed (%)" if gran == "channel" else "weights removed (%)")
        if axes[i][0].get_legend_handles_labels()[0]:
            axes[i][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_watershed(setup: Setup, args, path: pathlib.Path) -> str:
    """Mask IoU of the tasks' own keep-masks against depth (disparse_fx.mask_overlap) for the
    built-in model, DiSparse snip at the highest element sparsity of the sweep, seed 0."""
    sp = max(args.element) if args.element else 0.9
    result = run_compress(setup, "disparse-snip", "element", sp, args.seeds[0])
    overlap = dfx.mask_overlap(result)
    overlap.plot(path, title=f"Task keep-mask IoU against depth (DiSparse snip, element {sp:.1%}, "
                             f"'{setup.weighting}' weights)")
    return (f"## Where the tasks part ways: mask IoU against depth ('{setup.weighting}' weights, "
            f"element {sp:.1%}, DiSparse snip, seed {args.seeds[0]})\n\n"
            f"Watershed layer: {overlap.watershed} (all-task IoU drops by {overlap.watershed_drop:.3f}).\n\n"
            f"![mask IoU against depth]({path.name})\n\n")


# ------------------------------------------------------------------ workers
_SETUPS: Dict[str, Setup] = {}


def _worker_init(args) -> None:
    _common.set_threads(1)
    _worker_init.args = args


def _setup(weighting: str) -> Setup:
    if weighting not in _SETUPS:
        _SETUPS[weighting] = Setup(_worker_init.args, weighting)
    return _SETUPS[weighting]


def _prepare(weighting: str) -> float:
    """Train (or load) a weighting's dense model in a worker; returns the seconds it took."""
    return _setup(weighting).dense_seconds


def _job(job: tuple) -> dict:
    weighting, gran, budget, sp, method, seed = job
    t0 = time.perf_counter()
    try:
        r = one_run(_setup(weighting), "element" if gran == "none" else gran, sp, method, seed, budget)
    except Exception as exc:  # noqa: BLE001 - one failed run must not lose the sweep: reported, not stored
        return dict(job=list(job), error=f"{type(exc).__name__}: {exc}")
    r["granularity"] = gran
    r["seconds"] = time.perf_counter() - t0
    return r


def _key(r: dict) -> tuple:
    return (r.get("weighting", "equal"), r["granularity"], _budget(r), r["sparsity"], r["method"], r["seed"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true",
                    help="every sparsity (element 90/95/98/99/99.5%%, channel 50/70/80/90%%), both channel budgets, "
                         "every method")
    ap.add_argument("--smoke", action="store_true", help="tiny configuration (seconds; used by the tests)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--weightings", nargs="+", default=list(WEIGHTINGS), choices=list(WEIGHTINGS))
    ap.add_argument("--element", type=float, nargs="*", default=None, help="element sparsities")
    ap.add_argument("--channel", type=float, nargs="*", default=None, help="channel targets")
    ap.add_argument("--channel-budgets", nargs="+", default=None, choices=CHANNEL_BUDGETS,
                    help="what a channel target counts: 'flops' (FLOPs per sample removed; default) and/or "
                         "'params' (prunable parameters removed)")
    ap.add_argument("--methods-element", nargs="*", default=None)
    ap.add_argument("--methods-channel", nargs="*", default=None)
    ap.add_argument("--dense-steps", type=int, default=1200)
    ap.add_argument("--eval-every", type=int, default=100, help="validation loss every N dense steps (the curve)")
    ap.add_argument("--finetune-steps", type=int, default=None, help="default 60 (200 with --full)")
    ap.add_argument("--importance-batches", type=int, default=8)
    ap.add_argument("--imp-rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (1 torch thread each)")
    ap.add_argument("--cache", type=pathlib.Path, default=None, help="dense checkpoint folder (default: cache_dir())")
    ap.add_argument("--tp-bisect-steps", type=int, default=12, help="bisection steps of Torch-Pruning's ratio")
    ap.add_argument("--resume", action="store_true", help="skip runs already in the JSON file")
    ap.add_argument("--report-only", action="store_true",
                    help="only rebuild the table and plots from the JSON file (e.g. of an interrupted sweep)")
    ap.add_argument("--out", type=pathlib.Path, default=None)
    args = ap.parse_args(argv)
    args.threads = 1
    _common.set_threads(1)
    full = args.full
    defaults = dict(element=[0.9, 0.95, 0.98, 0.99, 0.995] if full else [0.9, 0.98, 0.995],
                    channel=[0.5, 0.7, 0.8, 0.9] if full else [0.5, 0.8],
                    channel_budgets=list(CHANNEL_BUDGETS[::-1]) if full else ["flops"],
                    methods_element=ELEMENT_METHODS if full else DEFAULT_ELEMENT_METHODS,
                    methods_channel=CHANNEL_METHODS if full else DEFAULT_CHANNEL_METHODS)
    defaults["finetune_steps"] = 200 if full else 60
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.smoke:
        args.seeds, args.element, args.channel, args.weightings = [0, 1], [0.9], [0.5], ["equal", "taskonomy"]
        args.dense_steps, args.eval_every, args.finetune_steps = 4, 2, 3
        args.importance_batches, args.batch_size, args.imp_rounds = 2, 4, 2
        args.methods_element = ["disparse-dynamic", "summed-snip", "imp"]
        args.methods_channel = ["disparse-magnitude", "tp-taylor"]  # the section exists without torch-pruning too
        args.channel_budgets = ["flops"]
        args.tp_bisect_steps = 2
        if args.cache is None and args.out is not None:
            args.cache = args.out.parent
    args.channel_budgets = list(dict.fromkeys(args.channel_budgets))
    out = _common.out_path(args.out, args.smoke, "quality.md")
    raw_path = out.with_suffix(".json") if out is not None else None
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")

    skipped = {}
    why = torch_pruning_available()
    if why is not None:
        args.methods_channel = [m for m in args.methods_channel if not m.startswith("tp-")]
        skipped["tp-magnitude, tp-taylor"] = f"torch-pruning is not importable ({why}); `pip install torch-pruning`"

    runs: List[dict] = []
    if (args.resume or args.report_only) and raw_path is not None and raw_path.exists():
        runs = json.loads(raw_path.read_text())["runs"]
    done = {_key(r) for r in runs}
    jobs = []
    for seed in args.seeds:  # seed-major: an interrupted sweep still has whole pairs
        for w in args.weightings:
            jobs.append((w, "none", "params", 0.0, "dense+finetune", seed))
            jobs += [(w, "element", "params", sp, m, seed) for sp in args.element for m in args.methods_element]
            jobs += [(w, "channel", b, sp, m, seed) for sp in args.channel for b in args.channel_budgets
                     for m in args.methods_channel]
    # the goal's settings (>= 98% element, >= 80% channel) for every seed first, then the rest of
    # the curve: a sweep cut short by its time still has every seed of the settings that decide
    jobs.sort(key=lambda j: (not (j[1] == "none" or _decides_goal(j[1], j[3])), j[5]))
    missing = [j for j in jobs if j not in done]
    failed: List[dict] = []
    _worker_init(args)
    if args.report_only:
        if missing:
            skipped["(partial sweep)"] = (f"{len(missing)} of {len(jobs)} runs of this configuration "
                                          "are missing (interrupted); cells show the seeds that ran")
        missing = []
    t_all = time.perf_counter()

    def save():
        if raw_path is not None:
            raw_path.parent.mkdir(parents=True, exist_ok=True)
            raw_path.write_text(json.dumps(dict(config={k: (str(v) if isinstance(v, pathlib.Path) else v)
                                                        for k, v in vars(args).items()}, runs=runs), indent=1))

    if missing:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that has run torch ops
        with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=ctx,
                                                    initializer=_worker_init, initargs=(args,)) as pool:
            for w, seconds in zip(args.weightings, pool.map(_prepare, args.weightings)):
                print(f"dense ({w}): ready in {seconds:.0f} s", flush=True)
            futures = {pool.submit(_job, j): j for j in missing}
            for i, fut in enumerate(concurrent.futures.as_completed(futures)):
                r = fut.result()
                if "error" in r:
                    failed.append(r)
                    print(f"[{i + 1}/{len(missing)}] FAILED {r['job']}: {r['error']}", flush=True)
                    continue
                runs.append(r)
                save()
                flops = f", FLOPs removed {r['flops_removed']:.3f}" if r.get("flops_removed") is not None else ""
                dt = "n/a" if r["delta_t"] is None else f"{r['delta_t']:+.2f}"
                print(f"[{i + 1}/{len(missing)}] {r['weighting']} {r['granularity']}"
                      f"{' ' + _budget(r) if r['granularity'] == 'channel' else ''} {r['sparsity']} {r['method']} "
                      f"seed {r['seed']}: Delta_T {dt}, sparsity {r['achieved_sparsity']:.3f}{flops}, "
                      f"{r['seconds']:.0f} s (total {time.perf_counter() - t_all:.0f} s)", flush=True)
    for f in failed:
        skipped[f"run {' '.join(map(str, f['job']))}"] = f"FAILED: {f['error']}"
    setups = {w: _setup(w) for w in args.weightings}
    text = report(setups, runs, args, started, skipped)
    if out is not None:
        plot(runs, args, out.with_suffix(".png"))
        plot_tasks(runs, args, out.with_name(out.stem + "_tasks.png"))
        text += f"\n![Delta_T against sparsity]({out.with_suffix('.png').name})\n\n"
        text += f"![each task against sparsity]({out.stem}_tasks.png)\n\n"
        if args.element:
            text += plot_watershed(setups[args.weightings[0]], args, out.with_name(out.stem + "_watershed.png"))
    text += f"Total wall time of this invocation: {time.perf_counter() - t_all:.0f} s.\n"
    _common.write(out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
