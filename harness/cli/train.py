"""`mimo train`: checks the recipe, shards and run dir, then starts the DeepSpeed launcher."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train with DeepSpeed (wraps `deepspeed harness/train.py`)",
        description="Validate the recipe, shards and run dir, then run `deepspeed --num_gpus N "
                    "harness/train.py ...` (or plain python for one process).")
    from harness.train import add_arguments  # light: torch and DeepSpeed load only when a run starts

    add_arguments(p)
    p.add_argument("--nprocs", type=int, default=1, help="ranks on this machine (default 1)")
    p.add_argument("--master-port", type=int, help="rendezvous port (default: a free one)")
    p.set_defaults(func=_train)


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
    tail = [script, "--recipe", args.recipe, "--run-dir", str(run_dir), "--resume", args.resume,
            *(["--verbose"] if args.verbose else []), *args.overrides]
    if args.nprocs == 1:
        cmd = [sys.executable, *tail]
    else:
        port = args.master_port or free_port()
        launcher = Path(sys.executable).parent / "deepspeed"
        quiet = [] if args.verbose or recipe.train.log_level == "verbose" else ["--log_level", "warning"]
        cmd = [str(launcher), "--num_gpus", str(args.nprocs), "--master_port", str(port), *quiet, *tail]
    print(f"mimo train: {' '.join(cmd)}", file=sys.stderr)
    return subprocess.call(cmd)
