"""The inspect / compress / slim / export / report subcommands: each run once in a
subprocess on a small model factory (tests/cli_models.py); help, usage errors and
--debug in-process (each subprocess imports torch, which is slow on 2 cores)."""
import pathlib
import subprocess
import sys

import pytest

import disparse_fx as dfx
from disparse_fx.cli import main
from disparse_fx.serialize import SerializationError, load

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL, DATA = "tests.cli_models:small_model", "tests.cli_models:small_data"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "disparse_fx", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


def _ok(res):
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_compress_slim_export_report_pipeline(tmp_path):
    result, slim, onnx, folder = tmp_path / "r.dfx", tmp_path / "s.dfx", tmp_path / "s.onnx", tmp_path / "report"
    out = _ok(run_cli("compress", MODEL, "--data", DATA, "--granularity", "channel", "--num-batches", "2",
                      "--out", result))
    assert "| stem.weight" in out and f"result saved to {result}" in out
    assert isinstance(load(result), dfx.CompressionResult)

    out = _ok(run_cli("slim", result, "--out", slim))
    assert "887 -> " in out and "parameters" in out
    slim_model = load(slim)
    assert sum(p.numel() for p in slim_model.parameters()) < 887

    out = _ok(run_cli("export", slim, "--out", onnx))  # input shape recorded by `slim`
    assert "output seg: max |onnxruntime - torch|" in out and "output cls:" in out
    assert f"{onnx.stat().st_size:,} bytes" in out

    out = _ok(run_cli("report", result, "--out", folder))
    assert sorted(p.name for p in folder.iterdir()) == ["graph.png", "graph.svg", "overlap.png", "report.md"]
    assert "| task seg " in (folder / "report.md").read_text()
    assert f"report: {folder / 'report.md'}" in out


def test_inspect(tmp_path):
    out = _ok(run_cli("inspect", MODEL, "--input-shape", "1,3,8,8", "--sparsity", "0.3"))
    lines = out.splitlines()
    row = next(l for l in lines if l.startswith("| stem.weight"))
    assert "shared(seg,cls)" in row and "| shared " in row and "| yes" in row
    assert "task-specific" in next(l for l in lines if l.startswith("| seg.weight"))
    assert "6 shared, 4 task-specific, 0 unused parameters" in out
    assert "def forward(self, x):" in out and "weight_mask" in out and "return {'seg'" in out


def test_inspect_a_transformer_by_head_dims():
    out = _ok(run_cli("inspect", "tests.cli_models:small_transformer", "--input-shape", "2,5,6", "--granularity",
                      "channel", "--attention", "head_dims", "--sparsity", "0.5"))
    assert "| encoder.layers.0.self_attn.in_proj_weight" in out
    assert "masked_layer_norm" in out  # residual channels removed: LayerNorm statistics over the kept ones


def test_failure_is_one_line_exit_1(tmp_path):
    res = run_cli("slim", tmp_path / "missing.dfx", "--out", tmp_path / "x.dfx")
    assert res.returncode == 1
    assert res.stderr.strip() == f"disparse-fx: error: '{tmp_path / 'missing.dfx'}': no such file"


@pytest.mark.parametrize("command, option", [("inspect", "--input-shape"), ("compress", "--num-batches"),
                                             ("slim", "--out"), ("export", "--opset"), ("report", "--format")])
def test_help(command, option, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0 and option in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["inspect", "nomodule"], "expected package.module:factory"),
    (["inspect", MODEL, "--input-shape", "1,x"], "expected positive integers"),
    (["slim", "r.dfx"], "the following arguments are required: --out"),
    (["compress", MODEL, "--out", "r.dfx"], "compress MODEL needs --data"),
    (["inspect", MODEL, "--granularity", "channel"], "inspect --granularity channel needs --input-shape"),
    (["report", "r.dfx", "--out", "f", "--format", "pdf"], "invalid choice: 'pdf'"),
])
def test_usage_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_in_process_failures_and_debug(tmp_path, capsys):
    assert main(["inspect", "tests.cli_models:not_a_model"]) == 1
    assert capsys.readouterr().err.strip() == ("disparse-fx: error: MODEL 'tests.cli_models:not_a_model' returned "
                                               "int, expected an nn.Module")
    assert main(["inspect", "tests.no_such_module:f"]) == 2  # names nothing usable: a usage error
    assert "cannot import 'tests.no_such_module'" in capsys.readouterr().err
    assert main(["inspect", "tests.cli_models:no_such_factory"]) == 2
    assert "'tests.cli_models' has no attribute 'no_such_factory'" in capsys.readouterr().err
    (tmp_path / "junk.dfx").write_bytes(b"junk")
    assert main(["report", str(tmp_path / "junk.dfx"), "--out", str(tmp_path / "f")]) == 1
    assert "not a readable disparse_fx file" in capsys.readouterr().err
    with pytest.raises(SerializationError):
        main(["--debug", "slim", str(tmp_path / "junk.dfx"), "--out", str(tmp_path / "s.dfx")])


