"""The `disparse-fx` command line (also `python -m disparse_fx`).

Exit codes: 0 success, 2 usage error, 1 failure (one line, no traceback unless --debug).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from .errors import DisparseError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disparse-fx", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks and DEBUG logs")
    sub = parser.add_subparsers(dest="command", required=True)
    from . import demo

    demo.add_arguments(sub.add_parser("demo", help="the main job on the built-in default (see demo --help)",
                                      description=demo.__doc__.splitlines()[0]))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with 2 on usage errors
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "demo":
            from .demo import run_from_args

            return run_from_args(args, sys.stdout)
    except (DisparseError, NotImplementedError) as exc:
        if args.debug:
            raise
        print(f"disparse-fx: error: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command}")
    return 2
