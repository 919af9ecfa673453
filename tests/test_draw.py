"""draw: files written, one box per compute node (or per collapsed block), owners and
widths; the layered layout (edges go down, few crossings, heads side by side), repeated
blocks, and the graphviz path."""
import shutil
import subprocess

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import disparse_fx as dfx
from disparse_fx.draw import Drawing, draw
from disparse_fx.layout import count_crossings, layered_layout
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
    with pytest.raises(dfx.DisparseValueError, match=r"\.svg, \.png or \.dot"):
        draw(gm, tmp_path / "g.pdf")
    with pytest.raises(dfx.DisparseValueError, match="collapse"):
        draw(gm, tmp_path / "g.svg", collapse=0)
    with pytest.raises(dfx.DisparseValueError, match="CompressionResult or an fx.GraphModule"):
        draw(ZOO[0].build(), tmp_path / "g.svg")


def test_resnet50_trunk_collapses_to_blocks(tmp_path):
    from disparse_fx.zoo import multitask_from_torchvision

    model = multitask_from_torchvision("resnet50", {"seg": ("dense", 3), "cls": ("classify", 5)})
    gm = trace_model(model)
    drawing = draw(gm, [tmp_path / "r50.svg", tmp_path / "r50.png"], repeats=False)
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
    # and with the repeated blocks of each stage merged: block 0 (with its downsample) + the rest
    merged = draw(gm, tmp_path / "r50m.png", collapse=3, repeats=True)
    assert merged.depth == 3 and merged.repeats
    assert [n.name for n in merged.nodes if n.name.startswith("trunk.layer")] == [
        "trunk.layer1.0", "trunk.layer1.1-2 x2", "trunk.layer2.0", "trunk.layer2.1-3 x3",
        "trunk.layer3.0", "trunk.layer3.1-5 x5", "trunk.layer4.0", "trunk.layer4.1-2 x2"]
    repeat = {n.name: n for n in merged.nodes}["trunk.layer3.1-5 x5"]
    assert repeat.repeat == 5 and len(repeat.members) == 5 * 10 and repeat.width_before == 1024
    # by default: the most detailed drawing within 60 boxes
    default = draw(gm, tmp_path / "r50d.png")
    assert len(default.nodes) <= 60 and default.repeats and default.crossings == 0


# ----------------------------------------------------------------------------- layout
@pytest.fixture(scope="module")
def demo_graph():
    """The demo's model (``python -m disparse_fx demo``), traced."""
    from disparse_fx.zoo import DEFAULT_TASKS, deeplab_resnet

    return trace_model(deeplab_resnet(DEFAULT_TASKS, size="tiny"))


def _assert_edges_go_down(drawing):
    layer = {n.name: n.layer for n in drawing.nodes}
    upward = [(a, b) for a, b in drawing.edges if not layer[a] < layer[b]]
    assert not upward, f"edges that do not go down: {upward[:5]}"


@pytest.mark.parametrize("entry", ZOO, ids=lambda e: e.name)
def test_every_edge_goes_down_on_the_zoo(entry, tmp_path):
    drawing = draw(trace_model(entry.build()), tmp_path / "g.png", engine="matplotlib")
    _assert_edges_go_down(drawing)
    tasks = [n for n in drawing.nodes if n.kind == "task"]
    assert {n.layer for n in tasks} == {max(n.layer for n in drawing.nodes)}  # task outputs on the last row


@pytest.mark.parametrize("options", [{}, {"collapse": None, "repeats": False}, {"collapse": 4}, {"collapse": 3}],
                         ids=["auto", "every-node", "depth-4", "depth-3"])
def test_demo_model_is_layered_without_crossings(demo_graph, options, tmp_path):
    """Measured: 0 crossings at every setting (the left-to-right drawing this layout
    replaced had 8 straight-line crossings at its default depth 4 and 132 with one box per
    node, plus edges running backwards through its columns)."""
    drawing = draw(demo_graph, tmp_path / "demo.png", engine="matplotlib", **options)
    _assert_edges_go_down(drawing)
    assert drawing.crossings == 0
    assert (tmp_path / "demo.png").read_bytes().startswith(PNG_MAGIC)


