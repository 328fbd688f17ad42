"""What the checksums in a checkpoint's COMPLETE marker cost, against the save itself.

A real DeepSpeed engine (world of one, ZeRO-1, fp32, Adam after one step so its moments exist)
saves a checkpoint with `save_checkpoint`; then every file of the tag is checksummed the way
`harness.checkpoint` does it (CRC-32, read back from disk: the page cache right after a save),
and with blake2b and sha256 for comparison. Variants are the hashes; `seconds` is the median of
`--reps`, `share_of_save` the hash time over the save time (the marker adds that to every save),
`MB_per_s` the hashing speed. The baseline of the speedup column is sha256.

    python benchmarks/checkpoint_checksum.py            # MIMO-UNet+ (16.1 M parameters)
    python benchmarks/checkpoint_checksum.py --quick    # tiny model
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import row, speedups, write_report  # noqa: E402

from harness import checkpoint, distributed  # noqa: E402

QUICK = dict(model="mimo-unet", overrides={"num_res": 1, "base_channels": 8}, reps=2)
FULL = dict(model="mimo-unet-plus", overrides={}, reps=3)


def _hashlib(name: str):
    def digest(path: Path) -> str:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, name).hexdigest()

    return digest


HASHES = {"crc32": checkpoint.file_crc32, "blake2b": _hashlib("blake2b"), "sha256": _hashlib("sha256")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model (the test suite)")
    ap.add_argument("--reps", type=int, help="timed repetitions (median reported)")
    ap.add_argument("--dir", help="where to write the checkpoints (default: a temp dir; pick the disk to measure)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/<host>-checkpoint_checksum.json)")
    return ap.parse_args(argv)


def engine_for(name: str, overrides: dict):
    import deepspeed
    import torch

    from harness.models import create_model

    distributed.prepare_env()
    distributed.init()
    model = create_model(name, **overrides)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    config = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    outputs = engine(torch.rand(1, 3, 64, 64))
    engine.backward(sum(o.mean() for o in outputs))
    engine.step()  # Adam's moments exist: the checkpoint has its real size
    return engine, sum(p.numel() for p in model.parameters())


def measure(engine, root: Path, reps: int) -> tuple[list[float], dict[str, list[float]], int]:
    saves, hashes, size = [], {name: [] for name in HASHES}, 0
    for i in range(reps):
        t0 = time.perf_counter()
        engine.save_checkpoint(str(root), tag=f"rep{i}", save_latest=False)
        saves.append(time.perf_counter() - t0)
        files = [p for p in sorted((root / f"rep{i}").rglob("*")) if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        for name, fn in HASHES.items():
            t0 = time.perf_counter()
            for p in files:
                fn(p)
            hashes[name].append(time.perf_counter() - t0)
        shutil.rmtree(root / f"rep{i}")
    return saves, hashes, size


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = {**(QUICK if args.quick else FULL), "quick": args.quick}
    reps = args.reps or cfg["reps"]
    engine, params = engine_for(cfg["model"], cfg["overrides"])
    with tempfile.TemporaryDirectory(prefix="mimo-ckpt-bench-", dir=args.dir) as tmp:
        saves, hashes, size = measure(engine, Path(tmp), reps)
    save_s = statistics.median(saves)
    rows = [row("save_checkpoint", "seconds", save_s), row("save_checkpoint", "MB_per_s", size / 2**20 / save_s)]
    for name, times in hashes.items():
        t = statistics.median(times)
        rows += [row(name, "seconds", t), row(name, "share_of_save", t / save_s), row(name, "MB_per_s", size / 2**20 / t)]
    config = {**cfg, "reps": reps, "parameters": params, "checkpoint_mb": round(size / 2**20, 1),
              "dir": args.dir or tempfile.gettempdir()}
    write_report("checkpoint_checksum", device="cpu", config=config, rows=rows,
                 speedup=speedups(rows, "seconds", "sha256", lower_is_better=True), out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
