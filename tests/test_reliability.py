"""Faults as a user meets them, on real 2-rank DeepSpeed CPU launches of recipes/smoke.yaml:
a corrupted checkpoint, two trainers on one run dir (and a stale lock), `--resume never` into a
used run dir, a changed recipe on resume, a full disk at a checkpoint, a bad shard member name,
and a GoPro tree without `blur/`. Each asserts what the README's "Reliability" section promises:
nothing lost, one line naming what is wrong, the exit code.

One base run (8 steps, checkpoints at 4 and 8) is made once; the tests work on copies of it.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from harness import checkpoint
from harness.cli import main as mimo
from harness.errors import HarnessError
from harness.lock import LOCK_FILE
from tests.fixtures.launch import Launch

pytestmark = pytest.mark.slow

TIMEOUT = 420
BASE = ["--recipe", "recipes/smoke.yaml", "train.steps=8", "checkpoint.every=4", "checkpoint.keep=3",
        "eval.every=100", "train.ema_decay=null"]


def _data(shards) -> list[str]:
    return [f"data.train={shards['train']}", f"data.val={shards['test']}"]


def _events(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def _errors(launch: Launch) -> list[str]:
    return [line for line in launch.output().splitlines() if line.startswith("train: error:")]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, train_shards) -> dict:
    """Trainer A on a run dir with a stale lock; while A holds the lock (its ranks stopped with
    SIGSTOP so that it cannot finish first), trainer B is started on the same dir."""
    root = tmp_path_factory.mktemp("reliability")
    run_dir = root / "run"
    run_dir.mkdir()
    stale = {"host": socket.gethostname(), "pid": _dead_pid(), "started": "2026-01-01 00:00:00 UTC"}
    (run_dir / LOCK_FILE).write_text(json.dumps(stale) + "\n")
    args = [*BASE, "--run-dir", str(run_dir), *_data(train_shards)]
    a = Launch(args, nprocs=2, log=root / "a.log")
    b = None
    try:
        a.wait_for(lambda: (run_dir / "log.jsonl").exists(), timeout=TIMEOUT)  # A holds the lock
        a.signal(signal.SIGSTOP)
        b = Launch(args, nprocs=2, log=root / "b.log")
        t0 = time.monotonic()
        b_rc = b.run(TIMEOUT)
        b_seconds = time.monotonic() - t0
        a.signal(signal.SIGCONT)
        a_rc = a.run(TIMEOUT)
    finally:
        a.signal(signal.SIGCONT)
        a.kill()
        if b is not None:
            b.kill()
    return {"dir": run_dir, "a": a, "a_rc": a_rc, "b": b, "b_rc": b_rc, "b_seconds": b_seconds,
            "stale": stale, "args": args}


def _copy(base_run, dest: Path) -> Path:
    shutil.copytree(base_run["dir"], dest)
    return dest


def _args_for(base_run, run_dir: Path) -> list[str]:
    """The base run's trainer arguments, pointed at `run_dir` (a copy of it)."""
    return [str(run_dir) if a == str(base_run["dir"]) else a for a in base_run["args"]]


def test_second_trainer_exits_at_once_naming_the_holder_stale_lock_taken_over(base_run):
    a, b, run_dir = base_run["a"], base_run["b"], base_run["dir"]
    assert base_run["a_rc"] == 0, a.output()[-3000:]
    stale = base_run["stale"]
    assert f"took over the lock left by pid {stale['pid']} on host {stale['host']}" in a.output()
    assert base_run["b_rc"] == 2, b.output()[-3000:]
    [line] = _errors(b)  # one line, from rank 0 only; B's rank 1 exited too (the launcher ended)
    assert re.fullmatch(rf"train: error: run dir {re.escape(str(run_dir))} is in use by pid \d+ on host "
                        rf"{re.escape(socket.gethostname())} \(started [^)]+\) \(lock {re.escape(str(run_dir))}/"
                        rf"{LOCK_FILE}\); wait for it to finish, stop it, or use another --run-dir", line), line
    assert base_run["b_seconds"] < 120  # it did not wait for A
    # Nothing interleaved: each step logged once, both checkpoints complete and verified.
    assert [e["step"] for e in _events(run_dir, "train")] == list(range(1, 9))
    assert [checkpoint.verify(run_dir / "checkpoints" / t) for t in ("step00000004", "step00000008")] == [None, None]
    assert (run_dir / LOCK_FILE).read_text() == ""  # released on exit: no takeover line next time


