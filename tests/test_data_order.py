"""The training order: a per-epoch permutation, the same at any world size, micro batch and worker
count; exact elastic resume; refusals; remote shards through the cache; truncated shards."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from harness.data.stream import Order, train_loader
from harness.errors import HarnessError
from tests.fixtures.shards import GOPRO_SCENE_FRAMES, flat_id

# 10 samples x 2 crops = 20 crops an epoch = 5 global batches of 4: 8 batches cross an epoch.
KW = dict(crop=16, crops_per_image=2, seed=7, augment="hflip,vflip,rot90", global_batch=4)


def _global_batches(source, n: int, *, world: int, micro: int, workers=(0,), start=None, **kw):
    """n global batches assembled from every rank's micro-batches (rank r's j-th is global micro
    j * world + r); `start` = a state to resume from. Returns ([(blur, sharp)], state after)."""
    kw = {**KW, **kw}
    accum = kw["global_batch"] // (world * micro)
    streams = []
    for rank in range(world):
        s = train_loader(source, batch_size=micro, rank=rank, world_size=world,
                         workers=workers[rank % len(workers)], **kw)
        if start is not None:
            s.load_state_dict(json.loads(json.dumps(start)))  # as it survives a checkpoint
        streams.append(s)
    its = [iter(s) for s in streams]
    out = []
    for _ in range(n):
        parts = [next(its[r]) for _ in range(accum) for r in range(world)]  # (t, r) order, r fastest
        out.append((torch.cat([p["blur"] for p in parts]), torch.cat([p["sharp"] for p in parts])))
    states = [s.state_dict() for s in streams]
    for s in streams:
        s.close()
    assert all(st == states[0] for st in states)  # every rank holds the same state
    return out, states[0]


def _equal(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


@pytest.mark.parametrize("epochs,cpi", [(1, 1), (3, 1), (3, 2)])
def test_every_sample_once_per_epoch(flat_shards, epochs, cpi):
    per_epoch = 12 * cpi // 4
    batches, state = _global_batches(flat_shards, epochs * per_epoch, world=2, micro=2, crops_per_image=cpi)
    assert state["epoch"] == epochs and state["position"] == epochs * 12 * cpi
    ids = [[flat_id(c) for c in blur] for blur, _ in batches]
    assert all(len(set(b)) == 4 for b in ids)  # never two crops of one image in a batch
    for e in range(epochs):
        seen = [i for b in ids[e * per_epoch:(e + 1) * per_epoch] for i in b]
        assert sorted(seen) == sorted(list(range(12)) * cpi)
    if epochs > 1:
        assert ids[:per_epoch] != ids[per_epoch:2 * per_epoch]  # a new permutation every epoch


def test_one_scene_batches_as_rare_as_a_permutation():
    """GoPro-sized layout in manifest (scene) order: the stream's order is the permutation's."""
    scene = np.repeat(np.arange(len(GOPRO_SCENE_FRAMES)), GOPRO_SCENE_FRAMES)
    order = Order(len(scene), seed=0, crops_per_image=1, global_batch=4)
    n = 3 * 2103 // 4
    ours = [scene[[order.crop(c)[1] for c in range(g * 4, g * 4 + 4)]] for g in range(n)]
    rng = np.random.default_rng(1)
    perm = np.concatenate([rng.permutation(len(scene)) for _ in range(3)])
    uniform = [scene[perm[g * 4:g * 4 + 4]] for g in range(n)]

    def stats(batches):
        return np.mean([len(set(b)) == 1 for b in batches]), np.mean([len(set(b)) for b in batches])

    (one, distinct), (one_u, distinct_u) = stats(ours), stats(uniform)
    assert one < 0.02 and abs(distinct - distinct_u) < 0.05 and abs(one - one_u) < 0.01, (one, distinct, one_u)


def test_world_size_micro_batch_and_workers_do_not_change_the_batches(packed_shards):
    ref, _ = _global_batches(packed_shards, 8, world=1, micro=4)
    assert not torch.equal(ref[0][0], ref[1][0])
    for world, micro, workers in ((1, 2, (0,)), (2, 2, (0,)), (2, 2, (2, 0)), (2, 1, (1,))):
        got, _ = _global_batches(packed_shards, 8, world=world, micro=micro, workers=workers)
        assert _equal(got, ref), (world, micro, workers)


def test_elastic_resume_is_exact_both_ways(packed_shards):
    ref, _ = _global_batches(packed_shards, 9, world=1, micro=4)
    _, state = _global_batches(packed_shards, 3, world=2, micro=2)
    after, state = _global_batches(packed_shards, 3, world=1, micro=4, start=state)  # 2 -> 1
    assert _equal(after, ref[3:6]) and state["position"] == 24 and state["epoch"] == 1
    after, _ = _global_batches(packed_shards, 3, world=2, micro=2, workers=(2, 0), start=state)  # 1 -> 2
    assert _equal(after, ref[6:9])


def test_changed_data_or_batch_is_refused_unless_asked(packed_shards, flat_shards, monkeypatch):
    stream = train_loader(packed_shards, batch_size=4, **KW)
    _ = next(iter(stream))
    state = stream.state_dict()
    other = train_loader(packed_shards, batch_size=4, **{**KW, "global_batch": 8})
    with pytest.raises(HarnessError, match=r"loader state: global_batch 4 in the checkpoint, 8 now "
                                           r"\(train.global_batch changed\); set MIMO_LOADER_RESUME=continue"):
        other.load_state_dict(state)
    with pytest.raises(HarnessError, match=r"loader state: manifest \w{12} in the checkpoint, \w{12} now "
                                           r"\(data.train changed\)"):
        train_loader(flat_shards, batch_size=4, **KW).load_state_dict(state)
    with pytest.raises(HarnessError, match=r"loader state: crops_per_image 2 in the checkpoint, 1 now"):
        train_loader(packed_shards, batch_size=4, **{**KW, "crops_per_image": 1}).load_state_dict(state)
    v1 = {"version": 1, "seed": 7, "batches": 3, "global_samples": 12, "world_size": 2}
    with pytest.raises(HarnessError, match="loader state: version 1 .* cannot be continued exactly"):
        stream.load_state_dict(v1)
    stream.load_state_dict(v1, mode="continue")  # documented non-exact continuation at the sample count
    assert stream.state_dict()["position"] == 12
    monkeypatch.setenv("MIMO_LOADER_RESUME", "continue")
    other.load_state_dict(state)  # a global batch of 8 from crop 4 on: rounded up to crop 8
    assert other.state_dict()["position"] == 8
    stream.close()


def test_remote_shards_are_cached_then_read_like_local_ones(packed_shards, tmp_path, monkeypatch):
    src = tmp_path / "remote"
    shutil.copytree(packed_shards, src)
    url = f"pipe:cat {src}/train-{{000000..000004}}.tar"
    monkeypatch.setenv("MIMO_SHARD_CACHE", str(tmp_path / "cache"))
    remote, _ = _global_batches(url, 3, world=1, micro=4)
    local, _ = _global_batches(packed_shards, 3, world=1, micro=4)
    assert _equal(remote, local) and len(list((tmp_path / "cache").iterdir())) == 5
    filed, _ = _global_batches(f"file:{packed_shards}/train-{{000000..000004}}.tar", 3, world=1, micro=4)
    assert _equal(filed, local)  # a local URL: read in place, not cached
    shutil.rmtree(src)  # read from the cache from now on: the pipe would fail
    again, _ = _global_batches(url, 3, world=1, micro=4)
    assert _equal(again, local)
    monkeypatch.setenv("MIMO_SHARD_CACHE", str(tmp_path / "small"))
    monkeypatch.setenv("MIMO_SHARD_CACHE_LIMIT", "10k")
    with pytest.raises(HarnessError, match=r"over MIMO_SHARD_CACHE_LIMIT=10240"):
        train_loader(f"pipe:cat {packed_shards}/train-{{000000..000004}}.tar")
    assert not [p for p in (tmp_path / "small").iterdir() if p.name.endswith(".tar")]
    with pytest.raises(HarnessError, match=r"shard pipe:cat /no/such.tar: download to the shard cache failed "
                                           r"\(the command exited with status 1\)"):
        train_loader("pipe:cat /no/such.tar")


def test_truncated_shard_is_one_line_naming_shard_and_key(flat_shards, tmp_path):
    data = (flat_shards / "train-000001.tar").read_bytes()
    bad = tmp_path / "cut-000000.tar"
    bad.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(HarnessError, match=r"shard .*cut-000000.tar: unreadable tar after key S0_000002 "
                                           r"\(unexpected end of data\)"):
        train_loader(str(bad), crop=16)


def test_one_read_per_sample_and_crops_of_a_window_reuse_it(flat_shards):
    for cpi in (1, 2):
        stream = train_loader(flat_shards, crop=16, crops_per_image=cpi, batch_size=4, seed=0)
        it = iter(stream)
        for _ in range(3 * cpi):  # one epoch
            next(it)
        ds = stream.dataset
        assert ds.reads == 12 and ds.bytes_read < 12 * (2 * 32 * 48 * 3 + 4096)
        stream.close()
