"""The masked GraphModule: readable rewrite, exact masking, trains and saves like a module."""
import copy
import io
import operator

import pytest
import torch

import disparse_fx as dfx
from disparse_fx.passes.insert_masks import insert_masks, masked_params
from disparse_fx.passes.trace import trace_model

from .zoo import ZOO, ZOO_BY_NAME, example_input, outputs_by_task


def compress(entry, **cfg):
    model = entry.build()
    cfg = {"sparsity": 0.8, "num_batches": 2, "progress": False, **cfg}
    return model, dfx.compress(model, entry.task_losses, entry.batches(cfg["num_batches"]),
                               dfx.CompressConfig(**cfg), inputs=entry.inputs)


@pytest.mark.parametrize("entry", ZOO, ids=lambda e: e.name)
def test_code_shows_one_multiply_per_masked_weight_use(entry):
    _, result = compress(entry)
    gm = result.model
    mask_reads = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.endswith("_mask")]
    muls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.mul
            and any(a in mask_reads for a in n.all_input_nodes)]
    assert len(muls) == len(mask_reads) >= len(result.plan.prunable)
    for p in result.plan.prunable:
        assert f"{p.replace('.', '_')}_mask" in gm.code
    gm.graph.lint()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("entry", [ZOO_BY_NAME["two_heads_dict"], ZOO_BY_NAME["tied_heads"],
                                   ZOO_BY_NAME["functional_conv"]], ids=lambda e: e.name)
def test_pruned_weights_stay_pruned_through_training(entry, optimizer):
    _, result = compress(entry)
    gm = result.model.train()
    opt = (torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2) if optimizer == "sgd"
           else torch.optim.AdamW(gm.parameters(), lr=1e-2, weight_decay=1e-2))
    params = dict(gm.named_parameters())
    names = {p: p for p in result.plan.prunable}
    if entry.name == "tied_heads":
        names["head_a.weight"] = "head_a.weight"
    for batch in entry.batches(5, seed=7):
        out = outputs_by_task(gm(entry.inputs(batch) if entry.inputs else batch["input"]))
        loss = sum(entry.task_losses[t](out[t], batch) for t in out)
        opt.zero_grad()
        loss.backward()
        for p in result.plan.prunable:  # zero effective gradient on pruned elements
            assert torch.all(params[names[p]].grad[~result.plan.masks[p]] == 0), p
        opt.step()
    for p, mask in result.plan.masks.items():
        assert torch.all(params[names[p]].detach()[~mask] == 0), p
        assert torch.any(params[names[p]].detach()[mask] != 0), p


def test_deepcopy_and_state_dict_roundtrip():
    entry = ZOO_BY_NAME["residual_tuple"]
    _, result = compress(entry)
    gm = result.model.eval()
    clone = copy.deepcopy(gm)
    buf = io.BytesIO()
    torch.save(gm.state_dict(), buf)
    buf.seek(0)
    fresh = copy.deepcopy(gm)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(torch.load(buf))
    x = example_input(entry)
    for other in (clone, fresh):
        for a, b in zip(gm(x), other(x)):
            assert torch.equal(a, b)
    assert set(masked_params(gm)) == set(result.plan.masks)
    assert "stem.weight_mask" in gm.state_dict()


def test_pass_never_mutates_its_input():
    entry = ZOO_BY_NAME["two_heads_dict"]
    gm = trace_model(entry.build())
    code, sd = gm.code, copy.deepcopy(gm.state_dict())
    mask = torch.zeros_like(gm.stem.weight, dtype=torch.bool)
    out = insert_masks(gm, {"stem.weight": mask})
    assert gm.code == code and set(gm.state_dict()) == set(sd)
    assert all(torch.equal(v, sd[k]) for k, v in gm.state_dict().items())
    assert out.stem.weight is not gm.stem.weight and float(out.stem.weight.detach().abs().sum()) == 0


