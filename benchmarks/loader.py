"""Loader throughput and shuffle quality: our shard stream vs a plain torch DataLoader over the PNG tree.

Throughput: same synthetic data (harness.data.synth, GoPro layout), same crop/batch, same number
of workers, same run. Variants:
  folder-png        torch Dataset over the PNG tree: decode a pair per crop (BasicSR style) — baseline
  shards-{png,raw}-c{1,4}   train_loader over packed shards, png or raw encoding, crops_per_image 1 or 4
Metrics: crops/s after a warm-up (worker start-up excluded); for the stream also reads and bytes
read per crop (the same micro-batches replayed in this process, worker by worker) and each
worker's peak RSS (VmHWM, forked pages included) and USS (its own pages) after the timed batches.
Shuffle quality (`shuffle-<layout>/...` rows): on a GoPro-sized layout (22 scenes, 2,103 pairs in
scene order, as `mimo pack` writes them; sample numbers and scene ids only, no decode; 10 epochs)
and a small one (8 scenes x 30 frames, 200 epochs), the share of global batches of 4 whose crops
all come from one scene and the mean number of scenes per batch, for the stream's order and for
uniform permutations (the reference DataLoader's shuffle=True).
Writes benchmarks/results/<host>-loader.json: host, device, config, results
[{variant, metric, value}], speedup {variant: value / baseline}.

    python benchmarks/loader.py            # full: 1280x720 frames, 256x256 crops, batch 4
    python benchmarks/loader.py --quick    # seconds; used by the test suite
"""

from __future__ import annotations

import argparse
import gc
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

from harness.files import load_rgb_array  # noqa: E402

# Both loaders get epochs as long as GoPro's train split, so that what happens once an epoch (the
# stream's shuffle buffers refill, the DataLoader's workers drain and restart the sampler) weighs
# what it weighs there, not once every 3 batches as a 12-pair set's own epochs would make it.
GOPRO_TRAIN_PAIRS = 2103
FULL = dict(size=(720, 1280), scenes=2, frames=6, crop=256, batch=4, warmup=4, batches=40)
QUICK = dict(size=(96, 128), scenes=1, frames=4, crop=64, batch=4, warmup=2, batches=6)
GOPRO_SCENE_FRAMES = [96] * 13 + [95] * 9  # 2,103 pairs in 22 scenes
SHUFFLE_EPOCHS = 10  # GoPro layout


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


def shuffle_quality(batch: int) -> list[dict]:
    """One-scene batch share and scenes per batch: the stream's order vs uniform permutations, on
    GoPro's layout and on a small one (8 scenes x 30 frames) where one-scene batches are common
    enough (0.16 % for a permutation) to compare within the sampling noise."""
    from harness.data.stream import Order

    rows = []
    for layout, frames, epochs in (("gopro", GOPRO_SCENE_FRAMES, SHUFFLE_EPOCHS), ("small", [30] * 8, 200)):
        scene = np.repeat(np.arange(len(frames)), frames)
        n, batches = len(scene), epochs * len(scene) // batch
        order = Order(n, seed=0, crops_per_image=1, global_batch=batch)
        ours = scene[[order.crop(c)[1] for c in range(batches * batch)]]
        rng = np.random.default_rng(0)
        uniform = scene[np.concatenate([rng.permutation(n) for _ in range(epochs)])[:batches * batch]]
        for name, b in (("stream", ours), ("permutation", uniform)):
            distinct = np.array([len(set(x)) for x in b.reshape(batches, batch)])
            one = float(np.mean(distinct == 1))
            variant = f"shuffle-{layout}/{name}"
            rows += [row(variant, "one_scene_batch_share", round(one, 5)),
                     row(variant, "one_scene_stderr", round(float(np.sqrt(one * (1 - one) / batches)), 5)),
                     row(variant, "scenes_per_batch", round(float(distinct.mean()), 4)),
                     row(variant, "batches", batches)]
    return rows


def io_per_crop(stream, workers: int, batches: int) -> tuple[float, float]:
    """(reads, bytes read) per crop of the first `batches` micro-batches, made in this process by the
    same per-worker code (worker w makes micro-batches w, w + workers, ...)."""
    ds = stream.dataset
    ds.start, ds.reads, ds.bytes_read = 0, 0, 0
    crops = 0
    for w in range(max(workers, 1)):
        gen = ds.worker_batches(w, max(workers, 1))
        for _ in range(batches // max(workers, 1)):
            crops += next(gen)["blur"].shape[0]
        gen.close()
    return ds.reads / crops, ds.bytes_read / crops


def worker_memory(stream) -> tuple[float, float]:
    """(max VmHWM, max USS) in MiB over the stream's live DataLoader workers."""
    import psutil

    hwm, uss = [], []
    for proc in getattr(stream._it, "_workers", []):
        with open(f"/proc/{proc.pid}/status") as fh:
            hwm.append(next(int(ln.split()[1]) for ln in fh if ln.startswith("VmHWM")) / 1024)
        uss.append(psutil.Process(proc.pid).memory_full_info().uss / 2**20)
    return (max(hwm), max(uss)) if hwm else (0.0, 0.0)


def run(cfg: dict, workers: int, work: Path) -> list[dict]:
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
    folder = DataLoader(FolderPairs([(p.blur, p.sharp) for p in pairs], crop, length=GOPRO_TRAIN_PAIRS),
                        batch_size=batch, shuffle=True,
                        num_workers=workers, drop_last=True, persistent_workers=workers > 0)
    rows = [row("folder-png", "crops_per_s", measure(endless(folder), warmup, n, batch))]
    del folder
    gc.collect()  # its persistent workers go before the stream's are measured
    for enc in ("png", "raw"):
        for cpi in (1, 4):
            variant = f"shards-{enc}-c{cpi}"
            stream = train_loader(work / enc, crop=crop, crops_per_image=cpi, batch_size=batch, seed=0,
                                  workers=workers)
            rows.append(row(variant, "crops_per_s", measure(stream, warmup, n, batch)))
            hwm, uss = worker_memory(stream)
            stream.close()
            reads, nbytes = io_per_crop(stream, workers, min(n, 16))
            rows += [row(variant, "reads_per_crop", round(reads, 3)),
                     row(variant, "mb_read_per_crop", round(nbytes / 2**20, 3)),
                     row(variant, "worker_peak_rss_mb", round(hwm, 1)), row(variant, "worker_uss_mb", round(uss, 1))]
    return rows + shuffle_quality(batch)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny images and few batches (seconds)")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", help="JSON path (default benchmarks/results/<host>-loader.json)")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="mimo-bench-") as tmp:
        rows = run(cfg, args.workers, Path(tmp))
    config = {**cfg, "size": list(cfg["size"]), "workers": args.workers, "quick": args.quick,
              "metric": "crops_per_s", "baseline": "folder-png", "torch": torch.__version__,
              "shuffle_layouts": {"gopro": {"scenes": len(GOPRO_SCENE_FRAMES), "pairs": sum(GOPRO_SCENE_FRAMES),
                                            "epochs": SHUFFLE_EPOCHS},
                                  "small": {"scenes": 8, "pairs": 240, "epochs": 200},
                                  "global_batch": cfg["batch"]}}
    write_report("loader", device="cpu", config=config, rows=rows,
                 speedup=speedups(rows, "crops_per_s", "folder-png"), out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
