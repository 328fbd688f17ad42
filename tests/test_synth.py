"""Synthetic GoPro-style data: layout, determinism, real blur, CLI errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from harness.data.synth import synth_pair, synthesize
from harness.errors import HarnessError
from harness.files import load_rgb_array
from harness.metrics import psnr


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_layout_is_gopro(tmp_path):
    split = synthesize(tmp_path, scenes=2, frames=3, size=(40, 56), seed=0, split="test")
    assert split == tmp_path / "test"
    expected = sorted(
        f"test/scene_{s:03d}/{kind}/{f:06d}.png"
        for s in range(2)
        for kind in ("blur", "sharp")
        for f in range(3)
    )
    assert _files(tmp_path) == expected  # nothing else: no temp files left behind
    with Image.open(tmp_path / "test/scene_001/blur/000002.png") as img:
        assert (img.mode, img.size) == ("RGB", (56, 40))


def test_deterministic_by_seed(tmp_path):
    args = dict(scenes=2, frames=2, size=(32, 48), preset="gopro")
    a = synthesize(tmp_path / "a", seed=7, **args)
    b = synthesize(tmp_path / "b", seed=7, **args)
    c = synthesize(tmp_path / "c", seed=8, **args)
    names = _files(a)
    assert names == _files(b) == _files(c)
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    assert all((a / n).read_bytes() != (c / n).read_bytes() for n in names)
    # frames within a scene, and scenes, are different pictures
    assert (a / names[0]).read_bytes() != (a / names[1]).read_bytes()


def _psnr(x: np.ndarray, y: np.ndarray) -> float:
    def batch(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255

    return float(psnr(batch(x), batch(y))[0])


def _grad_energy(img: np.ndarray, axis: int) -> float:
    return float(np.mean(np.diff(img.astype(np.float64), axis=axis) ** 2))


def test_easy_blur_is_real_and_horizontal(synth_gopro):
    pairs = [
        (load_rgb_array(p), load_rgb_array(p.parent.parent / "sharp" / p.name))
        for p in sorted((synth_gopro / "train").glob("*/blur/*.png"))
    ]
    assert len(pairs) == 6
    scores = [_psnr(b, s) for b, s in pairs]
    assert 15 < np.mean(scores) < 30, scores  # blurred, but still the same picture
    assert all(score < 35 for score in scores)
    assert _psnr(pairs[0][1], pairs[0][1]) > 80  # sharp vs itself: (near) infinite
    for blur, sharp in pairs:
        # horizontal motion removes horizontal detail (x gradients) far more than vertical
        x_ratio = _grad_energy(blur, 1) / _grad_energy(sharp, 1)
        y_ratio = _grad_energy(blur, 0) / _grad_energy(sharp, 0)
        assert x_ratio < 0.6 * y_ratio, (x_ratio, y_ratio)


def test_more_displacement_means_more_blur():
    small = [_psnr(*synth_pair(s, (64, 64), displacement=(2, 2))) for s in range(4)]
    large = [_psnr(*synth_pair(s, (64, 64), displacement=(12, 12))) for s in range(4)]
    assert np.mean(large) < np.mean(small) - 3


def test_gopro_preset_blurs_in_any_direction():
    pairs = [synth_pair(s, (64, 64), preset="gopro") for s in range(6)]
    assert np.mean([_psnr(b, s) for b, s in pairs]) < 30
    ratios = [
        (_grad_energy(b, 1) / _grad_energy(s, 1)) / (_grad_energy(b, 0) / _grad_energy(s, 0))
        for b, s in pairs
    ]
    assert max(ratios) > 1.0  # some frames lose more vertical than horizontal detail


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(size=(4, 64)), "size"),
        (dict(displacement=(8, 2)), "displacement"),
        (dict(direction="diagonal"), "direction"),
        (dict(subframes=4), "subframes"),
        (dict(preset="hard"), "preset"),
        (dict(split="../x"), "split"),
        (dict(scenes=0), "scenes"),
    ],
)
def test_bad_options_name_the_field(tmp_path, kwargs, field):
    args = dict(scenes=1, frames=1, size=(32, 32), seed=0) | kwargs
    with pytest.raises(HarnessError, match=field):
        synthesize(tmp_path, **args)
    assert not any(tmp_path.rglob("*.png"))


def _mimo(*args):
    return subprocess.run(
        [sys.executable, "-m", "harness", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_synth(tmp_path):
    res = _mimo(
        "synth",
        "--out",
        str(tmp_path),
        "--scenes",
        "1",
        "--frames",
        "2",
        "--size",
        "24x40",
        "--seed",
        "5",
        "--split",
        "test",
        "--preset",
        "gopro",
        "--displacement",
        "3-5",
    )
    assert res.returncode == 0, res.stderr
    assert _files(tmp_path) == [
        f"test/scene_000/{k}/{f:06d}.png" for k in ("blur", "sharp") for f in range(2)
    ]
    expected = synthesize(
        tmp_path / "api",
        scenes=1,
        frames=2,
        size=(24, 40),
        seed=5,
        split="test",
        preset="gopro",
        displacement=(3, 5),
    )
    assert (tmp_path / "test/scene_000/blur/000001.png").read_bytes() == (
        expected / "scene_000/blur/000001.png"
    ).read_bytes()


@pytest.mark.parametrize(
    "flag, value, message",
    [("--size", "64by64", "--size: expected HxW"), ("--displacement", "a-b", "--displacement: expected A-B")],
)
def test_cli_synth_bad_option_is_one_line(tmp_path, flag, value, message):
    res = _mimo("synth", "--out", str(tmp_path), "--scenes", "1", "--frames", "1", "--seed", "0", flag, value)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and message in res.stderr, res.stderr
    assert not any(tmp_path.rglob("*"))
