"""Speed: dense vs slim vs the same architecture built natively at the slim widths (CPU).

For multitask models with resnet50, mobilenet_v3_large and convnext_tiny trunks
(disparse_fx.zoo.multitask_from_torchvision, the four dense tasks of the built-in
dataset) and the zoo DeepLab-ResNet ('small' preset), at 30/50/70% channel sparsity
(criterion magnitude: data-free; one random batch only gives the shapes), with
``round_to`` 1 and 8, this measures parameters, FLOPs (passes.flops.count_flops: conv
and linear multiply-adds per image) and CPU latency - PyTorch eager and onnxruntime,
batch 1 and 8, interleaved rounds, medians (disparse_fx.latency) - of:

- dense: the model as built;
- slim: disparse_fx.slim() of the compressed model (an fx.GraphModule);
- native: the limit - the original eager model (its own Python forward) with every
  parameter and buffer replaced by a fresh tensor of the slim model's shape and every
  conv/linear/norm module's width attributes set accordingly. DeepLabMultiTask's
  constructor takes one global width, and torchvision's constructors fixed per-stage
  widths, so per-layer slim widths cannot come from a constructor call; rebuilding the
  modules in place is the closest native equivalent. It carries the slim weights, and
  its outputs are checked against the slim model's.

    python benchmarks/speed.py                 # default: 128x128 input, 5 rounds (~15 min on 2 cores)
    python benchmarks/speed.py --full          # 224x224, 15 rounds
    python benchmarks/speed.py --smoke --out /tmp/speed.md   # seconds; used by the tests

Writes benchmarks/results/speed.md and speed.png (speed-up against FLOPs reduction).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import math
import pathlib
import sys
import tempfile
import time
from typing import Dict, List

import torch
import torch.nn as nn
from tabulate import tabulate

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402

import disparse_fx as dfx  # noqa: E402
from disparse_fx.latency import interleaved_latency, onnxruntime_runner, torch_runner  # noqa: E402
from disparse_fx.zoo import DEFAULT_TASKS, deeplab_resnet, multitask_from_torchvision  # noqa: E402
from disparse_fx.passes.flops import count_flops  # noqa: E402
from disparse_fx.passes.trace import trace_model  # noqa: E402

MODELS = ["resnet50", "mobilenet_v3_large", "convnext_tiny", "deeplab-small"]


def build_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name.startswith("deeplab-"):
        return deeplab_resnet(DEFAULT_TASKS, size=name.split("-", 1)[1]).eval()
    return multitask_from_torchvision(name, DEFAULT_TASKS).eval()


def dummy_losses(model: nn.Module) -> Dict[str, object]:
    return {t: (lambda p, b: p.float().mean()) for t in DEFAULT_TASKS}


class NativeError(Exception):
    pass


def build_native(dense: nn.Module, slim: nn.Module) -> nn.Module:
    """The dense eager model with every tensor and width attribute set to the slim model's shapes."""
    native = copy.deepcopy(dense)
    sp = dict(slim.named_parameters(remove_duplicate=False))
    sb = dict(slim.named_buffers(remove_duplicate=False))
    for mname, mod in native.named_modules(remove_duplicate=False):
        prefix = f"{mname}." if mname else ""
        old_groups_dw = isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1 and mod.groups == mod.in_channels
        for pname, p in list(mod._parameters.items()):
            if p is None:
                continue
            if prefix + pname not in sp:
                raise NativeError(f"the slim model has no parameter {prefix + pname}")
            mod._parameters[pname] = nn.Parameter(sp[prefix + pname].detach().clone(), requires_grad=p.requires_grad)
        for bname, b in list(mod._buffers.items()):
            if b is None:
                continue
            if prefix + bname in sb:
                mod._buffers[bname] = sb[prefix + bname].detach().clone()
            elif b.dim() > 0:
                raise NativeError(f"the slim model has no buffer {prefix + bname}")
        if isinstance(mod, nn.modules.conv._ConvNd):
            w = mod.weight
            if isinstance(mod, nn.modules.conv._ConvTransposeNd):
                mod.in_channels, mod.out_channels = w.shape[0], w.shape[1] * mod.groups
            elif old_groups_dw and w.shape[1] == 1:
                mod.groups = mod.in_channels = mod.out_channels = w.shape[0]
            else:
                mod.in_channels, mod.out_channels = w.shape[1] * mod.groups, w.shape[0]
        elif isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.num_features = (mod.weight if mod.weight is not None else mod.running_mean).shape[0]
        elif isinstance(mod, nn.LayerNorm) and mod.weight is not None:
            mod.normalized_shape = tuple(mod.weight.shape)
        elif isinstance(mod, nn.GroupNorm) and mod.weight is not None:
            mod.num_channels = mod.weight.shape[0]
    return native.eval()


