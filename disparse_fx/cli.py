"""The `disparse-fx` command line (also `python -m disparse_fx`).

Subcommands: ``demo`` (the main job on the built-in default), ``inspect MODEL``
(ownership table and the graph code after mask insertion), ``compress [MODEL]``
(writes a result file), ``slim RESULT``, ``export MODEL_FILE`` (ONNX, verified with
onnxruntime) and ``report RESULT`` (a markdown or HTML report folder). MODEL is
``package.module:factory``: the factory is called with no arguments and returns the
nn.Module; ``--data package.module:factory`` returns ``(batches, task_losses)``.

Exit codes: 0 success, 2 usage error (an option argparse or ``CompressConfig`` rejects,
e.g. ``--sparsity 90``), 1 failure (one line, no traceback unless --debug).

MODEL and ``--data`` are imported as ``python -m`` would: the current folder comes first
on ``sys.path`` while a command runs, so ``disparse-fx compress mymodels:net`` finds
``./mymodels.py`` whichever way the command was started.

Options that set a ``CompressConfig`` field (``--sparsity``, ``--criterion``...) take
their defaults from ``CompressConfig`` itself, and ``--help`` shows every default. One
entry in ``CONFIG_OPTIONS`` adds such an option to ``inspect`` and ``compress``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import logging
import os
import re
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, TextIO, Tuple

from .errors import DisparseError, DisparseValueError

__all__ = ["main", "build_parser", "CLIError", "CLIUsageError", "ConfigOption", "CONFIG_OPTIONS", "positive_int"]


class CLIError(DisparseValueError):
    """A command-line argument names something that cannot be used (import, file kind)."""


class CLIUsageError(CLIError):
    """A command-line argument names nothing usable (a module that cannot be found, a
    missing attribute): a usage error, so the command exits with 2 like argparse's."""