def test_resume_never_and_changed_recipe_are_refused_before_anything_is_written(base_run, launch_train, tmp_path):
    run_dir = _copy(base_run, tmp_path / "run")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    args = _args_for(base_run, run_dir)

    never = launch_train([*args, "--resume", "never"], nprocs=2)
    assert never.run(TIMEOUT) == 2, never.output()[-3000:]
    assert _errors(never) == [
        f"train: error: --resume never: run dir {run_dir} already holds checkpoints (newest step00000008) that a "
        f"fresh run would save over; continue it with --resume auto, or start fresh with another --run-dir "
        f"(or delete {run_dir / 'checkpoints'})"]

    changed = launch_train([*args, "train.steps=12", "model.overrides.num_res=2", "data.crop=48"], nprocs=0)
    assert changed.run(TIMEOUT) == 2, changed.output()[-3000:]
    assert _errors(changed) == [
        "train: error: recipes/smoke.yaml: cannot resume step00000008 with a changed recipe: data.crop: 32 -> 48; "
        "model.overrides.num_res: 1 -> 2 (the checkpoint was trained with the old values; train the new ones in "
        "another --run-dir)"]
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before  # recipe.yaml, log.jsonl, checkpoints: untouched
    # The checkpoint keeps the recipe that trained it: export builds that architecture.
    (run_dir / "recipe.yaml").write_text("model: {name: mimo-unet, overrides: {num_res: 2}}\n")
    assert mimo(["export", str(run_dir), "--out", str(tmp_path / "w.pkl")]) == 0