def test_compress_data_free_with_input_shape(tmp_path, capsys):
    assert main(["compress", MODEL, "--criterion", "magnitude", "--input-shape", "2,3,8,8", "--num-batches", "1",
                 "--out", str(tmp_path / "r.dfx")]) == 0
    result = load(tmp_path / "r.dfx")
    assert result.plan.config.criterion == "magnitude" and result.plan.input_specs[0][0] == (2, 3, 8, 8)
    capsys.readouterr()
    assert main(["export", str(tmp_path / "r.dfx"), "--out", str(tmp_path / "m.onnx")]) == 0  # a masked model
    assert "output cls" in capsys.readouterr().out


def test_console_script_imports_from_the_current_folder(tmp_path):
    """The installed `disparse-fx` finds MODEL in the current folder, as `python -m` does."""
    script = pathlib.Path(sys.executable).with_name("disparse-fx")
    if not script.exists():
        pytest.skip("the disparse-fx console script is not installed next to this python")
    (tmp_path / "mymodels.py").write_text(
        "import torch.nn as nn\n\n"
        "class Two(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 2)\n\n"
        "    def forward(self, x):\n"
        "        return {'a': self.a(x), 'b': self.b(x)}\n\n"
        "def net():\n"
        "    return Two()\n")
    res = subprocess.run([str(script), "inspect", "mymodels:net", "--sparsity", "0.5"], capture_output=True,
                         text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "# Two: tasks a, b" in res.stdout


@pytest.mark.parametrize("command", ["inspect", "compress"])
def test_help_shows_defaults_equal_to_compress_config(command, capsys):
    import dataclasses

    from disparse_fx.cli import CONFIG_OPTIONS, build_parser

    defaults = {f.name: f.default for f in dataclasses.fields(dfx.CompressConfig)}
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    options = [o for o in CONFIG_OPTIONS if any(o.flag in a.option_strings for a in sub._actions)]
    assert {o.field for o in options} >= {"sparsity", "granularity", "seed"}
    for option in options:
        assert sub.get_default(option.field) == defaults[option.field], option.flag
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {defaults['sparsity']})" in text and f"(default: {defaults['seed']})" in text


@pytest.mark.parametrize("argv, message", [
    (["inspect", MODEL, "--sparsity", "90"], "argument --sparsity: must be a number in [0, 1), got 90.0"),
    (["compress", MODEL, "--data", DATA, "--num-batches", "0", "--out", "r.dfx"],
     "argument --num-batches: must be an integer >= 1 or None (up to 50), got 0"),
    (["export", "s.dfx", "--out", "s.onnx", "--opset", "0"], "argument --opset: must be an integer >= 1"),
])
def test_values_the_library_rejects_are_usage_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_failures_inside_the_users_module_name_it(tmp_path, monkeypatch, capsys):
    """An import that raises and a factory that raises: exit 1, the module or factory named."""
    (tmp_path / "raises_on_import.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp_path / "factories.py").write_text("def broken():\n    raise ValueError('boom in factory')\n")
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", "raises_on_import:f"]) == 1
    assert ("importing 'raises_on_import' for MODEL 'raises_on_import:f' raised RuntimeError: boom at import"
            in capsys.readouterr().err)
    assert main(["inspect", "factories:broken"]) == 1
    assert "MODEL factory 'factories:broken' raised ValueError: boom in factory" in capsys.readouterr().err


@pytest.mark.parametrize("capture, aten", [("fx", False), ("export", True), ("auto", False)])
def test_compress_capture_option(capture, aten, tmp_path, capsys):
    """--capture fx|export|auto (default auto) chooses how compress captures the model."""
    argv = ["compress", MODEL, "--criterion", "magnitude", "--input-shape", "2,3,8,8", "--num-batches", "1",
            "--out", str(tmp_path / "r.dfx")]
    assert main(argv + (["--capture", capture] if capture != "auto" else [])) == 0
    model = load(tmp_path / "r.dfx").model
    assert any(str(n.target).startswith("aten.") for n in model.graph.nodes) == aten
    capsys.readouterr()
    assert main(["inspect", MODEL, "--input-shape", "2,3,8,8", "--capture", capture]) == 0
    assert "graph code after mask insertion" in capsys.readouterr().out


def test_capture_option_help_and_choices(capsys):
    from disparse_fx.passes.capture import CAPTURES

    with pytest.raises(SystemExit) as info:
        main(["compress", "--help"])
    assert info.value.code == 0 and "--capture {" + ",".join(CAPTURES) + "}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["compress", MODEL, "--capture", "dynamo", "--out", "r.dfx"])
    assert info.value.code == 2 and "invalid choice: 'dynamo'" in capsys.readouterr().err


def test_an_out_path_that_is_a_folder_is_refused_before_the_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["compress", MODEL, "--data", DATA, "--out", str(tmp_path)])
    assert info.value.code == 2
    assert f"--out {tmp_path} is a folder; give the file to write, e.g. {tmp_path / 'result.dfx'}" in \
        capsys.readouterr().err
