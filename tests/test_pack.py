"""Packing GoPro / REDS / folders into shards: manifest, verify, bad input, resume, parts, encodings."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.cli import main
from harness.data import shards
from tests.fixtures.shards import GOPRO_FRAMES, make_gopro

REPO = Path(__file__).resolve().parent.parent


def _pack(*args) -> int:
    return main(["pack", *map(str, args), "--no-progress"])


def _tars(d: Path) -> list[Path]:
    return sorted(d.glob("*.tar"))


def test_gopro_manifest_verify_and_flipped_byte(fake_gopro, tmp_path, capsys):
    out = tmp_path / "s"
    assert _pack("gopro", "--root", fake_gopro, "--split", "train", "--out", out, "--samples-per-shard", 3,
                 "--encoding", "png") == 0
    m = shards.load_manifest(out)
    assert [s["samples"] for s in m["shards"]] == [3, 3, 3, 1]
    assert m["total_samples"] == sum(GOPRO_FRAMES.values()) == 10
    assert m["encoding"] == "png" and m["split"] == "train" and m["dataset"] == "gopro"
    assert m["image_sizes"] == [[32, 48]]
    keys = [k for s in m["shards"] for k in s["keys"]]
    assert keys[0] == "GOPR0001_00_00_000001" and len(set(keys)) == 10 and all("." not in k for k in keys)
    for s in m["shards"]:
        data = (out / s["name"]).read_bytes()
        assert s["sha256"] == hashlib.sha256(data).hexdigest() and s["bytes"] == len(data)
    # readable by plain tar and by webdataset without our code
    with tarfile.open(out / "train-000000.tar") as tf:
        names = tf.getnames()
        meta = json.loads(tf.extractfile("GOPR0001_00_00_000001.meta.json").read())
    assert names[:3] == [f"GOPR0001_00_00_000001.{m}" for m in ("blur.png", "meta.json", "sharp.png")]
    assert meta == {"scene": "GOPR0001_00_00", "frame": "000001", "height": 32, "width": 48,
                    "blur": "train/GOPR0001_00_00/blur/000001.png", "sharp": "train/GOPR0001_00_00/sharp/000001.png"}
    src = (fake_gopro / meta["blur"]).read_bytes()
    with tarfile.open(out / "train-000000.tar") as tf:
        assert tf.extractfile("GOPR0001_00_00_000001.blur.png").read() == src  # original bytes, no re-encode
    import webdataset as wds

    assert sum(1 for _ in wds.WebDataset(str(out / "train-{000000..000003}.tar"), shardshuffle=False)) == 10

    assert main(["shards", "verify", str(out)]) == 0
    assert main(["shards", "info", str(out)]) == 0
    assert "10 samples in 4 shard(s)" in capsys.readouterr().out

    victim = out / "train-000002.tar"
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF  # inside the first member's payload
    victim.write_bytes(bytes(data))
    assert main(["shards", "verify", str(out)]) == 2
    err = capsys.readouterr().err
    assert "train-000002.tar: sha256" in err and "train-000000.tar" not in err


def test_reds_and_folders_keys(fake_reds, paired_folders, tmp_path):
    assert _pack("reds", "--root", fake_reds, "--split", "val", "--out", tmp_path / "r") == 0
    m = shards.load_manifest(tmp_path / "r")
    assert m["shards"][0]["name"] == "val-000000.tar" and m["total_samples"] == 6
    assert m["shards"][0]["keys"][:2] == ["000_00000000", "000_00000001"]
    blur, sharp = paired_folders
    assert _pack("folders", "--blur", blur, "--sharp", sharp, "--out", tmp_path / "f") == 0  # raw by default
    m = shards.load_manifest(tmp_path / "f")
    assert m["shards"][0]["keys"] == ["a", "b", "sub_c"] and m["encoding"] == "raw"
    assert shards.verify(tmp_path / "f") == []


# ---------------------------------------------------------------- bad input


def _tree(tmp_path: Path) -> Path:
    return make_gopro(tmp_path / "src", "train", {"S1": 2, "S2": 2}, seed=5)


def _rgba(p: Path):
    Image.fromarray(np.zeros((32, 48, 4), np.uint8)).save(p)


def _grey16(p: Path):
    Image.fromarray(np.full((32, 48), 40000, np.uint16)).save(p)


BAD = {
    "missing root": (lambda r: r.rename(r.parent / "gone"), "src: dataset root directory not found"),
    "missing split": (lambda r: (r / "train").rename(r / "other"), "train: split 'train' directory not found"),
    "missing sharp dir": (lambda r: (r / "train/S2/sharp").rename(r / "train/S2/x"), "S2/sharp: 'sharp' directory"),
    "no twin": (lambda r: (r / "train/S1/sharp/000002.png").unlink(), "S1/blur/000002.png"),
    "size mismatch": (lambda r: Image.new("RGB", (40, 32)).save(r / "train/S2/sharp/000001.png"),
                      "S2/blur/000001.png is 32x48 but"),
    "corrupt": (lambda r: (r / "train/S1/sharp/000001.png").write_bytes(
        (r / "train/S1/sharp/000001.png").read_bytes()[:300]), "S1/sharp/000001.png: not a readable image"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_before_any_shard(case, tmp_path, capsys):
    root = _tree(tmp_path)
    breaker, expected = BAD[case]
    breaker(root)
    out = tmp_path / "out"
    assert _pack("gopro", "--root", root, "--split", "train", "--out", out, "--samples-per-shard", 1) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err
    assert not out.exists() or not _tars(out)


def test_rgba_and_16_bit_are_converted_without_flag(tmp_path):
    """These were refused without --convert; `mimo pack` now always converts them (and lists them)."""
    root = _tree(tmp_path)
    _rgba(root / "train/S1/blur/000001.png")
    _grey16(root / "train/S2/blur/000002.png")
    Image.fromarray(np.full((32, 48), 77, np.uint8)).save(root / "train/S2/sharp/000001.png")  # grey
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).convert("P").save(root / "train/S1/sharp/000002.png")
    out = tmp_path / "out"
    assert _pack("gopro", "--root", root, "--split", "train", "--out", out, "--samples-per-shard", 1) == 0
    m = shards.load_manifest(out)
    assert m["total_samples"] == 4 and m["skipped"] == []
    assert sorted((c["file"], c["mode"]) for c in m["converted"]) == [
        ("train/S1/blur/000001.png", "RGBA"), ("train/S1/sharp/000002.png", "P"),
        ("train/S2/blur/000002.png", "I;16"), ("train/S2/sharp/000001.png", "L")]
    samples = {s["__key__"]: s for t in _tars(out) for s in shards.iter_shard(str(t))}
    blur, _ = shards.decode_pair(samples["S2_000002"])
    assert blur.shape == (32, 48, 3) and int(blur[0, 0, 0]) == round(40000 / 65535 * 255)  # 16-bit scaled
    _, sharp = shards.decode_pair(samples["S2_000001"])
    assert (sharp == 77).all()  # grey replicated into R, G and B
    assert shards.read_meta(samples["S1_000001"])["converted"] == {"blur": "RGBA"}
    assert shards.read_meta(samples["S1_000002"])["converted"] == {"sharp": "P"}
    assert shards.read_meta(samples["S1_000001"]) | {"converted": None} == {
        "scene": "S1", "frame": "000001", "height": 32, "width": 48, "converted": None,
        "blur": "train/S1/blur/000001.png", "sharp": "train/S1/sharp/000001.png"}
    assert _pack("gopro", "--root", root, "--split", "train", "--out", tmp_path / "b", "--convert") == 0  # still accepted
    assert shards.verify(out) == []


def test_convert_and_skip_policies(tmp_path):
    root = _tree(tmp_path)
    _rgba(root / "train/S1/blur/000001.png")
    _grey16(root / "train/S1/sharp/000001.png")
    (root / "train/S2/sharp/000002.png").write_bytes(b"not a png")
    args = ["gopro", "--root", root, "--split", "train", "--samples-per-shard", 2]
    assert _pack(*args, "--out", tmp_path / "a", "--convert") == 2  # the corrupt file still fails
    assert _pack(*args, "--out", tmp_path / "b", "--convert", "--on-error", "skip", "--encoding", "raw") == 0
    m = shards.load_manifest(tmp_path / "b")
    assert m["total_samples"] == 3 and [s["reason"] for s in m["skipped"]][0].endswith("(UnidentifiedImageError)")
    sample = next(shards.iter_shard(str(tmp_path / "b" / "train-000000.tar")))
    blur, sharp = shards.decode_pair(sample)
    assert sample["__key__"] == "S1_000001" and blur.max() == 0  # RGBA zeros -> RGB zeros
    assert int(sharp[0, 0, 0]) == round(40000 / 65535 * 255)  # 16-bit scaled, not clipped


# ---------------------------------------------------------------- resume, parts, encodings


KILL_AFTER_TWO = """
import os, signal, sys
from harness.data import pack as P, sources
pairs, unmatched = sources.list_gopro(sys.argv[1], "train")
done = []
def on_shard(entry):
    done.append(entry)
    if len(done) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
