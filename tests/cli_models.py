"""Model and data factories for the CLI tests (`tests.cli_models:small_model`)."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class SmallTwoTask(nn.Module):
    """A conv trunk with BatchNorm shared by a per-pixel head and a classifier."""

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


def small_model():
    torch.manual_seed(0)
    return SmallTwoTask()


def small_data():
    """(batches, task_losses) for small_model."""
    gen = torch.Generator().manual_seed(0)
    batches = [{"input": torch.randn(4, 3, 8, 8, generator=gen),
                "seg": torch.randint(0, 3, (4, 8, 8), generator=gen),
                "cls": torch.randint(0, 4, (4,), generator=gen)} for _ in range(2)]
    losses = {"seg": lambda p, b: F.cross_entropy(p, b["seg"]), "cls": lambda p, b: F.cross_entropy(p, b["cls"])}
    return batches, losses


def not_a_model():
    return 42
