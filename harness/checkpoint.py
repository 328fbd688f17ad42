"""Torn-checkpoint-safe DeepSpeed checkpoints, elastic resume and export (design.md §6).

Layout under `<run_dir>/checkpoints/`:
  step00000020/            DeepSpeed files of every rank (+ ema.pkl), then COMPLETE last
  step00000020/COMPLETE    JSON: step, world size, every file's size -- written by rank 0 after
                           a barrier, so its presence means all ranks finished writing
  step00000020_universal/  universal conversion, made when resuming on another world size
  latest, best             tag names, replaced atomically
DeepSpeed's own `latest` is never written (save_latest=False): it is written before the other
ranks finish and can point at a torn checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from harness import distributed
from harness.errors import HarnessError
from harness.io import atomic_write

COMPLETE = "COMPLETE"
EMA_FILE = "ema.pkl"
_TAG = re.compile(r"^step(\d{8})$")


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


# ----------------------------------------------------------------------------- saving


def save(engine, ckpt_dir: Path, step: int, *, shared: dict, per_rank: dict, keep: int,
         ema_model=None, best: bool = False) -> Path:
    """Save on every rank (collective); returns the tag directory once it is complete."""
    tag = tag_for(step)
    # client_state is written by rank 0 only: gather every rank's RNG + loader state into it.
    ranks = distributed.all_gather_object({"rng": distributed.rng_state(), **per_rank})
    client = {**shared, "step": step, "world_size": len(ranks), "per_rank": ranks}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client, save_latest=False)
    tag_dir = ckpt_dir / tag
    if engine.global_rank == 0 and ema_model is not None:
        from harness.models import save_weights

        save_weights(ema_model, tag_dir / EMA_FILE)
    distributed.barrier()  # every rank's files are on disk before the marker
    if engine.global_rank == 0:
        _write_marker(tag_dir, step, len(ranks))
        _write_pointer(ckpt_dir / "latest", tag)
        if best:
            _write_pointer(ckpt_dir / "best", tag)
        prune(ckpt_dir, keep)
    distributed.barrier()
    return tag_dir


def _write_marker(tag_dir: Path, step: int, world_size: int) -> None:
    files = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*")) if p.is_file()}
    with atomic_write(tag_dir / COMPLETE) as tmp:
        tmp.write_text(json.dumps({"step": step, "world_size": world_size, "files": files}, indent=1))


def _write_pointer(path: Path, tag: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(tag + "\n")


def prune(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints (and `best`); drop older and torn ones."""
    complete = complete_tags(ckpt_dir)
    protected = set(complete[-keep:]) | {read_pointer(ckpt_dir / "best")}
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
        return all((tag_dir / name).stat().st_size == size for name, size in marker["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


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
    _write_marker(dst, marker(src)["step"], marker(src)["world_size"])


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


def load_ema(ema_model, tag_dir: Path) -> None:
    from harness.models import load_weights

    if (tag_dir / EMA_FILE).is_file():
        load_weights(ema_model, tag_dir / EMA_FILE)


# ----------------------------------------------------------------------------- export


def export(run_dir: str | os.PathLike, out: str | os.PathLike, *, ema: bool = False, tag: str = "latest") -> Path:
    """Consolidated fp32 (or EMA) weights of a run's checkpoint in the public {"model": ...} format."""
    from harness.models import create_model, save_weights
    from harness.recipe import recipe_from_dict

    ckpt_dir = checkpoint_dir(run_dir)
    if not ckpt_dir.is_dir():
        raise HarnessError(f"{run_dir}: not a run directory (no checkpoints/)")
    name = resolve_tag(ckpt_dir, tag)
    tag_dir = ckpt_dir / name
    if ema:
        if not (tag_dir / EMA_FILE).is_file():
            raise HarnessError(f"{tag_dir}: no EMA weights (train.ema_decay was off)")
        out = Path(out)
        with atomic_write(out) as tmp:
            shutil.copyfile(tag_dir / EMA_FILE, tmp)
        return out
    recipe = recipe_from_dict(_stored_recipe(run_dir), str(Path(run_dir) / "recipe.yaml"))
    model = create_model(recipe.model.name, **recipe.model.overrides)
    model.load_state_dict(fp32_state_dict(ckpt_dir, name))
    return save_weights(model.float(), out, step=marker(tag_dir)["step"])


def fp32_state_dict(ckpt_dir: Path, tag: str) -> dict:
    """Full fp32 weights: ZeRO's fp32 master partitions merged (bf16/fp16 module weights are rounded)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def _stored_recipe(run_dir) -> dict:
    import yaml

    path = Path(run_dir) / "recipe.yaml"
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        raise HarnessError(f"{path}: missing or unreadable (the run's resolved recipe)") from None
