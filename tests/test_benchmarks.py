"""Every benchmark script runs in its tiny --smoke configuration, so none of them rots.

Each runs as a subprocess (as a user would run it), single-threaded, writing into tmp_path.
"""
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
    assert (tmp_path / "quality.json").exists()


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
