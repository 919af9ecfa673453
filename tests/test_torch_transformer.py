"""torch.nn's transformer layers: traced through (not leaves), compressed and slimmed.

``nn.TransformerEncoder(Layer)`` / ``nn.TransformerDecoder(Layer)`` are leaves for
torch.fx and their fast path cannot be traced; :data:`passes.trace.TRACED_THROUGH`
traces their standard path instead, so their attention heads, LayerNorms and
feed-forward layers take part in the channel analysis like any hand-written block.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import disparse_fx as dfx
from disparse_fx.passes.attention import MultiheadAttention as Slimmable
from disparse_fx.passes.trace import trace_model


class EncoderTasks(nn.Module):
    """Token embedding -> nn.TransformerEncoder -> a per-token head and a pooled head."""

    def __init__(self, norm_first: bool, activation="relu"):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=True, norm_first=norm_first,
                                           activation=activation)
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16), enable_nested_tensor=False)
        self.tag, self.cls = nn.Linear(16, 3), nn.Linear(16, 2)

    def forward(self, x, pad=None):
        h = self.encoder(self.embed(x), src_key_padding_mask=pad)
        return {"tag": self.tag(h), "cls": self.cls(h.mean(1))}


class DecoderTasks(nn.Module):
    """Queries attending to encoded tokens through nn.TransformerDecoder (cross-attention)."""

    def __init__(self):
        super().__init__()
        self.embed, self.queries = nn.Linear(6, 16), nn.Parameter(torch.randn(1, 3, 16))
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 4, 32, batch_first=True), 2)
        self.box, self.score = nn.Linear(16, 4), nn.Linear(16, 1)

    def forward(self, x):
        memory = self.embed(x)
        q = self.decoder(self.queries.expand(x.shape[0], -1, -1), memory)
        return {"box": self.box(q), "score": self.score(q).squeeze(-1)}


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_traces_through_and_matches_torch(norm_first, activation):
    torch.manual_seed(0)
    model = EncoderTasks(norm_first, activation).eval()
    gm = trace_model(model)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert "encoder.layers.0.self_attn" in targets and "encoder.layers.1.linear2" in targets
    assert not any(isinstance(gm.get_submodule(t), (nn.TransformerEncoder, nn.TransformerEncoderLayer)) for t in targets)
    x = torch.randn(2, 5, 6)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    with torch.no_grad():
        for args in ((x,), (x, pad)):
            want, got = model(*args), gm(*args)
            for t in want:
                torch.testing.assert_close(got[t], want[t], atol=1e-5, rtol=1e-5)


def test_decoder_traces_through_and_matches_torch():
    torch.manual_seed(0)
    model = DecoderTasks().eval()
    gm = trace_model(model)
    assert "decoder.layers.1.multihead_attn" in {n.target for n in gm.graph.nodes if n.op == "call_module"}
    x = torch.randn(2, 5, 6)
    with torch.no_grad():
        want, got = model(x), gm(x)
    for t in want:
        torch.testing.assert_close(got[t], want[t], atol=1e-5, rtol=1e-5)


def test_a_transformer_layer_given_as_leaf_stays_a_leaf():
    gm = trace_model(EncoderTasks(False), leaf_modules=(nn.TransformerEncoder,))
    assert "encoder" in {n.target for n in gm.graph.nodes if n.op == "call_module"}


@pytest.mark.parametrize("attention", ["heads", "head_dims"])
@pytest.mark.parametrize("build", [lambda: EncoderTasks(False), lambda: EncoderTasks(True), DecoderTasks],
                         ids=["post-norm", "pre-norm", "decoder"])
def test_torch_transformers_compress_and_slim(build, attention):
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 5, 6)
    with torch.no_grad():
        targets = {t: torch.randn_like(v) for t, v in model(x).items()}
    losses = {t: (lambda key: lambda p, b: F.mse_loss(p, b[key]))(t) for t in targets}
    result = dfx.compress(model, losses, [{"input": x, **targets}], dfx.CompressConfig(
        sparsity=0.5, granularity="channel", attention=attention, num_batches=1, progress=False))
    slim = dfx.slim(result)  # parity with the masked model checked inside
    n0, n1 = (sum(p.numel() for p in m.parameters()) for m in (model, slim))
    assert n1 < 0.75 * n0
    attns = [m for m in slim.modules() if isinstance(m, (nn.MultiheadAttention, Slimmable))]
    assert attns and all(isinstance(m, Slimmable) for m in attns)  # rebuilt with the kept sizes
    with torch.no_grad():
        out = slim.eval()(x)
    assert {t: v.shape for t, v in out.items()} == {t: v.shape for t, v in targets.items()}


# torch's MultiheadAttention checks shapes in Python: the exporter warns that they are
# constants (they are: widths, not the batch); export_onnx checks two batch sizes anyway
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_models_with_torch_multihead_attention_export_to_onnx(tmp_path):
    """nn.MultiheadAttention's eval fast path (one fused op ONNX lacks) is off during export."""
    torch.manual_seed(0)
    gm = trace_model(EncoderTasks(False).eval())
    report = dfx.export_onnx(gm, torch.randn(2, 5, 6), tmp_path / "encoder.onnx")  # raises on a mismatch
    assert report.outputs == ("tag", "cls")
    assert torch.backends.mha.get_fastpath_enabled()  # restored
