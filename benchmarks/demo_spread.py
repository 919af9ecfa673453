"""Spread of the demo's quality numbers across seeds: is its Delta_T larger than its noise?

Runs ``python -m disparse_fx demo --seed S`` (the README's command, everything else at its
default) for each seed in its own process (``--jobs`` at a time, 1 torch thread each),
reads each run's ``metrics.json`` and tabulates each task's metrics for the dense and the
slim model and the slim model's Delta_T, with the spread over seeds (max - min and std).
A seed changes the dense model's initialisation and every batch order; the data split
and test photographs stay the same (disparse_fx.demo.DATA_SEED).

    python benchmarks/demo_spread.py                  # seeds 0 1 2 -> benchmarks/results/demo_spread.md
    python benchmarks/demo_spread.py --seeds 0 1 2 3 4
    python benchmarks/demo_spread.py --smoke --out /tmp/s.md   # demo --fast (used by the tests)
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from tabulate import tabulate

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_demo(seed: int, folder: pathlib.Path, fast: bool, extra=()) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "disparse_fx", "demo", "--seed", str(seed), "--out", str(folder), "--threads", "1",
           *extra]
    if fast:
        cmd.append("--fast")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"demo --seed {seed} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    out = json.loads((folder / "metrics.json").read_text())
    out["seconds"] = time.perf_counter() - t0
    out["trained"] = "dense model: trained" in proc.stdout
    return out


def spread(values) -> str:
    values = list(values)
    if len(values) < 2:
        return "n/a"
    return f"{max(values) - min(values):.2f} (std {statistics.stdev(values):.2f})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="demo --fast, 2 seeds")
    ap.add_argument("--finetune-steps", type=int, default=None, help="passed to the demo (default: the demo's)")
    ap.add_argument("--out", type=pathlib.Path, default=None)
    args = ap.parse_args(argv)
    _common.set_threads(1)  # the demos run in child processes with --threads 1
    if args.smoke:
        args.seeds = args.seeds[:2]
    out = _common.out_path(args.out, args.smoke, "demo_spread.md")
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    with tempfile.TemporaryDirectory() as tmp:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            extra = ("--finetune-steps", str(args.finetune_steps)) if args.finetune_steps else ()
            results = list(pool.map(lambda s: run_demo(s, pathlib.Path(tmp) / f"seed{s}", args.smoke, extra),
                                    args.seeds))
    tasks = list(results[0]["metrics"]["dense"])
    def fmt(v):
        return "n/a" if v is None else f"{v:+.2f}"

    rows = []
    for r in results:
        for model, label, dt, cost, time_text in (
                ("dense", "dense", 0.0, None, ""),
                ("dense_finetuned", "dense + same fine-tuning", r["delta_t_dense_finetuned"], 0.0, ""),
                ("slim", "slim (DiSparse)", r["delta_t"], r["delta_t_vs_dense_finetuned"],
                 f"{r['seconds']:.0f} s" + (" (dense trained)" if r["trained"] else " (dense cached)"))):
            rows.append([r["seed"], label] + [", ".join(f"{m} {v:.4f}" for m, v in r["metrics"][model][t].items())
                                              for t in tasks] + [fmt(dt), fmt(cost), time_text])
    deltas = [r["delta_t"] for r in results if r["delta_t"] is not None]
    costs = [r["delta_t_vs_dense_finetuned"] for r in results if r["delta_t_vs_dense_finetuned"] is not None]
    opts = results[0]["options"]
    extra = [f"demo options (defaults): {opts['granularity']} granularity, {opts['sparsity']:.0%} of the "
             f"{opts['budget']} removed, criterion {opts['criterion']}, dense {opts['dense_steps']} steps, "
             f"fine-tune {opts['finetune_steps']} steps; seeds {args.seeds}; {args.jobs} demo(s) at a time, "
             "1 torch thread each"]
    text = _common.header("Demo: spread of the quality numbers across seeds", extra, started=started)
    text += tabulate(rows, headers=["seed", "model"] + tasks + ["Delta_T % vs dense",
                                                               "Delta_T % vs dense + same fine-tuning", "time"],
                     tablefmt="github", disable_numparse=True)
    text += "\n\n"
    if deltas:
        text += (f"- slim Delta_T vs dense over seeds {args.seeds}: mean {statistics.mean(deltas):+.2f} %, "
                 f"spread (max - min) {spread(deltas)} points\n")
    if costs:
        text += (f"- slim Delta_T vs dense + same fine-tuning (pruning's own cost): mean "
                 f"{statistics.mean(costs):+.2f} %, spread (max - min) {spread(costs)} points\n")
    _common.write(out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
