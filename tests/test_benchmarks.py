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
    assert "element 90%, bfloat16 scores" in text


def test_compress_cost_memory_only_smoke(tmp_path):
    out = tmp_path / "memory.md"
    _check(_run("compress_cost.py", "--smoke", "--memory-only", "--out", str(out)))
    text = out.read_text()
    _header_ok(text)
    assert "compress / train step" in text and "channel 50%, bfloat16 scores" in text
    assert "time ratio" not in text


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
    for method in ("dense + same fine-tuning", "imp", "disparse-dynamic", "tp-taylor"):
        assert method in text
    for weighting in ("equal", "taskonomy"):
        assert f"## '{weighting}' weights: element sparsity 90.0%" in text
        assert f"## '{weighting}' weights: channel sparsity 50.0% (budget: flops" in text
        assert f"### Weighting '{weighting}': paired Delta_T difference DiSparse - baseline" in text
        assert f"### Dense training ('{weighting}' weights): validation loss" in text
    assert "mean diff [95% CI]" in text and "loses >= 5% Delta_T" in text and "Watershed layer:" in text
    for png in ("quality.png", "quality_tasks.png", "quality_watershed.png"):
        assert (tmp_path / png).stat().st_size > 0
    runs = json.loads((tmp_path / "quality.json").read_text())["runs"]
    assert {r["weighting"] for r in runs} == {"equal", "taskonomy"} and {r["seed"] for r in runs} == {0, 1}
    assert all(r["flops_removed"] > 0 for r in runs if r["granularity"] == "channel")
    assert all(set(r["task_deltas"]) == {"edge", "keypoint", "segment", "denoise"} for r in runs)
    imp = [r for r in runs if r["method"] == "imp"]
    assert imp and all(abs(r["achieved_sparsity"] - 0.9) < 0.01 for r in imp)

    # --resume after an interruption: only the missing run is made again
    raw = tmp_path / "quality.json"
    kept = [r for r in runs if not (r["seed"] == 1 and r["method"] == "imp" and r["weighting"] == "taskonomy")]
    raw.write_text(json.dumps(dict(config={}, runs=kept)))
    proc = _run("quality.py", "--smoke", "--resume", "--out", str(out))
    _check(proc)
    rerun = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(rerun) == 1 and "taskonomy element 0.9 imp seed 1:" in rerun[0], rerun
    after = json.loads(raw.read_text())["runs"]
    assert len(after) == len(runs) and after[: len(kept)] == kept


def test_t_interval_and_pairing():
    sys.path.insert(0, str(BENCH))
    try:
        import quality
    finally:
        sys.path.remove(str(BENCH))
    mean, lo, hi = quality.t_interval([1.0, 2.0, 3.0])
    # mean 2, std 1, t(0.975, 2) = 4.303: half-width 4.303 / sqrt(3)
    assert mean == 2.0 and abs(hi - 2.0 - 4.302653 / 3 ** 0.5) < 1e-5 and abs((mean - lo) - (hi - mean)) < 1e-12
    runs = [dict(method="a", seed=s, delta_t=d) for s, d in ((0, 1.0), (1, 2.0), (2, 4.0))]
    runs += [dict(method="b", seed=s, delta_t=d) for s, d in ((0, 0.0), (1, 0.0), (3, 9.0))]
    m, lo, hi, n = quality.paired(runs, "a", "b")  # seeds 0 and 1 only: diffs 1, 2
    assert n == 2 and m == 1.5 and lo < 1.5 < hi
    assert quality._reading(0.1, 2.0) == "DiSparse ahead" and quality._reading(-1.0, 2.0) == "CI includes 0"


def test_demo_spread_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("DISPARSE_FX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "spread.md"
    _check(_run("demo_spread.py", "--smoke", "--seeds", "3", "--out", str(out)))
    text = out.read_text()
    _header_ok(text)
    assert "| 3      | slim (DiSparse) " in text and "| 3      | dense + same fine-tuning " in text
    assert "(dense trained)" in text and "slim Delta_T vs dense over seeds [3]" in text


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


def test_compress_cost_result_memory_counts_each_storage_once(monkeypatch):
    """The 'result' column of --memory-only: the per-task scores (4 or 2 bytes an element of
    each task's domain), the masks (1 byte an element) and the masked model's own tensors."""
    monkeypatch.syspath_prepend(str(BENCH))
    import compress_cost as cc

    model, data, losses = cc.make_problem(2, 1, 2, 32, "tiny")
    own = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2 ** 20
    for dtype, nbytes in (("float32", 4), ("bfloat16", 2)):
        result = cc.dfx.compress(model, losses, data, cc.compress_config("element", 1, dtype))
        plan = result.plan
        got = cc.returned_mib(result, model)
        domains = sum(plan.masks[p].numel() for p in plan.prunable for _ in plan.owners[p])
        assert got["scores_mib"] == pytest.approx(domains * nbytes / 2 ** 20)
        masks = sum(m.numel() for per in plan.task_masks.values() for m in per.values())
        assert got["masks_mib"] == pytest.approx((masks + sum(m.numel() for m in plan.masks.values())) / 2 ** 20)
        assert own <= got["model_mib"] <= 3 * own  # a copy of the weights and buffers, plus the mask buffers
        assert got["returned_mib"] == pytest.approx(got["scores_mib"] + got["masks_mib"] + got["model_mib"])
        assert cc.returned_mib(result, result.model)["model_mib"] == 0  # storages already held are not counted


def test_compress_cost_memory_only_with_mmap_threshold(tmp_path):
    out = tmp_path / "memory.md"
    _check(_run("compress_cost.py", "--smoke", "--memory-only", "--malloc-mmap-threshold", "1048576",
                "--out", str(out)))
    text = out.read_text()
    assert "MALLOC_MMAP_THRESHOLD_=1048576" in text
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 4
    for row in rows:
        total, parts = row[9].split("=")
        assert abs(float(total) - sum(float(x) for x in parts.split("+"))) <= 1.5  # each rounded to 1 MiB