def test_demo_heads_side_by_side_in_frames_holding_only_their_head(demo_graph, tmp_path):
    drawing = draw(demo_graph, tmp_path / "demo.png", engine="matplotlib")
    tasks = list(task_output_nodes(demo_graph))

    def extent(nodes):
        return (min(n.x - n.width / 2 for n in nodes), max(n.x + n.width / 2 for n in nodes),
                min(n.layer for n in nodes), max(n.layer for n in nodes))

    heads = {t: extent([n for n in drawing.nodes if n.owners == {t}]) for t in tasks}
    lefts = [heads[t][0] for t in tasks]
    assert lefts == sorted(lefts)  # in task order, left to right
    for a, b in zip(tasks, tasks[1:]):
        assert heads[a][1] < heads[b][0]  # no horizontal overlap...
        assert heads[a][2] <= heads[b][3] and heads[b][2] <= heads[a][3]  # ...on the same rows
    trunk = extent([n for n in drawing.nodes if n.owners == set(tasks)])
    assert trunk[3] < min(h[2] for h in heads.values())  # the trunk sits above every head
    for t, (x0, x1, first, last) in heads.items():
        intruders = [n.name for n in drawing.nodes if n.owners != {t} and first <= n.layer <= last
                     and n.x + n.width / 2 > x0 and n.x - n.width / 2 < x1]
        assert not intruders, f"head {t}'s frame holds {intruders}"


def test_layout_primitives():
    assert count_crossings([["a", "b"], ["c", "d"]], [("a", "d"), ("b", "c")]) == 1
    assert count_crossings([["a", "b"], ["c", "d"]], [("a", "c"), ("a", "d"), ("b", "d")]) == 0
    with pytest.raises(dfx.DisparseValueError, match="consecutive rows"):
        count_crossings([["a"], ["b"], ["c"]], [("a", "c")])
    with pytest.raises(dfx.DisparseValueError, match="acyclic"):
        layered_layout(["a", "b"], [("a", "b"), ("b", "a")], band_of={"a": 0, "b": 0}, band_order=[0],
                       width={"a": 1.0, "b": 1.0})
    # a long edge gets a point per layer it passes; bands stand side by side in band order
    lay = layered_layout(["s", "a1", "a2", "b", "out"], [("s", "a1"), ("a1", "a2"), ("s", "b"), ("a2", "out")],
                         band_of={"s": "trunk", "a1": "A", "a2": "A", "b": "B", "out": "A"},
                         band_order=["B", "trunk", "A"], width=dict.fromkeys(["s", "a1", "a2", "b", "out"], 1.0),
                         sinks=["out"])
    assert lay.layer == {"s": 0, "a1": 1, "a2": 2, "b": 1, "out": 3}
    assert lay.x["b"] + 0.5 < lay.x["a1"] - 0.5  # band B left of band A
    assert [layer for _, layer in lay.routes[("s", "b")]] == [0, 1]


# ----------------------------------------------------------------------------- repeats
class _Block(nn.Module):
    def __init__(self, channels: int, project: bool = False):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.project = nn.Conv2d(channels, channels, 1) if project else None

    def forward(self, x):
        skip = x if self.project is None else self.project(x)
        return torch.relu(self.bn(self.conv(x)) + skip)


class _Repeated(nn.Module):
    """A stem, a stage of blocks (the first projects its skip), two heads."""

    def __init__(self, first_projects: bool):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stage = nn.Sequential(_Block(8, first_projects), _Block(8), _Block(8))
        self.seg, self.cls = nn.Conv2d(8, 2, 1), nn.Linear(8, 4)

    def forward(self, x):
        h = self.stage(self.stem(x))
        return {"seg": self.seg(h), "cls": self.cls(h.mean((2, 3)))}


@pytest.mark.parametrize("first_projects", [False, True])
def test_repeated_blocks_collapse_when_asked_or_above_max_boxes(first_projects, tmp_path):
    gm = trace_model(_Repeated(first_projects))
    plain = draw(gm, tmp_path / "plain.png", collapse=None, repeats=False)
    assert not plain.repeats and all(n.repeat == 1 for n in plain.nodes)
    merged = draw(gm, tmp_path / "merged.png", collapse=None, repeats=True)
    name = "stage.1-2 x2" if first_projects else "stage x3"
    box = {n.name: n for n in merged.nodes}[name]
    blocks = 2 if first_projects else 3
    assert box.repeat == blocks and len(box.members) == 4 * blocks  # conv, bn, add, relu per block
    assert box.width_before == 8 and box.params_before == blocks * (8 * 8 * 9 + 8 + 16)
    assert len(merged.nodes) == len(plain.nodes) - 4 * blocks + 1
    assert (("relu", "stage.1-2 x2") if first_projects else ("stem", "stage x3")) in merged.edges
    _assert_edges_go_down(merged)
    # "auto": only when the boxes do not fit max_boxes
    assert not draw(gm, tmp_path / "auto.png").repeats
    squeezed = draw(gm, tmp_path / "auto.png", max_boxes=len(merged.nodes))
    assert squeezed.repeats and squeezed.depth is None and name in {n.name for n in squeezed.nodes}
    with pytest.raises(dfx.DisparseValueError, match="repeats must be"):
        draw(gm, tmp_path / "g.png", repeats="yes")


