"""Recurrent multitask models shared by the RNN tests (test_rnn, test_serialize,
test_budget, test_training): the shape of /work/shared/cases/case09_lstm.py."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import disparse_fx as dfx

CELLS = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}


class SeqNet(nn.Module):
    """conv1d -> sequence -> RNN -> [0] -> linear -> a per-step head and a last-step head
    (``SeqNet()`` is case09's model: one LSTM layer of 32 units, batch first)."""

    def __init__(self, cell="LSTM", num_layers=1, bidirectional=False, batch_first=True, bias=True, **kw):
        super().__init__()
        self.batch_first = batch_first
        self.conv = nn.Conv1d(6, 24, 3, padding=1)
        self.rnn = CELLS[cell](24, 32, num_layers=num_layers, bidirectional=bidirectional,
                               batch_first=batch_first, bias=bias, **kw)
        width = (kw.get("proj_size") or 32) * (2 if bidirectional else 1)
        self.proj = nn.Linear(width, 32)
        self.tag, self.cls = nn.Linear(32, 5), nn.Linear(32, 3)

    def forward(self, x):  # x: (B, 6, T)
        h = F.relu(self.conv(x))
        h = h.transpose(1, 2) if self.batch_first else h.permute(2, 0, 1)  # (B, T, 24) / (T, B, 24)
        h = self.rnn(h)[0]
        h = F.relu(self.proj(h))
        if not self.batch_first:
            h = h.transpose(0, 1)  # (B, T, 32)
        return {"tag": self.tag(h).transpose(1, 2), "cls": self.cls(h[:, -1])}


def seq_data(n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"input": torch.randn(4, 6, 12, generator=gen), "tag": torch.randint(0, 5, (4, 12), generator=gen),
             "cls": torch.randint(0, 3, (4,), generator=gen)} for _ in range(n)]


LOSSES = {"tag": lambda p, b: F.cross_entropy(p, b["tag"]), "cls": lambda p, b: F.cross_entropy(p, b["cls"])}


def compress_channels(model, data, sparsity=0.5, **cfg):
    """Channel compress (taylor) of ``model`` on ``data`` (``seq_data()``-like)."""
    return dfx.compress(model, LOSSES, data, dfx.CompressConfig(
        sparsity=sparsity, granularity="channel", criterion="taylor", num_batches=len(data), progress=False, **cfg))
