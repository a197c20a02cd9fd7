"""The ``ann-kernels`` command line (also ``python -m ann_kernels``).

Each command group lives in its own module with an ``add_parser(subparsers)`` function that
registers its sub-commands (each with ``set_defaults(func=...)``, a function taking the
parsed arguments and returning an exit code). ``ANN_KERNELS_TRACEBACK=1`` shows full
tracebacks for errors that are otherwise printed as one line. To add a group, append its module to
``COMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMAND_MODULES = [
    "ann_kernels.train.commands",  # train, eval, compare, demo
    "ann_kernels.sequence.commands",  # eann train, eann eval
    "ann_kernels.inference.commands",  # calibrate, infer, serve
    "ann_kernels.generation.commands",  # generate
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ann-kernels",
        description="Anytime neural networks: train with any exit-weighting scheme, evaluate every exit.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return its exit code.
    Expected user errors (bad values, missing files) print one line, not a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        if os.environ.get("ANN_KERNELS_TRACEBACK"):
            raise
        print(f"ann-kernels {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ann-kernels {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
