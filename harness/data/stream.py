"""Streaming loaders over tar shards: `train_loader` (infinite, exactly resumable) and `eval_loader`.

How the training stream is built (all draws from numpy generators keyed by integers, so the
stream is a pure function of (seed, epoch, rank, world_size, worker lanes)):

- Batch `g` of a rank (g = 0, 1, 2, ...) belongs to epoch `g // batches_per_epoch` and is made
  by lane `g % lanes` (lanes = max(workers, 1)). torch's DataLoader asks its workers in turn,
  starting with worker 0, so a DataLoader started at batch `s` gives worker w the lane
  (s + w) % lanes, and each worker makes its lane's batches in order (batch_size=None: the
  worker batches, the DataLoader only transports).
- Epoch `e` deals the shards out to the `world_size * lanes` slots with a permutation keyed by
  (seed, e): disjoint shards per rank and worker (webdataset's split_by_node + split_by_worker).
  With fewer shards than slots, slots share shards (different draws), with a warning.
- A lane resamples its shards endlessly (shard order keyed by (seed, e, rank, world, lanes,
  lane)), reads each sequentially, shuffles samples in a small buffer, decodes a sample once and
  cuts `crops_per_image` aligned crops, shuffles crops in a buffer, and batches them. Every rank
  yields the same number of batches per epoch (the stream never runs dry), so DDP never hangs.
- Crop positions come from the image size in meta.json (or the file header): skipping consumed
  batches replays the draws and reads the tar bytes but decodes nothing.

State (`TrainStream.state_dict()`), identical on every rank apart from `rank`:
  {"version": 1, "seed", "epoch", "batches" (consumed by this rank), "batches_per_epoch",
   "batch_size", "crops_per_image", "world_size", "lanes", "rank",
   "samples" (crops consumed by this rank), "global_samples" (by all ranks)}
`load_state_dict` with the same seed/world_size/lanes/batch_size/crops_per_image/
batches_per_epoch resumes exactly: the next batch is the one the uninterrupted run would have
yielded next (skip cost: at most one epoch of tar reads, no decoding). Otherwise (elastic resume)
it continues at `global_samples // (batch_size * world_size)` batches: the epoch counter and the
number of samples seen carry over (rounded down to whole global batches), but the crops are those
a run started with the new configuration would yield there, not those the old one would have.
A sample that fails to decode under on_error="skip" is replaced by the next one; if that happened
inside the skipped region, the resumed stream is shifted from there on.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from harness.data import crops as C
from harness.data.shards import (
    decode_pair,
    image_ext,
    image_size,
    iter_shard,
    load_manifest,
    local_path,
    read_meta,
    tar_keys,
)
from harness.errors import HarnessError

log = logging.getLogger(__name__)
STATE_VERSION = 1
DEFAULT_EPOCH_BATCHES = 1000  # when the sample count is unknown (remote URLs without a manifest)
_SHARD_SALT = 0x5EED  # separates the shard-dealing generator from the lane generators
_ERROR = "__error__"


# ---------------------------------------------------------------- sources


def resolve_source(source: str | os.PathLike) -> tuple[list[str], list[int] | None]:
    """Shard URLs and per-shard sample counts (None when unknown) of a shard dir, manifest or URL pattern."""
    path = Path(source)
    if path.is_dir() or path.name == "manifest.json":
        manifest = load_manifest(path)
        base = path if path.is_dir() else path.parent
        urls = [str(base / s["name"]) for s in manifest["shards"]]
        for url in urls:
            if not Path(url).is_file():
                raise HarnessError(f"{url}: shard listed in the manifest is missing")
        return urls, [int(s["samples"]) for s in manifest["shards"]]
    import braceexpand

    urls = [u for part in str(source).split("::") for u in braceexpand.braceexpand(part)]
    paths = [local_path(u) for u in urls]
    missing = [u for u, p in zip(urls, paths) if p is not None and not p.is_file()]
    if missing:
        raise HarnessError(f"{missing[0]}: no such shard ({len(missing)} of {len(urls)} missing in {source})")
    if None in paths:
        return urls, None
    return urls, [len(tar_keys(p)) for p in paths]


# ---------------------------------------------------------------- helpers


def _lane() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def _shuffled(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Endless-stream shuffle buffer: fill `size`, then emit a random one and put the new item in its place."""
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = int(rng.integers(len(buf)))
        yield buf[i]
        buf[i] = item
    while buf:  # only reached for finite inputs
        yield buf.pop(int(rng.integers(len(buf))))


