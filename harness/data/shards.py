"""Shard layout, manifest, sample decoding and verification.

A shard directory holds `<split>-NNNNNN.tar` files and `manifest.json`. Each sample in a
tar is three members sharing the key `<scene>_<frame>` (no dots, so webdataset groups them):
`KEY.blur.<ext>`, `KEY.sharp.<ext>`, `KEY.meta.json`, with ext `png` (the original file
bytes) or `npy` (a uint8 HxWx3 array, the fastest to decode). See shards/README.md.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness import __version__
from harness.errors import HarnessError
from harness.files import atomic_write

FORMAT = "mimo-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ENCODINGS = {"png": "png", "raw": "npy"}  # encoding -> member extension
IMAGE_EXTS = ("png", "npy", "jpg", "jpeg", "ppm", "webp", "tif", "tiff")
_KEY_OK = re.compile(r"[^A-Za-z0-9_\-]")


def tool_version() -> str:
    return f"mimo-harness {__version__}"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def make_key(*parts: str) -> str:
    """`<scene>_<frame>` with every character outside [A-Za-z0-9_-] (dots, slashes) made '-'."""
    return "_".join(_KEY_OK.sub("-", p) for p in parts if p)


# ---------------------------------------------------------------- encoding / decoding


def encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr, dtype=np.uint8), allow_pickle=False)
    return buf.getvalue()


def _npy_header(data: bytes) -> tuple[tuple[int, ...], np.dtype, int]:
    fp = io.BytesIO(data[:4096] if len(data) > 4096 else data)
    major, _ = np.lib.format.read_magic(fp)
    reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = reader(fp)
    if fortran:
        raise ValueError("Fortran-ordered array")
    return shape, dtype, fp.tell()


def image_size(data: bytes, ext: str) -> tuple[int, int]:
    """(height, width) from the header only, without decoding the pixels."""
    if ext == "npy":
        shape, _, _ = _npy_header(data)
        return int(shape[0]), int(shape[1])
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.height, img.width


def decode_image(data: bytes, ext: str) -> np.ndarray:
    """Decode a stored image to a uint8 HxWx3 array; ValueError says what is wrong."""
    if ext == "npy":
        shape, dtype, offset = _npy_header(data)
        if dtype != np.uint8 or len(shape) != 3 or shape[2] != 3:
            raise ValueError(f"expected a uint8 HxWx3 array, got {dtype} {shape}")
        # Zero-copy view: this is what makes the raw encoding ~0.6 ms per 1280x720 frame.
        return np.frombuffer(data, dtype=np.uint8, count=int(np.prod(shape)), offset=offset).reshape(shape)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.mode != "RGB":
                raise ValueError(f"expected an 8-bit RGB image, got mode {img.mode}")
            img.load()
            return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"not a readable image ({exc.__class__.__name__}: {exc})") from None


def image_ext(sample: dict[str, Any], role: str) -> str:
    """The member extension holding `role` ('blur'/'sharp') in a webdataset sample dict."""
    for ext in IMAGE_EXTS:
        if f"{role}.{ext}" in sample:
            return ext
    names = sorted(k for k in sample if not k.startswith("__"))
    # A member named without its role (`KEY.png`) or with a dot in its key groups wrongly.
    raise ValueError(f"no {role} image member (expected {role}.<{'|'.join(IMAGE_EXTS)}>, the sample has "
                     f"{', '.join(names) or 'no members'}: a bad member name?)")


def decode_pair(sample: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(blur, sharp) uint8 HWC arrays of one sample; ValueError if absent, unreadable or mismatched."""
    out = []
    for role in ("blur", "sharp"):
        ext = image_ext(sample, role)
        try:
            out.append(decode_image(sample[f"{role}.{ext}"], ext))
        except ValueError as exc:
            raise ValueError(f"{role}.{ext}: {exc}") from None
    if out[0].shape != out[1].shape:
        raise ValueError(f"blur {out[0].shape[:2]} and sharp {out[1].shape[:2]} sizes differ")
    return out[0], out[1]


