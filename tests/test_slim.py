"""Slimming over the CNN zoo: masked(x) == slim(x), parameters drop, the graph lints,
task outputs keep their shapes, the input is untouched; plus the pass's guarantees."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import disparse_fx as dfx
from disparse_fx.passes.channel_groups import find_channel_groups
from disparse_fx.passes.errors import DisparseValueError, PostconditionError
from disparse_fx.passes.insert_channel_masks import insert_channel_masks, is_channel_mask
from disparse_fx.passes.slim import channels_emptied_by, check_parity, slim_channels
from disparse_fx.passes.trace import trace_model

from .cnn_zoo import CNN_ZOO, build


def random_keep(groups, p: float = 0.5, seed: int = 0):
    """Keep each channel of each removable group with probability ``p`` (legal keep)."""
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for g in groups.removable_groups():
        k = torch.rand(g.size, generator=gen) < p
        if not k.any():
            k[torch.randint(g.size, (1,), generator=gen)] = True
        for s in g.keep_one_of:
            if not k[s].any():
                k[s[0]] = True
        keep[g.id] = k
    flat = torch.ones(groups.num_channels, dtype=torch.bool)
    for gid, k in keep.items():
        flat[groups.offsets[gid]:groups.offsets[gid] + groups.groups[gid].size] = k
    for s in groups.nonempty:
        if not flat[s].any():
            first = int(s[0])
            gid = max(i for i, o in enumerate(groups.offsets) if o <= first)
            keep[gid][first - groups.offsets[gid]] = True
            flat[first] = True
    return keep


def snapshot(module: nn.Module):
    return ({k: v.clone() for k, v in module.state_dict().items()},
            [(n, m.training) for n, m in module.named_modules()],
            [(n, p.requires_grad) for n, p in module.named_parameters()])


def assert_same(a, b):
    assert a[0].keys() == b[0].keys()
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
    assert a[1] == b[1] and a[2] == b[2]


def outputs(model, x):
    with torch.no_grad():
        out = model(x)
    return dict(out) if isinstance(out, dict) else dict(enumerate(out))


@pytest.fixture(params=sorted(CNN_ZOO))
def zoo_case(request):
    model, x = build(request.param)
    gm = trace_model(model)
    return request.param, gm, x


@pytest.mark.parametrize("seed", [0, 1])
def test_masked_equals_slim_over_zoo(zoo_case, seed):
    name, gm, x = zoo_case
    groups = find_channel_groups(gm, (x,))
    keep = random_keep(groups, seed=seed)
    assert keep, f"{name}: no removable group"
    before = snapshot(gm)
    code = gm.code
    masked = insert_channel_masks(gm, groups, keep)
    slim = slim_channels(gm, groups, keep)
    assert_same(before, snapshot(gm))
    assert gm.code == code
    # invariant: the masked model computes the slim model (eval); shapes unchanged
    ref, got, orig = outputs(masked.eval(), x), outputs(slim.eval(), x), outputs(gm, x)
    assert ref.keys() == got.keys() == orig.keys()
    for k in ref:
        assert got[k].shape == orig[k].shape, (name, k)
        scale = ref[k].abs().max().clamp_min(1e-6)
        assert (ref[k] - got[k]).abs().max() <= 1e-4 * scale, (name, k)
    # parameters strictly drop; graph lints; no mask left
    n0 = sum(p.numel() for p in gm.parameters())
    n1 = sum(p.numel() for p in slim.parameters())
    assert n1 < n0, name
    expected = sum(groups.params_after(keep)[n] for n in groups.param_shapes if n not in groups.buffers)
    expected += sum(p.numel() for n, p in gm.named_parameters() if n not in groups.param_shapes)
    assert n1 == expected
    slim.graph.lint()
    assert not any(is_channel_mask(n) for n in slim.graph.nodes)
    assert any(is_channel_mask(n) for n in masked.graph.nodes)


def test_slim_accepts_masked_model_and_checks_its_masks():
    model, x = build("residual")
    gm = trace_model(model)
    groups = find_channel_groups(gm, (x,))
    keep = random_keep(groups)
    masked = insert_channel_masks(gm, groups, keep)
    slim = slim_channels(masked, groups, keep)
    assert not hasattr(slim, "channel_masks")
    assert hasattr(masked, "channel_masks")  # input untouched
    other = random_keep(groups, seed=5)
    with pytest.raises(DisparseValueError, match="do not match keep"):
        slim_channels(masked, groups, other)


def test_slim_model_trains_saves_and_copies():
    model, x = build("shuffle")
    gm = trace_model(model)
    groups = find_channel_groups(gm, (x,))
    slim = slim_channels(gm, groups, random_keep(groups))
    slim.train()
    out = slim(x)
    sum(v.float().pow(2).mean() for v in out.values()).backward()
    assert all(p.grad is not None for p in slim.parameters() if p.requires_grad)
    clone = copy.deepcopy(slim).eval()
    fresh = copy.deepcopy(slim)
    fresh.load_state_dict(slim.state_dict())
    slim.eval()
    for k, v in outputs(slim, x).items():
        assert torch.allclose(v, outputs(clone, x)[k])


def test_parameters_keep_dtype_and_parity_runs_in_float32():
    model, x = build("se")
    gm = trace_model(model.double())
    groups = find_channel_groups(gm, (x.double(),))
    slim = slim_channels(gm, groups, random_keep(groups))
    assert {p.dtype for p in slim.parameters()} == {torch.float64}
    assert slim(x.double())["seg"].dtype == torch.float64


def test_bad_keep_is_rejected():
    model, x = build("residual")
    gm = trace_model(model)
    groups = find_channel_groups(gm, (x,))
    g = groups.removable_groups()[0]
    fixed = next(gr for gr in groups.groups if not gr.removable)
    with pytest.raises(DisparseValueError, match="not removable"):
        slim_channels(gm, groups, {fixed.id: torch.zeros(fixed.size, dtype=torch.bool).index_fill(0, torch.tensor([0]), True)})
    with pytest.raises(DisparseValueError, match="keep at least one"):
        slim_channels(gm, groups, {g.id: torch.zeros(g.size, dtype=torch.bool)})
    with pytest.raises(DisparseValueError, match="shape"):
        slim_channels(gm, groups, {g.id: torch.ones(g.size + 1, dtype=torch.bool)})
    with pytest.raises(DisparseValueError, match="unknown group"):
        slim_channels(gm, groups, {len(groups.groups): torch.ones(1, dtype=torch.bool)})


def test_split_pieces_must_not_be_emptied():
    model, x = build("split")
    gm = trace_model(model)
    groups = find_channel_groups(gm, (x,))
    constrained = [g for g in groups.removable_groups() if g.keep_one_of]
    assert constrained, "the chunk / split pieces should constrain the stem group"
    g = constrained[0]
    k = torch.ones(g.size, dtype=torch.bool)
    k[g.keep_one_of[0]] = False
    with pytest.raises(DisparseValueError, match="split piece"):
        slim_channels(gm, groups, {g.id: k})


def test_parity_check_catches_a_wrong_model():
    model, x = build("residual")
    gm = trace_model(model)
    groups = find_channel_groups(gm, (x,))
    keep = random_keep(groups)
    slim = slim_channels(gm, groups, keep)
    with pytest.raises(PostconditionError, match="slim_channels: output"):
        check_parity(gm, slim, groups)  # the unmasked model is not what slim computes


def test_structure_of_the_slim_residual_net():
    model, x = build("residual")
    gm = trace_model(model)
    groups = find_channel_groups(gm, (x,))
    trunk = next(g for g in groups.removable_groups() if "stem.0.weight" in g.params)
    keep = {trunk.id: torch.arange(trunk.size) < 3}
    slim = slim_channels(gm, groups, keep)
    m = slim.get_submodule
    assert m("stem.0").out_channels == 3 and m("stem.1").num_features == 3
    assert m("b1.0.0").in_channels == 3 and m("b2.1").out_channels == 3
    assert slim.seg.in_channels == 3 and slim.cls.in_features == 3
    assert slim.reg.in_features == 3 * 4  # flatten: each channel owns a 2x2 block
    assert m("b1.0.0").out_channels == 8  # inner channels untouched
    # golden generated code: slimming keeps the graph (only shapes change)
    assert slim.code == gm.code


def test_depthwise_and_grouped_convs_keep_their_structure():
    model, x = build("grouped")
    gm = trace_model(model)
    groups = find_channel_groups(gm, (x,))
    slim = slim_channels(gm, groups, random_keep(groups, seed=3))
    dw, gc, up, gct = slim.get_submodule("dw.0"), slim.get_submodule("gc.0"), slim.up, slim.gct
    assert dw.groups == dw.in_channels and dw.out_channels == 2 * dw.in_channels
    assert gc.groups == 4 and gc.in_channels % 4 == 0 and gc.out_channels % 4 == 0
    assert up.groups == up.in_channels
    assert gct.groups == 2


def test_group_norm_removes_whole_norm_groups():
    model, x = build("norm")
    gm = trace_model(model)
    groups = find_channel_groups(gm, (x,))
    g = next(gr for gr in groups.groups if "gn.weight" in gr.params)
    assert g.removable and g.size == 4  # 4 norm groups of 4 channels
    slim = slim_channels(gm, groups, {g.id: torch.tensor([True, False, True, False])})
    assert slim.gn.num_groups == 2 and slim.gn.num_channels == 8
    assert slim.act.num_parameters == 8 and slim.c1.out_channels == 8


def test_flatten_view_sizes_are_rewritten():
    model, x = build("flatten")
    gm = trace_model(model)
    groups = find_channel_groups(gm, (x,))
    g = next(gr for gr in groups.groups if "kernel" in gr.params and gr.removable and
             any(m.param_name == "fc.weight" for m in gr.members))
    keep = {g.id: torch.arange(g.size) % 2 == 1}
    slim = slim_channels(gm, groups, keep)
    assert slim.fc.in_features == 4 * 16
    assert "view(-1, 64)" in slim.code


def test_channels_emptied_by_element_masks():
    model, x = build("residual")
    gm = trace_model(model)
    groups = find_channel_groups(gm, (x,))
    inner = next(g for g in groups.removable_groups()
                 if any(m.param_name == "b2.0.0.weight" and m.dim == 0 for m in g.members))
    # zero the weight slices reading inner channels 0 and 3: b2.1 reads them
    masks = {"b2.1.weight": torch.ones(8, 16, 3, 3, dtype=torch.bool)}
    masks["b2.1.weight"][:, [0, 3]] = False
    keep = channels_emptied_by(groups, masks)
    assert set(keep) == {inner.id}
    assert keep[inner.id].tolist() == [i not in (0, 3) for i in range(16)]
    # exact: the model with those weights zeroed equals its slim version
    folded = copy.deepcopy(gm)
    with torch.no_grad():
        folded.get_submodule("b2.1").weight.mul_(masks["b2.1.weight"])
    slim = slim_channels(folded, groups, keep)
    for k, v in outputs(folded, x).items():
        assert torch.allclose(v, outputs(slim, x)[k], atol=1e-5)
    # producer-side masks alone never empty a channel (bias / BatchNorm shift remain)
    prod = {"b2.0.0.weight": torch.zeros(16, 8, 3, 3, dtype=torch.bool)}
    assert channels_emptied_by(groups, prod) == {}


def test_parity_check_holds_for_random_ops_baked_into_the_graph():
    """A graph traced in train mode keeps torchvision's stochastic depth random in eval
    mode; the parity check runs masked and slim models on one random stream."""
    import torchvision

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(6, 8), nn.Linear(8, 6), nn.Linear(6, 2)

        def forward(self, x):
            branch = torchvision.ops.stochastic_depth(self.b(torch.relu(self.a(x))), 0.5, "row", True)
            return {"y": self.head(x + branch)}

    gm = trace_model(Residual())
    groups = find_channel_groups(gm, (torch.randn(4, 6),))
    for seed in range(5):
        slim_channels(gm, groups, random_keep(groups, p=0.5, seed=seed))  # raises on a mismatch


class ClassToken(nn.Module):
    """A class token expanded to the batch size read at run time, joined to the tokens:
    compressed on a batch of 1, where the expand's batch size equals the token's 1."""

    def __init__(self, c=16):
        super().__init__()
        self.embed = nn.Linear(8, c)
        self.cls_token = nn.Parameter(torch.randn(1, 1, c))
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.a, self.b = nn.Linear(c, 3), nn.Linear(c, 2)

    def forward(self, x):  # (N, L, 8)
        h = self.embed(x)
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), h], dim=1)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return {"a": self.a(h[:, 0]), "b": self.b(h[:, 1:])}


def test_slim_keeps_batch_sizes_read_at_run_time_when_compressed_on_one_sample():
    torch.manual_seed(0)
    model = ClassToken()
    data = [{"input": torch.randn(1, 5, 8), "a": torch.randn(1, 3), "b": torch.randn(1, 5, 2)}]
    losses = {t: (lambda t: lambda p, b: F.mse_loss(p, b[t]))(t) for t in ("a", "b")}
    result = dfx.compress(model, losses, data, dfx.CompressConfig(
        sparsity=0.5, granularity="channel", criterion="magnitude", num_batches=1, progress=False))
    slim = dfx.slim(result)
    assert slim.cls_token.shape[-1] < 16  # the residual width (and the token with it) was cut
    x = torch.randn(3, 5, 8)
    for t, v in result.model.eval()(x).items():
        torch.testing.assert_close(slim.eval()(x)[t], v, atol=1e-5, rtol=1e-4)
