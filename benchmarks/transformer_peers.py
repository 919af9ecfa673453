"""Structural coverage on vision transformers: disparse_fx vs Torch-Pruning, side by side.

    python benchmarks/transformer_peers.py             # writes benchmarks/results/transformer_peers.md
    python benchmarks/transformer_peers.py --smoke     # vit_b_32 only, print only

For each torchvision transformer (``weights=None``, single-task classifier as
Torch-Pruning expects it; its classifier head is left alone by both tools), both tools
are asked for the same thing: remove 50% of the channels structurally, whole attention
heads included, and return a model that runs.

- disparse_fx: ``dfx.compress(granularity="channel", sparsity=0.5, criterion="magnitude",
  attention="heads")`` + ``dfx.slim`` (parity with the masked model checked in code);
- Torch-Pruning (the benchmark-only ``bench`` extra): ``MetaPruner`` with
  ``GroupMagnitudeImportance``, ``pruning_ratio=0.5``, ``num_heads`` for every
  ``nn.MultiheadAttention`` (``prune_num_heads=True, head_pruning_ratio=0.5``), the
  classifier in ``ignored_layers``, then the attribute fix-ups its ViT example does
  (``num_heads`` / ``head_dim`` / ``embed_dim`` of the attention modules, the ViT's
  ``hidden_dim``). Swin's window attention takes its weights as function arguments:
  Torch-Pruning has no way to be told its heads, so it runs with its defaults there.

Each run happens in a child process with a time limit (``--timeout``, default 300 s):
a run with no result within it is reported as "hangs (killed)" (it may be very slow
rather than stuck; the other tool needs seconds on the same model). "runs" means the pruned model's forward on the example
input returns the right output shape. Reported: outcome, parameters before/after and
wall time. This compares coverage, not accuracy (random weights, no fine-tuning).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import pathlib
import sys
import time
import traceback
import warnings

import torch
from tabulate import tabulate

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402

MODELS = ["vit_b_16", "vit_b_32", "vit_l_32", "swin_t", "swin_s", "swin_v2_t", "maxvit_t"]


def _build(name: str):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    size = 224 if name.startswith(("vit", "maxvit")) else 64
    return model, torch.randn(1, 3, size, size)


def _classifier(model):
    for attr in ("heads", "head", "classifier"):
        if hasattr(model, attr):
            return getattr(model, attr)
    raise AttributeError("no classifier")


def run_ours(name: str):
    import torch.nn.functional as F

    import disparse_fx as dfx

    model, x = _build(name)
    n0 = sum(p.numel() for p in model.parameters())
    out_shape = model(x).shape
    config = dfx.CompressConfig(sparsity=0.5, granularity="channel", criterion="magnitude", attention="heads",
                                progress=False)
    result = dfx.compress(model, [lambda p, b: F.mse_loss(p, torch.zeros_like(p))], [x], config, inputs=lambda b: b)
    slim = dfx.slim(result)  # the classifier's outputs reach the task output: never removed
    with torch.no_grad():
        ok = tuple(slim.eval()(x).shape) == tuple(out_shape)
    return ok, n0, sum(p.numel() for p in slim.parameters())


def run_tp(name: str):
    import torch_pruning as tp
    from torchvision.models.vision_transformer import VisionTransformer

    model, x = _build(name)
    n0 = sum(p.numel() for p in model.parameters())
    out_shape = model(x).shape
    num_heads = {m: m.num_heads for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)}
    imp = tp.importance.GroupMagnitudeImportance(p=2)
    pruner = tp.pruner.MetaPruner(model, x, importance=imp, pruning_ratio=0.5, ignored_layers=[_classifier(model)],
                                  num_heads=num_heads, prune_num_heads=bool(num_heads), prune_head_dims=False,
                                  head_pruning_ratio=0.5 if num_heads else 0.0)
    pruner.step()
    for m in num_heads:  # the fix-ups of Torch-Pruning's torchvision ViT example
        m.num_heads = pruner.num_heads[m]
        m.embed_dim = m.out_proj.in_features
        m.head_dim = m.embed_dim // m.num_heads
        m.kdim = m.vdim = m.in_proj_weight.shape[1]
        m._qkv_same_embed_dim = m.kdim == m.embed_dim
    if isinstance(model, VisionTransformer):
        model.hidden_dim = model.conv_proj.out_channels
    with torch.no_grad():
        ok = tuple(model(x).shape) == tuple(out_shape)
    return ok, n0, sum(p.numel() for p in model.parameters())


def _child(tool: str, name: str, queue) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    try:
        ok, n0, n1 = (run_ours if tool == "disparse_fx" else run_tp)(name)
        queue.put(("runs" if ok else "wrong output shape", n0, n1, time.perf_counter() - t0, ""))
    except Exception as exc:  # noqa: BLE001 - the outcome is the measurement
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        queue.put(("error", None, None, time.perf_counter() - t0, last[:160]))


def run_one(tool: str, name: str, timeout: float):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(tool, name, queue))
    t0 = time.perf_counter()
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return "hangs (killed)", None, None, time.perf_counter() - t0, f"no result after {timeout:.0f} s"
    if queue.empty():
        return "crashed", None, None, time.perf_counter() - t0, f"exit code {proc.exitcode}"
    return queue.get()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="vit_b_32 only; print only")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--out", type=pathlib.Path, default=None)
    args = ap.parse_args(argv)
    try:
        import torch_pruning as tp
        tp_version = getattr(tp, "__version__", "?")
    except Exception as exc:  # noqa: BLE001
        sys.exit(f"torch-pruning is not importable ({exc}); pip install -e '.[bench]'")
    started = time.strftime("%Y-%m-%d %H:%M")
    rows = []
    for name in (["vit_b_32"] if args.smoke else MODELS):
        for tool in ("disparse_fx", "Torch-Pruning"):
            outcome, n0, n1, secs, note = run_one(tool, name, args.timeout)
            removed = f"{1 - n1 / n0:.1%}" if n0 and n1 else "-"
            rows.append([name, tool, outcome, f"{n0 / 1e6:.1f}M" if n0 else "-", f"{n1 / 1e6:.1f}M" if n1 else "-",
                         removed, f"{secs:.0f}", note])
            print(" | ".join(map(str, rows[-1])), flush=True)
    table = tabulate(rows, headers=["model", "tool", "outcome", "params", "after", "removed", "wall s", "note"],
                     tablefmt="github", disable_numparse=True)
    text = _common.header("Vision transformers: structural pruning coverage, disparse_fx vs Torch-Pruning", [
        f"torch-pruning {tp_version}; each run in a child process, one thread, limit {args.timeout:.0f} s",
        "task: single-task torchvision classifier (weights=None), 50% channels incl. whole heads, classifier kept; "
        "magnitude criterion for both (no data)",
    ], started=started) + table + "\n"
    _common.write(_common.out_path(args.out, args.smoke, "transformer_peers.md"), text)


if __name__ == "__main__":
    main()