def read_meta(sample: dict[str, Any]) -> dict[str, Any]:
    raw = sample.get("meta.json")
    return json.loads(raw) if raw else {}


# ---------------------------------------------------------------- reading tars


def is_url(source: str) -> bool:
    """Webdataset sources that are not local files (pipe:, http(s):, s3:, gs: ...)."""
    return "://" in source or source.startswith("pipe:")


def local_path(url: str) -> Path | None:
    """The file a local shard source names (`file:` prefix dropped); None for URLs."""
    return None if is_url(url) else Path(url.removeprefix("file:"))


def iter_shard(url: str, start: int = 0, stop: int | None = None) -> Iterator[dict[str, Any]]:
    """Samples `start`..`stop` of one shard (local path or webdataset URL such as `pipe:cat x.tar`),
    undecoded (a local shard reads only those; a remote one streams past the others).

    Samples are grouped by webdataset's own `group_by_keys`, so anything webdataset reads, we
    read, with the same keys. A local file is read through its index (`shard_index`), one
    `os.pread` per sample, members as memoryviews of that one buffer: webdataset's stream reader
    copies members in 10 KB pieces, which was three quarters of the cost of a raw 1280x720
    sample. A broken tar raises HarnessError naming the shard (and the key where it broke).
    """
    import webdataset as wds

    local = local_path(url)
    if local is not None and local.is_file():
        entries = shard_index(local, url)[start:stop]
        with open(local, "rb") as fh:
            for entry in entries:
                yield read_sample(fh.fileno(), entry, url)
        return
    try:
        yield from itertools.islice(wds.tarfile_samples([{"url": url}]), start, stop)
    except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
        raise HarnessError(f"shard {url}: unreadable tar ({_tar_message(exc)})") from None


def _tar_message(exc: BaseException) -> str:
    msg = str(exc.args[0]) if exc.args else exc.__class__.__name__
    return msg.split(" @ ")[0]


_WDS_SKIP = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: members it never yields


@dataclass(frozen=True)
class IndexedSample:
    """Where one sample's members lie in its tar: data offsets from the tar headers.

    `start`..`end` spans every member (headers between them included), so one read gets the sample.
    """

    key: str
    start: int
    end: int
    members: tuple[tuple[str, int, int], ...]  # (suffix, data offset, size)


def shard_index(path: Path, url: str | None = None) -> list[IndexedSample]:
    """Every sample of a local tar with its members' offsets, from the headers alone (no data read).

    Grouped by webdataset's `group_by_keys` (same keys and suffixes as webdataset). HarnessError
    naming the shard, and the last good key, for a corrupt or truncated tar.
    """
    from webdataset.tariterators import group_by_keys

    url = url or str(path)
    out: list[IndexedSample] = []

    def members(tf: tarfile.TarFile) -> Iterator[dict[str, Any]]:
        for info in tf:
            if info.isreg() and not _WDS_SKIP.match(info.name):
                yield {"fname": info.name, "data": (info.offset_data, info.size), "__url__": url}
            tf.members = []  # headers are not needed again: keep memory flat over big shards

    try:
        with tarfile.open(path, "r:") as tf:
            for sample in group_by_keys(members(tf)):
                parts = tuple((k, *v) for k, v in sample.items() if not k.startswith("__"))
                out.append(IndexedSample(sample["__key__"], min(p[1] for p in parts),
                                         max(p[1] + p[2] for p in parts), parts))
    except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
        where = f" after key {out[-1].key}" if out else ""
        raise HarnessError(f"shard {url}: unreadable tar{where} ({_tar_message(exc)})") from None
    return out