P.pack(pairs, unmatched, sys.argv[2], source={"dataset": "gopro", "root": sys.argv[1]}, split="train",
       options=P.PackOptions(samples_per_shard=2), on_shard=on_shard)
"""


def test_killed_pack_resumes_to_identical_shards(fake_gopro, pack_shards, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_TWO, str(fake_gopro), str(out)], cwd=REPO)
    assert proc.returncode == -9
    assert [p.name for p in _tars(out)] == ["train-000000.tar", "train-000001.tar"]
    assert not (out / "manifest.json").exists()
    (out / ".train-000002.tar.half.tmp").write_bytes(b"torn")  # as if killed while writing shard 2
    before = {p.name: os.stat(p).st_mtime_ns for p in _tars(out)}

    pack_shards(fake_gopro, out=out, samples_per_shard=2)
    clean = pack_shards(fake_gopro, out=tmp_path / "clean", samples_per_shard=2)
    assert {p.name: os.stat(p).st_mtime_ns for p in _tars(out)[:2]} == before  # kept, not rewritten
    assert [p.read_bytes() for p in _tars(out)] == [p.read_bytes() for p in _tars(clean)]
    assert not list(out.glob(".*.tmp"))
    assert shards.load_manifest(out)["total_samples"] == 10 and shards.verify(out) == []


def test_parts_merge_equal_single_pack(fake_gopro, packed_shards, tmp_path, capsys):
    out = tmp_path / "parts"
    for i in range(3):
        assert _pack("gopro", "--root", fake_gopro, "--split", "train", "--out", out,
                     "--samples-per-shard", 2, "--part", f"{i}/3", "--encoding", "png") == 0
    assert not (out / "manifest.json").exists()
    assert main(["shards", "merge-manifest", str(out)]) == 0
    merged, single = shards.load_manifest(out), shards.load_manifest(packed_shards)
    assert [(s["name"], s["sha256"], s["keys"]) for s in merged["shards"]] == \
        [(s["name"], s["sha256"], s["keys"]) for s in single["shards"]]
    assert merged["total_samples"] == 10 and shards.verify(out) == []
    (out / "manifest.part-0001-of-0003.json").unlink()
    (out / "manifest.json").unlink()
    assert main(["shards", "merge-manifest", str(out)]) == 2
    assert "parts [1] of 3" in capsys.readouterr().err


def test_local_shards_read_exactly_as_webdataset_reads_them(packed_shards):
    import webdataset as wds

    def strip(samples: list[dict]) -> list[dict]:
        return [{k: v for k, v in s.items() if k != "__url__"} for s in samples]

    for tar in _tars(packed_shards):
        ours = list(shards.iter_shard(str(tar)))  # random-access reader for local files
        assert ours == list(wds.tarfile_samples([{"url": str(tar)}]))  # webdataset's own reader
        assert strip(ours) == strip(shards.iter_shard(f"file:{tar}"))
        assert strip(ours) == strip(shards.iter_shard(f"pipe:cat {tar}"))  # URLs go through webdataset


def test_png_and_raw_decode_identical(fake_gopro, packed_shards, pack_shards):
    raw = pack_shards(fake_gopro, samples_per_shard=2, encoding="raw", workers=2)
    assert shards.load_manifest(raw)["encoding"] == "raw"
    for name in ("train-000000.tar", "train-000004.tar"):
        png_samples = list(shards.iter_shard(str(packed_shards / name)))
        raw_samples = list(shards.iter_shard(str(raw / name)))
        assert "blur.npy" in raw_samples[0] and "blur.png" in png_samples[0]
        for a, b in zip(png_samples, raw_samples, strict=True):
            pa, pb = shards.decode_pair(a), shards.decode_pair(b)
            assert a["__key__"] == b["__key__"]
            assert all(np.array_equal(x, y) for x, y in zip(pa, pb))
            assert pa[0].shape == (32, 48, 3) and pa[0].dtype == np.uint8
