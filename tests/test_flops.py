"""FLOPs per task and their drop after slimming."""
import disparse_fx as dfx
from passes.flops import count_flops
from passes.trace import trace_model

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
