"""Streaming loaders over tar shards: `train_loader` (infinite, exactly resumable) and `eval_loader`.

The training order is a pure function of (seed, epoch, position in the epoch), never of the world
size or the number of workers, and it is the reference code's (a DataLoader with shuffle=True):

- Samples are numbered 0..N-1 in manifest order (shard by shard). Epoch `e` is a uniform random
  permutation of all N, drawn from (seed, e) only: every sample exactly once per epoch.
- Crop sequence: epoch e contributes N * crops_per_image crops. The permutation is cut into
  windows of B samples (B = the global batch; the last window holds N mod B); a window yields
  crop k = 0 of each of its samples in order, then k = 1, ... (so a batch never holds two crops
  of one image). Epochs follow each other without a gap: a batch that runs past the end of
  epoch e continues with the start of epoch e + 1 (the epoch boundary wraps, as with
  `drop_last=False` over an endless sampler; no crop is dropped or repeated).
- Crop position and flips of crop k of sample i in epoch e: drawn from (seed, e, i, k) only.
- Global batch g = crops [g*B, (g+1)*B). It is split into B/m micro-batches of m crops; rank r of
  W takes micro-batch t*W + r at accumulation step t, i.e. the rank's j-th micro-batch is the
  global micro-batch j*W + r. So world 1 x accumulation 2 x micro 2 and world 2 x micro 2 feed
  the same crops to the same optimizer step.
- Workers split the rank's micro-batches round robin (torch's DataLoader asks worker 0 first):
  worker w of n makes micro-batches start + w, start + w + n, ... Each reads a sample with one
  `os.pread` through the shard index (`shards.shard_index`, built from the tar headers once,
  in the loader's process) and keeps at most B/W decoded samples (only when crops_per_image > 1:
  the other crops of a window reuse them). No shard is ever buffered whole.
- Remote shard URLs (pipe:, http(s)://, ...) are copied once into the shard cache
  (`shards.cache_shards`, size-limited) and then read like local ones: the same order.

State (`TrainStream.state_dict()`), the same on every rank and at any world size:
  {"version": 2, "seed", "epoch", "position" (crops consumed by all ranks), "global_batch",
   "crops_per_image", "samples" (N), "manifest" (sha256 of the shards' key lists)}
`load_state_dict` resumes exactly, at any world size, micro-batch or worker count: the next
global batches are those the uninterrupted run would have seen. A different manifest, global
batch or crops_per_image is refused with one line naming the field, as is a version-1 state (the
older shard-buffer stream, whose order depended on the world size); with MIMO_LOADER_RESUME=
continue (or `mode="continue"`) the stream instead continues this order at the saved crop count
(rounded up to a whole global batch), which is not what the old run would have seen.
A sample that fails to decode under on_error="skip" is replaced by the next decodable sample in
manifest order (same epoch and k), so the substitution is a pure function of the position too.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from harness.data import crops as C
from harness.data.shards import (
    IndexedSample,
    cache_shards,
    decode_pair,
    iter_shard,
    local_path,
    read_meta,
    read_sample,
    shard_index,
    source_urls,
)
from harness.errors import HarnessError

log = logging.getLogger(__name__)
STATE_VERSION = 2
RESUME_ENV = "MIMO_LOADER_RESUME"  # "exact" (default) or "continue"
RESUME_MODES = ("exact", "continue")
_PERM_SALT, _CROP_SALT = 0x5EED, 0xC409  # separate the permutation draws from the crop draws
_ERROR = "__error__"


# ---------------------------------------------------------------- sources


def _listing(source: str | os.PathLike) -> tuple[list[str], list[int] | None]:
    """Shard URLs of a source (`shards.source_urls`) with the manifest's sample counts (or None);
    a missing local shard is one HarnessError."""
    urls, counts = source_urls(source)
    if counts is not None:
        for url in urls:
            if not Path(url).is_file():
                raise HarnessError(f"{url}: shard listed in the manifest is missing")
        return urls, counts
    paths = [local_path(u) for u in urls]
    missing = [u for u, p in zip(urls, paths) if p is not None and not p.is_file()]
    if missing:
        raise HarnessError(f"{missing[0]}: no such shard ({len(missing)} of {len(urls)} missing in {source})")
    return urls, None


def resolve_source(source: str | os.PathLike) -> tuple[list[str], list[int] | None]:
    """Shard URLs and per-shard sample counts (None when unknown) of a shard dir, manifest or URL pattern."""
    urls, counts = _listing(source)
    paths = [local_path(u) for u in urls]
    if counts is None and None not in paths:
        counts = [len(shard_index(Path(p), u)) for p, u in zip(paths, urls)]
    return urls, counts


def index_source(source: str | os.PathLike) -> tuple[list[str], list[str], list[list[IndexedSample]]]:
    """Shard URLs, their local paths (remote shards cached first) and every shard's sample index."""
    urls, counts = _listing(source)
    if not urls:
        raise HarnessError(f"{source}: no shards")
    paths = cache_shards(urls)
    index = [shard_index(Path(p), u) for p, u in zip(paths, urls)]
    for url, entries, n in zip(urls, index, counts or [None] * len(urls)):
        if n is not None and len(entries) != n:
            raise HarnessError(f"shard {url}: {len(entries)} samples, the manifest says {n} "
                               f"(`mimo shards verify` the directory)")
    return urls, paths, index


