"""`mimo tune --recipe R [k=v ...]` and `mimo tune --resume EXP_DIR`: thin wrapper of harness.tune."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tune", help="search loss weights and LR schedules with Ray Tune",
        description="Run a Ray Tune experiment over a tune recipe (a base training recipe + `search:`); "
                    "every trial runs the trainer. Same as `python -m harness.tune`.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--recipe", help="tune recipe YAML (recipes/tune-*.yaml)")
    src.add_argument("--resume", metavar="EXP_DIR", help="continue an interrupted experiment")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="search.* keys change the search, others the base training recipe")
    p.set_defaults(func=_tune)


def _tune(args: argparse.Namespace) -> int:
    from harness.tune import execute

    return execute(args)  # same namespace fields as `python -m harness.tune`
