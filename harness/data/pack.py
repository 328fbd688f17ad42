"""Pack blur/sharp pairs into WebDataset tar shards with a manifest; atomic and resumable.

The shard plan (which sample goes into which `<split>-NNNNNN.tar`) is a pure function of the
sorted source listing and the options, so
- a re-run recomputes the same plan and keeps every shard already on disk whose members match
  the plan (shards appear only by atomic rename, so an existing one is complete);
- tar bytes are reproducible (fixed mtime/owner), so a killed-and-resumed pack equals a clean one;
- `--part i/N` packs a contiguous slice of the plan; `merge_manifests` joins the part manifests.
"""

from __future__ import annotations

import json
import multiprocessing
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.data import sources
from harness.data.shards import (
    ENCODINGS,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    encode_npy,
    sha256_file,
    shard_name,
    tool_version,
    write_manifest,
)
from harness.data.sources import PairInfo, PairSource
from harness.errors import HarnessError
from harness.files import atomic_write, decode_rgb8, png_bytes

DEFAULT_SHARD_BYTES = 1 << 30
_TAR_OVERHEAD = 3 * 1024 + 512  # three member headers + padding + meta.json, roughly
_MAX_LISTED = 5


@dataclass(frozen=True)
class PackOptions:
    # raw by default: a crop from a raw sample costs ~3 ms of one loader worker, from a PNG pair
    # ~50 ms (two 1280x720 decodes), which no GPU's handful of workers can feed at 1 crop per
    # image (benchmarks/README.md, loader); png keeps archives ~2x smaller.
    encoding: str = "raw"
    shard_bytes: int = DEFAULT_SHARD_BYTES
    samples_per_shard: int | None = None
    workers: int = 1
    limit: int | None = None
    # Non-RGB8 images (RGBA, grey, palette, 16-bit) are converted, and listed in the manifest's
    # `converted`; False is the strict mode (refuse them), which `mimo pack` no longer uses.
    convert: bool = True
    on_error: str = "raise"  # or "skip": leave bad pairs out and record them in the manifest
    part: tuple[int, int] = (0, 1)  # (index, count): this job packs slice `index` of `count`
    progress: bool = False


def parse_size(text: str) -> int:
    """'1GB', '500MB', '64k', '1000' -> bytes (HarnessError on anything else)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*", str(text).lower())
    if not m:
        raise HarnessError(f"--shard-size {text!r}: expected a size such as 1GB, 500MB or 1000000")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[(m.group(2) or "").rstrip("ib")[:1]]
    return max(1, int(float(m.group(1)) * scale))


def parse_part(text: str) -> tuple[int, int]:
    """'i/N' with 0 <= i < N."""
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise HarnessError(f"--part {text!r}: expected i/N with 0 <= i < N, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))


# ---------------------------------------------------------------- entry point


def pack(
    pairs: list[PairSource],
    unmatched: list[dict],
    out: str | Path,
    *,
    source: dict[str, Any],
    split: str,
    options: PackOptions = PackOptions(),
    on_shard: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Check the pairs, then write this part's shards and its manifest; returns the manifest.

    `source` describes the input ({"dataset": "gopro", "root": ..., ...}) for the manifest.
    `on_shard(entry)` is called after each shard is on disk (progress hooks, tests).
    """
    if options.encoding not in ENCODINGS:
        raise HarnessError(f"--encoding {options.encoding!r}: expected one of {sorted(ENCODINGS)}")
    out = Path(out)
    pairs = sorted(pairs, key=lambda p: p.key)[: options.limit] if options.limit else sorted(pairs, key=lambda p: p.key)
    if not pairs:
        raise HarnessError(f"{source.get('root')}: no blur/sharp pairs found for split '{split}'")
    sources.check_unique_keys(pairs)
    skipped = _check_unmatched(unmatched, options)
    checked, bad = _inspect(pairs, options, deep=False)
    skipped += bad
    plan = plan_shards(checked, options)
    first, stop = _part_range(len(plan), options.part)
    # Only this part's files get the deep (whole-file) check: a Slurm array splits that cost too.
    mine = [item for shard in plan[first:stop] for item in shard]
    _, bad = _inspect([p for p, _ in mine], options, deep=True)
    skipped += bad
    bad_files = {s["file"] for s in bad}
    plan = [[(p, i) for p, i in shard if str(p.blur) not in bad_files and str(p.sharp) not in bad_files]
            for shard in plan]
    entries = _write_part(out, split, plan, first, stop, options, on_shard)
    manifest = _manifest(source, split, options, checked, plan, entries, skipped)
    index, count = options.part
    if count == 1:
        _remove_stale(out, split, len(plan))
    write_manifest(out, manifest, MANIFEST if count == 1 else part_manifest_name(index, count))
    return manifest


def part_manifest_name(index: int, count: int) -> str:
    return f"manifest.part-{index:04d}-of-{count:04d}.json"


# ---------------------------------------------------------------- checks


