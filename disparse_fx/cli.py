"""The `disparse-fx` command line (also `python -m disparse_fx`).

Subcommands: ``demo`` (the main job on the built-in default), ``inspect MODEL``
(ownership table and the graph code after mask insertion), ``compress [MODEL]``
(writes a result file), ``slim RESULT``, ``export MODEL_FILE`` (ONNX, verified with
onnxruntime) and ``report RESULT`` (a markdown or HTML report folder). MODEL is
``package.module:factory``: the factory is called with no arguments and returns the
nn.Module; ``--data package.module:factory`` returns ``(batches, task_losses)``.

Exit codes: 0 success, 2 usage error, 1 failure (one line, no traceback unless --debug).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Any, List, Optional, TextIO, Tuple

from .errors import DisparseError, DisparseValueError

__all__ = ["main", "build_parser", "CLIError"]


class CLIError(DisparseValueError):
    """A command-line argument names something that cannot be used (import, file kind)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disparse-fx", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks and DEBUG logs")
    sub = parser.add_subparsers(dest="command", required=True)
    from . import demo

    demo.add_arguments(sub.add_parser("demo", help="the main job on the built-in default (see demo --help)",
                                      description=demo.__doc__.splitlines()[0]))
    _add_commands(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with 2 on usage errors
    if args.command == "compress" and args.model and not args.data and not (
            args.criterion in ("magnitude", "random") and args.input_shape):
        parser.error("compress MODEL needs --data package.module:factory (or --criterion magnitude/random with "
                     "--input-shape)")
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "demo":
            from .demo import run_from_args

            return run_from_args(args, sys.stdout)
        if args.command in _COMMANDS:
            return _COMMANDS[args.command](args, sys.stdout)
    except Exception as exc:  # noqa: BLE001 - one line, no traceback, unless --debug
        if args.debug:
            raise
        what = str(exc) if isinstance(exc, (DisparseError, NotImplementedError)) else f"{type(exc).__name__}: {exc}"
        print(f"disparse-fx: error: {what}".splitlines()[0], file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command}")
    return 2


# ----------------------------------------------------------------------------- subcommands
def _factory_spec(text: str) -> str:
    module, sep, attr = text.partition(":")
    if not sep or not module or not attr or not all(p.isidentifier() for p in module.split(".") + attr.split(".")):
        raise argparse.ArgumentTypeError(f"expected package.module:factory, got {text!r}")
    return text


def _shape(text: str) -> Tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(v < 1 for v in shape):
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas (1,3,64,64), got {text!r}")
    return shape


def _add_commands(sub) -> None:
    from .config import ATTENTION, CRITERIA, GRANULARITIES

    def cfg(p, *, criterion="snip"):
        p.add_argument("--sparsity", type=float, default=0.5, help="fraction of prunable parameters removed")
        p.add_argument("--granularity", choices=GRANULARITIES, default="element")
        p.add_argument("--attention", choices=ATTENTION, default="heads",
                       help="channel granularity: prune whole attention heads or per-head dimensions")
        p.add_argument("--seed", type=int, default=0)
        if criterion != "magnitude":
            p.add_argument("--criterion", choices=CRITERIA, default=criterion)

    p = sub.add_parser("inspect", help="ownership table and the graph code after mask insertion",
                       description="Print which tasks each parameter serves (shared / task-specific / unused) "
                                   "and the rewritten graph code after inserting masks at --sparsity "
                                   "(magnitude criterion: no data needed).")
    p.add_argument("model", type=_factory_spec, metavar="MODEL", help="package.module:factory returning the model")
    p.add_argument("--input-shape", type=_shape, help="example input shape, e.g. 1,3,64,64 (needed for "
                                                      "--granularity channel)")
    cfg(p, criterion="magnitude")

    p = sub.add_parser("compress", help="compress a model and save the result",
                       description="Compress MODEL (default: the built-in DeepLab-ResNet on the built-in photo "
                                   "tasks) with DiSparse and save the result (graph, masks, plan) to --out.")
    p.add_argument("model", nargs="?", type=_factory_spec, metavar="MODEL",
                   help="package.module:factory returning the model (default: the built-in model)")
    p.add_argument("--data", type=_factory_spec, help="package.module:factory returning (batches, task_losses); "
                                                      "default: the built-in photo tasks (built-in model only)")
    p.add_argument("--input-shape", type=_shape, help="with --criterion magnitude/random and no --data: the "
                                                      "shape of random example inputs")
    p.add_argument("--num-batches", type=int, default=8, help="batches used to estimate importance")
    p.add_argument("--baseline", action="store_true", help="one score on the summed loss (disentangle=False)")
    p.add_argument("--out", required=True, help="result file to write (e.g. result.dfx)")
    cfg(p)

    p = sub.add_parser("slim", help="remove pruned channels from a saved result",
                       description="Load a saved result, remove its pruned channels (dfx.slim) and save the slim "
                                   "model.")
    p.add_argument("result", metavar="RESULT", help="a file written by `disparse-fx compress`")
    p.add_argument("--out", required=True, help="slim model file to write (e.g. slim.dfx)")

    p = sub.add_parser("export", help="export a saved model to ONNX, verified with onnxruntime",
                       description="Load a saved slim model or result (its masked model), export it to ONNX and "
                                   "check onnxruntime against PyTorch.")
    p.add_argument("model_file", metavar="MODEL_FILE", help="a file written by `slim` or `compress`")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--input-shape", type=_shape, help="example input shape (default: the shape compress saw)")
    p.add_argument("--opset", type=int, default=None)

    p = sub.add_parser("report", help="write a report folder for a saved result",
                       description="Write the report (per-layer table, parameter and FLOP totals), the mask-overlap "
                                   "table and plot and the graph drawing into a folder.")
    p.add_argument("result", metavar="RESULT", help="a file written by `disparse-fx compress`")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--format", choices=("md", "html"), default="md")
    p.add_argument("--input-shape", type=_shape, help="example input shape (default: the shape compress saw)")


def _call_factory(spec: str, what: str) -> Any:
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise CLIError(f"cannot import {module_name!r} for {what} {spec!r}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"{module_name!r} has no attribute {attr!r} ({what} {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CLIError(f"{what} {spec!r} is not callable")
    return obj()


def _model(spec: str):
    import torch.nn as nn

    model = _call_factory(spec, "MODEL")
    if not isinstance(model, nn.Module):
        raise CLIError(f"MODEL {spec!r} returned {type(model).__name__}, expected an nn.Module")
    return model


def _dummy_losses(model) -> dict:
    from passes.trace import task_names, trace_model

    return {t: (lambda pred, batch: pred.float().sum()) for t in task_names(trace_model(model))}


def _load(path: str, kind: str):
    from .result import CompressionResult
    from .serialize import load

    obj = load(path)
    if kind == "result" and not isinstance(obj, CompressionResult):
        raise CLIError(f"'{path}' holds a {type(obj).__name__}, not a compression result (written by "
                       f"`disparse-fx compress`)")
    return obj


def _cmd_inspect(args, out: TextIO) -> int:
    import torch
    from tabulate import tabulate

    from .api import compress
    from .config import CompressConfig
    from .report import owners_label

    model = _model(args.model)
    data = [torch.randn(args.input_shape)] if args.input_shape else []
    config = CompressConfig(sparsity=args.sparsity, criterion="magnitude", granularity=args.granularity,
                            num_batches=1, seed=args.seed, progress=False, attention=args.attention)
    result = compress(model, _dummy_losses(model), data, config)
    plan = result.plan
    kinds = {"shared": "shared", "task": "task-specific", "unused": "unused"}
    rows = [[p, "x".join(map(str, t.shape)), t.numel(), owners_label(plan, p), kinds[plan.kind(p)],
             "yes" if p in plan.masks else ""] for p, t in model.named_parameters() if p in plan.owners]
    counts = {k: sum(1 for p in plan.owners if plan.kind(p) == k) for k in kinds}
    print(f"# {type(model).__name__}: tasks {', '.join(map(str, plan.tasks))}", file=out)
    print(tabulate(rows, headers=["parameter", "shape", "numel", "owners", "kind", "prunable"], tablefmt="github",
                   disable_numparse=True), file=out)
    print(f"\n{counts['shared']} shared, {counts['task']} task-specific, {counts['unused']} unused parameters",
          file=out)
    print(f"\n# graph code after mask insertion (granularity={args.granularity}, magnitude, sparsity "
          f"{plan.sparsity:.3f})", file=out)
    print(result.model.code.strip(), file=out)
    return 0


def _cmd_compress(args, out: TextIO) -> int:
    import torch

    from .api import compress
    from .config import CompressConfig
    from .serialize import save

    if args.model is None:
        from .zoo import DEFAULT_TASKS, deeplab_resnet

        model = deeplab_resnet(DEFAULT_TASKS, size="tiny")
        what = "built-in DeepLab-ResNet (tiny)"
    else:
        model, what = _model(args.model), args.model
    if args.data is not None:
        got = _call_factory(args.data, "--data")
        if not (isinstance(got, tuple) and len(got) == 2):
            raise CLIError(f"--data {args.data!r} must return (batches, task_losses), got {type(got).__name__}")
        data, losses = got
    elif args.model is None:
        from torch.utils.data import DataLoader

        from .data import default_task_losses, make_splits

        splits = make_splits(seed=args.seed, n_train=8 * args.num_batches, n_val=8, n_test=8)
        data, losses = DataLoader(splits.train, batch_size=8, shuffle=False), default_task_losses()
    elif args.criterion in ("magnitude", "random") and args.input_shape:
        gen = torch.Generator().manual_seed(args.seed)
        data = [torch.randn(args.input_shape, generator=gen) for _ in range(args.num_batches)]
        losses = _dummy_losses(model)
    else:  # main() rejects this combination as a usage error
        raise CLIError("compress MODEL needs --data package.module:factory (or --criterion magnitude/random "
                       "with --input-shape)")
    config = CompressConfig(sparsity=args.sparsity, criterion=args.criterion, disentangle=not args.baseline,
                            granularity=args.granularity, num_batches=args.num_batches, seed=args.seed,
                            progress=False, attention=args.attention)
    result = compress(model, losses, data, config)
    print(result.summary(), file=out)
    save(result, args.out)
    print(f"\ncompressed {what}: sparsity {result.plan.sparsity:.4f}; result saved to {args.out}", file=out)
    return 0


def _cmd_slim(args, out: TextIO) -> int:
    from .api import slim
    from .serialize import save

    result = _load(args.result, "result")
    model = slim(result)
    if result.plan.input_specs is not None:
        model.meta["input_specs"] = result.plan.input_specs  # lets `export` default its input shape
    save(model, args.out)
    before = sum(p.numel() for p in result.model.parameters())
    after = sum(p.numel() for p in model.parameters())
    print(f"slim model: {before:,} -> {after:,} parameters ({after / max(before, 1):.1%}); saved to {args.out}",
          file=out)
    return 0


def _example(args, obj):
    import torch

    from .result import CompressionResult

    if args.input_shape:
        return (torch.randn(args.input_shape, generator=torch.Generator().manual_seed(0)),)
    if isinstance(obj, CompressionResult):
        from .report import example_inputs_for

        return example_inputs_for(obj)
    specs = obj.meta.get("input_specs")
    if not specs:
        raise CLIError(f"'{args.model_file}' does not record its input shape; pass --input-shape")
    from .plan import inputs_from_specs

    return inputs_from_specs(specs)


def _cmd_export(args, out: TextIO) -> int:
    import os

    from .export import export_onnx
    from .result import CompressionResult

    obj = _load(args.model_file, "any")
    model = obj.model if isinstance(obj, CompressionResult) else obj
    example = _example(args, obj)
    rep = export_onnx(model, example, args.out, opset=args.opset)
    for name in rep.outputs:
        print(f"output {name}: max |onnxruntime - torch| = {rep.max_abs_diff[name]:.3g} (scale "
              f"{rep.scale[name]:.3g}, batch sizes {', '.join(map(str, rep.batch_sizes))})", file=out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {os.path.getsize(args.out):,} bytes, {n:,} parameters, opset {rep.opset}", file=out)
    return 0


def _cmd_report(args, out: TextIO) -> int:
    from .report import write_report

    result = _load(args.result, "result")
    example = _example(args, result) if args.input_shape else None
    paths = write_report(result, args.out, example_inputs=example, format=args.format)
    for key, path in paths.items():
        print(f"{key}: {path}", file=out)
    return 0


_COMMANDS = {"inspect": _cmd_inspect, "compress": _cmd_compress, "slim": _cmd_slim, "export": _cmd_export,
             "report": _cmd_report}
