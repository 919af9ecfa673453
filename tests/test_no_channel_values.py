"""Values that carry no channel need no rule; reductions by a norm have one.

Causal and padding masks, dtype limits and constant tensors are built from shapes and
constants: whatever op builds them, no channel of an activation or a parameter flows
through it, so the channel analysis passes them without a rule (issue #15 item 2, #16's
``~`` on a constant mask). An op that does read a channel still needs a rule, and the
error names it. ``Tensor.norm`` / ``torch.linalg.vector_norm`` reduce like a sum: an
all-zero channel adds nothing to a p-norm (p >= 0), so the reduced channels stay
removable (ConvNeXt-V2's global response norm, ``x / x.norm(dim=1)``).
"""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import disparse_fx as dfx

from .zoo import assert_slim_matches


def opaque_mask(n: int) -> torch.Tensor:
    """An op without a channel rule, called on a shape: a boolean band mask."""
    return torch.ones(n, n, dtype=torch.bool).triu(1)


fx.wrap("opaque_mask")


def opaque_scale(x: torch.Tensor) -> torch.Tensor:
    return x * 2


fx.wrap("opaque_scale")


class MaskedTokens(nn.Module):
    """Token mixing under a causal mask built from the sequence length and ``~``."""

    def __init__(self, dim=32, vocab=50):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 64), nn.Linear(64, dim)
        self.register_buffer("keep_pad", torch.ones(16, dtype=torch.bool))
        self.tag, self.cls = nn.Linear(dim, 5), nn.Linear(dim, 3)

    def forward(self, ids):
        h = self.emb(ids)                                           # (B, T, dim)
        t = ids.shape[1]
        causal = ~opaque_mask(t)                                    # no channel: no rule needed
        allowed = causal & ~(~self.keep_pad)                          # a constant buffer through ~
        scores = ids.new_zeros(t, t).float().masked_fill(~allowed, -1e9).softmax(-1)
        h = h + scores @ F.relu(self.fc2(F.relu(self.fc1(h))))      # (T,T) @ (B,T,dim)
        return {"tag": self.tag(h), "cls": self.cls(h.mean(1))}


def _token_data(n=3):
    g = torch.Generator().manual_seed(0)
    return [{"input": torch.randint(0, 50, (4, 16), generator=g), "tag": torch.randint(0, 5, (4, 16), generator=g),
             "cls": torch.randint(0, 3, (4,), generator=g)} for _ in range(n)]


TOKEN_LOSSES = {"tag": lambda p, b: F.cross_entropy(p.transpose(1, 2), b["tag"]),
                "cls": lambda p, b: F.cross_entropy(p, b["cls"])}


class GRN(nn.Module):
    """ConvNeXt-V2's global response norm on channels-last input (B, H, W, C)."""

    def __init__(self, c):
        super().__init__()
        self.gamma = nn.Parameter(torch.randn(1, 1, 1, c) * 0.1)
        self.beta = nn.Parameter(torch.randn(1, 1, 1, c) * 0.1)

    def forward(self, x):
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class ConvNormNet(nn.Module):
    def __init__(self, unit_norm=False, grn=False):
        super().__init__()
        self.unit_norm, self.use_grn = unit_norm, grn
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 24, 3, padding=1)
        self.pw = nn.Linear(24, 32)
        self.grn = GRN(32)
        self.seg, self.cls = nn.Conv2d(32, 4, 1), nn.Linear(32, 3)

    def forward(self, x):
        h = F.relu(self.c1(x))
        if self.unit_norm:  # F.normalize written out: the 2-norm over channels
            h = h / (h.norm(p=2, dim=1, keepdim=True) + 1e-6)
        h = F.relu(self.c2(h)).permute(0, 2, 3, 1)                  # channels last
        h = F.gelu(self.pw(h))
        if self.use_grn:
            h = self.grn(h)
        h = h.permute(0, 3, 1, 2)
        return {"seg": self.seg(h), "cls": self.cls(h.mean((2, 3)))}


def _image_data(n=3):
    g = torch.Generator().manual_seed(0)
    return [{"input": torch.randn(4, 3, 12, 12, generator=g), "seg": torch.randint(0, 4, (4, 12, 12), generator=g),
             "cls": torch.randint(0, 3, (4,), generator=g)} for _ in range(n)]


IMAGE_LOSSES = {"seg": lambda p, b: F.cross_entropy(p, b["seg"]), "cls": lambda p, b: F.cross_entropy(p, b["cls"])}


def _channel(model, losses, data, sparsity=0.5):
    return dfx.compress(model, losses, data, dfx.CompressConfig(
        sparsity=sparsity, granularity="channel", criterion="taylor", num_batches=len(data), progress=False))


def _output_group(result, param):
    """The channel group of ``param``'s output channels (dim 0)."""
    return next(g for g, m in result.plan.channels.groups.members_of(param) if m.dim == 0)


def _parity(result, slim, x):
    assert_slim_matches(result.model, slim, x, atol=1e-5, rtol=1e-4)


def test_masks_built_from_shapes_need_no_rule():
    data = _token_data()
    result = _channel(MaskedTokens(), TOKEN_LOSSES, data, sparsity=0.3)
    assert abs(result.plan.sparsity - 0.3) <= 0.01
    slim = dfx.slim(result)
    _parity(result, slim, data[0]["input"])
    assert slim.fc1.out_features < 64


def test_an_op_that_reads_channels_still_needs_a_rule():
    class Net(ConvNormNet):
        def forward(self, x):
            h = opaque_scale(F.relu(self.c1(x)))
            h = F.relu(self.c2(h)).permute(0, 2, 3, 1)
            h = self.pw(h).permute(0, 3, 1, 2)
            return {"seg": self.seg(h), "cls": self.cls(h.mean((2, 3)))}

    with pytest.raises(dfx.UnsupportedOpError, match=r"no channel rule for node 'opaque_scale'.*opaque_scale\(F.relu"):
        _channel(Net(), IMAGE_LOSSES, _image_data())


@pytest.mark.parametrize("unit_norm, grn", [(True, False), (False, True)])
def test_norm_reductions(unit_norm, grn):
    data = _image_data()
    result = _channel(ConvNormNet(unit_norm=unit_norm, grn=grn), IMAGE_LOSSES, data, sparsity=0.4)
    groups = {p: _output_group(result, p) for p in ("c1.weight", "pw.weight")}
    # the 2-norm over channels leaves c1's channels removable; GRN's mean over channels pins pw's
    assert groups["c1.weight"].removable
    assert groups["pw.weight"].removable is (not grn)
    if grn:
        assert "reduced (mean)" in groups["pw.weight"].reason
    slim = dfx.slim(result)
    _parity(result, slim, data[0]["input"])
    assert slim.c1.out_channels < 16


def test_norm_with_negative_order_pins():
    class Net(ConvNormNet):
        def forward(self, x):
            h = F.relu(self.c1(x))
            h = h / torch.linalg.vector_norm(h + 1, ord=-1, dim=1, keepdim=True)
            h = F.relu(self.c2(h)).permute(0, 2, 3, 1)
            h = self.pw(h).permute(0, 3, 1, 2)
            return {"seg": self.seg(h), "cls": self.cls(h.mean((2, 3)))}

    result = _channel(Net(), IMAGE_LOSSES, _image_data(), sparsity=0.3)
    group = _output_group(result, "c1.weight")
    assert not group.removable and "reduced (vector_norm)" in group.reason