def test_insert_masks_rejects_unknown_parameter_and_bad_shape():
    gm = trace_model(ZOO_BY_NAME["two_heads_dict"].build())
    with pytest.raises(dfx.DisparseValueError, match="mask given for 'nope.weight'"):
        insert_masks(gm, {"nope.weight": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(dfx.DisparseValueError, match=r"mask for 'stem.weight' has shape \(2,\)"):
        insert_masks(gm, {"stem.weight": torch.ones(2, dtype=torch.bool)})


def test_generic_leaf_module_is_masked_through_functional_call():
    """A user-chosen parameter inside a module without a functional rule (MHA)."""
    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
            self.a, self.b = torch.nn.Linear(8, 2), torch.nn.Linear(8, 3)

        def forward(self, x):
            h = self.attn(x, x, x, need_weights=False)[0]
            return {"a": self.a(h).mean(1), "b": self.b(h).mean(1)}

    torch.manual_seed(0)
    model = Attn().eval()
    data = [(torch.randn(2, 5, 8), None) for _ in range(2)]
    losses = {"a": lambda p, b: p.square().mean(), "b": lambda p, b: p.square().mean()}
    result = dfx.compress(model, losses, data, dfx.CompressConfig(
        sparsity=0.5, num_batches=2, progress=False, filter_fn=lambda n, p: p.dim() == 2))
    assert "attn.in_proj_weight" in result.plan.masks
    assert "functional_call" in result.model.code
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p, m in result.plan.masks.items():
            ref.get_parameter(p).mul_(m)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(result.model.eval()(x)["a"], ref(x)["a"], atol=1e-6, rtol=0)


def test_one_forward_per_batch():
    """Importance costs one forward per batch (and T backwards), never one per task."""
    entry = ZOO_BY_NAME["concat_list"]  # 4 tasks
    model = entry.build()
    calls = []
    model.fuse.register_forward_hook(lambda *a: calls.append(1))
    dfx.compress(model, entry.task_losses, entry.batches(6), dfx.CompressConfig(num_batches=6, progress=False))
    assert len(calls) == 6


def test_bfloat16_weights_score_in_float32():
    entry = ZOO_BY_NAME["tied_heads"]
    model = entry.build().to(torch.bfloat16)
    data = [{k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in b.items()}
            for b in entry.batches(2)]
    losses = {"a": lambda p, b: (p.float() - b["a"].float()).square().mean(),
              "b": lambda p, b: (p.float() - b["b"].float()).square().mean(),
              "c": lambda p, b: torch.nn.functional.cross_entropy(p.float(), b["c"])}
    result = dfx.compress(model, losses, data, dfx.CompressConfig(sparsity=0.5, num_batches=2, progress=False),
                          inputs=entry.inputs)
    assert all(s.dtype == torch.float32 for t in result.plan.task_scores.values() for s in t.values())
    assert result.model.trunk.weight.dtype == torch.bfloat16
    assert abs(result.plan.sparsity - 0.5) < 0.01


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_where_the_model_lives_cuda():
    entry = ZOO_BY_NAME["two_heads_dict"]
    model = entry.build().cuda()
    result = dfx.compress(model, entry.task_losses, entry.batches(2), dfx.CompressConfig(num_batches=2, progress=False))
    assert result.model.stem.weight.is_cuda and result.plan.masks["stem.weight"].is_cuda


@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_the_masked_model_holds_every_tensor_of_the_users_model(granularity):
    """with_unused has a spare head the forward never calls: its weights stay in the
    masked model, so the user's checkpoint loads into it strictly."""
    model, result = compress(ZOO_BY_NAME["with_unused"], granularity=granularity)
    keys = set(result.model.state_dict())
    assert set(model.state_dict()) <= keys
    masks = {k: v for k, v in result.model.state_dict().items() if k not in model.state_dict()}
    result.model.load_state_dict({**model.state_dict(), **masks}, strict=True)