def add_native(variants, notes, key, dense, compact, x1, **info) -> None:
    """variants[key with 'slim' -> 'native'] = the native twin of ``compact``, checked."""
    try:
        native = build_native(dense, compact)
        with torch.no_grad():
            diff = _max_diff(native(x1), compact(x1))
        if not diff < 1e-3:
            raise NativeError(f"native output differs from slim by {diff:.1e} (relative)")
        variants[key.replace("slim", "native", 1)] = dict(model=native, diff=diff, **info)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        notes[key] = f"native not built: {type(exc).__name__}: {exc}"


def _max_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max() / (b[k].abs().max() + 1e-12)) for k in b)


def bench_model(name: str, args, tmp: pathlib.Path) -> List[dict]:
    dense = build_model(name)
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(1, 3, args.size, args.size, generator=gen)
    x8 = torch.randn(8, 3, args.size, args.size, generator=gen)
    variants = {"dense": dict(model=dense, sparsity=0.0, round_to=None)}
    notes = {}
    for sp in args.sparsities:
        for rt in args.round_to:
            cfg = dfx.CompressConfig(sparsity=sp, criterion="magnitude", granularity="channel", round_to=rt,
                                     num_batches=1, progress=False)
            t0 = time.perf_counter()
            result = dfx.compress(dense, dummy_losses(dense), [{"input": x1}], cfg)
            compact = dfx.slim(result).eval()
            t_compress = time.perf_counter() - t0
            key = f"slim {sp:.0%} r{rt}"
            variants[key] = dict(model=compact, sparsity=result.plan.sparsity, round_to=rt, compress_s=t_compress)
            if args.native:
                add_native(variants, notes, key, dense, compact, x1, sparsity=result.plan.sparsity, round_to=rt)
            print(f"{name} {key}: sparsity {result.plan.sparsity:.3f}, compress+slim {t_compress:.1f} s", flush=True)
    return measure_variants(name, variants, notes, args, tmp, x1, x8)


def measure_variants(name, variants, notes, args, tmp, x1, x8) -> List[dict]:
    """Parameters, FLOPs and interleaved CPU latencies (PyTorch, onnxruntime; batch 1 and 8)
    of every variant; speed-ups against "dense", slim against its "native" twin."""
    rows = []
    for key, v in variants.items():
        m = v["model"]
        gm = m if isinstance(m, torch.fx.GraphModule) else trace_model(m)
        v["params"] = sum(p.numel() for p in m.parameters())
        v["flops"] = count_flops(gm, (x1,)).total
        if args.onnx:
            path = tmp / f"{name}-{key.replace(' ', '_').replace('%', '')}.onnx"
            dfx.export_onnx(m, x1, path)
            v["onnx"] = path
    lat = {}
    for bs, x in ((1, x1), (8, x8)):
        runners = {}
        for key, v in variants.items():
            runners[("torch", key)] = torch_runner(v["model"], x)
            if args.onnx:
                runners[("ort", key)] = onnxruntime_runner(v["onnx"], x, threads=args.threads)
        t0 = time.perf_counter()
        lat[bs] = interleaved_latency(runners, rounds=args.rounds, warmup=args.warmup)
        print(f"{name} batch {bs}: {len(runners)} runners x {args.rounds} rounds in {time.perf_counter() - t0:.0f} s",
              flush=True)
    d = variants["dense"]
    for key, v in variants.items():
        row = dict(model=name, variant=key, sparsity=v["sparsity"], round_to=v["round_to"], params=v["params"],
                   flops=v["flops"], flops_reduction=d["flops"] / v["flops"], note=notes.get(key, ""),
                   budget_removed=v.get("budget_removed"))
        for rt in ("torch", "ort"):
            for bs in (1, 8):
                t = lat[bs].get((rt, key))
                row[f"{rt}{bs}"] = t
                row[f"{rt}{bs}_speedup"] = (lat[bs][(rt, "dense")] / t) if t else None
                nat = lat[bs].get((rt, key.replace("slim", "native")))
                row[f"{rt}{bs}_vs_native"] = (t / nat) if (t and nat and key.startswith("slim")) else None
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- budgets
BUDGET_MODELS = ["resnet50", "mobilenet_v3_large", "convnext_tiny", "vit_b_16", "deeplab-small"]
#: The 3-task model of the budget issue: a per-pixel head, a classifier and a regressor.
BUDGET_TASKS = {"seg": ("dense", 5), "cls": ("classify", 10), "reg": ("regress", 3)}


