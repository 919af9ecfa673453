"""report / write_report: per-layer shapes before -> after, parameter and FLOP totals
per task, and a report folder with the overlap plot and the graph drawing."""
import pytest
import torch

import disparse_fx as dfx
from disparse_fx.report import report, summary_table, write_report
from disparse_fx.passes.flops import count_flops

from .zoo import ZOO_BY_NAME, example_input


def _compress(name, granularity):
    entry = ZOO_BY_NAME[name]
    config = dfx.CompressConfig(sparsity=0.5, granularity=granularity, num_batches=2, progress=False)
    return entry, dfx.compress(entry.build(), entry.task_losses, entry.batches(2), config, inputs=entry.inputs)


def _row(text, first_cell):
    line = next(l for l in text.splitlines() if l.startswith(f"| {first_cell} "))
    return [c.strip() for c in line.strip("|").split("|")]


@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_report_shapes_params_and_flops(granularity):
    entry, result = _compress("mid_trunk_branch", granularity)
    x = example_input(entry)
    slim = dfx.slim(result, (x,))
    text = report(result, example_inputs=x, slim_model=slim)
    after = dict(slim.named_parameters())
    for name, p in result.model.named_parameters():
        row = _row(text, name)
        assert row[2] == f"{'x'.join(map(str, p.shape))} -> {'x'.join(map(str, after[name].shape))}"
        assert row[1] == ("shared(early,late)" if len(result.plan.owners[name]) > 1 else
                          next(iter(result.plan.owners[name])))
        if name in result.plan.masks:
            assert row[-1] == f"{result.plan.density(name):.3f}"
    # totals: parameters and FLOPs before -> after, per task and overall
    before_f, after_f = count_flops(result.model, (x,)), count_flops(slim, (x,))
    overall = _row(text, "overall")
    n_before = sum(p.numel() for p in result.model.parameters())
    n_after = sum(p.numel() for p in slim.parameters())
    assert overall[1].startswith(f"{n_before:,} -> {n_after:,}")
    flops_cell = overall[3] if granularity == "element" else overall[2]
    assert flops_cell.startswith(f"{before_f.total:,} -> {after_f.total:,}")
    early = _row(text, "task early")
    early_params = [p for p, o in result.plan.owners.items() if "early" in o]
    assert early[1].startswith(f"{sum(result.model.get_parameter(p).numel() for p in early_params):,} -> ")
    assert any(c.startswith(f"{before_f.per_task['early']:,} -> {after_f.per_task['early']:,}") for c in early)
    if granularity == "element":
        assert "effective FLOPs, masked (% kept)" in text
        assert overall[4].startswith(f"{before_f.total:,} -> {before_f.effective_total:,}")
        assert before_f.effective_total < after_f.total <= before_f.total  # emptied channels go
    else:
        assert after_f.total < before_f.total and n_after < n_before
        assert "effective" not in text
    assert "FLOPs per sample" in text and "not counted" in text


def test_report_defaults_and_summary_unchanged():
    _, result = _compress("tied_heads", "channel")
    text = report(result, tablefmt="plain")  # slim and example inputs computed from the plan
    assert "head_a.weight" in text and "overall" in text and "|" not in text
    assert result.summary() == summary_table(result.plan)


@pytest.mark.parametrize("fmt", ["md", "html"])
def test_write_report_folder(fmt, tmp_path):
    _, result = _compress("two_heads_dict", "element")
    paths = write_report(result, tmp_path / "out", format=fmt)
    assert set(paths) == {"report", "overlap_plot", "graph_svg", "graph_png"}
    assert all(p.parent == tmp_path / "out" and p.stat().st_size > 0 for p in paths.values())
    assert paths["report"].name == f"report.{fmt}"
    text = paths["report"].read_text()
    assert "stem.weight" in text and "IoU" in text and "watershed" in text
    if fmt == "md":
        assert "![graph](graph.svg)" in text and "![mask overlap](overlap.png)" in text and "| task seg " in text
    else:
        assert text.startswith("<!DOCTYPE html>") and '<img src="graph.svg"' in text and "<table>" in text


def test_write_report_rejects_unknown_format(tmp_path):
    _, result = _compress("with_unused", "element")
    with pytest.raises(dfx.DisparseValueError, match="format must be 'md' or 'html'"):
        write_report(result, tmp_path, format="pdf")


def test_attention_heads_table_shows_each_tasks_votes():
    """A channel result on a transformer lists each attention layer's heads: before, kept
    (the union of the votes of the tasks reaching it) and each task's own votes."""
    import torch.nn.functional as F

    from disparse_fx.report import attention_table

    from .transformer_zoo import build

    model, x = build("sdpa")
    with torch.no_grad():
        targets = {t: torch.randn_like(v) for t, v in model(x).items()}
    losses = {t: (lambda key: lambda p, b: F.mse_loss(p, b[key]))(t) for t in targets}
    result = dfx.compress(model, losses, [{"input": x, **targets}], dfx.CompressConfig(
        sparsity=0.5, granularity="channel", num_batches=1, progress=False))
    headers, rows = attention_table(result.plan)
    assert headers[-3:] == ["votes[tokens]", "votes[pooled]", "votes[mid]"]
    assert [r[0] for r in rows] == [f"blocks.{i}.attn.qkv.weight" for i in range(3)]
    channels = result.plan.channels
    for row in rows:
        gid = next(g.id for g, m in channels.groups.members_of(row[0]) if m.dim == 0)  # the qkv rows
        union = torch.stack([v[gid] for v in channels.task_keep.values() if gid in v]).any(0)
        assert row[1:4] == ["heads", "4", str(int(channels.keep[gid].sum()))]
        assert int(row[3]) == int(union.sum())  # removed only if every reaching task votes so
    assert [r[-1] for r in rows][1:] == ["-", "-"]  # 'mid' branches off block 0: no vote later
    assert "## Attention heads" in dfx.report(result)
    element = dfx.compress(model, losses, [{"input": x, **targets}], dfx.CompressConfig(
        sparsity=0.5, num_batches=1, progress=False))
    assert attention_table(element.plan) is None and "## Attention heads" not in dfx.report(element)


@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_every_fraction_column_says_kept_or_removed(granularity):
    """Kept fractions (densities, after / before) and removed fractions (sparsity, the
    budget's 'removed') sit in the same report: each header says which it holds."""
    _, result = _compress("two_heads_dict", granularity)
    text = report(result)
    headers = {}
    for line in text.splitlines():
        if line.startswith("| ") and not set(line) <= set("|-: "):
            cells = [c.strip() for c in line.strip("|").split("|")]
            headers.setdefault(cells[0], cells)  # the first row of each table: its headers
    per_layer = headers["parameter"]
    assert per_layer[3:] == ["kept[seg]", "kept[cls]", "kept (final)"]
    totals = headers["scope"]
    assert all(h.endswith("(% kept)") for h in totals[1:]) and len(totals) == (5 if granularity == "element" else 3)
    overall = _row(text, "overall")
    n_before = sum(p.numel() for p in result.model.parameters())
    n_after = sum(p.numel() for p in dfx.slim(result).parameters())
    assert overall[1].endswith(f"({n_after / n_before:.1%})")  # after / before: the kept share
    if granularity == "channel":
        assert headers["quantity"] == ["quantity", "before", "after (slim)", "removed"]
        removed = _row(text, "parameters")[3]
        assert removed == f"{1 - n_after / n_before:.1%}"
    assert "sparsity (fraction removed): target 0.5000" in text
    summary = result.summary()
    assert "| kept[seg] " in summary and "kept (final)" in summary and "density" not in summary
    assert "sparsity (fraction removed)" in summary
