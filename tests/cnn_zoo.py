"""Small multitask CNNs for the channel-group and slimming tests.

Each model has a shared trunk and two or three task heads, and exercises one family of
channel couplings. ``CNN_ZOO`` maps a name to ``(factory, example input shape)``.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ResidualNet(nn.Module):
    """Stem + two residual blocks (adds couple the trunk channels); dense, pooled-linear and
    flatten-into-linear heads."""

    def __init__(self, w: int = 8):
        super().__init__()
        self.stem = cbr(3, w)
        self.b1 = nn.Sequential(cbr(w, w), nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w))
        self.b2 = nn.Sequential(cbr(w, 2 * w), nn.Conv2d(2 * w, w, 3, padding=1), nn.BatchNorm2d(w))
        self.seg = nn.Conv2d(w, 4, 1)
        self.cls = nn.Linear(w, 5)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.reg = nn.Linear(w * 4, 2)

    def forward(self, x):
        h = self.stem(x)
        h = F.relu(h + self.b1(h))
        h = F.relu(h + self.b2(h))
        return {
            "seg": self.seg(h),
            "cls": self.cls(h.mean((2, 3))),
            "reg": self.reg(torch.flatten(self.pool(h), 1)),
        }


class ConcatNet(nn.Module):
    """DenseNet-like concatenations (offset mapping); a head branches mid-trunk."""

    def __init__(self, w: int = 6):
        super().__init__()
        self.stem = cbr(3, w)
        self.l1 = cbr(w, w)
        self.l2 = cbr(2 * w, w)
        self.trans = nn.Sequential(nn.BatchNorm2d(3 * w), nn.ReLU(), nn.Conv2d(3 * w, 2 * w, 1), nn.AvgPool2d(2))
        self.early = nn.Conv2d(2 * w, 3, 1)
        self.seg = nn.Conv2d(2 * w, 2, 3, padding=1)
        self.cls = nn.Linear(2 * w, 4)

    def forward(self, x):
        h0 = self.stem(x)
        h1 = torch.cat([h0, self.l1(h0)], 1)
        early = self.early(h1)
        h2 = torch.cat([h1, self.l2(h1)], dim=1)
        t = self.trans(h2)
        return {"early": early, "seg": F.interpolate(self.seg(t), scale_factor=2.0), "cls": self.cls(t.mean((2, 3)))}


class SplitNet(nn.Module):
    """Res2Net-like: chunk / split / slicing along channels, then concat."""

    def __init__(self, w: int = 8):
        super().__init__()
        self.stem = cbr(3, 2 * w)
        self.a = cbr(w, w)
        self.b = cbr(w // 2, w // 2)
        self.fuse = nn.Conv2d(2 * w, 2 * w, 1)
        self.seg = nn.Conv2d(2 * w, 3, 1)
        self.cls = nn.Linear(w, 2)

    def forward(self, x):
        h = self.stem(x)
        p, q = h.chunk(2, dim=1)
        q1, q2 = torch.split(q, [self.b[0].in_channels, q.shape[1] - self.b[0].in_channels], 1)
        y = torch.cat([self.a(p), self.b(q1), q2], 1)
        y = self.fuse(y)
        head = y[:, : y.size(1) // 2]
        return (self.seg(y), self.cls(head.mean((2, 3))))


class GroupedNet(nn.Module):
    """Depthwise (multiplier 2) and grouped convs, depthwise transposed conv."""

    def __init__(self, w: int = 8):
        super().__init__()
        self.stem = cbr(3, w)
        self.dw = nn.Sequential(nn.Conv2d(w, 2 * w, 3, padding=1, groups=w), nn.BatchNorm2d(2 * w), nn.ReLU6())
        self.gc = nn.Sequential(nn.Conv2d(2 * w, 2 * w, 3, padding=1, groups=4), nn.BatchNorm2d(2 * w), nn.ReLU())
        self.pw = nn.Conv2d(2 * w, w, 1)
        self.up = nn.ConvTranspose2d(w, w, 2, stride=2, groups=w)
        self.gct = nn.ConvTranspose2d(w, w, 3, padding=1, groups=2)
        self.seg = nn.Conv2d(w, 2, 1)
        self.cls = nn.Linear(2 * w, 3)

    def forward(self, x):
        h = self.stem(x)
        g = self.gc(self.dw(h))
        y = self.pw(g) + h
        y = self.gct(self.up(y).relu())
        return {"seg": self.seg(y), "cls": self.cls(g.amax((2, 3)))}


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int = 2):
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s


class SENet(nn.Module):
    """Squeeze-excitation gates and a hardswish inverted residual (MobileNetV3-like)."""

    def __init__(self, w: int = 8):
        super().__init__()
        self.stem = cbr(3, w)
        self.expand = nn.Sequential(nn.Conv2d(w, 3 * w, 1), nn.BatchNorm2d(3 * w), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(3 * w, 3 * w, 3, padding=1, groups=3 * w), nn.BatchNorm2d(3 * w), nn.Hardswish())
        self.se = SqueezeExcite(3 * w)
        self.project = nn.Sequential(nn.Conv2d(3 * w, w, 1), nn.BatchNorm2d(w))
        self.se2 = SqueezeExcite(w)
        self.seg = nn.Conv2d(w, 2, 1)
        self.cls = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(w, 3))
        self.reg = nn.Linear(3 * w, 1)

    def forward(self, x):
        h = self.stem(x)
        e = self.se(self.dw(self.expand(h)))
        y = self.se2(self.project(e) + h)
        return {"seg": self.seg(y), "cls": self.cls(F.adaptive_avg_pool2d(y, 1)),
                "reg": self.reg(e.mean(dim=(2, 3)))}


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(n, -1, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        b = c // 2
        self.branch = nn.Sequential(cbr(b, b, 1), nn.Conv2d(b, b, 3, padding=1, groups=b, bias=False),
                                    nn.BatchNorm2d(b), cbr(b, b, 1))

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((x1, self.branch(x2)), dim=1), 2)


class ShuffleNet(nn.Module):
    """ShuffleNetV2 units: chunk, concat and the view-transpose-view channel shuffle."""

    def __init__(self, w: int = 8):
        super().__init__()
        self.stem = cbr(3, 2 * w)
        self.u1 = ShuffleUnit(2 * w)
        self.u2 = ShuffleUnit(2 * w)
        self.shuffle = nn.ChannelShuffle(2)
        self.conv = cbr(2 * w, 2 * w, 1)
        self.seg = nn.Conv2d(2 * w, 2, 1)
        self.cls = nn.Linear(2 * w, 3)

    def forward(self, x):
        h = self.u2(self.u1(self.stem(x)))
        h = self.conv(self.shuffle(h))
        return {"seg": self.seg(h), "cls": self.cls(h.mean([2, 3]))}


class DecoderNet(nn.Module):
    """Encoder-decoder: strided convs, transposed-conv decoder with a skip concat, upsample."""

    def __init__(self, w: int = 6):
        super().__init__()
        self.e1 = cbr(3, w)
        self.e2 = cbr(w, 2 * w, stride=2)
        self.d1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2)
        self.fuse = cbr(2 * w, w)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.seg = nn.Conv2d(w, 3, 3, padding=1)
        self.depth = nn.Conv2d(w, 1, 1)
        self.cls = nn.Linear(2 * w, 2)

    def forward(self, x):
        s = self.e1(x)
        b = self.e2(s)
        d = self.fuse(torch.cat([self.d1(b), s], 1))
        return {"seg": self.seg(d), "depth": self.depth(self.up(F.max_pool2d(d, 2))),
                "cls": self.cls(F.adaptive_max_pool2d(b, 1).flatten(1))}


class NormNet(nn.Module):
    """GroupNorm (whole norm groups removed), InstanceNorm, PReLU per channel, LayerNorm
    over channels (channels-last; removable, masked statistics), padding and dropout."""

    def __init__(self, w: int = 8):
        super().__init__()
        self.c1 = nn.Conv2d(3, 2 * w, 3, padding=1)
        self.gn = nn.GroupNorm(4, 2 * w)
        self.act = nn.PReLU(2 * w)
        self.c2 = nn.Conv2d(2 * w, w, 3)
        self.inorm = nn.InstanceNorm2d(w, affine=True)
        self.drop = nn.Dropout2d(0.2)
        self.c3 = nn.Conv2d(w, w, 1)
        self.ln = nn.LayerNorm(w)
        self.seg = nn.Conv2d(w, 2, 1)
        self.cls = nn.Linear(w, 3)
        self.reg = nn.Linear(2 * w, 1)

    def forward(self, x):
        h = self.act(self.gn(self.c1(x)))
        g = self.drop(F.relu(self.inorm(self.c2(F.pad(h, (1, 1, 1, 1))))))
        t = self.c3(g).permute(0, 2, 3, 1)
        t = self.ln(t).permute(0, 3, 1, 2)
        return {"seg": self.seg(t), "cls": self.cls(g.mean((2, 3))), "reg": self.reg(h.sum((2, 3)))}


class FlattenNet(nn.Module):
    """Hard-coded view sizes into a Linear (each channel -> a block of features), a
    functional conv on a parameter, and a functional BatchNorm-like affine."""

    def __init__(self, w: int = 8):
        super().__init__()
        self.c1 = cbr(3, w, stride=2)
        self.kernel = nn.Parameter(torch.randn(w, w, 3, 3) * 0.1)
        self.scale = nn.Parameter(torch.rand(w) + 0.5)
        self.shift = nn.Parameter(torch.randn(w) * 0.1)
        self.fc = nn.Linear(w * 4 * 4, 6)
        self.w = w
        self.seg = nn.Conv2d(w, 2, 1)

    def forward(self, x):
        h = self.c1(x)
        h = F.conv2d(h, self.kernel, padding=1)
        h = h * self.scale.view(1, -1, 1, 1) + self.shift[None, :, None, None]
        h = F.relu(h)
        flat = F.adaptive_avg_pool2d(h, 4).view(-1, self.w * 16)
        return [self.seg(h), self.fc(flat)]


class MultiDepthNet(nn.Module):
    """Heads branching at three depths; a head's features pass a residual with a
    per-channel learnable scale (ConvNeXt layer-scale style), a matmul head and a spatial
    attention map that sums over channels (masked in front of the sum)."""

    def __init__(self, w: int = 8):
        super().__init__()
        self.s1 = cbr(3, w)
        self.s2 = cbr(w, 2 * w, stride=2)
        self.s3 = nn.Conv2d(2 * w, 2 * w, 3, padding=1)
        self.gamma = nn.Parameter(torch.full((2 * w, 1, 1), 0.5))
        self.h1 = nn.Conv2d(w, 2, 1)
        self.h2 = nn.Sequential(nn.Conv2d(2 * w, w, 1), nn.SiLU(), nn.Conv2d(w, 2, 1))
        self.proj = nn.Parameter(torch.randn(2 * w, 3) * 0.1)

    def forward(self, x):
        a = self.s1(x)
        a = a * torch.sigmoid(a.sum(1, keepdim=True))  # spatial attention: a sum over channels
        b = self.s2(a)
        c = b + self.gamma * self.s3(b)
        feats = c.mean((2, 3))
        return {"edge": self.h1(a), "seg": self.h2(b), "cls": feats @ self.proj}


class PixelNet(nn.Module):
    """Pixel shuffle / unshuffle (blocks of r*r channels), a token head (flatten + transpose
    into a per-token Linear), ``view(n, c, -1)`` pooling and a stacked branch sum."""

    def __init__(self, w: int = 4):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4 * w, 3, padding=1)
        self.c2 = nn.Sequential(nn.Conv2d(w, w, 3, padding=1), nn.InstanceNorm2d(w), nn.GELU())
        self.c3 = nn.Conv2d(4 * w, 2 * w, 1)
        self.alt = nn.Conv2d(4 * w, 2 * w, 3, padding=1)
        self.seg = nn.Conv2d(2 * w, 2, 1)
        self.cls = nn.Linear(2 * w, 3)
        self.tok = nn.Linear(2 * w, 4)

    def forward(self, x):
        h = F.pixel_shuffle(self.c1(x), 2)
        h = F.pixel_unshuffle(self.c2(h), 2)
        y = torch.stack([self.c3(h), self.alt(h)], 1).sum(1)
        n, c = y.shape[:2]
        tokens = y.flatten(2).transpose(1, 2)
        return {"seg": self.seg(y), "cls": self.cls(y.view(n, c, -1).mean(-1)),
                "tok": self.tok(tokens).mean(1)}


CNN_ZOO: Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, ...]]] = {
    "residual": (ResidualNet, (2, 3, 16, 16)),
    "concat": (ConcatNet, (2, 3, 16, 16)),
    "split": (SplitNet, (2, 3, 16, 16)),
    "grouped": (GroupedNet, (2, 3, 16, 16)),
    "se": (SENet, (2, 3, 16, 16)),
    "shuffle": (ShuffleNet, (2, 3, 16, 16)),
    "decoder": (DecoderNet, (2, 3, 16, 16)),
    "norm": (NormNet, (2, 3, 16, 16)),
    "flatten": (FlattenNet, (2, 3, 16, 16)),
    "multidepth": (MultiDepthNet, (2, 3, 16, 16)),
    "pixel": (PixelNet, (2, 3, 8, 8)),
}


def build(name: str, seed: int = 0) -> Tuple[nn.Module, torch.Tensor]:
    """The zoo model ``name`` in eval mode with non-trivial BatchNorm statistics, and an input."""
    factory, shape = CNN_ZOO[name]
    torch.manual_seed(seed)
    model = factory()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) and getattr(m, "weight", None) is not None:
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    model.eval()
    return model, torch.randn(*shape)
