"""Property: random multitask CNN graphs slim exactly.

Hypothesis draws a trunk of blocks (plain convs, residual adds, concats, channel
splits, grouped / depthwise convs, squeeze-excitation gates, channel shuffles, group
norms, transposed convs, pools) and heads (dense, pooled-linear, flatten-linear) that
branch at random depths. For each graph: random keep of every removable group ->
``slim_channels`` (parity with the masked model checked in code) -> task output shapes
unchanged, parameters down. 20 examples by default, 200 under the ``long`` marker.
"""
from __future__ import annotations

from typing import List, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from disparse_fx.passes.channel_groups import find_channel_groups
from disparse_fx.passes.slim import slim_channels
from disparse_fx.passes.trace import trace_model

from .cnn_zoo import SqueezeExcite, channel_shuffle
from .test_slim import random_keep

KINDS = ("conv", "residual", "concat", "split", "grouped", "depthwise", "se", "shuffle", "gn",
         "transposed", "pool")
HEADS = ("dense", "classify", "flatten")


class Block(nn.Module):
    """One trunk block; ``out`` is its output width."""

    def __init__(self, kind: str, c: int, p: int):
        super().__init__()
        self.kind = kind
        w = (4, 6, 8, 12)[p % 4]
        self.out = c
        if kind == "conv":
            self.f = nn.Sequential(nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU())
            self.out = w
        elif kind == "residual":
            self.f = nn.Sequential(nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
                                   nn.Conv2d(w, c, 1), nn.BatchNorm2d(c))
        elif kind == "concat":
            self.f = nn.Sequential(nn.Conv2d(c, w, 1), nn.ReLU())
            self.out = c + w
        elif kind == "split":
            self.kind = "split" if c % 2 == 0 else "conv1"
            self.f = nn.Conv2d(c // 2, c // 2, 3, padding=1) if c % 2 == 0 else nn.Conv2d(c, c, 1)
        elif kind == "grouped":
            g = next(g for g in (4, 3, 2, 1) if c % g == 0 and g <= c)
            self.f = nn.Sequential(nn.Conv2d(c, 2 * g * (1 + p % 2), 3, padding=1, groups=g), nn.ReLU())
            self.out = 2 * g * (1 + p % 2)
        elif kind == "depthwise":
            m = 1 + p % 2
            self.f = nn.Sequential(nn.Conv2d(c, c * m, 3, padding=1, groups=c), nn.BatchNorm2d(c * m), nn.Hardswish())
            self.out = c * m
        elif kind == "se":
            self.f = SqueezeExcite(c, 2) if c >= 2 else nn.Identity()
        elif kind == "shuffle":
            self.kind = "shuffle" if c % 2 == 0 else "identity"
            self.f = nn.Identity()
        elif kind == "gn":
            g = (1, 2)[p % 2]
            self.f = nn.Sequential(nn.Conv2d(c, 4 * g, 1), nn.GroupNorm(g, 4 * g), nn.PReLU(4 * g))
            self.out = 4 * g
        elif kind == "transposed":
            self.f = nn.Sequential(nn.ConvTranspose2d(c, w, 3, padding=1), nn.ReLU())
            self.out = w
        elif kind == "pool":
            self.f = nn.MaxPool2d(2) if p % 2 else nn.AvgPool2d(2)

    def forward(self, x):
        if self.kind == "residual":
            return F.relu(x + self.f(x))
        if self.kind == "concat":
            return torch.cat([x, self.f(x)], 1)
        if self.kind == "split":
            a, b = x.chunk(2, dim=1)
            return torch.cat([self.f(b), a], 1)
        if self.kind == "shuffle":
            return channel_shuffle(x, 2)
        return self.f(x)


class RandomMultitaskCNN(nn.Module):
    def __init__(self, blocks: List[Tuple[str, int]], heads: List[Tuple[str, int]]):
        super().__init__()
        c = 3
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        c = 6
        self.blocks = nn.ModuleList()
        widths = [c]
        for kind, p in blocks:
            b = Block(kind, c, p)
            self.blocks.append(b)
            c = b.out
            widths.append(c)
        self.heads = nn.ModuleList()
        self.head_at, self.head_kind = [], []
        for kind, depth in heads:
            depth = depth % (len(blocks) + 1)
            cw = widths[depth]
            head = {"dense": lambda: nn.Conv2d(cw, 2, 1), "classify": lambda: nn.Linear(cw, 3),
                    "flatten": lambda: nn.Linear(cw * 4, 2)}[kind]()
            self.heads.append(head)
            self.head_at.append(depth)
            self.head_kind.append(kind)

    def forward(self, x):
        feats = [self.stem(x)]
        for b in self.blocks:
            feats.append(b(feats[-1]))
        out = {}
        for i, (head, depth, kind) in enumerate(zip(self.heads, self.head_at, self.head_kind)):
            f = feats[depth]
            if kind == "dense":
                out[f"t{i}"] = head(f)
            elif kind == "classify":
                out[f"t{i}"] = head(f.mean((2, 3)))
            else:
                out[f"t{i}"] = head(torch.flatten(F.adaptive_avg_pool2d(f, 2), 1))
        return out


graphs = st.tuples(
    st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 7)), min_size=1, max_size=7),
    st.lists(st.tuples(st.sampled_from(HEADS), st.integers(0, 7)), min_size=2, max_size=3),
    st.integers(0, 2**16),
)


def check_graph(spec) -> None:
    blocks, heads, seed = spec
    if sum(k == "pool" for k, _ in blocks) > 2:
        blocks = [b for b in blocks if b[0] != "pool"]
    torch.manual_seed(seed)
    model = RandomMultitaskCNN(blocks, heads).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 8, 8)
    gm = trace_model(model)
    groups = find_channel_groups(gm, (x,))
    keep = random_keep(groups, p=0.5, seed=seed)
    slim = slim_channels(gm, groups, keep)  # raises PostconditionError on any mismatch
    with torch.no_grad():
        before, after = gm(x), slim(x)
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in after.items()}
    n0 = sum(p.numel() for p in gm.parameters())
    n1 = sum(p.numel() for p in slim.parameters())
    assert n1 <= n0
    if any(not bool(k.all()) for k in keep.values()):
        assert n1 < n0
    slim.graph.lint()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs)
def test_random_multitask_cnns_slim_exactly(spec):
    check_graph(spec)


@pytest.mark.long
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs)
def test_random_multitask_cnns_slim_exactly_long(spec):
    check_graph(spec)
