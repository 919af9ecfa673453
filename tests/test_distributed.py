"""torch.distributed: 2 gloo ranks on CPU, compared with one process over the union of shards.

One module-scoped spawn runs every distributed scenario (process start-up dominates):

- ``compress``: each rank scores its own shard; every rank must return the same plan,
  identical to a single-process run over the union of the shards. snip sums per-batch
  ``|g * w|``, so rank r's batches are the single run's batches ``r*n .. r*n + n - 1``.
  With one batch per rank the all-reduced sum is ``b0 + b1`` in both runs (bitwise
  equal scores); with two, float summation order differs (scores within tolerance).
- ``ddp``: DynamicSparsity under DistributedDataParallel (the masked GraphModule
  wrapped as is). Masks must be identical on both ranks at every update and equal to a
  single process training on the concatenation of the two ranks' batches (DDP averages
  the per-rank mean-loss gradients, which is the gradient of the concatenated mean).
"""
import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import disparse_fx as dfx
from disparse_fx import distributed
from disparse_fx.importance import default_inputs
from disparse_fx.training import DynamicSparsity

from .zoo import ZOO_BY_NAME, outputs_by_task

WORLD = 2
COMPRESS_CASES = [("two_heads_dict", 1), ("two_heads_dict", 2), ("residual_tuple", 1), ("residual_tuple", 2)]
DDP_ENTRY, DDP_STEPS, DDP_EVERY = "residual_tuple", 30, 5  # no BatchNorm: per-rank batch statistics would differ
SPAWN_TIMEOUT_S = 240


def _config(n):
    return dfx.CompressConfig(sparsity=0.8, num_batches=n, progress=False)


def _compress(entry, batches):
    return dfx.compress(entry.build(), entry.task_losses, batches, _config(len(batches)), inputs=entry.inputs)


def _shard(batches, rank, n):
    return batches[rank * n:(rank + 1) * n]


def _ddp_batches(entry):
    return entry.batches(WORLD * DDP_STEPS, seed=21)


def _concat(batches):
    first = batches[0]
    return {k: torch.cat([b[k] for b in batches]) for k in first}


