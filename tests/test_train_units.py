"""Fast checks of the trainer's small modules: launcher env mapping, RNG capture, checkpoint
bookkeeping (torn tags, pruning, tag resolution) -- no process group needed."""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import checkpoint, distributed
from harness.errors import HarnessError


def test_slurm_env_maps_to_torch_distributed_env():
    env = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "1234",
           "MASTER_ADDR": "10.0.0.7"}
    distributed.prepare_env(env)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("3", "1", "4", "10.0.0.7")
    assert env["MASTER_PORT"] == str(20000 + 1234)  # identical on every task of the job
    # A launcher's own variables win over Slurm's (srun around deepspeed/torchrun).
    env = {"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "5", "SLURM_NTASKS": "8"}
    distributed.prepare_env(env)
    assert (env["RANK"], env["WORLD_SIZE"]) == ("0", "2")


def test_plain_python_is_a_world_of_one_on_a_free_loopback_port():
    env: dict[str, str] = {}
    distributed.prepare_env(env)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("0", "0", "1", "127.0.0.1")
    assert env["MASTER_PORT"] != "29500" and int(env["MASTER_PORT"]) > 0


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    distributed.seed_everything(7, rank=1)
    state = distributed.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    distributed.seed_everything(99, rank=0)
    distributed.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def _fake_tag(ckpt: Path, step: int, complete: bool = True) -> Path:
    tag = ckpt / checkpoint.tag_for(step)
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * step)
    if complete:
        checkpoint._write_marker(tag, step, world_size=2)
    return tag


def test_torn_checkpoints_are_never_picked_and_pruning_keeps_best(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        _fake_tag(ckpt, step)
    torn_new = _fake_tag(ckpt, 10, complete=False)  # being written (or killed mid-write)
    (ckpt / "step00000008" / "mp_rank_00_model_states.pt").write_bytes(b"short")  # truncated after marker
    assert checkpoint.complete_tags(ckpt) == ["step00000002", "step00000004", "step00000006"]
    assert checkpoint.resolve_tag(ckpt) == "step00000006"

    checkpoint._write_pointer(ckpt / "best", "step00000002")
    checkpoint.prune(ckpt, keep=1)
    left = sorted(p.name for p in ckpt.iterdir() if p.is_dir())
    # best and the newest complete one survive; the truncated 8 and the torn 10 are newer than the
    # newest complete checkpoint and may still be in the making, so they stay too.
    assert left == ["step00000002", "step00000006", "step00000008", "step00000010"]
    assert checkpoint.resolve_tag(ckpt, "best") == "step00000002"
    assert torn_new.exists()
    marker = json.loads((ckpt / "step00000006" / "COMPLETE").read_text())
    assert marker["world_size"] == 2 and marker["checksum"] == "crc32"
    assert marker["files"] == {"mp_rank_00_model_states.pt": {"size": 6, "crc32": f"{zlib.crc32(b'x' * 6):08x}"}}
    with pytest.raises(HarnessError, match="no complete checkpoint for tag 'step00000010'"):
        checkpoint.resolve_tag(ckpt, "step00000010")
    with pytest.raises(HarnessError, match="no complete checkpoint"):
        checkpoint.resolve_tag(tmp_path / "empty")