def test_a_module_called_twice_in_a_block_is_split_not_cyclic(demo_graph, tmp_path):
    # depth 4 puts both calls of a block's ReLU module in one box, which data leaves and re-enters
    drawing = draw(demo_graph, tmp_path / "d4.png", collapse=4, repeats=False)
    names = {n.name for n in drawing.nodes}
    assert {"backbone.layer1.0.relu", "backbone.layer1.0.relu #2"} <= names
    _assert_edges_go_down(drawing)


# ----------------------------------------------------------------------------- engines
class _FakeDot:
    """Stands in for subprocess.run of graphviz's dot: records calls, writes the -o file."""

    def __init__(self, returncode=0):
        self.calls, self.returncode = [], returncode

    def __call__(self, args, input=None, **kwargs):
        self.calls.append((list(args), input))
        if self.returncode == 0:
            with open(args[args.index("-o") + 1], "w") as f:
                f.write("<svg>drawn by dot</svg>")
        return subprocess.CompletedProcess(args, self.returncode, "", "Error: syntax error")


def test_dot_renders_when_it_is_on_the_path(monkeypatch, tmp_path):
    fake = _FakeDot()
    monkeypatch.setattr(shutil, "which", lambda name: "/opt/graphviz/bin/dot" if name == "dot" else None)
    monkeypatch.setattr(subprocess, "run", fake)
    gm = trace_model(ZOO_BY_NAME["two_heads_dict"].build())
    drawing = draw(gm, [tmp_path / "g.svg", tmp_path / "g.png", tmp_path / "g.dot"])
    assert drawing.engine == "dot"
    assert [args[:2] for args, _ in fake.calls] == [["/opt/graphviz/bin/dot", "-Tsvg"],
                                                    ["/opt/graphviz/bin/dot", "-Tpng"]]
    source = fake.calls[0][1]
    assert source == (tmp_path / "g.dot").read_text()
    assert source.startswith("digraph") and "rankdir=TB" in source
    assert source.count("subgraph cluster_") == 3  # shared trunk, head seg, head cls
    assert 'label="head seg"' in source and 'label="shared trunk"' in source
    assert '"relu_1" -> "task:seg";' not in source and '"stem" -> "bn";' in source
    assert (tmp_path / "g.svg").read_text() == "<svg>drawn by dot</svg>"


def test_without_dot_or_when_dot_fails_matplotlib_draws(monkeypatch, tmp_path):
    gm = trace_model(ZOO_BY_NAME["two_heads_dict"].build())
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("dot is not installed"))
    drawing = draw(gm, tmp_path / "g.png")
    assert drawing.engine == "matplotlib" and (tmp_path / "g.png").read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(dfx.DisparseValueError, match="engine='dot' needs graphviz"):
        draw(gm, tmp_path / "g.png", engine="dot")
    draw(gm, tmp_path / "g.dot")  # the graphviz source needs no dot
    assert (tmp_path / "g.dot").read_text().startswith("digraph")

    failing = _FakeDot(returncode=1)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/dot")
    monkeypatch.setattr(subprocess, "run", failing)
    drawing = draw(gm, tmp_path / "h.png")
    assert len(failing.calls) == 1 and drawing.engine == "matplotlib"
    assert (tmp_path / "h.png").read_bytes().startswith(PNG_MAGIC)
    assert draw(gm, tmp_path / "m.png", engine="matplotlib").engine == "matplotlib"
    assert len(failing.calls) == 1


# ----------------------------------------------------------------------------- sizes after
def test_draw_does_not_slim_a_channel_plan_gives_the_widths_after(monkeypatch, tmp_path):
    import disparse_fx.passes.slim as passes_slim

    entry = ZOO_BY_NAME["two_heads_dict"]
    result = _compress(entry, "channel")
    slim = dfx.slim(result)
    with_slim = draw(result, tmp_path / "a.png", slim_model=slim)
    monkeypatch.setattr(dfx, "slim", lambda *a, **k: pytest.fail("draw slimmed"))
    monkeypatch.setattr(passes_slim, "slim_channels", lambda *a, **k: pytest.fail("draw slimmed"))
    from_plan = draw(result, tmp_path / "b.png")
    assert [(n.name, n.width_before, n.width_after, n.params_after) for n in from_plan.nodes] == \
        [(n.name, n.width_before, n.width_after, n.params_after) for n in with_slim.nodes]
    assert from_plan.nodes[1].width_after == slim.stem.out_channels < 8
    element = _compress(entry, "element")
    drawn = draw(element, tmp_path / "c.png")  # an element plan: no widths after without the slim model
    assert all(n.width_after is None and n.params_after is None for n in drawn.nodes)