def manifest_identity(index: list[list[IndexedSample]]) -> str:
    """sha256 of every shard's key list: what sample number i means (paths may move, keys may not)."""
    h = hashlib.sha256()
    for entries in index:
        h.update(("\n".join(e.key for e in entries) + "\n\0").encode())
    return h.hexdigest()


# ---------------------------------------------------------------- the order


class Order:
    """The global crop sequence (module docstring): crop c -> (epoch, sample number, crop k).

    A pure function of (seed, samples, crops_per_image, global batch); picklable.
    """

    def __init__(self, samples: int, *, seed: int, crops_per_image: int, global_batch: int):
        self.n, self.seed, self.cpi, self.window = samples, seed, crops_per_image, global_batch
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def reseed(self, seed: int) -> None:
        self.seed = seed
        self._perms.clear()

    @property
    def epoch_crops(self) -> int:
        return self.n * self.cpi

    def permutation(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s order of all samples, drawn from (seed, epoch) only."""
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch, _PERM_SALT]).permutation(self.n)
            self._perms[epoch] = perm
            while len(self._perms) > 2:  # a batch spans at most two epochs
                self._perms.popitem(last=False)
        return perm

    def crop(self, c: int) -> tuple[int, int, int]:
        epoch, p = divmod(c, self.epoch_crops)
        full = self.n // self.window  # windows of `window` samples, then one of n % window
        if p < full * self.window * self.cpi:
            w, r = divmod(p, self.window * self.cpi)
            k, s = divmod(r, self.window)
            slot = w * self.window + s
        else:
            k, s = divmod(p - full * self.window * self.cpi, self.n - full * self.window)
            slot = full * self.window + s
        return epoch, int(self.permutation(epoch)[slot]), k

    def crops(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        return [self.crop(c) for c in range(lo, hi)]


def crop_rng(seed: int, epoch: int, sample: int, k: int) -> np.random.Generator:
    """The generator of crop k of sample `sample` in epoch `epoch` (position and flips)."""
    return np.random.default_rng([seed, epoch, sample, k, _CROP_SALT])


# ---------------------------------------------------------------- training stream


def _lane() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class TrainDataset(IterableDataset):
    """One rank's micro-batches (picklable: plain attributes; open files live in `_Reader`)."""

    def __init__(self, urls: list[str], paths: list[str], index: list[list[IndexedSample]], order: Order, *,
                 crop, augs, micro: int, rank: int, world_size: int, on_error: str):
        self.urls, self.paths = list(urls), list(paths)  # as given (errors name them), as opened
        self.samples = [(s, e) for s, entries in enumerate(index) for e in entries]
        self.order, self.crop, self.augs, self.on_error = order, crop, augs, on_error
        self.micro, self.rank, self.world_size = micro, rank, world_size
        # The other crops of a window reuse a decoded sample; one crop per image never does.
        self.cache_size = order.window // world_size if order.cpi > 1 else 0
        self.start = 0  # this rank's first micro-batch
        self.reads = self.bytes_read = self.decode_errors = 0

    def __iter__(self):
        worker, workers = _lane()
        try:
            yield from self.worker_batches(worker, workers)
        except HarnessError as exc:  # cross the worker boundary as one line, not a traceback
            yield {_ERROR: str(exc)}

    def worker_batches(self, worker: int, workers: int) -> Iterator[dict[str, torch.Tensor]]:
        """What worker `worker` of `workers` yields: micro-batches start + worker, + workers, ..."""
        reader = _Reader(self)
        try:
            for j in itertools.count(self.start + worker, workers):
                yield self.micro_batch(j, reader)
        finally:
            reader.close()

    def micro_batch(self, j: int, reader: _Reader) -> dict[str, torch.Tensor]:
        q = j * self.world_size + self.rank  # the global micro-batch this rank's j-th one is
        ch, cw = self.crop
        blurs, sharps = [], []
        for epoch, sample, k in self.order.crops(q * self.micro, (q + 1) * self.micro):
            sample, blur, sharp = reader.pair(sample)
            spec = C.draw(crop_rng(self.order.seed, epoch, sample, k), *blur.shape[:2], ch, cw, self.augs)
            blurs.append(C.cut(blur, spec, ch, cw))
            sharps.append(C.cut(sharp, spec, ch, cw))
        return {"blur": C.to_tensor_batch(blurs), "sharp": C.to_tensor_batch(sharps)}


class _Reader:
    """A worker's open shard files and its few decoded samples (at most `cache_size`)."""

    def __init__(self, ds: TrainDataset):
        self.ds, self.fds = ds, {}
        self.cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def pair(self, sample: int) -> tuple[int, np.ndarray, np.ndarray]:
        """(sample number, blur, sharp); under on_error="skip" a broken sample is replaced by the
        next decodable one in manifest order."""
        n = len(self.ds.samples)
        for tried in range(n):
            got = self._decoded((sample + tried) % n)
            if got is not None:
                return (sample + tried) % n, *got
        raise HarnessError(f"no decodable sample in {len(self.ds.paths)} shard(s)")

    def _decoded(self, i: int) -> tuple[np.ndarray, np.ndarray] | None:
        if i in self.cache:
            self.cache.move_to_end(i)
            return self.cache[i]
        ds = self.ds
        shard, entry = ds.samples[i]
        url = ds.urls[shard]
        raw = read_sample(self._fd(shard), entry, url)
        ds.reads, ds.bytes_read = ds.reads + 1, ds.bytes_read + entry.end - entry.start
        try:
            blur, sharp = decode_pair(raw)
        except ValueError as exc:
            if ds.on_error != "skip":
                raise HarnessError(f"shard {url}: key {entry.key}: {exc}") from None
            ds.decode_errors += 1
            log.warning("skipping shard %s: key %s: %s (%d skipped in this worker)", url, entry.key, exc,
                        ds.decode_errors)
            return None
        (h, w), (ch, cw) = blur.shape[:2], ds.crop
        if h < ch or w < cw:
            raise HarnessError(f"shard {url}: key {entry.key}: image {h}x{w} is smaller than the crop {ch}x{cw}")
        if ds.cache_size:
            self.cache[i] = (blur, sharp)
            while len(self.cache) > ds.cache_size:
                self.cache.popitem(last=False)
        return blur, sharp

    def _fd(self, shard: int) -> int:
        fd = self.fds.get(shard)
        if fd is None:
            fd = self.fds[shard] = os.open(self.ds.paths[shard], os.O_RDONLY)
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        self.cache.clear()


class TrainStream:
    """Infinite iterable of this rank's {"blur", "sharp"} uint8 NCHW micro-batches (channels_last
    memory; see `crops.to_tensor_batch` and `crops.to_float`) with exact save/restore.

    Iterating continues from `batches` (this rank's micro-batches consumed so far); `position` is
    the crops consumed by all ranks, `epoch` the epoch the next crop belongs to. See the module
    docstring for the order and the state format.
    """

    def __init__(self, dataset: TrainDataset, workers: int, manifest: str):
        self.dataset, self.workers, self.manifest = dataset, workers, manifest
        self.batches = 0
        self._it: Iterator | None = None
        self._it_at = -1

    @property
    def position(self) -> int:
        return self.batches * self.dataset.micro * self.dataset.world_size

    @property
    def epoch(self) -> int:
        return self.position // self.dataset.order.epoch_crops

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

    def _start(self) -> None:
        self.close()
        self.dataset.start = self.batches
        if self.workers == 0:
            self._it = iter(self.dataset)
        else:
            loader = DataLoader(self.dataset, batch_size=None, num_workers=self.workers,
                                pin_memory=torch.cuda.is_available(), prefetch_factor=2)
            self._it = iter(loader)
        self._it_at = self.batches

    def close(self) -> None:
        """Stop the worker processes and close the shard files (they reopen on the next iteration)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        elif it is not None:
            it.close()  # the in-process generator: its `finally` closes the files

    def state_dict(self) -> dict[str, Any]:
        order = self.dataset.order
        return {"version": STATE_VERSION, "seed": order.seed, "epoch": self.epoch, "position": self.position,
                "global_batch": order.window, "crops_per_image": order.cpi, "samples": order.n,
                "manifest": self.manifest}

    def load_state_dict(self, state: dict[str, Any], mode: str | None = None) -> None:
        """Continue where `state` was saved (exact), or with mode/MIMO_LOADER_RESUME "continue"
        at its crop count in this stream's order (see the module docstring)."""
        mode = mode or os.environ.get(RESUME_ENV) or "exact"
        if mode not in RESUME_MODES:
            raise HarnessError(f"{RESUME_ENV}={mode!r}: expected one of {RESUME_MODES}")
        position = self._saved_position(state, mode == "continue")
        per_round = self.dataset.micro * self.dataset.world_size  # crops of one micro-batch per rank
        if mode == "continue":  # start at a whole global batch
            window = self.dataset.order.window
            position = -(-position // window) * window
        elif position % per_round:
            raise HarnessError(f"loader state: position {position} is not a multiple of {per_round} crops "
                               f"(micro batch x world size); set {RESUME_ENV}=continue to round it up")
        self.batches = position // per_round
        self.close()

    def _saved_position(self, state: dict[str, Any], relaxed: bool) -> int:
        hint = f"; set {RESUME_ENV}=continue to continue this order at the saved crop count instead"
        version = state.get("version")
        if version == 1 and "global_samples" in state:
            if not relaxed:
                raise HarnessError("loader state: version 1 (the shard-buffer stream of earlier versions, whose "
                                   "order depended on the world size) cannot be continued exactly" + hint)
            return int(state["global_samples"])
        if version != STATE_VERSION:
            raise HarnessError(f"loader state: version {version!r}, expected {STATE_VERSION}")
        for field in ("seed", "position", "global_batch", "crops_per_image", "manifest"):
            if field not in state:
                raise HarnessError(f"loader state: missing field '{field}'")
        order = self.dataset.order
        for field, now, recipe_field in (("manifest", self.manifest, "data.train"),
                                         ("global_batch", order.window, "train.global_batch"),
                                         ("crops_per_image", order.cpi, "data.crops_per_image")):
            if state[field] != now and not relaxed:
                shown = (str(state[field])[:12], str(now)[:12]) if field == "manifest" else (state[field], now)
                raise HarnessError(f"loader state: {field} {shown[0]} in the checkpoint, {shown[1]} now "
                                   f"({recipe_field} changed)" + hint)
        order.reseed(int(state["seed"]))
        return int(state["position"])


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
    global_batch: int | None = None,
    on_error: str = "raise",
) -> TrainStream:
    """Infinite, deterministic, exactly resumable training micro-batches for one rank.

    `source`: a shard directory (with manifest.json), a manifest path or a webdataset URL pattern
    (`shards/train-{000000..000009}.tar`, `pipe:...`; remote shards are cached first, see
    `shards.cache_shards`). `batch_size`: the micro batch of this rank; `global_batch`: the
    optimizer step's batch over all ranks and accumulation steps (default batch_size x
    world_size), a multiple of batch_size x world_size. `augment`: True = hflip (the paper), or
    names from hflip/vflip/rot90. `on_error`: "raise" or "skip" for samples that fail to decode.
    """
    if not 0 <= rank < world_size:
        raise HarnessError(f"rank {rank} / world_size {world_size}: expected 0 <= rank < world_size")
    if batch_size < 1 or crops_per_image < 1 or workers < 0:
        raise HarnessError("batch_size and crops_per_image must be >= 1, workers >= 0")
    global_batch = global_batch or batch_size * world_size
    if global_batch % (batch_size * world_size):
        raise HarnessError(f"global_batch {global_batch}: expected a multiple of batch_size {batch_size} x "
                           f"world_size {world_size}")
    if on_error not in ("raise", "skip"):
        raise HarnessError(f"on_error {on_error!r}: expected 'raise' or 'skip'")
    crop, augs = C.crop_size(crop), C.parse_augment(augment)
    urls, paths, index = index_source(source)
    n = sum(len(entries) for entries in index)
    if n == 0:
        raise HarnessError(f"{source}: no samples in {len(paths)} shard(s)")
    order = Order(n, seed=seed, crops_per_image=crops_per_image, global_batch=global_batch)
    dataset = TrainDataset(urls, paths, index, order, crop=crop, augs=augs, micro=batch_size, rank=rank,
                           world_size=world_size, on_error=on_error)
    return TrainStream(dataset, workers, manifest_identity(index))


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
            if start < hi and lo < start + count:  # local shards: only the slice's samples are read
                for raw in iter_shard(url, max(lo - start, 0), min(hi - start, count)):
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
    return C.to_float(hwc.permute(2, 0, 1))  # the batches' own uint8 -> float rule
