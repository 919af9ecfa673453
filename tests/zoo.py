"""A zoo of small multitask models shared by the core tests.

Each entry carries a hand-written ownership expectation (which tasks each parameter
reaches), a batch generator and task losses, so one test can be parametrized over all
of them. Structures covered: shared trunk + 2-4 heads; residual add; concat; weight
tying; dict, tuple and list outputs; a head branching mid-trunk; an unused parameter;
a functional conv through get_attr; BatchNorm; dropout.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ZooEntry:
    name: str
    factory: Callable[[], nn.Module]
    owners: Mapping[str, frozenset]  # expected ownership of EVERY parameter
    task_losses: Any  # dict or list, as the model's outputs
    make_batch: Callable[[torch.Generator], Any]
    inputs: Callable[[Any], Any] = None  # None = the default rule
    input_shape: tuple = field(default=(4, 3, 8, 8))

    def build(self, seed: int = 0) -> nn.Module:
        """The model with weights drawn from ``seed`` (the global RNG is left alone)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.factory()

    def batches(self, n: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        return [self.make_batch(gen) for _ in range(n)]


def _img_batch(gen, n=4, c=3, hw=8, **targets):
    batch = {"input": torch.randn(n, c, hw, hw, generator=gen)}
    for key, (kind, shape) in targets.items():
        if kind == "class":
            batch[key] = torch.randint(0, shape[0], (n, *shape[1:]), generator=gen)
        else:
            batch[key] = torch.randn(n, *shape, generator=gen)
    return batch


def _ce(key):
    return lambda pred, batch: F.cross_entropy(pred, batch[key])


def _mse(key):
    return lambda pred, batch: F.mse_loss(pred, batch[key])


# ---------------------------------------------------------------- models
class TwoHeadsDict(nn.Module):
    """Conv trunk with BN shared by a per-pixel head and a pooled classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.seg = nn.Conv2d(8, 3, 1)
        self.cls = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.body(F.relu(self.bn(self.stem(x)))))
        return {"seg": self.seg(h), "cls": self.cls(h.mean((2, 3)))}


class ResidualTuple(nn.Module):
    """Residual block in the trunk; three heads returned as a tuple."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block1 = nn.Conv2d(8, 8, 3, padding=1)
        self.block2 = nn.Conv2d(8, 8, 3, padding=1)
        self.h0 = nn.Conv2d(8, 2, 1)
        self.h1 = nn.Linear(8, 3)
        self.h2 = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 1))

    def forward(self, x):
        s = F.relu(self.stem(x))
        h = F.relu(s + self.block2(F.relu(self.block1(s))))
        p = h.mean((2, 3))
        return self.h0(h), self.h1(p), self.h2(p)


class ConcatList(nn.Module):
    """Two trunk branches concatenated; four heads returned as a list; dropout."""

    def __init__(self):
        super().__init__()
        self.left = nn.Conv2d(3, 4, 3, padding=1)
        self.right = nn.Conv2d(3, 4, 1)
        self.fuse = nn.Conv2d(8, 8, 3, padding=1)
        self.drop = nn.Dropout(0.1)
        self.heads = nn.ModuleList([nn.Linear(8, k) for k in (2, 3, 4, 5)])

    def forward(self, x):
        h = F.relu(self.fuse(torch.cat([self.left(x), self.right(x)], dim=1)))
        p = self.drop(h.mean((2, 3)))
        return [head(p) for head in self.heads]


class TiedHeads(nn.Module):
    """Two heads share one weight (tying): it belongs to both tasks, counted once."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(12, 16)
        self.head_a = nn.Linear(16, 6)
        self.head_b = nn.Linear(16, 6)
        self.head_b.weight = self.head_a.weight  # tied
        self.own_c = nn.Linear(16, 2)

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        return {"a": self.head_a(h), "b": self.head_b(h), "c": self.own_c(h)}


class MidTrunkBranch(nn.Module):
    """Task 'early' branches off after layer1; 'late' uses the whole trunk."""

    def __init__(self):
        super().__init__()
        self.layer1 = nn.Conv2d(3, 8, 3, padding=1)
        self.layer2 = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.layer3 = nn.Conv2d(8, 16, 3, padding=1)
        self.early = nn.Conv2d(8, 2, 1)
        self.late = nn.Linear(16, 3)

    def forward(self, x):
        a = F.relu(self.layer1(x))
        b = F.relu(self.layer3(F.relu(self.layer2(a))))
        return {"early": self.early(a), "late": self.late(b.amax((2, 3)))}


class WithUnused(nn.Module):
    """A module never called by forward: its parameters are unused (never pruned)."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(12, 16)
        self.a = nn.Linear(16, 3)
        self.b = nn.Linear(16, 2)
        self.spare = nn.Linear(16, 16)

    def forward(self, x):
        h = F.relu(self.trunk(x))
        return {"a": self.a(h), "b": self.b(h)}


