"""The README's quickstart runs as written, and the README opens with the two commands."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_opens_with_demo_and_test_commands():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1)
    assert first_block.splitlines()[0].startswith("make demo")
    assert first_block.splitlines()[1].startswith("make test")


def test_quickstart_runs(capsys):
    code = re.search(r"## Quickstart\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "shared(seg,cls)" in out and "weight_mask" in out


def test_transformer_example_runs(capsys):
    code = re.search(r"## Transformers: heads, head dimensions, tokens\s+```python\n(.*?)```", README.read_text(),
                     re.S).group(1)
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "M parameters (from 28.0M), heads per layer [" in out


def test_budget_example_runs_on_the_quickstart_model(capsys):
    text = README.read_text()
    quickstart = re.search(r"## Quickstart\s+```python\n(.*?)```", text, re.S).group(1)
    budget = re.search(r"## Budgets: parameters, FLOPs or latency\s+.*?```python\n(.*?)```", text, re.S).group(1)
    namespace = {"__name__": "readme"}
    exec(compile(quickstart, str(README), "exec"), namespace)
    exec(compile(budget, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "budget flops: target 50.00% removed" in out and "FLOPs / sample" in out