def test_corrupted_checkpoint_is_named_skipped_and_the_good_one_kept(base_run, launch_train, tmp_path, capsys):
    run_dir = _copy(base_run, tmp_path / "run")
    ckpts = run_dir / "checkpoints"
    bad = ckpts / "step00000008" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(bad.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(x ^ 0xFF for x in data[mid:mid + 64])  # size unchanged
    bad.write_bytes(bytes(data))
    assert checkpoint.is_complete(bad.parent)  # sizes alone do not see it

    assert mimo(["checkpoints", "verify", str(run_dir)]) == 2
    out, err = capsys.readouterr()
    assert "step00000004  ok" in out and f"step00000008  BAD: {bad.name}: checksum mismatch" in out
    assert "1 of 2 checkpoint(s) fail verification: step00000008" in err

    args = _args_for(base_run, run_dir)
    resumed = launch_train([*args, "train.steps=12", "checkpoint.keep=1", "--resume", "auto"], nprocs=2)
    assert resumed.run(TIMEOUT) == 0, resumed.output()[-3000:]
    out = resumed.output()
    assert (f"train: checkpoint step00000008 fails verification ({bad.name}: checksum mismatch (the file "
            f"changed after it was saved)); resuming from step00000004") in out
    assert "train: resuming step00000004 with recipe changes: checkpoint.keep: 3 -> 1; train.steps: 8 -> 12" in out
    assert _events(run_dir, "resumed")[-1]["tag"] == "step00000004"
    assert (ckpts / "quarantine" / "step00000008" / bad.name).read_bytes() == bytes(data)  # kept for a look
    # keep=1: the resumed tag went only once newer complete ones existed; every tag verifies.
    assert checkpoint.complete_tags(ckpts) == ["step00000012"]
    assert checkpoint.verify(ckpts / "step00000012") is None
    steps = [e["step"] for e in _events(run_dir, "train")]
    assert steps[8:] == list(range(5, 13))  # trained again from step 4, not from the bad step 8


def test_nonfinite_right_after_resume_names_the_checkpoint_and_deletes_nothing(base_run, launch_train, tmp_path):
    import torch

    run_dir = _copy(base_run, tmp_path / "run")
    tag = run_dir / "checkpoints" / "step00000008"
    # A checkpoint that was bad when it was written (NaN fp32 master weights): its checksums hold.
    with torch.no_grad():
        for path in tag.glob("zero_pp_rank_*_optim_states.pt"):
            state = torch.load(path, weights_only=False, map_location="cpu")  # our own test file
            for t in state["optimizer_state_dict"]["single_partition_of_fp32_groups"]:
                t.fill_(float("nan"))
            torch.save(state, path)
    checkpoint._write_marker(tag, 8, 2, recipe=checkpoint.marker(tag)["recipe"])
    args = _args_for(base_run, run_dir)
    bad = launch_train([*args, "train.steps=16", "train.max_nonfinite=3", "checkpoint.every=2",
                        "checkpoint.keep=1"], nprocs=2)
    assert bad.run(TIMEOUT) == 2, bad.output()[-3000:]
    assert _errors(bad) == [
        f"train: error: recipes/smoke.yaml: non-finite loss or gradients for 3 steps in a row right after resuming "
        f"from {tag}: that checkpoint may be bad (check it with `mimo checkpoints verify {run_dir}`; resume an "
        f"earlier one with --resume {tag.parent}/stepN)"]
    # Nothing pruned by the saves during the streak, no tag saved from the bad state at the abort.
    assert checkpoint.complete_tags(tag.parent)[:2] == ["step00000004", "step00000008"]


@pytest.fixture
def small_disk(tmp_path):
    """A 12 MB tmpfs (root only), unmounted at the end."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.fail("the disk-full test mounts a tmpfs and needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_at_a_checkpoint_is_one_line_and_resume_works_after(base_run, launch_train, small_disk):
    run_dir = _copy(base_run, small_disk / "run")
    ckpts = run_dir / "checkpoints"
    need = sum(e["size"] for e in checkpoint.marker(ckpts / "step00000008")["files"].values())
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * max(0, shutil.disk_usage(small_disk).free - need // 2))
    args = _args_for(base_run, run_dir)

    full = launch_train([*args, "train.steps=12"], nprocs=2)
    assert full.run(TIMEOUT) == 2, full.output()[-3000:]
    [line] = _errors(full)
    assert line.startswith(f"train: error: {ckpts}: not enough disk space to save step00000012: ")
    assert (f"a checkpoint needs about {need / 2**20:.1f} MB; the last complete checkpoint is step00000008 "
            "(free space, then resume with --resume auto)") in line
    assert "Traceback" not in full.output()
    assert checkpoint.complete_tags(ckpts) == ["step00000004", "step00000008"]
    assert not (ckpts / "step00000012").exists()

    filler.unlink()
    again = launch_train([*args, "train.steps=12", "--resume", "auto"], nprocs=2)
    assert again.run(TIMEOUT) == 0, again.output()[-3000:]
    assert checkpoint.complete_tags(ckpts)[-1] == "step00000012"
    assert json.loads((run_dir / "summary.json").read_text())["final_step"] == 12


def _rename_member(shard: Path, old_suffix: str, new_suffix: str) -> str:
    """Rewrite `shard` with its first sample's `old_suffix` member renamed; returns that key."""
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    key = members[0][0].name.split(".", 1)[0]
    with tarfile.open(shard, "w") as out:
        for m, data in members:
            if m.name == f"{key}.{old_suffix}":
                m.name = f"{key}.{new_suffix}"
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    return key


def test_bad_member_name_is_one_line_naming_shard_and_key_and_skip_is_honoured(train_shards, tmp_path):
    from harness.data.stream import train_loader

    shards = tmp_path / "shards"
    shutil.copytree(train_shards["train"], shards)
    shard = sorted(shards.glob("*.tar"))[0]
    key = _rename_member(shard, "blur.npy", "blurred.npy")

    def batches(on_error: str) -> int:
        loader = train_loader(str(shards), crop=32, crops_per_image=1, batch_size=2, seed=0, rank=0,
                              world_size=1, workers=0, augment=False, on_error=on_error)
        it = iter(loader)
        try:
            return sum(len(next(it)["blur"]) for _ in range(16))  # more than an epoch: every sample
        finally:
            loader.close()

    with pytest.raises(HarnessError) as err:
        batches("raise")
    msg = str(err.value)
    assert "\n" not in msg and f"shard {shard}" in msg and f"key {key}" in msg
    assert "no blur image member" in msg and "blurred.npy" in msg
    assert batches("skip") == 32


def test_pack_gopro_without_blur_names_the_blur_dir_option(tmp_path, capsys):
    from harness.data.synth import synthesize

    root = tmp_path / "gopro"
    synthesize(root, scenes=1, frames=1, size=(16, 16), seed=0, split="train")
    for blur in root.glob("train/*/blur"):
        blur.rename(blur.with_name("blur_gamma"))
    assert mimo(["pack", "gopro", "--root", str(root), "--split", "train", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("'blur' directory not found; the scene has blur_gamma/: pass --blur-dir blur_gamma")
    assert not (tmp_path / "out" / "manifest.json").exists()
