"""Dynamic DiSparse sparse training of a multitask model under DistributedDataParallel.

Run on CPU with two processes (gloo)::

    torchrun --nproc_per_node=2 examples/train_dynamic_ddp.py --steps 300

On GPUs the same command picks NCCL and one GPU per process; without torchrun it runs
as a single process. What happens:

1. every rank builds the same DeepLab-ResNet ("tiny": dilated ResNet trunk shared by
   four ASPP-like task heads) from the same seed;
2. ``dfx.compress`` scores each rank's own shard of the data per task; the scores are
   all-reduced, so every rank gets the same plan (the target sparsity);
3. the masked GraphModule is wrapped in DistributedDataParallel and trained with Adam;
   ``DynamicSparsity`` starts from ERK densities with random masks and, every
   ``--update-every`` steps until ``--end-step``, drops the smallest-magnitude live
   weights of each layer and regrows by per-task gradient (averaged across ranks);
4. rank 0 logs the sparsity after each update and the per-task losses; at the end the
   ranks check that their masks are identical.

The data is generated (smooth random images): the tasks are denoising, a 6-class
intensity segmentation, an edge map and a brightness "keypoint" map, all computed from
the clean image, so the losses can go down.
"""
from __future__ import annotations

import argparse
import json
import logging
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import disparse_fx as dfx
from disparse_fx.training import DynamicSparsity

log = logging.getLogger("train_dynamic_ddp")

TASKS = {"edge": ("dense", 1), "keypoint": ("dense", 1), "segment": ("dense", 6), "denoise": ("dense", 3)}


def build_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    try:
        from disparse_fx.zoo import DEFAULT_TASKS, deeplab_resnet
        return deeplab_resnet(DEFAULT_TASKS, size="tiny")
    except ImportError:  # an install without the zoo: a small stand-in with the same tasks
        return _SmallMultitask()


class _SmallMultitask(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                         torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU())
        self.heads = torch.nn.ModuleDict({t: torch.nn.Conv2d(16, c, 1) for t, (_, c) in TASKS.items()})

    def forward(self, x):
        h = self.trunk(x)
        return {t: head(h) for t, head in self.heads.items()}


def make_batch(gen: torch.Generator, batch_size: int, size: int) -> dict:
    noise = torch.rand(batch_size, 3, size // 4, size // 4, generator=gen)
    clean = F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)
    gray = clean.mean(1, keepdim=True)
    gx = gray[..., :, 1:] - gray[..., :, :-1]
    gy = gray[..., 1:, :] - gray[..., :-1, :]
    grad = F.pad(gx.abs(), (0, 1)) + F.pad(gy.abs(), (0, 0, 0, 1))
    return {
        "input": clean + 0.1 * torch.randn(clean.shape, generator=gen),
        "denoise": clean,
        "segment": (gray[:, 0] * 6).clamp(0, 5).long(),
        "edge": (grad > grad.flatten(1).median(1).values.view(-1, 1, 1, 1)).float(),
        "keypoint": gray.square(),
    }


TASK_LOSSES = {
    "edge": lambda p, b: F.binary_cross_entropy_with_logits(p, b["edge"]),
    "keypoint": lambda p, b: F.mse_loss(p, b["keypoint"]),
    "segment": lambda p, b: F.cross_entropy(p, b["segment"]),
    "denoise": lambda p, b: F.l1_loss(p, b["denoise"]),
}


def to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--update-every", type=int, default=25)
    ap.add_argument("--end-step", type=int, default=None, help="default: 75%% of --steps (the paper's ratio)")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--batch-size", type=int, default=8, help="per rank")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--importance-batches", type=int, default=4, help="per rank")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the sparsity/loss history as JSON (rank 0)")
    args = ap.parse_args(argv)

    distributed = "RANK" in os.environ  # launched by torchrun
    if distributed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(message)s")

    model = build_model(args.seed).to(device)
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)  # this rank's shard of the data
    shard = [make_batch(gen, args.batch_size, args.image_size) for _ in range(args.importance_batches)]
    config = dfx.CompressConfig(sparsity=args.sparsity, num_batches=args.importance_batches, progress=False,
                                seed=args.seed)
    result = dfx.compress(model, TASK_LOSSES, [to(b, device) for b in shard], config)
    log.info("compress: %d ranks, plan sparsity %.4f over %d prunable weights", world, result.plan.sparsity,
             len(result.plan.prunable))

    gm = result.model.train()
    ddp = torch.nn.parallel.DistributedDataParallel(gm, device_ids=[device.index] if device.type == "cuda" else None) \
        if distributed else gm
    opt = torch.optim.Adam(ddp.parameters(), lr=args.lr, weight_decay=5e-4)
    end_step = args.end_step or max(1, int(0.75 * args.steps))
    sched = DynamicSparsity(result, TASK_LOSSES, opt, update_every=args.update_every, end_step=end_step,
                            init="erk", seed=args.seed)
    dens = sched.densities()
    log.info("ERK init: sparsity %.4f; layer densities %.3f..%.3f, %d of %d layers dense", sched.sparsity,
             min(dens.values()), max(dens.values()), sum(d == 1.0 for d in dens.values()), len(dens))

    history = {"sparsity": [(0, sched.sparsity)], "loss": []}
    for step in range(1, args.steps + 1):
        batch = to(make_batch(gen, args.batch_size, args.image_size), device)
        out = ddp(batch["input"])
        losses = {t: fn(out[t], batch) for t, fn in TASK_LOSSES.items()}
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        entry = sched.step(batch)
        if entry is not None:
            history["sparsity"].append((step, entry["sparsity"]))
            log.info("step %4d: update, drop fraction %.3f, regrown %5d, sparsity %.4f", step,
                     entry["prune_fraction"], entry["regrown"], entry["sparsity"])
        if step % args.log_every == 0 or step == args.steps:
            history["loss"].append((step, {t: float(v.detach()) for t, v in losses.items()}))
            log.info("step %4d: loss %.4f (%s)", step, float(loss.detach()),
                     ", ".join(f"{t} {float(v.detach()):.3f}" for t, v in losses.items()))

    flat = torch.cat([m.reshape(-1).float() for m in sched.masks.values()])
    if distributed:
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        identical = all(torch.equal(g, gathered[0]) for g in gathered)
    else:
        identical = True
    log.info("final sparsity %.4f (target %.4f); masks identical on all %d ranks: %s",
             sched.sparsity, args.sparsity, world, identical)
    history["masks_identical"] = identical
    if args.out and rank == 0:
        with open(args.out, "w") as f:
            json.dump(history, f, indent=1)
    if distributed:
        dist.destroy_process_group()
    return history


if __name__ == "__main__":
    main()