class _DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help text with each option's default appended (unless it has none or says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (any(action.default is v for v in (None, False, argparse.SUPPRESS)) or "default" in text
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disparse-fx", description=__doc__.splitlines()[0],
                                     formatter_class=_DefaultsHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and DEBUG logs")
    sub = parser.add_subparsers(dest="command", required=True)
    from . import demo

    p = _add_parser(sub, "demo", help="the main job on the built-in default (see demo --help)",
                    description=demo.__doc__.splitlines()[0])
    demo.add_arguments(p)
    _add_commands(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with 2 on usage errors
    args.config = _check_config(args)  # so do options CompressConfig rejects
    if args.command == "compress" and args.model and not args.data and not (
            args.criterion in ("magnitude", "random") and args.input_shape):
        parser.error("compress MODEL needs --data package.module:factory (or --criterion magnitude/random with "
                     "--input-shape)")
    if args.command == "inspect" and args.granularity == "channel" and not args.input_shape:
        parser.error("inspect --granularity channel needs --input-shape (the channel analysis runs the model once "
                     "on an input of that shape, e.g. --input-shape 1,3,224,224)")
    out = getattr(args, "out", None)
    if args.command in ("compress", "slim", "export") and out and os.path.isdir(out):
        # before the work, not after it: save() would fail only at the end
        parser.error(f"--out {out} is a folder; give the file to write, e.g. "
                     f"{os.path.join(out, 'model.onnx' if args.command == 'export' else 'result.dfx')}")
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        with _current_folder_importable():
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
        return 2 if isinstance(exc, CLIUsageError) else 1
    parser.error(f"unknown command {args.command}")
    return 2


@contextlib.contextmanager
def _current_folder_importable() -> Iterator[None]:
    """The current folder first on sys.path while a command runs, as ``python -m`` puts
    it (an installed console script starts without it); removed again afterwards."""
    cwd = os.getcwd()
    if "" in sys.path or cwd in sys.path:
        yield
        return
    sys.path.insert(0, cwd)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(cwd)


# ----------------------------------------------------------------------------- CompressConfig options
@dataclasses.dataclass(frozen=True)
class ConfigOption:
    """A command-line option that sets the CompressConfig field of the same name
    (``--num-batches`` sets ``num_batches``); its default is CompressConfig's."""

    field: str
    help: str
    type: Optional[Callable[[str], Any]] = None
    choices: Optional[Sequence[str]] = None
    action: Optional[str] = None

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")

    def add_to(self, parser: argparse.ArgumentParser, default: Any = dataclasses.MISSING) -> None:
        from .config import CompressConfig

        if default is dataclasses.MISSING:
            default = {f.name: f.default for f in dataclasses.fields(CompressConfig)}[self.field]
        kwargs: Dict[str, Any] = {"default": default, "help": self.help}
        if self.choices is not None:
            kwargs["choices"] = tuple(self.choices)
        if self.type is not None:
            kwargs["type"] = self.type
        if self.action is not None:
            kwargs["action"] = self.action
        parser.add_argument(self.flag, **kwargs)


def _config_options() -> Tuple[ConfigOption, ...]:
    from .config import ATTENTION, BUDGETS, CRITERIA, GRANULARITIES

    return (
        ConfigOption("sparsity", "fraction removed, in [0, 1), of what --budget counts", type=float),
        ConfigOption("budget", "what --sparsity counts (channel granularity for flops / latency): prunable "
                               "parameters, FLOPs per sample, or forward latency on the model's device "
                               "(a per-layer table measured once and cached)", choices=BUDGETS),
        ConfigOption("round_to", "channel granularity: kept channel counts are multiples of it "
                                 "(default: 8 on CUDA, for 16-bit weights and a FLOPs or latency budget, else 1)", type=int),
        ConfigOption("best_effort", "accept the most that can be removed when the target cannot be reached "
                                    "(default: an error naming what pins the rest)", action="store_true"),
        ConfigOption("granularity", "prune single weights or whole channels", choices=GRANULARITIES),
        ConfigOption("criterion", "importance score: snip (at initialisation), taylor (trained models), "
                                  "magnitude or random (no data needed)", choices=CRITERIA),
        ConfigOption("attention", "channel granularity: prune whole attention heads or per-head dimensions",
                     choices=ATTENTION),
        ConfigOption("num_batches", "batches used to estimate importance (default: up to 50, all the data "
                                    "has if fewer)", type=int),
        ConfigOption("seed", "seeds the random criterion and tie-breaking", type=int),
    )


CONFIG_OPTIONS = _config_options()


def _add_config_options(parser: argparse.ArgumentParser, *fields: str, **defaults: Any) -> None:
    """Add the CONFIG_OPTIONS naming ``fields`` (all when none), defaults from
    CompressConfig unless given in ``defaults``."""
    for option in CONFIG_OPTIONS:
        if not fields or option.field in fields:
            option.add_to(parser, defaults.get(option.field, dataclasses.MISSING))


_CONFIG_FIXED: Dict[str, Callable[[argparse.Namespace], Dict[str, Any]]] = {
    # what a command sets itself; the other fields come from its options
    "inspect": lambda a: {"criterion": "magnitude", "num_batches": 1, "progress": False},
    "compress": lambda a: {"disentangle": not a.baseline, "progress": False},
}
_CONFIG_MESSAGE = re.compile(r"CompressConfig\.(\w+) (.*)", re.S)


def _check_config(args: argparse.Namespace):
    """The CompressConfig the command's options ask for (None if it has none); an
    option CompressConfig rejects is a usage error (exit 2) naming the option."""
    from .config import CompressConfig

    names = {f.name for f in dataclasses.fields(CompressConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    if not given:
        return None
    try:
        return CompressConfig(**{**given, **_CONFIG_FIXED.get(args.command, lambda a: {})(args)})
    except DisparseValueError as exc:
        found = _CONFIG_MESSAGE.match(str(exc))
        flags = {o.field: o.flag for o in CONFIG_OPTIONS}
        if found and found.group(1) in given and found.group(1) in flags:
            message = f"argument {flags[found.group(1)]}: {found.group(2)}"
        else:
            message = str(exc)
        args._parser.error(message)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (else a usage error)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _add_parser(sub, name: str, **kwargs) -> argparse.ArgumentParser:
    p = sub.add_parser(name, formatter_class=_DefaultsHelpFormatter, **kwargs)
    p.set_defaults(_parser=p)  # usage errors found after parsing are reported by the subcommand's parser
    return p


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


def _add_capture_option(p) -> None:
    from .passes.capture import CAPTURES

    p.add_argument("--capture", choices=CAPTURES, default="auto",
                   help="how the model becomes a graph: fx (symbolic tracing), export (torch.export on the first "
                        "batch: current Hugging Face models) or auto (tracing, torch.export if tracing fails) "
                        "(default: auto)")


def _add_commands(sub) -> None:
    p = _add_parser(sub, "inspect", help="ownership table and the graph code after mask insertion",
                    description="Print which tasks each parameter serves (shared / task-specific / unused) "
                                "and the rewritten graph code after inserting masks at --sparsity "
                                "(magnitude criterion: no data needed).")
    p.add_argument("model", type=_factory_spec, metavar="MODEL", help="package.module:factory returning the model")
    p.add_argument("--input-shape", type=_shape, help="example input shape, e.g. 1,3,64,64 (needed for "
                                                      "--granularity channel)")
    _add_capture_option(p)
    _add_config_options(p, "sparsity", "granularity", "attention", "seed")

    p = _add_parser(sub, "compress", help="compress a model and save the result",
                       description="Compress MODEL (default: the built-in DeepLab-ResNet on the built-in photo "
                                   "tasks) with DiSparse and save the result (graph, masks, plan) to --out.")
    p.add_argument("model", nargs="?", type=_factory_spec, metavar="MODEL",
                   help="package.module:factory returning the model (default: the built-in model)")
    p.add_argument("--data", type=_factory_spec, help="package.module:factory returning (batches, task_losses); "
                                                      "default: the built-in photo tasks (built-in model only)")
    p.add_argument("--input-shape", type=_shape, help="with --criterion magnitude/random and no --data: the "
                                                      "shape of random example inputs")
    p.add_argument("--baseline", action="store_true", help="one score on the summed loss (disentangle=False)")
    p.add_argument("--out", required=True, help="result file to write (e.g. result.dfx)")
    _add_capture_option(p)
    _add_config_options(p)

    p = _add_parser(sub, "slim", help="remove pruned channels from a saved result",
                       description="Load a saved result, remove its pruned channels (dfx.slim) and save the slim "
                                   "model.")
    p.add_argument("result", metavar="RESULT", help="a file written by `disparse-fx compress`")
    p.add_argument("--out", required=True, help="slim model file to write (e.g. slim.dfx)")

    p = _add_parser(sub, "export", help="export a saved model to ONNX, verified with onnxruntime",
                       description="Load a saved slim model or result (its masked model), export it to ONNX and "
                                   "check onnxruntime against PyTorch.")
    p.add_argument("model_file", metavar="MODEL_FILE", help="a file written by `slim` or `compress`")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--input-shape", type=_shape, help="example input shape (default: the shape compress saw)")
    p.add_argument("--opset", type=positive_int, default=None, help="ONNX opset (default: 17)")

    p = _add_parser(sub, "report", help="write a report folder for a saved result",
                       description="Write the report (per-layer table, parameter and FLOP totals), the mask-overlap "
                                   "table and plot and the graph drawing into a folder.")
    p.add_argument("result", metavar="RESULT", help="a file written by `disparse-fx compress`")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--format", choices=("md", "html"), default="md", help="report format")
    p.add_argument("--input-shape", type=_shape, help="example input shape (default: the shape compress saw)")


def _call_factory(spec: str, what: str) -> Any:
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise CLIUsageError(f"cannot import {module_name!r} for {what} {spec!r} (looked in the current folder "
                            f"and sys.path): {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - the user's module failed while importing
        raise CLIError(f"importing {module_name!r} for {what} {spec!r} raised {type(exc).__name__}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIUsageError(f"{module_name!r} has no attribute {attr!r} ({what} {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CLIUsageError(f"{what} {spec!r} is not callable")
    try:
        return obj()
    except Exception as exc:  # noqa: BLE001 - the user's factory failed
        raise CLIError(f"{what} factory {spec!r} raised {type(exc).__name__}: {exc}") from exc


def _model(spec: str):
    import torch.nn as nn

    model = _call_factory(spec, "MODEL")
    if not isinstance(model, nn.Module):
        raise CLIError(f"MODEL {spec!r} returned {type(model).__name__}, expected an nn.Module")
    return model


def _dummy_losses(model) -> dict:
    from disparse_fx.passes.trace import task_names, trace_model

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
    from .report import owners_label

    model = _model(args.model)
    data = [torch.randn(args.input_shape)] if args.input_shape else []
    result = compress(model, _dummy_losses(model), data, args.config, capture=args.capture)
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

        splits = make_splits(seed=args.seed, n_train=8 * args.config.batch_limit, n_val=8, n_test=8)
        data, losses = DataLoader(splits.train, batch_size=8, shuffle=False), default_task_losses()
    elif args.criterion in ("magnitude", "random") and args.input_shape:
        gen = torch.Generator().manual_seed(args.seed)
        data = [torch.randn(args.input_shape, generator=gen) for _ in range(args.config.batch_limit)]
        losses = _dummy_losses(model)
    else:  # main() rejects this combination as a usage error
        raise CLIError("compress MODEL needs --data package.module:factory (or --criterion magnitude/random "
                       "with --input-shape)")
    result = compress(model, losses, data, args.config, capture=args.capture)
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
