"""Loader throughput: our shard stream vs a plain torch DataLoader over the PNG folder tree.

Same synthetic data (harness.data.synth, GoPro layout), same crop/batch, same number of
workers, same run. Variants:
  folder-png        torch Dataset over the PNG tree: decode a pair per crop (BasicSR style) — baseline
  shards-{png,raw}-c{1,4}   train_loader over packed shards, png or raw encoding, crops_per_image 1 or 4
Metric: crops/s after a warm-up (worker start-up excluded). Writes
benchmarks/results/<host>-loader.json: host, device, config, results [{variant, metric, value}],
speedup {variant: value / baseline}.

    python benchmarks/loader.py            # full: 1280x720 frames, 256x256 crops, batch 4
    python benchmarks/loader.py --quick    # seconds; used by the test suite
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import row, speedups, write_report  # noqa: E402  (puts the repo on sys.path)
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from harness.io import load_rgb_array  # noqa: E402

# Both loaders get epochs as long as GoPro's train split, so that what happens once an epoch (the
# stream's shuffle buffers refill, the DataLoader's workers drain and restart the sampler) weighs
# what it weighs there, not once every 3 batches as a 12-pair set's own epochs would make it.
GOPRO_TRAIN_PAIRS = 2103
FULL = dict(size=(720, 1280), scenes=2, frames=6, crop=256, batch=4, warmup=4, batches=40)
QUICK = dict(size=(96, 128), scenes=1, frames=4, crop=64, batch=4, warmup=2, batches=6)


class FolderPairs(Dataset):
    """The usual folder loader: every item decodes a blur/sharp PNG pair for one random crop + hflip.

    `length` > len(pairs) cycles through the pairs, so that a small synthetic set still fills
    batches larger than itself (with drop_last, a shorter epoch would yield no batch at all).
    """

    def __init__(self, pairs: list[tuple[Path, Path]], crop: int, length: int | None = None):
        self.pairs, self.crop, self.length = pairs, crop, max(length or 0, len(pairs))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        blur, sharp = (load_rgb_array(p) for p in self.pairs[i % len(self.pairs)])
        h, w, _ = blur.shape
        y, x = np.random.randint(0, h - self.crop + 1), np.random.randint(0, w - self.crop + 1)
        flip = np.random.rand() < 0.5
        out = []
        for a in (blur, sharp):
            c = a[y : y + self.crop, x : x + self.crop]
            c = c[:, ::-1] if flip else c
            out.append(torch.from_numpy(np.ascontiguousarray(c)).permute(2, 0, 1).float().div_(255.0))
        return {"blur": out[0], "sharp": out[1]}


def endless(loader):
    """Batches from `loader`, epoch after epoch."""
    while True:
        yield from loader


def measure(batches, warmup: int, n: int, batch: int) -> float:
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    t = time.perf_counter()
    for _ in range(n):
        b = next(it)
        assert b["blur"].shape[0] == batch
    return n * batch / (time.perf_counter() - t)


def run(cfg: dict, workers: int, work: Path) -> dict:
    from harness.data import pack as P
    from harness.data import sources
    from harness.data.stream import train_loader
    from harness.data.synth import synthesize

    synthesize(work / "src", scenes=cfg["scenes"], frames=cfg["frames"], size=cfg["size"], seed=0, split="train")
    pairs, unmatched = sources.list_gopro(work / "src", "train")
    for enc in ("png", "raw"):
        P.pack(pairs, unmatched, work / enc, source={"dataset": "gopro", "root": str(work / "src")},
               split="train", options=P.PackOptions(encoding=enc, samples_per_shard=2, workers=workers))
    crop, batch, warmup, n = cfg["crop"], cfg["batch"], cfg["warmup"], cfg["batches"]
    results = []
    folder = DataLoader(FolderPairs([(p.blur, p.sharp) for p in pairs], crop, length=GOPRO_TRAIN_PAIRS),
                        batch_size=batch, shuffle=True,
                        num_workers=workers, drop_last=True, persistent_workers=workers > 0)
    results.append(("folder-png", measure(endless(folder), warmup, n, batch)))
    for enc in ("png", "raw"):
        for cpi in (1, 4):
            stream = train_loader(work / enc, crop=crop, crops_per_image=cpi, batch_size=batch, seed=0,
                                  workers=workers, samples_per_epoch=GOPRO_TRAIN_PAIRS * cpi)
            results.append((f"shards-{enc}-c{cpi}", measure(stream, warmup, n, batch)))
            stream.close()
    return {v: value for v, value in results}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny images and few batches (seconds)")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", help="JSON path (default benchmarks/results/<host>-loader.json)")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="mimo-bench-") as tmp:
        values = run(cfg, args.workers, Path(tmp))
    config = {**cfg, "size": list(cfg["size"]), "workers": args.workers, "quick": args.quick,
              "metric": "crops_per_s", "baseline": "folder-png", "torch": torch.__version__}
    rows = [row(v, "crops_per_s", x) for v, x in values.items()]
    write_report("loader", device="cpu", config=config, rows=rows,
                 speedup=speedups(rows, "crops_per_s", "folder-png"), out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
