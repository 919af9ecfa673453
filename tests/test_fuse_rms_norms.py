"""Hand-written RMSNorms become ``F.rms_norm`` on traced and exported graphs (#15).

The spellings real code uses (``x.pow(2)``, ``x * x``, ``torch.pow``, ``x ** 2``,
``torch.mean``, ``eps + mean``, Llama's ``.to(float32)`` / ``.to(input_dtype)`` casts,
a weight multiply) compute the same after the rewrite, and the residual width they
normalise is one removable channel group, as with ``F.rms_norm``.
"""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import disparse_fx as dfx
from disparse_fx.passes.capture import capture_model, export_model
from disparse_fx.passes.channel_groups import find_channel_groups
from disparse_fx.passes.fuse_rms_norms import fuse_rms_norms

C = 16


def _pow(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def _self_mul(x):
    return torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + 1e-5) * x


def _torch_fns(x):
    return torch.mul(x, torch.rsqrt(torch.mean(torch.pow(x, 2), -1, keepdim=True) + 1e-6))


def _power_op(x):
    return x * (1e-6 + (x ** 2).mean((-1,), keepdim=True)).rsqrt()


class Llama(nn.Module):
    """transformers' LlamaRMSNorm, as written there."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(C))

    def forward(self, x):
        input_dtype = x.dtype
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + 1e-6)
        return self.weight * h.to(input_dtype)


class Weighted(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn, self.weight = fn, nn.Parameter(torch.randn(C))

    def forward(self, x):
        return self.fn(x) * self.weight


NORMS = {"pow": Weighted(_pow), "self_mul": Weighted(_self_mul), "torch_fns": Weighted(_torch_fns),
         "power_op": Weighted(_power_op), "llama": Llama()}


@pytest.mark.parametrize("name", NORMS)
def test_the_rewrite_computes_the_same(name):
    model = NORMS[name]
    gm = fx.symbolic_trace(model)
    code = gm.code
    fused = fuse_rms_norms(gm)
    assert gm.code == code  # pure
    targets = [n.target for n in fused.graph.nodes]
    assert targets.count(F.rms_norm) == 1 and "mean" not in targets and torch.mean not in targets
    x = torch.randn(3, 5, C) * 4
    with torch.no_grad():
        assert (fused(x) - model(x)).abs().max() < 1e-6
    weight = [n for n in fused.graph.nodes if n.target is F.rms_norm][0].args[2]
    assert (weight is not None) == (name != "llama")  # Llama's weight multiplies a cast: kept apart


@pytest.mark.parametrize("name", ["pow", "llama"])
def test_exported_graphs_use_the_same_matcher(name):
    gm = export_model(NORMS[name], (torch.randn(2, 4, C),))
    assert sum(n.target is F.rms_norm for n in gm.graph.nodes) == 1
    x = torch.randn(3, 7, C)
    with torch.no_grad():
        assert (gm(x) - NORMS[name](x)).abs().max() < 1e-6


def test_what_is_not_an_rms_norm_stays():
    def over_dim1(x):
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6)

    def no_keepdim(x):
        return x * torch.rsqrt(x.pow(2).mean(-1).unsqueeze(-1) + 1e-6)

    def cube(x):
        return x * torch.rsqrt(x.pow(3).mean(-1, keepdim=True) + 1e-6)

    def other_x(x):
        y = x + 1
        return y * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def variance_reused(x):
        v = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(v + 1e-6) + v

    for fn in (over_dim1, no_keepdim, cube, other_x, variance_reused):
        gm = fx.symbolic_trace(Weighted(fn))
        assert fuse_rms_norms(gm) is gm, fn.__name__


class Tiny(nn.Module):
    """/work/shared/cases/e15: a residual stream under a hand-written RMS norm, a vocab
    head and a pooled head."""

    def __init__(self, C=32, V=500):
        super().__init__()
        self.emb = nn.Embedding(V, C)
        self.fc1, self.fc2 = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)
        self.norm = nn.Parameter(torch.ones(C))
        self.lm, self.cls = nn.Linear(C, V), nn.Linear(C, 2)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.fc2(F.gelu(self.fc1(h)))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm
        return {"lm": self.lm(h), "cls": self.cls(h[:, -1])}


def _case():
    torch.manual_seed(0)
    data = [{"input": torch.randint(0, 500, (4, 12)), "y": torch.randint(0, 2, (4,))} for _ in range(2)]
    losses = {"lm": lambda p, b: F.cross_entropy(p[:, :-1].reshape(-1, 500), b["input"][:, 1:].reshape(-1)),
              "cls": lambda p, b: F.cross_entropy(p, b["y"])}
    return Tiny(), losses, data


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_the_residual_width_is_one_removable_group(capture):
    model, _, data = _case()
    x = data[0]["input"]
    gm = capture_model(model, (x,), capture=capture)
    groups = find_channel_groups(gm, (x,))
    residual = [g for g in groups.groups if "emb.weight" in g.params]
    assert len(residual) == 1 and residual[0].removable and residual[0].size == 32
    assert {"norm", "fc2.weight", "lm.weight"} <= set(residual[0].params)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_compress_reaches_the_target_and_slims_with_parity(capture):
    model, losses, data = _case()
    cfg = dfx.CompressConfig(sparsity=0.5, granularity="channel", num_batches=2, progress=False)
    result = dfx.compress(model, losses, data, cfg, capture=capture)
    assert abs(result.plan.sparsity - 0.5) < 0.02
    slim = dfx.slim(result)
    width = slim.get_parameter("emb.weight").shape[1]
    assert width < 32 and slim.get_parameter("norm").shape == (width,)
    x = torch.randint(0, 500, (3, 9))
    result.model.eval()
    slim.eval()
    with torch.no_grad():
        masked, out = result.model(x), slim(x)
    for task in ("lm", "cls"):
        assert torch.allclose(masked[task], out[task], atol=1e-5)
    slim.graph.lint()