def read_sample(fd: int, entry: IndexedSample, url: str) -> dict[str, Any]:
    """One sample as webdataset gives it (`__key__`, `__url__`, suffix -> bytes-like), read with a
    single `os.pread`; members are zero-copy memoryviews of that read (meta.json as bytes)."""
    size = entry.end - entry.start
    data = os.pread(fd, size, entry.start)
    if len(data) != size:
        raise HarnessError(f"shard {url}: key {entry.key}: truncated ({len(data)} of {size} bytes "
                           f"at offset {entry.start})")
    view = memoryview(data)
    sample: dict[str, Any] = {"__key__": entry.key, "__url__": url}
    for suffix, off, n in entry.members:
        part = view[off - entry.start : off - entry.start + n]
        sample[suffix] = bytes(part) if suffix.endswith("json") else part
    return sample


CACHE_ENV, CACHE_LIMIT_ENV = "MIMO_SHARD_CACHE", "MIMO_SHARD_CACHE_LIMIT"
DEFAULT_CACHE_LIMIT = "256GB"


def shard_cache_dir() -> Path:
    """Where remote shards are cached: $MIMO_SHARD_CACHE, else ~/.cache/mimo-harness/shards."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mimo-harness" / "shards")


def cache_shards(urls: list[str]) -> list[str]:
    """Local paths for shard sources: local ones as they are, remote ones (pipe:, http(s)://, s3://
    ...) copied once into the shard cache (named by a hash of the URL) and read like local ones.

    The cache holds at most $MIMO_SHARD_CACHE_LIMIT bytes (default 256GB): a download that would
    go over it is removed and refused with one line, so a too-small disk fails at start, not later.
    """
    from harness.data.pack import parse_size

    if all(local_path(u) is not None for u in urls):
        return [str(local_path(u)) for u in urls]
    cache = shard_cache_dir()
    raw_limit = os.environ.get(CACHE_LIMIT_ENV) or DEFAULT_CACHE_LIMIT
    try:
        limit = parse_size(raw_limit)
    except HarnessError:
        raise HarnessError(f"{CACHE_LIMIT_ENV}={raw_limit!r}: expected a size such as 256GB") from None
    return [str(local_path(u) or _cached(u, cache, limit)) for u in urls]


def _cached(url: str, cache: Path, limit: int) -> Path:
    import webdataset as wds

    name = Path(url.split("?")[0].rstrip("/").split()[-1]).name or "shard.tar"
    path = cache / f"{hashlib.sha1(url.encode()).hexdigest()[:16]}-{name}"
    if path.is_file():
        return path
    try:
        with atomic_write(path) as tmp, open(tmp, "wb") as out:
            stream = wds.gopen(url, "rb")
            try:
                while block := stream.read(1 << 22):
                    out.write(block)
            finally:
                stream.close()
            used = sum(p.stat().st_size for p in cache.iterdir() if p.is_file())
            if used > limit:
                raise HarnessError(f"shard cache {cache}: {url} would make it {used} bytes, over "
                                   f"{CACHE_LIMIT_ENV}={limit}; raise the limit or copy the shards to a local dir")
    except (OSError, ValueError) as exc:  # pipe: commands that fail raise from close()
        msg = _tar_message(exc)
        status = re.search(r"\): exit (\d+)", msg)
        if status:
            msg = f"the command exited with status {status.group(1)}"
        elif "no gopen handler" in msg:
            msg = "no reader for this scheme; wrap it in a command, e.g. pipe:aws s3 cp s3://... -"
        raise HarnessError(f"shard {url}: download to the shard cache failed ({msg})") from None
    return path


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- manifest


def load_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and sanity-check `<directory>/manifest.json` (HarnessError naming the file)."""
    path = Path(directory)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise HarnessError(f"{path}: no shard manifest (pack with `mimo pack ...` first)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HarnessError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise HarnessError(f"{path}: not a {FORMAT} manifest (field 'format')")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise HarnessError(
            f"{path}: format_version {manifest.get('format_version')!r}, this tool reads {FORMAT_VERSION}"
        )
    for field in ("shards", "encoding", "split", "total_samples"):
        if field not in manifest:
            raise HarnessError(f"{path}: missing field '{field}'")
    return manifest


