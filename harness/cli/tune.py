"""`mimo tune --recipe R [k=v ...]` and `mimo tune --resume EXP_DIR`: thin wrapper of harness.tune."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tune", help="search loss weights and LR schedules with Ray Tune",
        description="Run a Ray Tune experiment over a tune recipe (a base training recipe + `search:`); "
                    "every trial runs the trainer. Same as `python -m harness.tune`.")
    from harness.tune import add_arguments  # light: Ray is imported only when a search runs

    add_arguments(p)
    p.set_defaults(func=_tune)


def _tune(args: argparse.Namespace) -> int:
    from harness.tune import execute

    return execute(args)  # same namespace fields as `python -m harness.tune`
