"""`mimo` command line: parse, call, turn errors into one line and a non-zero exit.

Each area registers its subcommands from a small module in this package; handlers import
their heavy dependencies (torch, deepspeed, mlflow, ray) lazily so `mimo --help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from harness import __version__
from harness.errors import HarnessError

# Modules in harness.cli that define `register(subparsers)`.
COMMAND_MODULES = ["models", "synth", "data", "train", "export", "checkpoints", "tracking", "tune"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mimo", description="MIMO-UNet deblurring harness")
    parser.add_argument("--version", action="version", version=f"mimo-harness {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"harness.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except HarnessError as exc:
        print(f"mimo {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mimo {args.command}: interrupted", file=sys.stderr)
        return 130
