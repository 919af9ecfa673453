"""Vision transformers as 3-task models: what channel compress + slim removes, and CPU latency.

    python benchmarks/transformer_slim.py              # writes benchmarks/results/transformer_slim.md
    python benchmarks/transformer_slim.py --smoke      # swin_t only, print only (used by the tests)

Every torchvision ``vit_*``, ``swin_*`` and ``maxvit_t`` (``weights=None``) is wrapped
as in tests/test_transformer_coverage.py (dense, pooled-classify and regression heads on
the shared trunk) and compressed with ``dfx.compress(granularity="channel",
sparsity=0.5)`` (snip, one batch of 2 random images with random targets, each task's
own MSE loss), once per attention policy ("heads", "head_dims"); then ``dfx.slim``
(which checks parity with the masked model). Reported: parameters before/after, the
attention heads and head width before/after (summed over attention layers), the time
compress and slim took, and the CPU latency of one batch-1 forward of the original and
the slim model, measured interleaved (median over rounds, one thread).
``vit_h_14`` (632M parameters) is left out unless ``--huge`` is given.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402

import disparse_fx as dfx  # noqa: E402
from disparse_fx.latency import interleaved_latency, torch_runner  # noqa: E402
from disparse_fx.zoo import multitask_from_torchvision  # noqa: E402

TASKS = {"seg": ("dense", 3), "cls": ("classify", 5), "reg": ("regress", 2)}
MODELS = ["vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "swin_t", "swin_s", "swin_b",
          "swin_v2_t", "swin_v2_s", "swin_v2_b", "maxvit_t"]


def attention_sizes(model: torch.nn.Module):
    """(attention layers, total heads, head widths seen) over the model's attention modules
    and Swin window-attention calls."""
    from disparse_fx.passes.attention import MultiheadAttention as Slimmable

    layers, heads, widths = 0, 0, set()
    for m in model.modules():
        if isinstance(m, (torch.nn.MultiheadAttention, Slimmable)):
            layers += 1
            heads += m.num_heads
            widths.add(getattr(m, "head_dim", m.embed_dim // m.num_heads))
    for gm in [m for m in model.modules() if isinstance(m, torch.fx.GraphModule)]:
        for n in gm.graph.nodes:
            if n.op == "call_function" and getattr(n.target, "__name__", "") == "shifted_window_attention":
                h = n.args[5] if len(n.args) > 5 else n.kwargs["num_heads"]
                weight = n.args[1]
                while weight.op != "get_attr":  # the masked model multiplies it by a channel mask
                    weight = weight.args[0]
                qkv_rows = gm.get_parameter(weight.target).shape[0]
                layers, heads = layers + 1, heads + h
                widths.add(qkv_rows // (3 * h))
    return layers, heads, widths


def maxvit_heads(model):
    """MaxViT's attention is hand-written (no module holds a head count): its heads are
    the head columns of its relative-position bias tables."""
    total = 0
    for name, p in model.named_parameters():
        if name.endswith("relative_position_bias_table"):
            total += p.shape[-1]
    return total


def run_one(name: str, policy: str, rounds: int):
    torch.manual_seed(0)
    model = multitask_from_torchvision(name, TASKS, head_width=32).eval()
    size = model.info.input_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, size, size, generator=gen)
    with torch.no_grad():
        targets = {t: torch.randn(v.shape, generator=gen) for t, v in model(x).items()}
    losses = {t: (lambda key: lambda p, b: F.mse_loss(p, b[key]))(t) for t in targets}
    t0 = time.perf_counter()
    result = dfx.compress(model, losses, [{"input": x, **targets}], dfx.CompressConfig(
        sparsity=0.5, granularity="channel", num_batches=1, progress=False, attention=policy))
    t1 = time.perf_counter()
    slim = dfx.slim(result)
    t2 = time.perf_counter()
    n0 = sum(p.numel() for p in model.parameters())
    n1 = sum(p.numel() for p in slim.parameters())
    if name.startswith("maxvit"):
        h0, h1 = maxvit_heads(model), maxvit_heads(slim)
        heads = f"{h0} -> {h1} (relative-bias head columns)"
    else:
        (l0, h0, w0), (_, h1, w1) = attention_sizes(result.model), attention_sizes(slim)
        heads = f"{h0} -> {h1} heads in {l0} layers; width {sorted(map(str, w0))} -> {sorted(map(str, w1))}"
    one = x[:1]
    lat = interleaved_latency({"original": torch_runner(model, one), "slim": torch_runner(slim, one)},
                              rounds=rounds, warmup=1)
    return [name, policy, f"{n0 / 1e6:.1f}M", f"{n1 / 1e6:.1f}M", f"{1 - n1 / n0:.1%}",
            f"{result.plan.sparsity:.3f}", heads, f"{t1 - t0:.1f}", f"{t2 - t1:.1f}",
            f"{lat['original'] * 1e3:.0f}", f"{lat['slim'] * 1e3:.0f}", f"{lat['original'] / lat['slim']:.2f}x"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="swin_t only, fewer rounds; print only")
    ap.add_argument("--huge", action="store_true", help="also vit_h_14 (needs ~40 GB)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=pathlib.Path, default=None)
    _common.add_threads_argument(ap)
    args = ap.parse_args(argv)
    _common.set_threads(args.threads)
    warnings.simplefilter("ignore")
    names = ["swin_t"] if args.smoke else MODELS + (["vit_h_14"] if args.huge else [])
    started = time.strftime("%Y-%m-%d %H:%M")
    rows = []
    for name in names:
        for policy in ("heads", "head_dims"):
            rows.append(run_one(name, policy, 2 if args.smoke else args.rounds))
            print(" | ".join(rows[-1]), flush=True)
    table = tabulate(rows, headers=["model", "attention", "params", "slim params", "removed", "plan sparsity",
                                    "attention sizes", "compress s", "slim s", "original ms", "slim ms",
                                    "speed-up"], tablefmt="github")
    text = _common.header("Vision transformers: channel compress 50% + slim", [
        "model: torchvision classifier (weights=None) as a 3-task model (dense 3, classify 5, regress 2; heads 32 "
        "wide); input 2 x 3 x 224 x 224 (ViT, MaxViT) or 64 x 64 (Swin)",
        "compress: DiSparse, snip, 1 batch, sparsity 0.5 of the prunable (conv, linear, attention projection) "
        "weights after slimming; slim parity with the masked model checked in code",
        "latency: batch 1, eval, no grad, median of interleaved rounds (original vs slim, same process)",
    ], started=started) + table + "\n"
    _common.write(_common.out_path(args.out, args.smoke, "transformer_slim.md"), text)


if __name__ == "__main__":
    main()
