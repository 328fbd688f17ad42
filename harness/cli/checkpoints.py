"""`mimo checkpoints verify RUN_DIR`: re-read every checkpoint of a run against its checksums."""

from __future__ import annotations

import argparse

from harness.errors import HarnessError


def register(subparsers) -> None:
    p = subparsers.add_parser("checkpoints", help="a run's checkpoints: verify their checksums")
    sub = p.add_subparsers(dest="checkpoints_command", metavar="ACTION", required=True)
    verify = sub.add_parser("verify", help="check every checkpoint tag of RUN_DIR (sizes and CRC-32 of each file)")
    verify.add_argument("run_dir", metavar="RUN_DIR")
    verify.set_defaults(func=_verify)


def _verify(args: argparse.Namespace) -> int:
    from harness import checkpoint

    rows = checkpoint.verify_run(args.run_dir)
    for tag, problem in rows:
        print(f"{tag}  {'ok' if problem is None else 'BAD: ' + problem}")
    bad = [tag for tag, problem in rows if problem is not None]
    if bad:
        raise HarnessError(f"{args.run_dir}: {len(bad)} of {len(rows)} checkpoint(s) fail verification: {', '.join(bad)}")
    return 0
