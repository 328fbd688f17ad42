"""Torn-checkpoint-safe DeepSpeed checkpoints, elastic resume and export (docs/design.md §6).

Layout under `<run_dir>/checkpoints/`:
  step00000020/            DeepSpeed files of every rank (+ ema.pkl), then COMPLETE last
  step00000020/COMPLETE    JSON: step, world size, the recipe, every file's size and CRC-32 --
                           written by rank 0 after a barrier (it reads every file back to checksum
                           it), so its presence means all ranks finished writing
  quarantine/<tag>/        complete tags set aside by a resume (failed verification, or newer
                           than the tag an explicit --resume went back to); never pruned
  step00000020_universal/  universal conversion, made when resuming on another world size
  latest, best             tag names, replaced atomically
DeepSpeed's own `latest` is never written (save_latest=False): it is written before the other
ranks finish and can point at a torn checkpoint.

Two levels of checking: `is_complete` (marker present, sizes match: cheap, used for listing) and
`verify` (every file's CRC-32 too: reads the whole tag, used before a resume loads it and by
`mimo checkpoints verify`). CRC-32 (zlib, ~3 GB/s on one core) detects bit rot and torn copies;
it is not a defence against deliberate tampering (torch.load's weights_only is).
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

from harness import distributed
from harness.errors import HarnessError
from harness.files import atomic_write

COMPLETE = "COMPLETE"
EMA_FILE = "ema.pkl"
QUARANTINE = "quarantine"
_TAG = re.compile(r"^step(\d{8})$")
DISK_MARGIN = 1.1  # free space a save needs, relative to the last checkpoint's size


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


# ----------------------------------------------------------------------------- saving


def save(engine, ckpt_dir: Path, step: int, *, shared: dict, per_rank: dict, keep: int | None,
         ema=None, best: bool = False, protect: str | None = None) -> Path:
    """Save on every rank (collective); returns the tag directory once it is complete.

    `keep=None` prunes nothing. `protect`: a tag pruning must keep (the one this run resumed
    from) -- the new tag, checksummed from disk, is complete before anything is pruned.
    HarnessError (one line, on every rank) when the disk lacks space or a complete tag of
    this step exists already (a checkpoint is never re-saved over).
    """
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    # Before the first checkpoint there is no size to go by: ~16 bytes a parameter (fp32 weights,
    # fp32 master copy and Adam's two moments), the size of a ZeRO-1/2 fp32 checkpoint.
    first = 16 * sum(p.numel() for p in engine.module.parameters())
    _agree(_before_save(ckpt_dir, tag, first) if engine.global_rank == 0 else None)
    # client_state is written by rank 0 only: gather every rank's RNG + loader state into it.
    ranks = distributed.all_gather_object({"rng": distributed.rng_state(), **per_rank})
    client = {**shared, "step": step, "world_size": len(ranks), "per_rank": ranks}
    failure = None
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client, save_latest=False)
        if engine.global_rank == 0 and ema is not None:
            ema.save(tag_dir / EMA_FILE)
    except (OSError, RuntimeError) as exc:  # disk full surfaces as "basic_ios::clear: iostream error"
        failure = _save_failure(ckpt_dir, tag, exc)
    _agree(failure, cleanup=tag_dir if engine.global_rank == 0 else None)
    files = _checksums(tag_dir, engine.global_rank, len(ranks))
    if engine.global_rank == 0:
        _write_marker(tag_dir, step, len(ranks), recipe=shared.get("recipe"), files=files)
        _write_pointer(ckpt_dir / "latest", tag)
        if best:
            _write_pointer(ckpt_dir / "best", tag)
        if keep is not None:
            prune(ckpt_dir, keep, protect=protect)
    distributed.barrier()
    return tag_dir


def _agree(error: str | None, cleanup: Path | None = None) -> None:
    """Collective: every rank raises the same HarnessError when any rank reports one."""
    errors = [e for e in distributed.all_gather_object(error) if e]  # also the barrier before the marker
    if errors:
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)  # a torn tag; the earlier ones stay intact
        raise HarnessError(errors[0])


def _before_save(ckpt_dir: Path, tag: str, first: int) -> str | None:
    """Rank 0, before a save: refuse to re-save over a complete tag, drop a torn one, check space."""
    tag_dir = ckpt_dir / tag
    if is_complete(tag_dir):
        return (f"{tag_dir}: a complete checkpoint of this step exists already; refusing to save over it "
                "(is another trainer writing this run dir?)")
    if tag_dir.exists():
        shutil.rmtree(tag_dir)  # torn (a killed save): its stale files must not join the new marker
    need = _last_size(ckpt_dir) or first
    free = _free(ckpt_dir)
    if free < need * DISK_MARGIN:
        return _disk_full_line(ckpt_dir, tag, free, need)
    return None


def _save_failure(ckpt_dir: Path, tag: str, exc: BaseException) -> str:
    free, need = _free(ckpt_dir), _last_size(ckpt_dir)
    if getattr(exc, "errno", None) == errno.ENOSPC or "iostream error" in str(exc) or free < need:
        return _disk_full_line(ckpt_dir, tag, free, need)
    return f"{ckpt_dir / tag}: saving the checkpoint failed ({str(exc).strip().splitlines()[0][:200]})"


def _disk_full_line(ckpt_dir: Path, tag: str, free: int, need: int) -> str:
    tags = complete_tags(ckpt_dir)
    last = f"the last complete checkpoint is {tags[-1]}" if tags else "no complete checkpoint yet"
    size = f"a checkpoint needs about {_mb(need)}" if need else "a checkpoint needs more"
    return (f"{ckpt_dir}: not enough disk space to save {tag}: {_mb(free)} free, {size}; {last} "
            "(free space, then resume with --resume auto)")


def _free(ckpt_dir: Path) -> int:
    return shutil.disk_usage(ckpt_dir if ckpt_dir.exists() else ckpt_dir.parent).free


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def _last_size(ckpt_dir: Path) -> int:
    """Bytes of the newest complete checkpoint (0 before the first one)."""
    tags = complete_tags(ckpt_dir)
    return sum(_entry_size(e) for e in marker(ckpt_dir / tags[-1])["files"].values()) if tags else 0


def _checksums(tag_dir: Path, rank: int = 0, world_size: int = 1) -> dict[str, dict]:
    """{file: {size, crc32}} of a tag, read back from disk. Collective when world_size > 1: each
    rank checksums every world_size-th file (the files are read in parallel), rank 0 gets them all."""
    # COMPLETE itself is never listed: a stale marker from a torn save would be torn forever.
    paths = [p for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != COMPLETE]
    mine = {str(p.relative_to(tag_dir)): {"size": p.stat().st_size, "crc32": file_crc32(p)}
            for p in paths[rank::world_size]}
    parts = distributed.all_gather_object(mine) if world_size > 1 else [mine]
    return dict(sorted(item for part in parts for item in part.items()))


def _write_marker(tag_dir: Path, step: int, world_size: int, recipe: dict | None = None,
                  files: dict[str, dict] | None = None) -> None:
    files = _checksums(tag_dir) if files is None else files
    body = {"step": step, "world_size": world_size, "checksum": "crc32", "files": files}
    if recipe is not None:
        body["recipe"] = recipe  # the recipe that trained these weights (export, resume checks)
    with atomic_write(tag_dir / COMPLETE) as tmp:
        tmp.write_text(json.dumps(body, indent=1))


def file_crc32(path: Path) -> str:
    """CRC-32 of a file, hex; over an mmap (no copies: about twice as fast as read() in chunks)."""
    crc = 0
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size:  # an empty file cannot be mapped
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as view:
                crc = zlib.crc32(view)
    return f"{crc:08x}"


def _entry_size(entry) -> int:
    return entry["size"] if isinstance(entry, dict) else entry  # markers before checksums: sizes only


def _write_pointer(path: Path, tag: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(tag + "\n")


def prune(ckpt_dir: Path, keep: int, protect: str | None = None) -> None:
    """Keep the newest `keep` complete checkpoints, `best` and `protect`; drop older and torn ones."""
    complete = complete_tags(ckpt_dir)
    protected = set(complete[-keep:]) | {read_pointer(ckpt_dir / "best"), protect}
    newest = complete[-1] if complete else None
    for path in ckpt_dir.iterdir():
        base = path.name.removesuffix("_universal")
        if not path.is_dir() or not _TAG.match(base) or base in protected:
            continue
        # Torn tags newer than the newest complete one may still be in the making: leave them.
        if newest is None or base < newest:
            shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- finding


def read_pointer(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def is_complete(tag_dir: Path) -> bool:
    """True when COMPLETE exists and every file it lists has the recorded size."""
    try:
        marker = json.loads((tag_dir / COMPLETE).read_text())
        return all((tag_dir / name).stat().st_size == _entry_size(e) for name, e in marker["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def verify(tag_dir: Path) -> str | None:
    """None when the tag is complete and every file matches its recorded CRC-32, else the reason."""
    if not is_complete(tag_dir):
        return "torn (no COMPLETE marker, or a file is missing or has the wrong size)"
    for name, entry in marker(tag_dir)["files"].items():
        if isinstance(entry, dict) and "crc32" in entry:
            try:
                if file_crc32(tag_dir / name) != entry["crc32"]:
                    return f"{name}: checksum mismatch (the file changed after it was saved)"
            except OSError as exc:
                return f"{name}: unreadable ({exc.strerror or exc})"
    return None


def verify_run(run_dir: str | os.PathLike) -> list[tuple[str, str | None]]:
    """(tag, problem or None) for every checkpoint tag of a run (torn ones included), oldest first."""
    ckpt_dir = _run_checkpoints(run_dir)
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and _TAG.match(p.name))
    if not tags:
        raise HarnessError(f"{ckpt_dir}: no checkpoints")
    return [(tag, verify(ckpt_dir / tag)) for tag in tags]


def newest_verified(ckpt_dir: Path) -> tuple[str | None, dict[str, str]]:
    """(newest complete tag that verifies, {newer complete tag: why it fails verification})."""
    failed = {}
    for tag in reversed(complete_tags(ckpt_dir)):
        problem = verify(ckpt_dir / tag)
        if problem is None:
            return tag, failed
        failed[tag] = problem
    return None, failed


def set_aside_newer(ckpt_dir: Path, tag: str) -> list[str]:
    """Before resuming from `tag`: torn tags of later steps are deleted and complete ones moved to
    quarantine/, so that no later save lands on them -> lines saying so."""
    lines = []
    for path in sorted(ckpt_dir.iterdir()):
        base = path.name.removesuffix("_universal")
        if not path.is_dir() or not _TAG.match(base) or base <= tag:
            continue
        if path.name == base and is_complete(path):
            dest = ckpt_dir / QUARANTINE / base
            n = 1
            while dest.exists():
                dest, n = ckpt_dir / QUARANTINE / f"{base}.{n}", n + 1
            dest.parent.mkdir(exist_ok=True)
            os.replace(path, dest)
            lines.append(f"{path.name} (newer than the resumed checkpoint) moved to {dest}")
        else:
            shutil.rmtree(path, ignore_errors=True)
    for name in ("latest", "best"):
        pointed = read_pointer(ckpt_dir / name)
        if pointed and not (ckpt_dir / pointed).is_dir():
            (ckpt_dir / name).unlink(missing_ok=True)
    return lines


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Complete checkpoint tags, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and _TAG.match(p.name))
    return [t for t in tags if is_complete(ckpt_dir / t)]


def marker(tag_dir: Path) -> dict:
    return json.loads((tag_dir / COMPLETE).read_text())


def resolve_tag(ckpt_dir: Path, tag: str = "latest") -> str:
    """`latest` (newest complete), `best`, or an explicit tag -> a complete tag, or HarnessError."""
    if tag == "latest":
        tags = complete_tags(ckpt_dir)
        if not tags:
            raise HarnessError(f"{ckpt_dir}: no complete checkpoint")
        return tags[-1]
    name = read_pointer(ckpt_dir / "best") if tag == "best" else tag
    if not name or not is_complete(ckpt_dir / name):
        raise HarnessError(f"{ckpt_dir}: no complete checkpoint for tag {tag!r}")
    return name


# ----------------------------------------------------------------------------- resuming


def prepare_load(ckpt_dir: Path, tag: str, world_size: int) -> tuple[str, bool]:
    """(tag to load, universal?) -- converts to a universal checkpoint when the world size changed.

    Collective: call on every rank before deepspeed.initialize (the engine needs
    `checkpoint.load_universal` in its config). Rank 0 converts, the others wait.
    """
    saved = marker(ckpt_dir / tag)["world_size"]
    if saved == world_size:
        return tag, False
    universal = f"{tag}_universal"
    if _rank() == 0 and not (ckpt_dir / universal / COMPLETE).is_file():
        _convert_universal(ckpt_dir / tag, ckpt_dir / universal)
    distributed.barrier()
    return universal, True


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _convert_universal(src: Path, dst: Path) -> None:
    shutil.rmtree(dst, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--inject_missing_state",
           "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--input_folder", str(src), "--output_folder", str(dst)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        raise HarnessError(f"{src}: universal checkpoint conversion failed: {tail[0]}")
    # The converter writes `latest_universal` beside the tags; we pass tags explicitly.
    (dst.parent / "latest_universal").unlink(missing_ok=True)
    if (src / EMA_FILE).is_file():
        shutil.copy2(src / EMA_FILE, dst / EMA_FILE)
    _write_marker(dst, marker(src)["step"], marker(src)["world_size"], recipe=marker(src).get("recipe"))


def load(engine, ckpt_dir: Path, tag: str, rank: int) -> tuple[dict, dict, bool]:
    """Load `tag` into the engine -> (client state, per-rank entry for `rank`, same world size?).

    After a world-size change rank r gets entry min(r, old world - 1): its RNG states must not be
    reused, but the loader state still carries the global sample count (the stream re-maps it).
    """
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None or not client or "per_rank" not in client:
        raise HarnessError(f"{ckpt_dir / tag}: not a checkpoint written by harness.train")
    entries = client["per_rank"]
    same_world = client["world_size"] == engine.world_size
    return client, entries[min(rank, len(entries) - 1)], same_world


# ----------------------------------------------------------------------------- export


def export(run_dir: str | os.PathLike, out: str | os.PathLike, *, ema: bool = False, tag: str = "latest") -> Path:
    """Consolidated fp32 (or EMA) weights of a run's checkpoint in the public {"model": ...} format."""
    from harness.models import create_model, save_weights
    from harness.recipe import recipe_from_dict

    ckpt_dir = _run_checkpoints(run_dir)
    name = resolve_tag(ckpt_dir, tag)
    tag_dir = ckpt_dir / name
    if ema:
        if not (tag_dir / EMA_FILE).is_file():
            raise HarnessError(f"{tag_dir}: no EMA weights (train.ema_decay was off)")
        out = Path(out)
        with atomic_write(out) as tmp:
            shutil.copyfile(tag_dir / EMA_FILE, tmp)
        return out
    recipe = recipe_from_dict(*tag_recipe(run_dir, name))
    model = create_model(recipe.model.name, **recipe.model.overrides)
    model.load_state_dict(fp32_state_dict(ckpt_dir, name))
    return save_weights(model.float(), out, step=marker(tag_dir)["step"])


def _run_checkpoints(run_dir) -> Path:
    ckpt_dir = checkpoint_dir(run_dir)
    if not ckpt_dir.is_dir():
        raise HarnessError(f"{run_dir}: not a run directory (no checkpoints/)")
    return ckpt_dir


def fp32_state_dict(ckpt_dir: Path, tag: str) -> dict:
    """Full fp32 weights: ZeRO's fp32 master partitions merged (bf16/fp16 module weights are rounded)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def tag_recipe(run_dir, tag: str) -> tuple[dict, str]:
    """(recipe dict, where it came from) that trained `tag`: its marker's copy, else recipe.yaml
    (markers written before the recipe was stored in them)."""
    tag_dir = checkpoint_dir(run_dir) / tag
    stored = marker(tag_dir).get("recipe")
    if stored is not None:
        return stored, str(tag_dir / COMPLETE)
    return _stored_recipe(run_dir), str(Path(run_dir) / "recipe.yaml")


def _stored_recipe(run_dir) -> dict:
    import yaml

    path = Path(run_dir) / "recipe.yaml"
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        raise HarnessError(f"{path}: missing or unreadable (the run's resolved recipe)") from None