class _Sample:
    """An undecoded sample; decoded at most once, when its first crop is materialized."""

    __slots__ = ("url", "key", "raw", "arrays")

    def __init__(self, url: str, raw: dict[str, Any]):
        self.url, self.key, self.raw, self.arrays = url, raw["__key__"], raw, None

    def size(self) -> tuple[int, int]:
        meta = read_meta(self.raw)
        if "height" in meta and "width" in meta:
            return int(meta["height"]), int(meta["width"])
        ext = image_ext(self.raw, "blur")
        return image_size(self.raw[f"blur.{ext}"], ext)

    def decode(self) -> tuple[np.ndarray, np.ndarray]:
        if self.arrays is None:
            self.arrays = decode_pair(self.raw)
            self.raw = None  # the bytes are no longer needed
        return self.arrays

    def where(self) -> str:
        return f"shard {self.url}: key {self.key}"


# ---------------------------------------------------------------- training stream


class TrainDataset(IterableDataset):
    """The per-lane batch generator (picklable: plain attributes only)."""

    def __init__(self, urls, *, crop, crops_per_image, batch_size, seed, rank, world_size, lanes, augs,
                 batches_per_epoch, shuffle, on_error):
        self.urls, self.crop, self.cpi, self.batch_size = list(urls), crop, crops_per_image, batch_size
        self.seed, self.rank, self.world_size, self.lanes = seed, rank, world_size, lanes
        self.augs, self.batches_per_epoch, self.shuffle, self.on_error = augs, batches_per_epoch, shuffle, on_error
        self.start_batch = 0
        self.decode_errors = 0

    def lane_shards(self, epoch: int, lane: int) -> list[str]:
        n, slots = len(self.urls), self.world_size * self.lanes
        perm = np.random.default_rng([self.seed, epoch, _SHARD_SALT]).permutation(n)
        slot = self.rank * self.lanes + lane
        picks = perm[slot::slots] if n >= slots else [perm[slot % n]]
        return [self.urls[i] for i in picks]

    def __iter__(self):
        worker, n_workers = _lane()
        if n_workers != self.lanes:
            yield {_ERROR: f"loader built for {self.lanes} worker lane(s) but run with {n_workers} workers"}
            return
        # A fresh DataLoader asks worker 0 first, so worker w makes the lane of batch start_batch + w.
        lane = (worker + self.start_batch) % self.lanes
        try:
            yield from self._batches(lane)
        except HarnessError as exc:  # cross the worker boundary as one line, not a traceback
            yield {_ERROR: str(exc)}

    def _batches(self, lane: int):
        n_per_epoch, epoch, specs = self.batches_per_epoch, None, None
        g = self.start_batch + (lane - self.start_batch) % self.lanes  # first batch of this lane
        while True:
            if g // n_per_epoch != epoch:
                epoch = g // n_per_epoch
                specs = self._crop_specs(epoch, lane)
                first_of_lane = (lane - epoch * n_per_epoch) % self.lanes
                for _ in range(first_of_lane, g - epoch * n_per_epoch, self.lanes):  # consumed: no decode
                    for _ in range(self.batch_size):
                        next(specs)
            yield self._materialize(specs)
            g += self.lanes

    def _samples(self, epoch: int, lane: int, rng: np.random.Generator) -> Iterator[_Sample]:
        shards = self.lane_shards(epoch, lane)
        while True:
            for i in rng.permutation(len(shards)):
                for raw in iter_shard(shards[i]):
                    yield _Sample(shards[i], raw)

    def _crop_specs(self, epoch: int, lane: int) -> Iterator[tuple[_Sample, C.CropSpec]]:
        rng = np.random.default_rng([self.seed, epoch, self.rank, self.world_size, self.lanes, lane])
        ch, cw = self.crop

        def per_crop():
            for sample in _shuffled(self._samples(epoch, lane, rng), self.shuffle, rng):
                h, w = sample.size()
                if h < ch or w < cw:
                    raise HarnessError(f"{sample.where()}: image {h}x{w} is smaller than the crop {ch}x{cw}")
                for _ in range(self.cpi):
                    yield sample, C.draw(rng, h, w, ch, cw, self.augs)

        # Mixing crops of a few images: a batch is not all crops of one frame.
        return _shuffled(per_crop(), 4 * max(self.batch_size, self.cpi), rng)

    def _materialize(self, specs) -> dict[str, torch.Tensor]:
        ch, cw = self.crop
        blurs, sharps = [], []
        while len(blurs) < self.batch_size:
            sample, spec = next(specs)
            try:
                blur, sharp = sample.decode()
            except ValueError as exc:
                if self.on_error != "skip":
                    raise HarnessError(f"{sample.where()}: {exc}") from None
                self.decode_errors += 1
                log.warning("skipping %s: %s (%d skipped in this worker)", sample.where(), exc, self.decode_errors)
                continue
            blurs.append(C.cut(blur, spec, ch, cw))
            sharps.append(C.cut(sharp, spec, ch, cw))
        return {"blur": C.to_tensor_batch(blurs), "sharp": C.to_tensor_batch(sharps)}