def _check_unmatched(unmatched: list[dict], options: PackOptions) -> list[dict]:
    if unmatched and options.on_error != "skip":
        names = ", ".join(u["file"] for u in unmatched[:_MAX_LISTED])
        more = f" and {len(unmatched) - _MAX_LISTED} more" if len(unmatched) > _MAX_LISTED else ""
        raise HarnessError(f"{len(unmatched)} frame(s) without a blur/sharp twin: {names}{more} "
                           "(or pass --on-error skip)")
    return list(unmatched)


def _inspect_one(args: tuple[PairSource, bool, bool]) -> PairInfo | str:
    pair, convert, deep = args
    try:
        return sources.inspect_pair(pair, convert, deep)
    except ValueError as exc:
        return str(exc)


def _inspect(pairs: list[PairSource], options: PackOptions, deep: bool):
    """([(pair, info)], [skipped records]); HarnessError on the first bad pair unless on_error=skip."""
    jobs = [(p, options.convert, deep) for p in pairs]
    results = _map(_inspect_one, jobs, options, "check" if deep else "scan", len(jobs))
    good, bad = [], []
    for pair, res in zip(pairs, results):
        if isinstance(res, str):
            bad.append({"key": pair.key, "file": str(pair.blur), "sharp": str(pair.sharp), "reason": res})
        else:
            good.append((pair, res))
    if bad and options.on_error != "skip":
        more = f" ({len(bad) - 1} more bad pair(s); --on-error skip leaves them out)" if len(bad) > 1 else ""
        raise HarnessError(bad[0]["reason"] + more)
    return good, bad


# ---------------------------------------------------------------- plan


def _sample_bytes(info: PairInfo, encoding: str) -> int:
    if encoding == "raw":
        return 2 * (info.height * info.width * 3 + 128) + _TAR_OVERHEAD
    return info.blur_bytes + info.sharp_bytes + _TAR_OVERHEAD


def plan_shards(items: list[tuple[PairSource, PairInfo]], options: PackOptions) -> list[list]:
    """Greedy, deterministic cut of the sorted samples into shards of ~shard_bytes (or N samples)."""
    plan: list[list] = [[]]
    size = 0
    for pair, info in items:
        nbytes = _sample_bytes(info, options.encoding)
        full = (len(plan[-1]) >= options.samples_per_shard if options.samples_per_shard
                else size + nbytes > options.shard_bytes)
        if plan[-1] and full:
            plan.append([])
            size = 0
        plan[-1].append((pair, info))
        size += nbytes
    return plan


def _part_range(n_shards: int, part: tuple[int, int]) -> tuple[int, int]:
    index, count = part
    return index * n_shards // count, (index + 1) * n_shards // count


# ---------------------------------------------------------------- writing


def _member_names(items: list, encoding: str) -> list[str]:
    ext = ENCODINGS[encoding]
    return [f"{p.key}.{m}" for p, _ in items for m in (f"blur.{ext}", "meta.json", f"sharp.{ext}")]


def _write_part(out: Path, split: str, plan: list, first: int, stop: int, options: PackOptions, on_shard):
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(out / shard_name(split, j), plan[j], options.encoding) for j in range(first, stop)]
    entries = []
    bar = _bar(sum(len(plan[j]) for j in range(first, stop)), "pack", options.progress)
    for entry in _imap(_write_shard, jobs, options):
        entries.append(entry)
        bar.update(entry["samples"])
        if on_shard:
            on_shard(entry)
    bar.close()
    return sorted(entries, key=lambda e: e["name"])


def _write_shard(job: tuple[Path, list, str]) -> dict[str, Any]:
    path, items, encoding = job
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed run
        stale.unlink(missing_ok=True)
    if not (path.is_file() and _members_match(path, items, encoding)):
        import webdataset as wds

        with atomic_write(path) as tmp, open(tmp, "wb") as fh:
            # Fixed mtime/owner: the same input always gives byte-identical tars.
            writer = wds.TarWriter(fh, encoder=False, mtime=0, user="mimo", group="mimo", mode=0o444)
            for pair, info in items:
                writer.write(_sample(pair, info, encoding))
            writer.close()
    return {"name": path.name, "samples": len(items), "bytes": path.stat().st_size,
            "sha256": sha256_file(path), "keys": [p.key for p, _ in items]}


def _members_match(path: Path, items: list, encoding: str) -> bool:
    import tarfile

    try:
        with tarfile.open(path, "r:") as tf:
            return tf.getnames() == _member_names(items, encoding)
    except (tarfile.TarError, OSError, EOFError):
        return False


def _sample(pair: PairSource, info: PairInfo, encoding: str) -> dict[str, Any]:
    ext = ENCODINGS[encoding]
    meta = {"scene": pair.scene, "frame": pair.frame, "blur": pair.blur_rel, "sharp": pair.sharp_rel,
            "height": info.height, "width": info.width}
    converted = _converted_modes(info)
    if converted:  # only then: samples of RGB8 files keep their bytes (and shard hashes) as before
        meta["converted"] = converted
    return {"__key__": pair.key, f"blur.{ext}": _payload(pair.blur, info.blur_convert, encoding),
            f"sharp.{ext}": _payload(pair.sharp, info.sharp_convert, encoding),
            "meta.json": json.dumps(meta, sort_keys=True).encode()}


