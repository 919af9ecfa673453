"""FLOPs per task and their drop after slimming."""
import torch
import torch.nn as nn

import disparse_fx as dfx
from disparse_fx.passes.flops import count_flops
from disparse_fx.passes.trace import trace_model

from .zoo import ZOO_BY_NAME, example_input


def test_per_task_flops_and_slim_reduction():
    entry = ZOO_BY_NAME["mid_trunk_branch"]
    model = entry.build()
    x = example_input(entry)
    dense = count_flops(trace_model(model), (x,))
    # 'early' needs layer1 + its head only; 'late' the whole trunk
    assert dense.per_task["early"] < dense.per_task["late"] <= dense.total
    assert dense.per_task["early"] == dense.per_node["layer1"] + dense.per_node["early"]
    result = dfx.compress(model, entry.task_losses, entry.batches(2), dfx.CompressConfig(
        sparsity=0.5, granularity="channel", num_batches=2, progress=False))
    slim = count_flops(dfx.slim(result), (x,))
    assert slim.total < dense.total
    masked = count_flops(dfx.compress(model, entry.task_losses, entry.batches(2), dfx.CompressConfig(
        sparsity=0.9, num_batches=2, progress=False)).model, (x,))
    assert masked.total == dense.total  # dense FLOPs unchanged by element masks...
    assert masked.effective_total < 0.2 * dense.total  # ...effective FLOPs follow the density


def test_attention_flops_are_counted():
    """MultiheadAttention, scaled_dot_product_attention, einsum and Swin's window attention
    count their products (projections, q k^T, attention x v), by hand here."""
    import torch.nn.functional as F
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.swin = ShiftedWindowAttention(8, [2, 2], [0, 0], 2)

        def forward(self, x, img):  # x (N, L, 8), img (N, 4, 4, 8)
            a = self.mha(x, x, x, need_weights=False)[0]
            q = x.view(2, 5, 2, 4).transpose(1, 2)
            s = F.scaled_dot_product_attention(q, q, q)
            e = torch.einsum("bhid,bhjd->bhij", q, q)
            return {"a": a, "s": s, "e": e, "w": self.swin(img)}

    x, img = torch.randn(2, 5, 8), torch.randn(2, 4, 4, 8)
    f = count_flops(trace_model(Attn()), (x, img))
    by_kind = {}
    for name, v in f.per_node.items():
        by_kind[name.split("_")[0]] = by_kind.get(name.split("_")[0], 0) + v
    # per sample: projections 5 tokens x 8 x (8 + 16) + out 5 x 8 x 8; attention 2 heads x 5 x 5 x (4 + 4)
    assert by_kind["mha"] == 2 * (5 * 8 * 24 + 5 * 8 * 8 + 2 * 5 * 5 * 8)
    assert by_kind["scaled"] == 2 * (2 * 5 * 5 * (4 + 4))
    assert by_kind["einsum"] == 2 * (2 * 5 * 5 * 4)
    # 16 tokens, windows of 4: qkv 16 x 8 x 24, q k^T and attn x v 16 x 4 x 8 each, proj 16 x 8 x 8
    assert by_kind["shifted"] == 2 * (16 * 8 * 24 + 16 * 4 * 2 * 8 + 16 * 8 * 8)