def build_budget_model(name: str, size: int) -> nn.Module:
    torch.manual_seed(0)
    if name.startswith("deeplab-"):
        return deeplab_resnet(DEFAULT_TASKS, size=name.split("-", 1)[1]).eval()
    kwargs = {"image_size": size} if name.startswith("vit_") else {}
    return multitask_from_torchvision(name, BUDGET_TASKS, **kwargs).eval()


def output_layers(result) -> List[str]:
    """Modules whose output channels are a task output (the heads' last layers)."""
    names = set()
    for g in result.plan.channels.groups.groups:
        if g.reason.startswith("reaches task output"):
            names |= {m.param_name.rsplit(".", 1)[0] for m in g.members if m.dim == 0 and not m.is_buffer
                      and m.param_name.endswith(".weight")}
    return sorted(names)


def uniform_width(dense, result, target_flops: float, x1, round_to: int = 8):
    """Every removable channel group cut to one common kept fraction (first channels in
    index order, counts rounded to ``round_to``), the fraction bisected to ``target_flops``."""
    from disparse_fx.passes.channel_costs import flop_cost_model
    from disparse_fx.passes.insert_channel_masks import insert_channel_masks
    from disparse_fx.passes.slim import slim_channels

    groups = result.plan.channels.groups
    gm = trace_model(dense)
    costs = flop_cost_model(gm, groups, (x1,))

    def keep_at(f: float):
        keep = {}
        for g in groups.removable_groups():
            k = torch.zeros(g.size, dtype=torch.bool)
            n = max(1, min(g.size, -(-int(math.ceil(f * g.size)) // round_to) * round_to))
            k[:n] = True
            for piece in g.keep_one_of:
                if not bool(k[piece].any()):
                    k[piece[0]] = True
            keep[g.id] = k
        return keep

    lo, hi = 0.0, 1.0
    for _ in range(20):
        mid = (lo + hi) / 2
        if float(costs.cost(groups.keep_vector(keep_at(mid)).double())) > target_flops:
            hi = mid
        else:
            lo = mid
    keep = keep_at(lo)
    return slim_channels(insert_channel_masks(gm, groups, keep), groups, keep).eval(), lo


def torch_pruning_at(dense, result, target_flops: float, x1, round_to: int = 8):
    """Torch-Pruning 1.6: global group-L2 magnitude (the summed model: no per-task view),
    iterative steps of 2% until the FLOPs (passes.flops) reach ``target_flops``; the
    heads' output layers ignored. Returns (model, flops) or raises."""
    import torch_pruning as tp

    model = copy.deepcopy(dense).eval()
    ignored = [model.get_submodule(n) for n in output_layers(result)]
    steps = 45
    pruner = tp.pruner.MetaPruner(model, x1, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  global_pruning=True, pruning_ratio=0.9, iterative_steps=steps,
                                  ignored_layers=ignored, round_to=round_to)
    flops = count_flops(trace_model(model), (x1,)).total
    for _ in range(steps):
        if flops <= target_flops:
            break
        pruner.step()
        flops = count_flops(trace_model(model), (x1,)).total
    return model.eval(), flops


def bench_budgets(name: str, args, tmp: pathlib.Path) -> List[dict]:
    """dense; slim at a params / FLOPs / latency budget (round_to 8) and their native
    twins; uniform width and Torch-Pruning at the FLOPs-budget model's FLOPs."""
    dense = build_budget_model(name, args.size)
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(1, 3, args.size, args.size, generator=gen)
    x8 = torch.randn(8, 3, args.size, args.size, generator=gen)
    with torch.no_grad():
        tasks = list(dense(x1))
    losses = {t: (lambda p, b: p.float().mean()) for t in tasks}  # magnitude is data-free
    variants = {"dense": dict(model=dense, sparsity=0.0, round_to=None)}
    notes: Dict[str, str] = {}
    flops_result = None
    for budget in args.budgets:
        cfg = dfx.CompressConfig(sparsity=args.target, budget=budget, criterion="magnitude", granularity="channel",
                                 round_to=8, num_batches=1, progress=False)
        example = x8 if budget == "latency" else x1  # the latency table is for the batch it will run
        t0 = time.perf_counter()
        key = f"slim {budget} {args.target:.0%}"
        try:
            result = dfx.compress(dense, losses, [{"input": example}], cfg)
        except dfx.TargetUnreachableError as exc:  # reported in the table (e.g. a tiny, overhead-bound model)
            notes[key] = f"{type(exc).__name__}: {str(exc)[:200]}"
            print(f"{name} {key}: {notes[key]}", flush=True)
            continue
        compact = dfx.slim(result).eval()
        t_compress = time.perf_counter() - t0
        b = result.plan.budget
        variants[key] = dict(model=compact, sparsity=result.plan.sparsity, round_to=8, budget_removed=b.achieved)
        notes[key] = (f"compress+slim {t_compress:.0f} s; planned {budget} removed {b.achieved:.3f}"
                      + (f"; modelled b8 latency {b.latency_ms[0]:.1f} -> {b.latency_ms[1]:.1f} ms" if b.latency_ms else ""))
        if args.native:
            add_native(variants, notes, key, dense, compact, x1, sparsity=result.plan.sparsity, round_to=8)
        if budget == "flops":
            flops_result = result
        print(f"{name} {key}: {notes[key]}", flush=True)
    if flops_result is not None:
        target = count_flops(variants[f"slim flops {args.target:.0%}"]["model"], (x1,)).total
        uniform, frac = uniform_width(dense, flops_result, target, x1)
        variants["uniform width"] = dict(model=uniform, sparsity=float("nan"), round_to=8)
        notes["uniform width"] = f"every group kept at {frac:.3f} (index order), same FLOPs as the FLOPs budget"
        if args.peers:
            try:
                t0 = time.perf_counter()
                peer, _ = torch_pruning_at(dense, flops_result, target, x1)
                variants["torch-pruning"] = dict(model=peer, sparsity=float("nan"), round_to=8)
                notes["torch-pruning"] = (f"Torch-Pruning {_tp_version()} global group magnitude, iterative, round_to 8, "
                                          f"to the FLOPs budget's FLOPs ({time.perf_counter() - t0:.0f} s)")
            except Exception as exc:  # noqa: BLE001 - reported in the table
                notes["torch-pruning"] = f"Torch-Pruning failed: {type(exc).__name__}: {str(exc)[:160]}"
                print(f"{name}: {notes['torch-pruning']}", flush=True)
    rows = measure_variants(name, variants, notes, args, tmp, x1, x8)
    for key in notes:  # notes of variants that did not run
        if key not in variants and not any(r["variant"] == key for r in rows):
            rows.append(dict(model=name, variant=key, sparsity=float("nan"), round_to=None, params=0, flops=0,
                             flops_reduction=None, note=notes[key], budget_removed=None))
    return rows


def _tp_version() -> str:
    try:
        import torch_pruning as tp

        return tp.__version__
    except ImportError:  # pragma: no cover
        return "(absent)"


def budget_table(rows: List[dict], onnx: bool) -> str:
    out = []
    for r in rows:
        if r["flops_reduction"] is None:
            out.append([r["model"], r["variant"]] + [""] * (9 + (4 if onnx else 0)) + [r["note"]])
            continue
        line = [r["model"], r["variant"], f"{r['params'] / 1e6:.2f}", f"{r['flops'] / 1e9:.3f}",
                _x(r["flops_reduction"]), _ms(r["torch1"]), _ms(r["torch8"]), _x(r["torch1_speedup"]),
                _x(r["torch8_speedup"])]
        if onnx:
            line += [_ms(r["ort1"]), _ms(r["ort8"]), _x(r["ort1_speedup"]), _x(r["ort8_speedup"])]
        line += [" / ".join(f"{r[k]:.3f}" for k in ("torch1_vs_native", "torch8_vs_native", "ort1_vs_native",
                                                      "ort8_vs_native") if r.get(k) is not None),
                 "" if r.get("budget_removed") is None else f"{r['budget_removed']:.3f}", r["note"]]
        out.append(line)
    headers = ["model", "variant", "params M", "GFLOPs/img", "FLOPs red.", "torch b1 ms", "torch b8 ms",
               "torch b1 speed-up", "torch b8 speed-up"]
    if onnx:
        headers += ["ort b1 ms", "ort b8 ms", "ort b1 speed-up", "ort b8 speed-up"]
    headers += ["slim / native (torch b1 / b8 / ort b1 / b8)", "planned removed", "note"]
    return tabulate(out, headers=headers, tablefmt="github", disable_numparse=True)


def budget_summary(rows: List[dict], target: float) -> str:
    lines = []
    ratios = [r[k] for r in rows for k in ("torch1_vs_native", "torch8_vs_native", "ort1_vs_native", "ort8_vs_native")
              if r.get(k) is not None]
    if ratios:
        lines.append(f"- slim within 5% of native: {sum(v <= 1.05 for v in ratios)} of {len(ratios)} cells")
    slower = [(r["model"], r["variant"], k) for r in rows if r["variant"] != "dense" and r["flops_reduction"]
              for k in ("torch1", "torch8", "ort1", "ort8") if r.get(f"{k}_speedup") and r[f"{k}_speedup"] < 1.0]
    lines.append(f"- cells where a compact model is slower than its dense model: {len(slower)}"
                 + (f" ({'; '.join(' '.join(s) for s in slower[:8])})" if slower else ""))
    for r in rows:
        if r["variant"].startswith("slim ") and r["flops_reduction"]:
            lines.append(f"- {r['model']}, {r['variant']}: FLOPs {r['flops_reduction']:.2f}x fewer; speed-up "
                         f"PyTorch b1 {_x(r['torch1_speedup'])}, b8 {_x(r['torch8_speedup'])}; onnxruntime b1 "
                         f"{_x(r.get('ort1_speedup'))}, b8 {_x(r.get('ort8_speedup'))}")
    return "\n".join(lines) + "\n"


def _ms(v):
    return "" if v is None else f"{v * 1e3:.1f}"


def _x(v):
    return "" if v is None else f"{v:.2f}x"


def table(rows: List[dict], onnx: bool) -> str:
    out = []
    for r in rows:
        line = [r["model"], r["variant"], f"{r['sparsity']:.3f}", f"{r['params'] / 1e6:.2f}", f"{r['flops'] / 1e9:.3f}",
                _x(r["flops_reduction"]), _ms(r["torch1"]), _ms(r["torch8"]), _x(r["torch1_speedup"]),
                _x(r["torch8_speedup"])]
        if onnx:
            line += [_ms(r["ort1"]), _ms(r["ort8"]), _x(r["ort1_speedup"]), _x(r["ort8_speedup"])]
        line += [" / ".join(f"{r[k]:.3f}" for k in ("torch1_vs_native", "torch8_vs_native", "ort1_vs_native",
                                                      "ort8_vs_native") if r.get(k) is not None), r["note"]]
        out.append(line)
    headers = ["model", "variant", "sparsity", "params M", "GFLOPs/img", "FLOPs red.", "torch b1 ms", "torch b8 ms",
               "torch b1 speed-up", "torch b8 speed-up"]
    if onnx:
        headers += ["ort b1 ms", "ort b8 ms", "ort b1 speed-up", "ort b8 speed-up"]
    headers += ["slim / native latency (torch b1 / b8 / ort b1 / b8)", "note"]
    return tabulate(out, headers=headers, tablefmt="github", disable_numparse=True)


def summary(rows: List[dict]) -> str:
    ratios = [(r["model"], r["variant"], k, r[k]) for r in rows for k in
              ("torch1_vs_native", "torch8_vs_native", "ort1_vs_native", "ort8_vs_native") if r.get(k) is not None]
    if not ratios:
        return "No native model could be measured.\n"
    within = sum(1 for *_, v in ratios if v <= 1.05)
    worst = max(ratios, key=lambda t: t[3])
    lines = [f"- slim within 5% of native (slim/native latency <= 1.05): {within} of {len(ratios)} measurements; "
             f"worst {worst[3]:.3f} ({worst[0]}, {worst[1]}, {worst[2]})"]
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model and r["variant"].startswith("slim")]
        if not rs:
            continue
        for rt in (1, 8):
            pairs = [(r["flops_reduction"], r[f"torch8_speedup"], r["variant"]) for r in rs if r["round_to"] == rt
                     and r["torch8_speedup"]]
            if pairs:
                lines.append(f"- {model}, round_to={rt}: FLOPs reduction -> PyTorch batch-8 speed-up: " +
                             ", ".join(f"{v.split()[1]}: {f:.2f}x -> {s:.2f}x" for f, s, v in pairs))
    return "\n".join(lines) + "\n"


def plot(rows: List[dict], path: pathlib.Path, onnx: bool) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("torch1", "PyTorch, batch 1"), ("torch8", "PyTorch, batch 8")]
    if onnx:
        keys += [("ort1", "onnxruntime, batch 1"), ("ort8", "onnxruntime, batch 8")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 4.2), squeeze=False)
    models = list(dict.fromkeys(r["model"] for r in rows))
    colors = dict(zip(models, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, (k, title) in zip(axes[0], keys):
        top = 1.0
        for r in rows:
            if not r["variant"].startswith("slim") or r.get(f"{k}_speedup") is None:
                continue
            marker = "o" if r["round_to"] == 1 else "s"
            ax.scatter(r["flops_reduction"], r[f"{k}_speedup"], color=colors[r["model"]], marker=marker,
                       facecolors="none" if r["round_to"] == 8 else colors[r["model"]])
            top = max(top, r["flops_reduction"], r[f"{k}_speedup"])
        ax.plot([1, top], [1, top], "k--", lw=0.8, label="speed-up = FLOPs reduction")
        ax.set_title(title)
        ax.set_xlabel("FLOPs reduction (dense / slim)")
        ax.set_ylabel("measured speed-up (dense / slim latency)")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[m], marker="o", ls="", label=m) for m in models]
    handles += [plt.Line2D([], [], color="gray", marker="o", ls="", label="round_to=1"),
                plt.Line2D([], [], color="gray", marker="s", mfc="none", ls="", label="round_to=8"),
                plt.Line2D([], [], color="k", ls="--", label="speed-up = FLOPs reduction")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--round-to", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--size", type=int, default=None, help="input side (default 128; 224 with --full)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; 15 with --full)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-onnx", dest="onnx", action="store_false")
    ap.add_argument("--no-native", dest="native", action="store_false")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--budgets", nargs="*", default=None, choices=["params", "flops", "latency"],
                    help="instead of the sparsity sweep: 3-task models at a --target budget of each kind "
                         "(default all three), with uniform width and Torch-Pruning at the same FLOPs; writes "
                         "speed_budget.md")
    ap.add_argument("--target", type=float, default=0.5, help="budget target (fraction removed)")
    ap.add_argument("--no-peers", dest="peers", action="store_false", help="skip the Torch-Pruning row")
    ap.add_argument("--smoke", action="store_true", help="tiny configuration (seconds; used by the tests)")
    ap.add_argument("--out", type=pathlib.Path, default=None)
    _common.add_threads_argument(ap)
    args = ap.parse_args(argv)
    _common.set_threads(args.threads)
    args.size = args.size or (224 if args.full else 128)
    args.rounds = args.rounds or (15 if args.full else 5)
    if args.smoke:
        args.models, args.sparsities, args.round_to, args.size, args.rounds = ["deeplab-tiny"], [0.5], [1, 8], 32, 2
    if args.budgets is not None:
        return budget_main(args)
    out = _common.out_path(args.out, args.smoke, "speed.md")
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    rows = run_models(args, bench_model)
    extra = [f"models: {', '.join(args.models)} (tasks {list(DEFAULT_TASKS)}: dense heads); input "
             f"{args.size}x{args.size}; channel sparsities {args.sparsities}, criterion magnitude, round_to {args.round_to}",
             f"latency: {args.rounds} interleaved rounds after {args.warmup} warm-up round(s), median per call; "
             f"PyTorch eager (no_grad, eval) and onnxruntime CPU, both with {args.threads} thread(s)" + ("" if args.onnx else " (onnx off)"),
             "speed-up = dense latency / variant latency; FLOPs red. = dense FLOPs / variant FLOPs (conv + linear "
             "multiply-adds per image, passes.flops); slim / native = slim latency / native latency (the limit: "
             "<= 1.05 means within 5%)"]
    text = _common.header("Speed: dense vs slim vs native at the slim widths (CPU)", extra, started=started)
    text += "## Summary\n\n" + summary(rows) + "\n## All measurements\n\n" + table(rows, args.onnx) + "\n"
    if out is not None:
        png = out.with_suffix(".png")
        plot(rows, png, args.onnx)
        text += f"\n![speed-up against FLOPs reduction]({png.name})\n"
    _common.write(out, text)
    return 0


