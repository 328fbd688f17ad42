"""Data-parallel scaling: the trainer launched by `deepspeed` on 1 vs N ranks, images/s ratio.

The same recipe (global batch fixed, so N ranks each take batch/N) is launched for real with
`deepspeed --num_gpus N --master_port <free> harness/train.py`; images/s is the median of the
trainer's own log.jsonl records after the first (start-up, first-step allocation excluded).
On CPU the ranks are gloo processes sharing the machine's cores (one torch thread each).

    python benchmarks/scaling.py --quick              # tiny model, the test suite
    python benchmarks/scaling.py                      # CPU: MIMO-UNet, 64x64 crops, 1 vs 2 ranks
    python benchmarks/scaling.py --device cuda --ranks 1,2,4,8 --crop 256 --batch 32 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, row, speedups, write_report  # noqa: E402

from harness.distributed import free_port  # noqa: E402

DEEPSPEED = Path(sys.executable).parent / "deepspeed"
QUICK = dict(overrides="{num_res: 1, base_channels: 8}", crop=32, batch=4, steps=12, log_every=3)
FULL = dict(overrides="{}", crop=64, batch=4, steps=30, log_every=5)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model and few steps (the test suite)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the launcher picks the accelerator)")
    ap.add_argument("--ranks", default="1,2", help="comma-separated world sizes; the first is the baseline")
    ap.add_argument("--model", default="mimo-unet")
    ap.add_argument("--crop", type=int)
    ap.add_argument("--batch", type=int, help="global batch (divisible by every world size)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--timeout", type=float, default=600, help="seconds per launch")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/<host-or-gpu>-scaling.json)")
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for key in ("crop", "batch", "steps"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    args.cfg, args.world_sizes = cfg, [int(n) for n in args.ranks.split(",")]
    bad = [n for n in args.world_sizes if n < 1 or cfg["batch"] % n]
    if bad:
        ap.error(f"--ranks {bad}: every world size must divide the global batch {cfg['batch']}")
    return args


def make_shards(work: Path, ranks: int) -> Path:
    """Raw-encoded synthetic shards, at least two per rank so that ranks read disjoint shards."""
    from harness.data import pack, sources
    from harness.data.synth import synthesize

    synthesize(work / "src", scenes=2, frames=2 * ranks, size=(96, 128), seed=0, split="train")
    pairs, unmatched = sources.list_gopro(work / "src", "train")
    pack.pack(pairs, unmatched, work / "shards", source={"dataset": "gopro", "root": str(work / "src")},
              split="train", options=pack.PackOptions(encoding="raw", samples_per_shard=2))
    return work / "shards"


def launch(ranks: int, args, shards: Path, run_dir: Path) -> float:
    """One real `deepspeed` launch; returns the median images/s of its log records after the first."""
    cfg = args.cfg
    port = free_port()
    cmd = [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", str(port), str(REPO / "harness" / "train.py"),
           "--recipe", str(REPO / "recipes" / "smoke.yaml"), "--run-dir", str(run_dir), "--resume", "never",
           f"model.name={args.model}", f"model.overrides={cfg['overrides']}", f"data.train={shards}", "data.val=null",
           f"data.crop={cfg['crop']}", "data.crops_per_image=1", "data.workers=0",
           f"train.global_batch={cfg['batch']}", "train.micro_batch=null", f"train.steps={cfg['steps']}",
           f"train.precision={args.precision}", "train.ema_decay=null", "train.threads=null",
           f"train.log_every={cfg['log_every']}", "eval.every=1000000000", "checkpoint.every=1000000000"]
    log = run_dir.parent / f"launch-{ranks}.log"
    print(f"[scaling] {ranks} rank(s): {' '.join(cmd[:6])} ...", flush=True)
    with open(log, "wb") as fh:
        # Own process group: on timeout the launcher and every rank are killed together.
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
        finally:
            for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
                path.unlink(missing_ok=True)  # DeepSpeed leaves its shared-memory buffers behind
    if rc != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"scaling: {ranks}-rank launch failed ({rc}); log {log}:\n{tail}")
    records = [json.loads(ln) for ln in (run_dir / "log.jsonl").read_text().splitlines() if ln.strip()]
    ips = [r["images_per_sec"] for r in records if r["event"] == "train"][1:]
    return statistics.median(ips)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mimo-bench-scaling-") as tmp:
        work = Path(tmp)
        shards = make_shards(work, max(args.world_sizes))
        for n in args.world_sizes:
            ips = launch(n, args, shards, work / f"run-{n}")
            rows += [row(f"ranks-{n}", "images_per_s", ips), row(f"ranks-{n}", "per_rank_images_per_s", ips / n)]
    base = f"ranks-{args.world_sizes[0]}"
    speedup = speedups(rows, "images_per_s", base)
    config = {**args.cfg, "model": args.model, "precision": args.precision, "world_sizes": args.world_sizes,
              "device": args.device, "quick": args.quick, "backend": "nccl" if args.device == "cuda" else "gloo",
              "launcher": "deepspeed --num_gpus N", "baseline": base,
              "batch_note": "global batch; each of N ranks takes batch / N"}
    write_report("scaling", device=args.device, config=config, rows=rows, speedup=speedup, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