def _train_dynamic(entry, result, model, batch_at):
    """Adam + DynamicSparsity; returns masks after each update, history, final weights."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = DynamicSparsity(result, entry.task_losses, opt, update_every=DDP_EVERY, end_step=DDP_STEPS,
                            inputs=entry.inputs, seed=0)
    masks = [sched.masks]
    for step in range(1, DDP_STEPS + 1):
        batch = batch_at(step)
        out = outputs_by_task(model((entry.inputs or default_inputs)(batch)))
        loss = sum(entry.task_losses[t](out[t], batch) for t in out)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched.step(batch) is not None:
            masks.append(sched.masks)
    weights = {p: w.detach().clone() for p, w in result.model.named_parameters()}
    return {"masks": masks, "history": sched.history, "weights": weights}


def _worker(rank, port, outdir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        out = {"compress": {}, "world": distributed.world_size(), "active": distributed.is_active()}
        for name, n in COMPRESS_CASES:
            entry = ZOO_BY_NAME[name]
            plan = _compress(entry, _shard(entry.batches(WORLD * n, seed=11), rank, n)).plan
            out["compress"][(name, n)] = {"masks": plan.masks, "task_masks": plan.task_masks,
                                          "task_scores": plan.task_scores, "sparsity": plan.sparsity}
        entry = ZOO_BY_NAME[DDP_ENTRY]
        result = _compress(entry, _shard(entry.batches(WORLD, seed=11), rank, 1))
        ddp = torch.nn.parallel.DistributedDataParallel(result.model)
        data = _ddp_batches(entry)
        out["ddp"] = _train_dynamic(entry, result, ddp, lambda step: data[WORLD * (step - 1) + rank])
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("ranks"))
    ctx = mp.spawn(_worker, args=(_free_port(), outdir), nprocs=WORLD, join=False)
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ctx.join(timeout=5):  # raises ProcessRaisedException with the child's traceback
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"the {WORLD} gloo ranks did not finish within {SPAWN_TIMEOUT_S}s")
    return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def _max_diff(a, b):
    return max(float((a[t][p] - b[t][p]).abs().max()) for t in a for p in a[t])


def test_ranks_saw_an_active_process_group(ranks):
    assert all(r["world"] == WORLD and r["active"] for r in ranks)


@pytest.mark.parametrize("name, n", COMPRESS_CASES)
def test_compress_on_shards_equals_one_process_on_their_union(ranks, name, n):
    entry = ZOO_BY_NAME[name]
    single = _compress(entry, entry.batches(WORLD * n, seed=11)).plan
    r0, r1 = (r["compress"][(name, n)] for r in ranks)
    for p in single.masks:  # every rank returns the same plan, and it is the single-process one
        assert torch.equal(r0["masks"][p], r1["masks"][p]), p
        assert torch.equal(r0["masks"][p], single.masks[p]), p
    for t in single.task_masks:
        for p in single.task_masks[t]:
            assert torch.equal(r0["task_masks"][t][p], single.task_masks[t][p]), (t, p)
    assert _max_diff(r0["task_scores"], r1["task_scores"]) == 0.0
    diff = _max_diff(r0["task_scores"], single.task_scores)
    if n == 1:
        assert diff == 0.0  # b0 + b1 in both runs: bitwise equal
    else:
        assert diff <= 1e-6
    assert r0["sparsity"] == r1["sparsity"] == single.sparsity


def test_ddp_dynamic_sparsity_masks_agree_across_ranks_and_with_one_process(ranks):
    entry = ZOO_BY_NAME[DDP_ENTRY]
    r0, r1 = ranks[0]["ddp"], ranks[1]["ddp"]
    assert len(r0["masks"]) == len(r1["masks"]) == 1 + len(range(DDP_EVERY, DDP_STEPS, DDP_EVERY))
    for m0, m1 in zip(r0["masks"], r1["masks"]):
        assert all(torch.equal(m0[p], m1[p]) for p in m0)
    assert all(h["mask_mismatches"] == 0 for h in r0["history"] + r1["history"])
    assert sum(h["regrown"] for h in r0["history"]) > 0

    result = _compress(entry, entry.batches(WORLD, seed=11))
    data = _ddp_batches(entry)
    single = _train_dynamic(entry, result, result.model,
                            lambda step: _concat(data[WORLD * (step - 1):WORLD * step]))
    for i, (m0, ms) in enumerate(zip(r0["masks"], single["masks"])):
        assert all(torch.equal(m0[p], ms[p]) for p in m0), f"update {i}"
    assert [h["sparsity"] for h in r0["history"]] == [h["sparsity"] for h in single["history"]]
    for p, w in single["weights"].items():
        torch.testing.assert_close(r0["weights"][p], w, rtol=1e-4, atol=1e-5)
        assert torch.equal(r0["weights"][p], r1["weights"][p]), p


def test_helpers_are_no_ops_without_a_process_group():
    assert not distributed.is_active() and distributed.world_size() == 1 and distributed.rank() == 0
    t = torch.arange(4.0)
    distributed.all_reduce_mean_([t])
    distributed.broadcast_([t])
    assert torch.equal(t, torch.arange(4.0))


@pytest.mark.long
def test_example_trains_under_torchrun_with_two_ranks(tmp_path):
    """examples/train_dynamic_ddp.py as documented, shortened: torchrun, 2 gloo ranks."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "history.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(root / "examples" / "train_dynamic_ddp.py"), "--steps", "8", "--update-every", "2",
           "--image-size", "16", "--batch-size", "2", "--importance-batches", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    history = json.loads(out.read_text())
    assert history["masks_identical"] is True
    assert [s for s, _ in history["sparsity"]] == [0, 2, 4]
    assert all(abs(v - 0.9) <= 0.0025 for _, v in history["sparsity"])
