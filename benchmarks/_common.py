"""Shared helpers of the benchmark scripts: the results header, mean +- std, writing files."""
from __future__ import annotations

import datetime
import os
import pathlib
import platform
import shlex
import statistics
import sys
from typing import Iterable, Optional

import torch

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def add_threads_argument(ap) -> None:
    ap.add_argument("--threads", type=int, default=1,
                    help="torch (and onnxruntime) CPU threads; default 1: this machine's 2 cores are shared, "
                         "and 2-thread runs under contention stall on each other")


def set_threads(n: int) -> None:
    torch.set_num_threads(n)


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1 / 5 / 15 min)"
    except OSError:  # pragma: no cover - not on every platform
        return "n/a"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return (f"{platform.platform()}, {cpu}, {os.cpu_count()} logical CPUs, "
            f"{torch.get_num_threads()} torch threads; python {platform.python_version()}, torch {torch.__version__}")


def git_commit() -> str:
    """The repository commit the run used (and whether library files differed from it)."""
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "disparse_fx", "passes"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"commit {head}" + (" + uncommitted changes in disparse_fx/ or passes/" if dirty else "")


GIT_AT_START = git_commit()  # the scripts import this module first thing: the code the run used


def command() -> str:
    script = pathlib.Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(pathlib.Path.cwd())
    except ValueError:
        pass
    return "python " + " ".join(shlex.quote(a) for a in [str(script), *sys.argv[1:]])


def header(title: str, extra: Iterable[str] = (), *, started: Optional[str] = None) -> str:
    lines = [f"# {title}", "",
             f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}" + (f" (started {started})" if started else ""),
             f"- machine: {machine()}",
             f"- load average at the end of the run: {load_average()} (the machine is shared: other work was running)",
             f"- command: `{command()}`",
             f"- code (at the start of the run): {GIT_AT_START}"]
    lines += [f"- {e}" for e in extra]
    return "\n".join(lines) + "\n\n"


def mean_std(values, fmt: str = "{:.4f}") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values)).lstrip('+')}"


def out_path(arg: Optional[pathlib.Path], smoke: bool, name: str) -> Optional[pathlib.Path]:
    """Where a script writes: --out if given; else benchmarks/results/<name> (None in --smoke: print only)."""
    if arg is not None:
        return arg
    return None if smoke else RESULTS / name


def smoke_main(run, name: str, description: str, argv=None) -> int:
    """``main`` of a script whose only options are ``--smoke`` and ``--out``: ``run(args)``
    returns the results text, written to benchmarks/results/``name`` (printed only in --smoke)."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=pathlib.Path, default=None)
    args = ap.parse_args(argv)
    write(out_path(args.out, args.smoke, name), run(args))
    return 0


def write(path: Optional[pathlib.Path], text: str) -> None:
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"written: {path}")