def write_manifest(directory: Path, manifest: dict[str, Any], name: str = MANIFEST) -> Path:
    path = Path(directory) / name
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return path


def shard_urls(directory: str | os.PathLike, manifest: dict[str, Any]) -> list[str]:
    return [str(Path(directory) / s["name"]) for s in manifest["shards"]]


def expand_pattern(source: str) -> list[str]:
    """Shard URLs of a pattern: `::`-separated parts, each brace-expanded as webdataset does."""
    from braceexpand import braceexpand  # webdataset's own dependency

    return [u for part in str(source).split("::") for u in braceexpand(part)]


def source_urls(source: str | os.PathLike) -> tuple[list[str], list[int] | None]:
    """The one way a data source becomes shard URLs: a shard directory (or its manifest.json) ->
    its manifest's shards and sample counts; anything else -> the expanded pattern, counts None."""
    path = Path(source)
    if path.is_dir() or path.name == "manifest.json":
        directory = path if path.is_dir() else path.parent
        manifest = load_manifest(directory)
        return shard_urls(directory, manifest), [int(s["samples"]) for s in manifest["shards"]]
    return expand_pattern(str(source)), None


def info(directory: str | os.PathLike) -> dict[str, Any]:
    """Counts, sizes and encoding of a shard directory, from its manifest."""
    m = load_manifest(directory)
    return {
        "directory": str(directory),
        "dataset": m.get("dataset"),
        "split": m["split"],
        "encoding": m["encoding"],
        "shards": len(m["shards"]),
        "samples": m["total_samples"],
        "bytes": sum(s["bytes"] for s in m["shards"]),
        "image_sizes": m.get("image_sizes", []),
        "skipped": len(m.get("skipped", [])),
        "tool": m.get("tool"),
    }


# ---------------------------------------------------------------- verify


def verify(directory: str | os.PathLike, *, progress: bool = False) -> list[str]:
    """Re-hash every shard against the manifest and decode every sample.

    Returns the problems found, one line each naming the shard (and key); empty means all good.
    """
    directory = Path(directory)
    manifest = load_manifest(directory)
    problems: list[str] = []
    bar = _progress(manifest["total_samples"], "verify", progress)
    for entry in manifest["shards"]:
        problems.extend(_verify_shard(directory / entry["name"], entry, bar))
    bar.close()
    return problems


def _verify_shard(path: Path, entry: dict[str, Any], bar) -> list[str]:
    name = entry["name"]
    if not path.is_file():
        return [f"{name}: missing"]
    problems = []
    size = path.stat().st_size
    if size != entry["bytes"]:
        problems.append(f"{name}: {size} bytes, manifest says {entry['bytes']}")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        problems.append(f"{name}: sha256 {digest[:12]}... does not match the manifest ({entry['sha256'][:12]}...)")
    keys = []
    try:
        for sample in iter_shard(str(path)):
            keys.append(sample["__key__"])
            bar.update(1)
            problems.extend(_verify_sample(name, sample))
    except HarnessError as exc:
        problems.append(str(exc))
    expected = entry.get("keys")
    if len(keys) != entry["samples"]:
        problems.append(f"{name}: {len(keys)} samples, manifest says {entry['samples']}")
    elif expected is not None and keys != expected:
        first = next(k for k, e in zip(keys, expected) if k != e)
        problems.append(f"{name}: key {first} is not the manifest's key at its position")
    return problems


def _verify_sample(name: str, sample: dict[str, Any]) -> list[str]:
    key = sample["__key__"]
    try:
        blur, _ = decode_pair(sample)
        meta = read_meta(sample)
    except (ValueError, json.JSONDecodeError) as exc:
        return [f"{name}: key {key}: {exc}"]
    if meta and (meta.get("height"), meta.get("width")) != blur.shape[:2]:
        return [f"{name}: key {key}: meta.json says {meta.get('height')}x{meta.get('width')}, "
                f"image is {blur.shape[0]}x{blur.shape[1]}"]
    return []


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="sample", disable=not enabled, leave=False)
