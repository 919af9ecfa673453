"""Every benchmark script runs in its tiny --smoke configuration, so none of them rots.

Each runs as a subprocess (as a user would run it), single-threaded, writing into tmp_path.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _run(script: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(BENCH / script), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


def _header_ok(text: str) -> None:
    assert "- date: " in text and "- machine: " in text and "torch threads" in text
    assert "- command: `python " in text and "--smoke" in text and "load average" in text


def test_compress_cost_smoke(tmp_path):
    out = tmp_path / "cost.md"
    _check(_run("compress_cost.py", "--smoke", "--out", str(out)))
    text = out.read_text()
    _header_ok(text)
    assert "time ratio" in text and "memory ratio" in text
    assert "Analysis time" in text


def test_speed_budget_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("DISPARSE_FX_CACHE", str(tmp_path / "cache"))  # the latency table's cache
    out = tmp_path / "speed_budget.md"
    _check(_run("speed.py", "--budgets", "--smoke", "--no-peers", "--out", str(out)))
    text = out.read_text()
    _header_ok(text)
    for row in ("slim params 50%", "slim flops 50%", "uniform width", "cells where a compact model is slower"):
        assert row in text


def test_speed_smoke(tmp_path):
    out = tmp_path / "speed.md"
    _check(_run("speed.py", "--smoke", "--out", str(out)))
    text = out.read_text()
    _header_ok(text)
    assert "slim 50% r1" in text and "native 50% r8" in text and "speed-up" in text
    assert (tmp_path / "speed.png").stat().st_size > 0


def test_quality_smoke(tmp_path):
    out = tmp_path / "quality.md"
    _check(_run("quality.py", "--smoke", "--out", str(out)))
    text = out.read_text()
    _header_ok(text)
    for method in ("dense + same fine-tuning", "erk-random", "disparse-dynamic"):
        assert method in text
    assert "## element sparsity 90%" in text and "## channel sparsity 50%" in text
    assert "## channel sparsity 50% (budget: params" in text and "## channel sparsity 50% (budget: flops" in text
    assert "What the speed costs" in text and "FLOPs removed" in text
    raw = tmp_path / "quality.json"
    runs = json.loads(raw.read_text())["runs"]
    flops_runs = [r for r in runs if r.get("budget") == "flops"]
    assert flops_runs and all(r["flops_removed"] > 0 for r in flops_runs)

    # a results file from before --channel-budgets (no "budget", no FLOPs fields): --resume keeps its
    # channel runs as params runs and adds only the FLOPs-budget runs
    old = [{k: v for k, v in r.items() if k not in ("budget", "flops_dense", "flops_after", "flops_removed")}
           for r in runs if r.get("budget") != "flops"]
    raw.write_text(json.dumps(dict(config={}, dense_metrics={}, runs=old)))
    proc = _run("quality.py", "--smoke", "--resume", "--out", str(out))
    _check(proc)
    rerun = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert rerun and all(" flops " in line for line in rerun), rerun
    after = json.loads(raw.read_text())["runs"]
    assert len(after) == len(runs) and after[: len(old)] == old


def test_gpu_smoke_falls_back_to_cpu(tmp_path):
    out = tmp_path / "gpu.md"
    _check(_run("gpu.py", "--smoke", "--out", str(out)))
    text = out.read_text()
    _header_ok(text)
    assert "- device: " in text
    assert "## Speed" in text and "## Cost" in text


@pytest.mark.parametrize("extra", [(), ("--tests",)])
def test_gpu_without_gpu_exits_zero(tmp_path, extra):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the no-GPU message does not apply")
    proc = _run("gpu.py", *extra, "--out", str(tmp_path / "gpu.md"))
    _check(proc)
    assert "no CUDA GPU" in proc.stdout
    assert not (tmp_path / "gpu.md").exists()
