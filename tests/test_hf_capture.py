"""Hugging Face transformers (5.x) trunks through the torch.export front end
(``compress(..., capture="export" | "auto")``): small configs, no weights, each wrapped
as a 2-task model (a token head and a pooled head), channel compress at 0.5 -> slim
parity -> at least 30% fewer prunable parameters -> ONNX verified in onnxruntime."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install '.[hf]')")

import disparse_fx as dfx  # noqa: E402
from disparse_fx.passes.capture import export_model  # noqa: E402
from disparse_fx.passes.errors import TraceError  # noqa: E402
from disparse_fx.passes.trace import trace_model  # noqa: E402

from .zoo import assert_slim_matches  # noqa: E402

VOCAB = 100


class TwoTasks(nn.Module):
    """A trunk's last hidden state -> a per-token head and a pooled head (first token)."""

    def __init__(self, trunk: nn.Module, hidden: int, key: str = "input_ids"):
        super().__init__()
        self.trunk, self.key = trunk, key
        self.tok = nn.Linear(hidden, 3)
        self.cls = nn.Linear(hidden, 2)

    def forward(self, x):
        h = self.trunk(**{self.key: x}).last_hidden_state
        return {"tok": self.tok(h), "cls": self.cls(h[:, 0])}


def _bert():
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=VOCAB)
    return TwoTasks(transformers.BertModel(cfg), 64)


def _vit():
    cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                 image_size=32, patch_size=8, num_channels=3)
    return TwoTasks(transformers.ViTModel(cfg, add_pooling_layer=False), 64, key="pixel_values")


def _gpt2():  # Conv1D layers: aten.addmm with a transposed weight
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, use_cache=False)
    return TwoTasks(transformers.GPT2Model(cfg), 64)


def _llama():  # RMSNorm written out, rotary embeddings, SwiGLU
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                   intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64,
                                   use_cache=False)
    return TwoTasks(transformers.LlamaModel(cfg), 64)


def _qwen2():  # grouped-query attention: 4 query heads, 2 k/v heads
    cfg = transformers.Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64,
                                   use_cache=False)
    return TwoTasks(transformers.Qwen2Model(cfg), 64)


def _distilbert():
    cfg = transformers.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=VOCAB)
    return TwoTasks(transformers.DistilBertModel(cfg), 64)


def _roberta():
    cfg = transformers.RobertaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=VOCAB)
    return TwoTasks(transformers.RobertaModel(cfg), 64)


def _mistral():  # GQA and a sliding-window mask
    cfg = transformers.MistralConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64,
                                     sliding_window=8, use_cache=False)
    return TwoTasks(transformers.MistralModel(cfg), 64)


def _gemma():  # one k/v head (multi-query), RMSNorm scaled by 1 + weight, GeGLU
    cfg = transformers.GemmaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                   head_dim=16, intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64,
                                   use_cache=False)
    return TwoTasks(transformers.GemmaModel(cfg), 64)


def _albert():  # one layer's weights shared by every layer, a factorised embedding
    cfg = transformers.AlbertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, vocab_size=VOCAB, embedding_size=32)
    return TwoTasks(transformers.AlbertModel(cfg), 64)


# name: (model factory, input kind, long); the quick subset runs in `make test`, the long ones
# under `make test-all`
ARCHS = {
    "bert": (_bert, "tokens", False),
    "gpt2": (_gpt2, "tokens", False),
    "llama": (_llama, "tokens", False),
    "vit": (_vit, "image", True),
    "qwen2": (_qwen2, "tokens", True),
    "distilbert": (_distilbert, "tokens", True),
    "roberta": (_roberta, "tokens", True),
    "mistral": (_mistral, "tokens", True),
    "gemma": (_gemma, "tokens", True),
    "albert": (_albert, "tokens", True),
}


def _inputs(kind: str, batch: int, length: int) -> torch.Tensor:
    if kind == "image":  # 32 px, 8 px patches: 16 patches and a class token
        return torch.randn(batch, 3, 32, 32)
    return torch.randint(0, VOCAB, (batch, length))


