"""A tied input embedding and LM head (``head.weight = emb.weight``, HF's
``tie_word_embeddings=True``) compresses at channel granularity on both capture paths:
the residual width slims both names of the one tensor, which stay one parameter,
also through save / load (#15)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import disparse_fx as dfx

from .zoo import assert_slim_matches

V, C = 50, 32


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, C)
        self.fc1, self.fc2 = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)
        self.head = nn.Linear(C, V, bias=False)
        self.head.weight = self.emb.weight
        self.cls = nn.Linear(C, 2)

    def forward(self, ids):
        h = self.emb(ids)
        h = F.layer_norm(h + self.fc2(F.gelu(self.fc1(h))), (C,))
        return {"lm": self.head(h), "cls": self.cls(h[:, 0])}


def check_tied_compress(model, losses, data, tied, capture="auto", tmp_path=None):
    """compress at channel 0.5 -> slim: parity, the tied names one narrower parameter."""
    a, b = tied
    assert model.get_parameter(a) is model.get_parameter(b)
    cfg = dfx.CompressConfig(sparsity=0.5, granularity="channel", criterion="taylor", num_batches=2, progress=False)
    result = dfx.compress(model, losses, data, cfg, capture=capture)
    assert abs(result.plan.sparsity - 0.5) < 0.03
    slim = dfx.slim(result)
    w = slim.get_parameter(a)
    assert w is slim.get_parameter(b) and w.shape[1] < model.get_parameter(a).shape[1]
    assert sum(1 for p in slim.parameters() if p is w) == 1  # one parameter
    x = data[0]["input"]
    out = assert_slim_matches(result.model, slim, x)
    if tmp_path is not None:
        dfx.save(slim, tmp_path / "tied.dfx")
        back = dfx.load(tmp_path / "tied.dfx").eval()
        assert back.get_parameter(a) is back.get_parameter(b)
        with torch.no_grad():
            assert torch.equal(back(x)["lm"], out["lm"])
    return slim


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_tied_embedding_and_head_stay_one_parameter(capture, tmp_path):
    torch.manual_seed(0)
    data = [{"input": torch.randint(0, V, (4, 12)), "y": torch.randint(0, 2, (4,))} for _ in range(2)]
    losses = {"lm": lambda p, b: F.cross_entropy(p[:, :-1].reshape(-1, V), b["input"][:, 1:].reshape(-1)),
              "cls": lambda p, b: F.cross_entropy(p, b["y"])}
    check_tied_compress(TiedLM(), losses, data, ("emb.weight", "head.weight"), capture, tmp_path)