class TrainStream:
    """Infinite iterable of {"blur", "sharp"} uint8 NCHW batches (channels_last memory; see
    `crops.to_tensor_batch` and `crops.to_float`) with exact save/restore.

    Iterating continues from `batches` (the count consumed so far); `epoch` and
    `batches_per_epoch` give the nominal epoch. See the module docstring for the state format.
    """

    def __init__(self, dataset: TrainDataset, workers: int):
        self.dataset, self.workers = dataset, workers
        self.batches = 0
        self._it: Iterator | None = None
        self._it_at = -1

    @property
    def batches_per_epoch(self) -> int:
        return self.dataset.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self.batches // self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            if self._it is None or self._it_at != self.batches:
                self._start()
            batch = next(self._it)
            if _ERROR in batch:
                self.close()
                raise HarnessError(batch[_ERROR])
            self.batches += 1
            self._it_at += 1
            yield batch

    def epoch_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """The batches left in the current epoch (the same number on every rank)."""
        it = iter(self)
        for _ in range(self.batches_per_epoch - self.batches % self.batches_per_epoch):
            yield next(it)

    def _start(self) -> None:
        self.close()
        self.dataset.start_batch = self.batches
        if self.workers == 0:
            self._it = iter(self.dataset)
        else:
            loader = DataLoader(self.dataset, batch_size=None, num_workers=self.workers,
                                pin_memory=torch.cuda.is_available(), prefetch_factor=2)
            self._it = iter(loader)
        self._it_at = self.batches

    def close(self) -> None:
        """Stop the worker processes (they restart on the next iteration)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def state_dict(self) -> dict[str, Any]:
        d = self.dataset
        return {"version": STATE_VERSION, "seed": d.seed, "epoch": self.epoch, "batches": self.batches,
                "batches_per_epoch": d.batches_per_epoch, "batch_size": d.batch_size,
                "crops_per_image": d.cpi, "world_size": d.world_size, "lanes": d.lanes, "rank": d.rank,
                "samples": self.batches * d.batch_size,
                "global_samples": self.batches * d.batch_size * d.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for field in ("version", "seed", "batches", "global_samples", "world_size", "lanes", "batch_size",
                      "crops_per_image", "batches_per_epoch"):
            if field not in state:
                raise HarnessError(f"loader state: missing field '{field}'")
        if state["version"] != STATE_VERSION:
            raise HarnessError(f"loader state: version {state['version']!r}, expected {STATE_VERSION}")
        d = self.dataset
        d.seed = int(state["seed"])
        same = all(state[k] == v for k, v in (("world_size", d.world_size), ("lanes", d.lanes),
                                               ("batch_size", d.batch_size), ("crops_per_image", d.cpi),
                                               ("batches_per_epoch", d.batches_per_epoch)))
        if same:
            self.batches = int(state["batches"])
        else:
            self.batches = int(state["global_samples"]) // (d.batch_size * d.world_size)
            log.info("elastic loader resume: %d global samples -> batch %d of rank %d (new configuration)",
                     state["global_samples"], self.batches, d.rank)
        self.close()


def train_loader(
    source: str | os.PathLike,
    *,
    crop: int | tuple[int, int] = 256,
    crops_per_image: int = 1,
    batch_size: int = 4,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    augment: bool | str | list[str] = True,
    samples_per_epoch: int | None = None,
    shuffle: int = 16,
    on_error: str = "raise",
) -> TrainStream:
    """Infinite, deterministic, exactly resumable training batches for one rank.

    `source`: a shard directory (with manifest.json), a manifest path or a webdataset URL pattern
    (`shards/train-{000000..000009}.tar`, `pipe:...`). `samples_per_epoch`: crops per epoch over
    all ranks (default: every image's crops once). `augment`: True = hflip (the paper), or names
    from hflip/vflip/rot90. `shuffle`: sample shuffle-buffer size. `on_error`: "raise" or "skip"
    for samples that fail to decode.
    """
    if not 0 <= rank < world_size:
        raise HarnessError(f"rank {rank} / world_size {world_size}: expected 0 <= rank < world_size")
    if batch_size < 1 or crops_per_image < 1 or workers < 0 or shuffle < 1:
        raise HarnessError("batch_size, crops_per_image and shuffle must be >= 1, workers >= 0")
    if on_error not in ("raise", "skip"):
        raise HarnessError(f"on_error {on_error!r}: expected 'raise' or 'skip'")
    crop, augs = C.crop_size(crop), C.parse_augment(augment)
    urls, counts = resolve_source(source)
    if not urls:
        raise HarnessError(f"{source}: no shards")
    per_global_batch = batch_size * world_size
    if samples_per_epoch:
        n = max(1, samples_per_epoch // per_global_batch)
    elif counts is not None:
        n = max(1, math.ceil(sum(counts) * crops_per_image / per_global_batch))
    else:
        n = DEFAULT_EPOCH_BATCHES
    lanes = max(workers, 1)
    if len(urls) < world_size * lanes:
        log.warning("%d shard(s) for %d ranks x %d workers: some share shards; pack more, smaller shards",
                    len(urls), world_size, lanes)
    dataset = TrainDataset(urls, crop=crop, crops_per_image=crops_per_image, batch_size=batch_size,
                           seed=seed, rank=rank, world_size=world_size, lanes=lanes, augs=augs,
                           batches_per_epoch=n, shuffle=shuffle, on_error=on_error)
    return TrainStream(dataset, workers)


# ---------------------------------------------------------------- evaluation


class EvalDataset(IterableDataset):
    """Contiguous slices of the global sample order: rank r, worker w reads only its slice."""

    def __init__(self, urls: list[str], counts: list[int], rank: int, world_size: int, total: int, on_error: str):
        self.urls, self.counts, self.rank, self.world_size = urls, counts, rank, world_size
        self.total, self.on_error = total, on_error

    def __iter__(self):
        lane, lanes = _lane()
        lo, hi = _slice(self.total, self.rank, self.world_size)
        lo, hi = (lo + a for a in _slice(hi - lo, lane, lanes))
        try:
            yield from self._samples(lo, hi)
        except HarnessError as exc:
            yield {_ERROR: str(exc)}

    def _samples(self, lo: int, hi: int):
        start = 0
        for url, count in zip(self.urls, self.counts):
            if start < hi and lo < start + count:
                for i, raw in enumerate(iter_shard(url)):
                    if start + i >= hi:
                        break
                    if start + i >= lo:  # samples before the slice are read, never decoded
                        item = self._decode(url, raw)
                        if item is not None:
                            yield item
            start += count

    def _decode(self, url: str, raw: dict[str, Any]):
        try:
            blur, sharp = decode_pair(raw)
        except ValueError as exc:
            if self.on_error != "skip":
                raise HarnessError(f"shard {url}: key {raw['__key__']}: {exc}") from None
            log.warning("skipping shard %s: key %s: %s", url, raw["__key__"], exc)
            return None
        scene = read_meta(raw).get("scene", "")
        return {"key": raw["__key__"], "scene": scene, "blur": torch.from_numpy(blur.copy()),
                "sharp": torch.from_numpy(sharp.copy())}


def _slice(n: int, i: int, parts: int) -> tuple[int, int]:
    return i * n // parts, (i + 1) * n // parts


def eval_loader(
    source: str | os.PathLike,
    *,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    max_images: int | None = None,
    on_error: str = "raise",
):
    """Full-frame `Pair(key, scene, blur, sharp)` (CHW float32 in [0,1]); every sample exactly once
    over all ranks and workers, in shard order. `max_images` keeps the first N of the global order.
    The consumer pads to a multiple of 4 (harness.infer.pad_to_multiple)."""
    if not 0 <= rank < world_size:
        raise HarnessError(f"rank {rank} / world_size {world_size}: expected 0 <= rank < world_size")
    urls, counts = resolve_source(source)
    if counts is None:
        raise HarnessError(f"{source}: evaluating remote shards needs their manifest.json (sample counts)")
    total = sum(counts) if max_images is None else min(sum(counts), max_images)
    dataset = EvalDataset(urls, counts, rank, world_size, total, on_error)
    return _EvalIterable(dataset, workers)


class _EvalIterable:
    def __init__(self, dataset: EvalDataset, workers: int):
        self.dataset, self.workers = dataset, workers

    def __len__(self) -> int:  # this rank's share
        lo, hi = _slice(self.dataset.total, self.dataset.rank, self.dataset.world_size)
        return hi - lo

    def __iter__(self):
        from harness.infer import Pair

        items = iter(self.dataset) if self.workers == 0 else iter(
            DataLoader(self.dataset, batch_size=None, num_workers=self.workers))
        for item in items:
            if _ERROR in item:
                raise HarnessError(item[_ERROR])
            yield Pair(key=item["key"], scene=item["scene"], blur=_chw(item["blur"]), sharp=_chw(item["sharp"]))


def _chw(hwc: torch.Tensor) -> torch.Tensor:
    return hwc.permute(2, 0, 1).float().div_(255.0)
