"""draw: files written, one box per compute node (or per collapsed block), owners and widths."""
import pytest
import torch.fx as fx

import disparse_fx as dfx
from disparse_fx.draw import Drawing, draw
from disparse_fx.passes.trace import task_output_nodes, trace_model

from .zoo import ZOO, ZOO_BY_NAME

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _compress(entry, granularity):
    config = dfx.CompressConfig(sparsity=0.5, granularity=granularity, num_batches=2, progress=False)
    return dfx.compress(entry.build(), entry.task_losses, entry.batches(2), config, inputs=entry.inputs)


def _expected_boxes(gm: fx.GraphModule) -> int:
    """One box per compute node of the dense graph, per input, per task."""
    ops = [n for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return len(ops) + len(inputs) + len(task_output_nodes(gm))


@pytest.mark.parametrize("entry", ZOO, ids=lambda e: e.name)
def test_one_box_per_node_on_the_zoo(entry, tmp_path):
    gm = trace_model(entry.build())
    drawing = draw(gm, tmp_path / "g.png", collapse=None)
    assert isinstance(drawing, Drawing) and drawing.depth is None
    assert len(drawing.nodes) == _expected_boxes(gm)
    assert sorted(n.name for n in drawing.nodes if n.kind == "task") == \
        sorted(f"task:{t}" for t in task_output_nodes(gm))
    names = {n.name for n in drawing.nodes}
    assert all(a in names and b in names for a, b in drawing.edges)
    data = (tmp_path / "g.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000


@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_masked_result_draws_like_its_dense_graph_with_widths_after(granularity, tmp_path):
    entry = ZOO_BY_NAME["two_heads_dict"]
    result = _compress(entry, granularity)
    slim = dfx.slim(result)
    drawing = draw(result, tmp_path / "result", slim_model=slim)  # no suffix: SVG and PNG
    assert [p.suffix for p in drawing.paths] == [".svg", ".png"]
    svg = (tmp_path / "result.svg").read_text()
    assert "<svg" in svg and len(svg) > 5000
    assert (tmp_path / "result.png").read_bytes().startswith(PNG_MAGIC)
    # mask plumbing is not drawn: x, stem, bn, relu, body, relu, seg, mean, cls + 2 tasks
    assert len(drawing.nodes) == 11 == _expected_boxes(trace_model(entry.build()))
    by_owner = {}
    for n in drawing.nodes:
        by_owner.setdefault(n.owners, []).append(n.kind)
    assert by_owner[frozenset({"seg"})] == ["op", "task"]
    assert by_owner[frozenset({"cls"})] == ["op", "op", "task"]  # mean, cls
    assert by_owner[frozenset({"seg", "cls"})] == ["input"] + ["op"] * 5
    widths = [(n.width_before, n.width_after) for n in drawing.nodes if n.width_before is not None]
    assert widths[-2:] == [(3, 3), (4, 4)]  # heads keep their outputs
    assert widths[0] == (8, slim.stem.out_channels if granularity == "channel" else 8)
    if granularity == "channel":
        assert widths[0][1] < 8 and "width 8 -> " in next(n.label for n in drawing.nodes if n.width_before)
    assert sum(n.params_after for n in drawing.nodes if n.params_after) == sum(p.numel() for p in slim.parameters())


def test_bad_arguments(tmp_path):
    gm = trace_model(ZOO[0].build())
    with pytest.raises(dfx.DisparseValueError, match=r"\.svg or \.png"):
        draw(gm, tmp_path / "g.pdf")
    with pytest.raises(dfx.DisparseValueError, match="collapse"):
        draw(gm, tmp_path / "g.svg", collapse=0)
    with pytest.raises(dfx.DisparseValueError, match="CompressionResult or an fx.GraphModule"):
        draw(ZOO[0].build(), tmp_path / "g.svg")


def test_resnet50_trunk_collapses_to_blocks(tmp_path):
    from disparse_fx.zoo import multitask_from_torchvision

    model = multitask_from_torchvision("resnet50", {"seg": ("dense", 3), "cls": ("classify", 5)})
    drawing = draw(trace_model(model), [tmp_path / "r50.svg", tmp_path / "r50.png"])
    # 177 compute nodes do not fit 60 boxes; depth 3 = one box per bottleneck block:
    # input, stem conv1/bn1/relu/maxpool, 3+4+6+3 blocks, seg head 0/1/2, cls head 0/1, 2 tasks
    assert drawing.depth == 3
    assert len(drawing.nodes) == 1 + 4 + 16 + 3 + 2 + 2 == 28
    blocks = [n for n in drawing.nodes if n.name.startswith("trunk.layer")]
    assert [n.name for n in blocks] == [f"trunk.layer{i}.{j}" for i, k in enumerate((3, 4, 6, 3), 1)
                                        for j in range(k)]
    assert all(n.owners == {"seg", "cls"} for n in blocks)
    widths = {n.name: n.width_before for n in blocks}  # the block's last conv (conv3 or downsample)
    assert [widths[f"trunk.layer{i}.0"] for i in (1, 2, 3, 4)] == [256, 512, 1024, 2048]
    assert all(len(n.members) >= 10 for n in blocks)  # conv/bn/relu x3 + residual add (+ downsample)
    heads = [n for n in drawing.nodes if n.name.startswith("heads.")]
    assert {n.name: set(n.owners) for n in heads} == {
        "heads.seg.0": {"seg"}, "heads.seg.1": {"seg"}, "heads.seg.2": {"seg"},
        "heads.cls.0": {"cls"}, "heads.cls.1": {"cls"}}
    assert len(drawing.edges) == 27  # a chain of blocks that forks into two heads
    assert (tmp_path / "r50.svg").stat().st_size > 20000
    assert (tmp_path / "r50.png").read_bytes().startswith(PNG_MAGIC)