def _converted_modes(info: PairInfo) -> dict[str, str]:
    """{"blur": "RGBA", ...}: the original mode of each converted image of a pair."""
    return {side: mode for side, conv, mode in (("blur", info.blur_convert, info.blur_mode),
                                                 ("sharp", info.sharp_convert, info.sharp_mode)) if conv}


def _converted_files(plan: list) -> list[dict[str, str]]:
    """Every packed file that was converted to 8-bit RGB, root-relative, with its original mode."""
    out = []
    for shard in plan:
        for pair, info in shard:
            for side, mode in _converted_modes(info).items():
                out.append({"file": pair.blur_rel if side == "blur" else pair.sharp_rel, "mode": mode})
    return out


def _payload(path: Path, convert: bool, encoding: str) -> bytes:
    try:
        if encoding == "png" and not convert:
            return path.read_bytes()  # the original bytes: no re-encode, no quality change
        arr = decode_rgb8(path, convert=True)
    except OSError as exc:
        raise HarnessError(f"{path}: not a readable image ({exc.__class__.__name__})") from None
    return encode_npy(arr) if encoding == "raw" else png_bytes(arr)


def _remove_stale(out: Path, split: str, n_shards: int) -> None:
    """Shards beyond the plan (from an earlier, larger pack into the same directory) would be wrong."""
    for path in out.glob(f"{split}-*.tar"):
        m = re.fullmatch(rf"{re.escape(split)}-(\d{{6}})\.tar", path.name)
        if m and int(m.group(1)) >= n_shards:
            path.unlink()


# ---------------------------------------------------------------- manifest


def _manifest(source, split, options, checked, plan, entries, skipped) -> dict[str, Any]:
    index, count = options.part
    opts = asdict(options)
    for transient in ("workers", "progress", "part"):
        opts.pop(transient)
    first, stop = _part_range(len(plan), options.part)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "tool": tool_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **source, "split": split, "encoding": options.encoding, "options": opts,
        "image_sizes": sorted({(i.height, i.width) for _, i in checked}),
        "planned_shards": len(plan), "part": [index, count],
        "total_samples": sum(e["samples"] for e in entries),
        "shards": entries, "skipped": skipped, "converted": _converted_files(plan[first:stop]),
    }


def merge_manifests(out: str | Path) -> dict[str, Any]:
    """Join `manifest.part-*.json` (from `--part i/N` jobs) into `manifest.json`."""
    out = Path(out)
    parts = sorted(out.glob("manifest.part-*-of-*.json"))
    if not parts:
        raise HarnessError(f"{out}: no manifest.part-*-of-*.json to merge")
    loaded = [json.loads(p.read_text()) for p in parts]
    count = loaded[0]["part"][1]
    have = {m["part"][0] for m in loaded if m["part"][1] == count}
    missing = sorted(set(range(count)) - have)
    if missing:
        raise HarnessError(f"{out}: parts {missing} of {count} have no manifest yet (pack them first)")
    head = loaded[0]
    for p, m in zip(parts, loaded):
        for field in ("dataset", "root", "split", "encoding", "options", "planned_shards"):
            if m.get(field) != head.get(field):
                raise HarnessError(f"{p}: field '{field}' differs from {parts[0].name}; parts of different packs")
    shards = sorted((e for m in loaded if m["part"][1] == count for e in m["shards"]), key=lambda e: e["name"])
    if len(shards) != head["planned_shards"]:
        raise HarnessError(f"{out}: parts list {len(shards)} shards, the plan has {head['planned_shards']}")
    skipped = {json.dumps(s, sort_keys=True): s for m in loaded for s in m["skipped"]}
    merged = {**head, "part": [0, 1], "parts_merged": count, "shards": shards,
              "total_samples": sum(e["samples"] for e in shards), "skipped": list(skipped.values()),
              "converted": [c for m in loaded if m["part"][1] == count for c in m.get("converted", [])],
              "image_sizes": sorted({tuple(s) for m in loaded for s in m["image_sizes"]})}
    write_manifest(out, merged)
    return merged


# ---------------------------------------------------------------- parallel helpers


def _imap(fn, jobs: list, options: PackOptions, chunksize: int = 1):
    """Results of fn over jobs, in order; a process pool when --workers > 1."""
    if options.workers <= 1 or len(jobs) <= 1:
        yield from map(fn, jobs)
        return
    # fork: workers only touch PIL/numpy/tarfile, and fork needs no `__main__` guard in callers' scripts.
    with multiprocessing.get_context("fork").Pool(min(options.workers, len(jobs))) as pool:
        yield from pool.imap(fn, jobs, chunksize)


def _map(fn, jobs: list, options: PackOptions, desc: str, total: int) -> list:
    bar = _bar(total, desc, options.progress)
    out = []
    for res in _imap(fn, jobs, options, chunksize=8):
        out.append(res)
        bar.update(1)
    bar.close()
    return out


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="pair", disable=not enabled, leave=False)