def run_models(args, bench) -> List[dict]:
    """``bench(name, args, tmp)`` for every model of ``args.models``, rows concatenated."""
    rows: List[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            t0 = time.perf_counter()
            rows += bench(name, args, pathlib.Path(tmp))
            print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


def budget_main(args) -> int:
    args.budgets = args.budgets or ["params", "flops", "latency"]
    if args.models == MODELS:
        args.models = BUDGET_MODELS
    if args.smoke:
        args.models, args.size, args.rounds = ["deeplab-tiny"], 32, 2
    out = _common.out_path(args.out, args.smoke, "speed_budget.md")
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    rows = run_models(args, bench_budgets)
    extra = [f"models: {', '.join(args.models)} (torchvision trunks: tasks {BUDGET_TASKS}; DeepLab: "
             f"{list(DEFAULT_TASKS)}); input {args.size}x{args.size}; budgets {args.budgets} at {args.target:.0%} "
             f"removed, criterion magnitude, round_to 8; the latency budget's table is measured at batch 8",
             f"latency: {args.rounds} interleaved rounds after {args.warmup} warm-up round(s), median per call; "
             f"PyTorch eager (no_grad, eval) and onnxruntime CPU, both with {args.threads} thread(s)",
             "speed-up = dense latency / variant latency; FLOPs red. = dense FLOPs / variant FLOPs (passes.flops); "
             "slim / native = slim latency / the same widths built natively (<= 1.05: within 5%); planned removed "
             "= the fraction of the budget quantity the plan removes (for latency: of the modelled PyTorch batch-8 "
             "time)"]
    text = _common.header("Speed at a parameter, FLOPs and latency budget (CPU)", extra, started=started)
    text += "## Summary\n\n" + budget_summary(rows, args.target) + "\n## All measurements\n\n"
    text += budget_table(rows, args.onnx) + "\n"
    _common.write(out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