def _data(kind: str):
    g = torch.Generator().manual_seed(0)
    return [{"input": _inputs(kind, 4, 16), "tok": torch.randint(0, 3, (4, 16), generator=g),
             "cls": torch.randint(0, 2, (4,), generator=g)} for _ in range(2)]


def _tok_loss(pred, batch):
    n = min(pred.shape[1], batch["tok"].shape[1])
    return F.cross_entropy(pred[:, :n].reshape(-1, pred.shape[-1]), batch["tok"][:, :n].reshape(-1))


LOSSES = {"tok": _tok_loss, "cls": lambda pred, batch: F.cross_entropy(pred, batch["cls"])}
CONFIG = dfx.CompressConfig(sparsity=0.5, granularity="channel", criterion="taylor", num_batches=2, progress=False)


def _assert_parity(result, slim, x):
    """The masked and the slim model agree on ``x`` (eval mode); the slim outputs."""
    return assert_slim_matches(result.model, slim, x)


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.long if long else ())
                                  for a, (_, _, long) in ARCHS.items()])
def test_compress_slim_onnx(arch, tmp_path):
    make, kind, _ = ARCHS[arch]
    torch.manual_seed(0)
    model = make()
    data = _data(kind)
    result = dfx.compress(model, LOSSES, data, CONFIG)
    plan = result.plan
    params = dict(model.named_parameters())
    assert set(plan.prunable) <= set(params)  # the user's names
    slim = dfx.slim(result)
    slim_params = dict(slim.named_parameters())
    assert set(slim_params) <= set(params)
    before = sum(params[p].numel() for p in plan.prunable)
    after = sum(slim_params[p].numel() for p in plan.prunable if p in slim_params)
    assert 1 - after / before >= 0.3, f"{arch}: only {1 - after / before:.1%} of the prunable parameters removed"
    x = data[0]["input"]
    compact = _assert_parity(result, slim, x)
    with torch.no_grad():
        other = slim(_inputs(kind, 3, 24))  # batch and sequence stay dynamic
    assert other["tok"].shape[0] == 3
    if kind == "tokens":
        assert other["tok"].shape[1] == 24
    dfx.save(slim, tmp_path / f"{arch}.dfx")  # the ATen graph saves and loads (no pickled code)
    with torch.no_grad():
        assert torch.equal(dfx.load(tmp_path / f"{arch}.dfx").eval()(x)["tok"], compact["tok"])
    report = dfx.export_onnx(slim, x[:1], tmp_path / f"{arch}.onnx", dynamic_sequence=kind == "tokens")
    assert report.outputs == ("tok", "cls") and report.batch_sizes == (1, 2)


def test_bert_does_not_trace_and_auto_exports():
    """symbolic tracing fails on a transformers 5 trunk; capture='auto' falls back to
    torch.export, whose graph reads the user's parameters under their own names."""
    model = _bert()
    with pytest.raises(TraceError):
        trace_model(model)
    gm = export_model(model, (_inputs("tokens", 2, 8),))
    assert gm.get_parameter("trunk.encoder.layer.0.attention.self.query.weight") is \
        model.trunk.encoder.layer[0].attention.self.query.weight
    assert not any(n.op == "call_module" and "guard" in str(n.target) for n in gm.graph.nodes)


