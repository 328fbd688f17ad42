"""Streaming loaders: exact resume, eval coverage, alignment, errors (the order: test_data_order.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.data import shards
from harness.data.stream import eval_loader, train_loader
from harness.errors import HarnessError
from tests.fixtures.shards import make_gopro

REPO = Path(__file__).resolve().parent.parent


def _take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def _same(a, b) -> bool:
    return all(torch.equal(x["blur"], y["blur"]) and torch.equal(x["sharp"], y["sharp"]) for x, y in zip(a, b))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_k_batches_is_exact(packed_shards, workers):
    """2 ranks: a loader restored after k batches yields batches k+1.. of the uninterrupted one."""
    kw = dict(crop=16, crops_per_image=3, batch_size=2, seed=7, world_size=2, workers=workers,
              augment="hflip,vflip,rot90")  # 30 crops an epoch, 4 a round of both ranks: crosses epochs
    for rank in range(2):
        full = train_loader(packed_shards, rank=rank, **kw)
        ref = _take(full, 11)
        full.close()
        first = train_loader(packed_shards, rank=rank, **kw)
        _take(first, 5)
        state = json.loads(json.dumps(first.state_dict()))  # it must survive a checkpoint's JSON/pickle
        first.close()
        assert state["position"] == 20 and state["epoch"] == 0 and state["samples"] == 10
        resumed = train_loader(packed_shards, rank=rank, **kw)
        resumed.load_state_dict(state)
        assert _same(_take(resumed, 6), ref[5:])
        resumed.close()
        assert not _same(ref[:1], ref[1:2])


@pytest.mark.parametrize("per_shard,n_shards", [(4, 3), (3, 4), (2, 5)])
def test_eval_loader_every_sample_once(fake_gopro, pack_shards, per_shard, n_shards):
    out = pack_shards(fake_gopro, samples_per_shard=per_shard)
    manifest = shards.load_manifest(out)
    assert len(manifest["shards"]) == n_shards
    keys = []
    for rank in range(2):
        pairs = eval_loader(out, rank=rank, world_size=2, workers=2 if rank else 0)
        got = list(pairs)
        assert len(got) == len(pairs) == 5
        keys += [p.key for p in got]
    assert sorted(keys) == sorted(k for s in manifest["shards"] for k in s["keys"])
    assert len(set(keys)) == 10
    first = next(iter(eval_loader(out, max_images=1)))
    src = np.array(Image.open(fake_gopro / "train/GOPR0001_00_00/blur/000001.png"))
    assert first.key == "GOPR0001_00_00_000001" and first.scene == "GOPR0001_00_00"
    assert first.blur.shape == (3, 32, 48) and torch.equal(first.blur, torch.from_numpy(src).permute(2, 0, 1) / 255)


def test_crops_stay_aligned(tmp_path, pack_shards):
    """Shards whose sharp equals blur: every augmented multi-crop pair must stay equal."""
    root = make_gopro(tmp_path / "src", "train", {"A": 3}, seed=9)
    for p in (root / "train/A/blur").iterdir():
        (root / "train/A/sharp" / p.name).write_bytes(p.read_bytes())
    out = pack_shards(root, samples_per_shard=1, encoding="raw")
    src = {p.name: np.asarray(Image.open(p)) for p in (root / "train/A/blur").iterdir()}
    for b in _take(train_loader(out, crop=(8, 12), crops_per_image=4, batch_size=4, seed=0,
                                augment="hflip,vflip,rot90"), 5):
        assert torch.equal(b["blur"], b["sharp"]) and b["blur"].shape == (4, 3, 8, 12)
        crop = b["blur"][0].permute(1, 2, 0).numpy()
        assert any(_contains(img, crop) for img in src.values())  # a real (flipped) crop of a source frame


def _contains(img: np.ndarray, crop: np.ndarray) -> bool:
    h, w = crop.shape[:2]
    variants = [crop, crop[:, ::-1], crop[::-1], crop[::-1, ::-1]]
    return any(np.array_equal(img[y:y + h, x:x + w], v) for v in variants
               for y in range(img.shape[0] - h + 1) for x in range(img.shape[1] - w + 1))


def test_png_and_raw_streams_identical(fake_gopro, packed_shards, pack_shards):
    raw = pack_shards(fake_gopro, samples_per_shard=2, encoding="raw")
    kw = dict(crop=16, crops_per_image=2, batch_size=3, seed=5, workers=0)
    assert _same(_take(train_loader(packed_shards, **kw), 4), _take(train_loader(raw, **kw), 4))


def test_decode_error_names_shard_and_key_or_is_skipped(tmp_path, packed_shards):
    import webdataset as wds

    bad = tmp_path / "bad-000000.tar"
    good = list(shards.iter_shard(str(packed_shards / "train-000000.tar")))
    with open(bad, "wb") as fh:
        w = wds.TarWriter(fh, encoder=False)
        for s in good:
            w.write({k: v for k, v in s.items() if k != "__url__"})
        broken = dict(good[0], __key__="broken")
        broken["blur.png"] = broken["blur.png"][:100]
        w.write({k: v for k, v in broken.items() if k != "__url__"})
        w.close()
    url = str(tmp_path / "bad-{000000..000000}.tar")
    with pytest.raises(HarnessError, match=r"bad-000000.tar: key broken: blur.png: not a readable image"):
        _take(train_loader(url, crop=16, batch_size=3, seed=0, workers=1), 4)
    stream = train_loader(url, crop=16, batch_size=3, seed=0, on_error="skip")
    assert len(_take(stream, 4)) == 4 and stream.dataset.decode_errors >= 1
    with pytest.raises(HarnessError, match=r"bad-000001.tar: no such shard \(1 of 2 missing"):
        train_loader(str(tmp_path / "bad-{000000..000001}.tar"))


def test_loader_benchmark_quick(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "benchmarks/loader.py", "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert {"host", "device", "config", "results", "speedup"} <= set(res)
    value = {(r["variant"], r["metric"]): r["value"] for r in res["results"]}
    variants = {v for v, m in value if m == "crops_per_s"}
    assert variants == {"folder-png", "shards-png-c1", "shards-raw-c1", "shards-png-c4", "shards-raw-c4"}
    assert all(value[v, "crops_per_s"] > 0 for v in variants)
    assert res["speedup"]["folder-png"] == 1.0 and set(res["speedup"]) == variants
    # one read per decoded sample: 1 per crop, 1/4 with 4 crops per image (its window's other crops)
    assert value["shards-raw-c1", "reads_per_crop"] == 1 and value["shards-raw-c4", "reads_per_crop"] < 0.5
    assert 0 < value["shards-raw-c1", "worker_uss_mb"] < 200
    stream, perm = (value[f"shuffle-small/{k}", "one_scene_batch_share"] for k in ("stream", "permutation"))
    assert abs(stream - perm) < 4 * value["shuffle-small/permutation", "one_scene_stderr"] + 1e-4
    assert "crops/s" in proc.stdout


def test_loader_source_errors(tmp_path):
    with pytest.raises(HarnessError, match="no shard manifest"):
        train_loader(tmp_path)
    (tmp_path / "x.tar").write_bytes(b"")
    with pytest.raises(HarnessError, match="augment: unknown"):
        train_loader(str(tmp_path / "x.tar"), augment="colour")
    with pytest.raises(HarnessError, match=r"x.tar: unreadable tar"):
        train_loader(str(tmp_path / "x.tar"))


def test_to_float_scales_uint8_once_in_float32_and_passes_floats_through():
    from harness.data.crops import to_float, to_tensor_batch

    crops = [np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5, np.full((4, 4, 3), 255, np.uint8)]
    batch = to_tensor_batch(crops)
    assert batch.dtype == torch.uint8 and batch.shape == (2, 3, 4, 4)
    assert torch.equal(batch[0], torch.from_numpy(crops[0]).permute(2, 0, 1))
    f32 = to_float(batch)
    assert f32.dtype == torch.float32 and torch.equal(f32, batch.float() / 255) and f32.max() == 1.0
    # bf16: divided in float32, rounded once (not 255 rounded to bf16 and divided in bf16)
    assert torch.equal(to_float(batch, torch.bfloat16), (batch.float() / 255).bfloat16())
    assert torch.equal(to_float(f32), f32) and to_float(f32, torch.float16).dtype == torch.float16
