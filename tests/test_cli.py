"""The command line: demo end to end, help, exit codes."""
import json
import subprocess
import sys

import pytest

from disparse_fx.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "disparse_fx", *args], capture_output=True, text=True, timeout=600)


def test_demo_fast_mode(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("DISPARSE_FX_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--fast", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    for row in ("parameters", "FLOPs / image", "CPU latency, onnxruntime, batch 8", "segment miou", "Delta_T",
                "dense + same fine-tuning", "pruning's own cost", "graph.svg", "report.md"):
        assert row in out
    assert (tmp_path / "demo" / "slim.onnx").exists() and (tmp_path / "demo" / "summary.md").exists()
    saved = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert saved["seed"] == 0 and set(saved["metrics"]["slim"]) == {"edge", "keypoint", "segment", "denoise"}
    assert set(saved["metrics"]) == {"dense", "slim", "dense_finetuned"} and "delta_t_vs_dense_finetuned" in saved
    assert saved["params"]["slim"] < saved["params"]["dense"] and saved["flops"]["slim"] < saved["flops"]["dense"]
    photos = [line for line in out.splitlines() if "test photographs" in line]
    # the second run loads the cached dense checkpoint instead of training again
    assert main(["demo", "--fast", "--out", str(tmp_path / "demo")]) == 0
    assert "loaded the cached checkpoint" in capsys.readouterr().out
    # another seed trains another model, but on the same data split: the same test photographs
    assert main(["demo", "--fast", "--seed", "1", "--out", str(tmp_path / "demo1")]) == 0
    out1 = capsys.readouterr().out
    assert "trained" in out1 and [line for line in out1.splitlines() if "test photographs" in line] == photos
    assert json.loads((tmp_path / "demo1" / "metrics.json").read_text())["seed"] == 1


def test_help_and_usage_errors():
    assert run_cli("--help").returncode == 0
    assert "--sparsity" in run_cli("demo", "--help").stdout
    bad = run_cli("demo", "--criterion", "l1")
    assert bad.returncode == 2 and "invalid choice: 'l1'" in bad.stderr


def test_options_the_config_rejects_are_usage_errors_exit_2():
    res = run_cli("demo", "--sparsity", "1.5")
    assert res.returncode == 2
    assert res.stderr.strip().endswith("disparse-fx demo: error: argument --sparsity: must be a number in [0, 1), "
                                       "got 1.5")


def test_bad_demo_option_fails_before_any_work(capsys):
    for option in ("--dense-steps", "--threads"):
        with pytest.raises(SystemExit) as info:
            main(["demo", option, "0"])
        assert info.value.code == 2
        assert f"error: argument {option}: must be an integer >= 1, got '0'" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--debug"])
def test_debug_shows_traceback(flag, tmp_path):
    res = run_cli(flag, "slim", str(tmp_path / "missing.dfx"), "--out", str(tmp_path / "s.dfx"))
    assert res.returncode == 1 and "Traceback" in res.stderr