def test_capture_fx_is_the_tracer_and_auto_keeps_it():
    """capture='auto' traces whatever symbolic tracing can trace (no torch.export)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = self.a(x).relu()
            return {"y": self.b(h), "z": self.b(h).sum(-1, keepdim=True)}

    data = [{"input": torch.randn(4, 4)} for _ in range(2)]
    losses = {"y": lambda p, b: p.pow(2).mean(), "z": lambda p, b: p.pow(2).mean()}
    cfg = dfx.CompressConfig(sparsity=0.5, num_batches=2, progress=False)
    def aten_ops(gm):
        return [n for n in gm.graph.nodes if isinstance(n.target, torch._ops.OpOverload)]

    auto = dfx.compress(Net(), losses, data, cfg)
    assert not aten_ops(auto.model)
    exported = dfx.compress(Net(), losses, data, cfg, capture="export")
    assert aten_ops(exported.model)
    assert set(exported.plan.prunable) == set(auto.plan.prunable) == {"a.weight", "b.weight"}
    with pytest.raises(ValueError, match="capture must be one of"):
        dfx.compress(Net(), losses, data, cfg, capture="dynamo")


def test_llama_rms_norm_keeps_the_residual_width_removable():
    """Llama's RMSNorm is written out (x * rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)):
    capture reads it as F.rms_norm, so the residual width is one removable group (a mean
    over the channels would pin it) and the graph still computes the model."""
    from disparse_fx.passes.channel_groups import find_channel_groups

    model = _llama().eval()
    x = _inputs("tokens", 2, 8)
    gm = export_model(model, (x,))
    assert sum(n.target is F.rms_norm for n in gm.graph.nodes) == 5  # 2 per layer + the final norm
    with torch.no_grad():
        assert torch.allclose(gm(x)["tok"], model(x)["tok"], atol=1e-5)
    groups = find_channel_groups(gm, (x,))
    residual = [g for g in groups.groups if "trunk.layers.0.input_layernorm.weight" in g.params]
    assert len(residual) == 1 and residual[0].removable and residual[0].size == 64
    assert "trunk.embed_tokens.weight" in residual[0].params


def test_readme_hugging_face_example_runs(capsys):
    import pathlib
    import re

    readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    code = re.search(r"## Hugging Face models\s+.*?```python\n(.*?)```", readme.read_text(), re.S).group(1)
    exec(compile(code, str(readme), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "parameters, from" in out and "torch.Size([3, 24, 5])" in out


def test_flops_budget_on_an_exported_gpt2():
    """FLOPs of ATen graphs (linear, addmm, sdpa) are counted: a 50% FLOPs budget halves
    the exported GPT-2's counted FLOPs after slimming."""
    from disparse_fx.passes.flops import count_flops

    torch.manual_seed(0)
    model = _gpt2().eval()
    data = _data("tokens")
    x = data[0]["input"]
    dense = count_flops(export_model(model, (x,)), (x,)).total
    assert dense > 2 * 2 * 16 * 64 * 64 * 4 * 2  # at least the attention projections of 2 layers x 16 tokens
    cfg = dfx.CompressConfig(sparsity=0.5, granularity="channel", criterion="taylor", num_batches=2,
                             progress=False, budget="flops")
    slim = dfx.slim(dfx.compress(model, LOSSES, data, cfg))
    assert abs(count_flops(slim, (x,)).total / dense - 0.5) < 0.03


