"""The target-sparsity, export-parity and transformer-slim benchmark scripts run in --smoke
(so they never rot)."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script,expect", [
    ("target_sparsity.py", ["| deeplab tiny, 4 tasks", "| yes"]),
    ("export_parity.py", ["| DeepLab-ResNet tiny (4 tasks)", "| slim"]),
    ("transformer_slim.py", ["| swin_t  | heads", "| swin_t  | head_dims", "heads in 12 layers"]),
])
def test_smoke(script, expect, tmp_path):
    out = tmp_path / "result.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "- date: " in text and "- command: `python " in text and "--smoke" in text
    for fragment in expect:
        assert fragment in text
    assert "| NO" not in text  # every smoke target within tolerance