class FunctionalConv(nn.Module):
    """Trunk kernel as a bare Parameter used by F.conv2d (a get_attr node)."""

    def __init__(self):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.2)
        self.kernel_bias = nn.Parameter(torch.zeros(8))
        self.a = nn.Conv2d(8, 2, 1)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(F.conv2d(x, self.kernel, self.kernel_bias, padding=1))
        return {"a": self.a(h), "b": self.b(h.mean((2, 3)))}


def _owners(spec: Dict[str, tuple]) -> Dict[str, frozenset]:
    return {p: frozenset(ts) for p, ts in spec.items()}


def _both(prefixes, tasks):
    return {f"{pre}.{leaf}": tasks for pre in prefixes for leaf in ("weight", "bias")}


SEG_CLS = dict(seg=("class", (3, 8, 8)), cls=("class", (4,)))

ZOO = [
    ZooEntry(
        "two_heads_dict", TwoHeadsDict,
        _owners({**_both(["stem", "bn", "body"], ("seg", "cls")), **_both(["seg"], ("seg",)),
                 **_both(["cls"], ("cls",))}),
        {"seg": _ce("seg"), "cls": _ce("cls")},
        lambda g: _img_batch(g, **SEG_CLS),
    ),
    ZooEntry(
        "residual_tuple", ResidualTuple,
        _owners({**_both(["stem", "block1", "block2"], (0, 1, 2)), **_both(["h0"], (0,)),
                 **_both(["h1"], (1,)), **_both(["h2.0", "h2.2"], (2,))}),
        [_ce("t0"), _ce("t1"), _mse("t2")],
        lambda g: _img_batch(g, t0=("class", (2, 8, 8)), t1=("class", (3,)), t2=("reg", (1,))),
    ),
    ZooEntry(
        "concat_list", ConcatList,
        _owners({**_both(["left", "right", "fuse"], (0, 1, 2, 3)),
                 **{k: v for i in range(4) for k, v in _both([f"heads.{i}"], (i,)).items()}}),
        [_ce(f"t{i}") for i in range(4)],
        lambda g: _img_batch(g, **{f"t{i}": ("class", (k,)) for i, k in enumerate((2, 3, 4, 5))}),
    ),
    ZooEntry(
        "tied_heads", TiedHeads,
        _owners({**_both(["trunk"], ("a", "b", "c")), "head_a.weight": ("a", "b"),
                 "head_a.bias": ("a",), "head_b.bias": ("b",), **_both(["own_c"], ("c",))}),
        {"a": _mse("a"), "b": _mse("b"), "c": _ce("c")},
        lambda g: {"x": torch.randn(4, 12, generator=g), "a": torch.randn(4, 6, generator=g),
                   "b": torch.randn(4, 6, generator=g), "c": torch.randint(0, 2, (4,), generator=g)},
        inputs=lambda b: b["x"],
        input_shape=(4, 12),
    ),
    ZooEntry(
        "mid_trunk_branch", MidTrunkBranch,
        _owners({**_both(["layer1"], ("early", "late")), **_both(["layer2", "layer3", "late"], ("late",)),
                 **_both(["early"], ("early",))}),
        {"early": _ce("early"), "late": _ce("late")},
        lambda g: _img_batch(g, early=("class", (2, 8, 8)), late=("class", (3,))),
    ),
    ZooEntry(
        "with_unused", WithUnused,
        _owners({**_both(["trunk"], ("a", "b")), **_both(["a"], ("a",)), **_both(["b"], ("b",)),
                 **_both(["spare"], ())}),
        # batches are (x, targets) tuples: the default inputs rule takes batch[0]
        {"a": lambda p, b: F.mse_loss(p, b[1]["a"]), "b": lambda p, b: F.cross_entropy(p, b[1]["b"])},
        lambda g: (torch.randn(4, 12, generator=g),
                   {"a": torch.randn(4, 3, generator=g), "b": torch.randint(0, 2, (4,), generator=g)}),
        input_shape=(4, 12),
    ),
    ZooEntry(
        "functional_conv", FunctionalConv,
        _owners({"kernel": ("a", "b"), "kernel_bias": ("a", "b"), **_both(["a"], ("a",)),
                 **_both(["b"], ("b",))}),
        {"a": _ce("a"), "b": _ce("b")},
        lambda g: _img_batch(g, a=("class", (2, 8, 8)), b=("class", (3,))),
    ),
]

ZOO_BY_NAME = {e.name: e for e in ZOO}


def example_input(entry: ZooEntry, seed: int = 123) -> torch.Tensor:
    return torch.randn(*entry.input_shape, generator=torch.Generator().manual_seed(seed))


def outputs_by_task(out) -> Dict[Hashable, torch.Tensor]:
    return dict(out) if isinstance(out, dict) else dict(enumerate(out))


def assert_slim_matches(masked: nn.Module, slim: nn.Module, x, *, atol: float = 1e-4, rtol: float = 1e-4):
    """The masked and the slim model agree on ``x`` task by task (both in eval mode, no
    grad) within ``atol`` / ``rtol``; returns the slim model's outputs."""
    masked.eval()
    slim.eval()
    with torch.no_grad():
        want, got = masked(x), slim(x)
    for task in want:
        assert torch.allclose(want[task], got[task], atol=atol, rtol=rtol), task
    return got