def test_export_of_a_cnn_with_batch_norm_and_pooling():
    """capture='export' on a conv trunk: ATen conv, batch_norm (weight first), max_pool and
    mean get their rules; channel compress slims with parity; BatchNorm is named as frozen."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
            self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
            self.seg, self.cls = nn.Conv2d(16, 4, 1), nn.Linear(16, 3)

        def forward(self, x):
            h = F.max_pool2d(self.bn1(self.conv1(x)).relu(), 2)
            h = h + self.bn2(self.conv2(h)).relu()
            return {"seg": self.seg(h), "cls": self.cls(h.mean((2, 3)))}

    torch.manual_seed(0)
    data = [{"input": torch.randn(4, 3, 16, 16), "seg": torch.randint(0, 4, (4, 8, 8)),
             "cls": torch.randint(0, 3, (4,))} for _ in range(2)]
    losses = {"seg": lambda p, b: F.cross_entropy(p, b["seg"]), "cls": lambda p, b: F.cross_entropy(p, b["cls"])}
    model = Net().eval()
    with pytest.warns(dfx.DisparseWarning, match=r"BatchNorm layer\(s\) are captured as in eval mode"):
        result = dfx.compress(model, losses, data, CONFIG, capture="export")
    slim = dfx.slim(result)
    assert slim.get_parameter("conv1.weight").shape[0] < 16
    assert slim.get_buffer("bn1.running_mean").shape == slim.get_parameter("conv1.weight").shape[:1]


@pytest.mark.long  # the quick tie test is tests/test_tied_weights.py
def test_gpt2_with_a_tied_lm_head_keeps_the_tie(tmp_path):
    """GPT-2 with its LM head (tie_word_embeddings=True: lm_head.weight IS wte.weight) and
    a pooled head: channel 0.5 -> slim parity; the tie stays one narrower parameter under
    both names, also after save / load."""
    from .test_tied_weights import check_tied_compress

    class LMAndCls(nn.Module):
        def __init__(self):
            super().__init__()
            cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                          use_cache=False, tie_word_embeddings=True)
            self.lm, self.cls = transformers.GPT2LMHeadModel(cfg), nn.Linear(64, 2)

        def forward(self, x):
            out = self.lm(input_ids=x, output_hidden_states=True)
            return {"lm": out.logits, "cls": self.cls(out.hidden_states[-1][:, 0])}

    torch.manual_seed(0)
    data = _data("tokens")
    losses = {"lm": lambda p, b: F.cross_entropy(p[:, :-1].reshape(-1, VOCAB), b["input"][:, 1:].reshape(-1)),
              "cls": LOSSES["cls"]}
    slim = check_tied_compress(LMAndCls().eval(), losses, data, ("lm.transformer.wte.weight", "lm.lm_head.weight"),
                               tmp_path=tmp_path)
    report = dfx.export_onnx(slim, data[0]["input"][:1], tmp_path / "gpt2_lm.onnx", dynamic_sequence=True)
    assert report.outputs == ("lm", "cls")


def test_timm_mobilevit_falls_back_to_export(tmp_path):
    """timm's mobilevit_xxs does not trace (control flow on sizes); capture='auto'
    exports it (the image's spatial size static): channel 0.5 -> slim parity -> ONNX."""
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install '.[hf]')")

    class TwoTasks(nn.Module):  # the feature map -> a dense head and a pooled head
        def __init__(self):
            super().__init__()
            self.trunk = timm.create_model("mobilevit_xxs", pretrained=False, num_classes=0, global_pool="")
            c = self.trunk.num_features
            self.seg, self.cls = nn.Conv2d(c, 4, 1), nn.Linear(c, 3)

        def forward(self, x):
            f = self.trunk.forward_features(x)
            return {"seg": self.seg(f), "cls": self.cls(f.mean((2, 3)))}

    torch.manual_seed(0)
    model = TwoTasks().eval()
    with pytest.raises(TraceError):
        trace_model(model)
    g = torch.Generator().manual_seed(0)
    data = [{"input": torch.randn(2, 3, 64, 64, generator=g), "seg": torch.randint(0, 4, (2, 2, 2), generator=g),
             "cls": torch.randint(0, 3, (2,), generator=g)} for _ in range(2)]
    losses = {"seg": lambda p, b: F.cross_entropy(p, b["seg"]), "cls": lambda p, b: F.cross_entropy(p, b["cls"])}
    result = dfx.compress(model, losses, data, CONFIG, capture="auto")
    assert abs(result.plan.sparsity - 0.5) < 0.02
    slim = dfx.slim(result)
    params, slim_params = dict(model.named_parameters()), dict(slim.named_parameters())
    before = sum(params[p].numel() for p in result.plan.prunable)
    assert 1 - sum(slim_params[p].numel() for p in result.plan.prunable if p in slim_params) / before >= 0.3
    x = data[0]["input"]
    _assert_parity(result, slim, x)
    report = dfx.export_onnx(slim, x[:1], tmp_path / "mobilevit.onnx")
    assert report.outputs == ("seg", "cls") and report.batch_sizes == (1, 2)
