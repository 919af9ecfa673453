"""The `disparse-fx` command line (also `python -m disparse_fx`).

Exit codes: 0 success, 2 usage error, 1 failure (one line, no traceback unless --debug).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from .config import CRITERIA, GRANULARITIES
from .errors import DisparseError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disparse-fx", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks and DEBUG logs")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compress the built-in multitask model (the main job)")
    demo.add_argument("--sparsity", type=float, default=0.9, help="fraction of prunable parameters removed")
    demo.add_argument("--criterion", choices=CRITERIA, default="snip")
    demo.add_argument("--granularity", choices=GRANULARITIES, default="element")
    demo.add_argument("--baseline", action="store_true", help="one score on the summed loss (disentangle=False)")
    demo.add_argument("--batches", type=int, default=8, help="batches used for importance")
    demo.add_argument("--size", choices=("tiny", "small", "paper"), default="tiny", help="model size")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with 2 on usage errors
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "demo":
            from .demo import DemoOptions, run_demo

            opts = DemoOptions(sparsity=args.sparsity, criterion=args.criterion, granularity=args.granularity,
                               disentangle=not args.baseline, batches=args.batches, size=args.size, seed=args.seed)
            return run_demo(opts, sys.stdout)
    except (DisparseError, NotImplementedError) as exc:
        if args.debug:
            raise
        print(f"disparse-fx: error: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command}")
    return 2
