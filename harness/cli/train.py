"""`mimo train` (checks the recipe, then starts the DeepSpeed launcher) and `mimo export`."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def register(subparsers) -> None:
    register_train(subparsers)
    register_export(subparsers)


def register_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train with DeepSpeed (wraps `deepspeed harness/train.py`)",
        description="Validate the recipe, shards and run dir, then run `deepspeed --num_gpus N "
                    "harness/train.py ...` (or plain python for one process).")
    from harness.train import add_arguments  # light: torch and DeepSpeed load only when a run starts

    add_arguments(p)
    p.add_argument("--nprocs", type=int, default=1, help="ranks on this machine (default 1)")
    p.add_argument("--master-port", type=int, help="rendezvous port (default: a free one)")
    p.set_defaults(func=_train)


def register_export(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a run's weights as a public {'model': ...} checkpoint",
        description="Consolidate a run's DeepSpeed checkpoint (fp32 master weights, or the EMA) into "
                    "the weights file that `mimo deblur`, `mimo eval` and the original code load.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="weights file to write (e.g. weights.pkl)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (train.ema_decay runs)")
    p.add_argument("--tag", default="latest", help="latest (default), best, or a checkpoint tag")
    p.set_defaults(func=_export)


def _train(args: argparse.Namespace) -> int:
    from harness.distributed import free_port
    from harness.recipe import load_recipe
    from harness.train import default_run_dir, describe, preflight

    if args.nprocs < 1:
        raise SystemExit("mimo train: error: --nprocs must be >= 1")
    recipe = load_recipe(args.recipe, args.overrides)
    if args.print_recipe:
        print(describe(recipe, args.nprocs))
        return 0
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(recipe)
    preflight(recipe, run_dir, args.nprocs)  # errors here: before any rank starts
    if args.dry_run:
        print(f"ok: {recipe.source} (world size {args.nprocs}, run dir {run_dir})")
        return 0
    script = str(Path(__file__).resolve().parent.parent / "train.py")
    tail = [script, "--recipe", args.recipe, "--run-dir", str(run_dir), "--resume", args.resume, *args.overrides]
    if args.nprocs == 1:
        cmd = [sys.executable, *tail]
    else:
        port = args.master_port or free_port()
        launcher = Path(sys.executable).parent / "deepspeed"
        cmd = [str(launcher), "--num_gpus", str(args.nprocs), "--master_port", str(port), *tail]
    print(f"mimo train: {' '.join(cmd)}", file=sys.stderr)
    return subprocess.call(cmd)


def _export(args: argparse.Namespace) -> int:
    from harness.checkpoint import export

    path = export(args.run_dir, args.out, ema=args.ema, tag=args.tag)
    print(path)
    return 0
