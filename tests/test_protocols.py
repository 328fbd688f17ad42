"""HIDE and RealBlur trees in their published layouts through `mimo pack` and `mimo eval --data`,
and the scoring protocols: RealBlur's ECC-aligned masked scores, BasicSR's Y channel, the default."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from harness import protocols
from harness.cli import main
from harness.data import shards
from harness.errors import HarnessError
from harness.files import to_float
from harness.infer import dataset_pairs
from harness.models import create_model, save_weights

SIZE = (40, 48)  # height, width: >= 11 for SSIM, small for speed
RB_J = "RealBlur-J_ECC_IMCORR_centroid_itensity_ref"
RB_R = "RealBlur-R_BM3D_ECC_IMCORR_centroid_itensity_ref"


def natural(rng: np.random.Generator, size=SIZE) -> np.ndarray:
    """A smooth, textured uint8 RGB image (blurred noise): ECC and Y/RGB comparisons need structure."""
    noise = rng.random((size[0] + 8, size[1] + 8, 3)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), 2.0)[4:-4, 4:-4]
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    return np.round(20 + 215 * smooth).astype(np.uint8)


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _pair(blur: Path, sharp: Path, rng: np.random.Generator) -> None:
    s = natural(rng)
    _save(sharp, s)
    _save(blur, ((s.astype(np.uint16) + np.roll(s, 1, axis=1) + np.roll(s, 2, axis=1)) // 3).astype(np.uint8))


@pytest.fixture(scope="module")
def hide(tmp_path_factory) -> Path:
    """HIDE_dataset: train/ (2), test/test-close-ups (2), test/test-long-shot (3), GT/ for all + 1."""
    root = tmp_path_factory.mktemp("hide") / "HIDE_dataset"
    rng = np.random.default_rng(0)
    names = {"train": ["1fromGOPR0950.MP4.png", "2fromGOPR0950.MP4.png"],
             "test/test-close-ups": ["10fromGOPR1044.MP4.png", "7fromGOPR1096.MP4.png"],
             "test/test-long-shot": ["1fromGOPR0862.MP4.png", "3fromGOPR0862.MP4.png", "9fromGOPR1010.MP4.png"]}
    for folder, files in names.items():
        for name in files:
            _pair(root / folder / name, root / "GT" / name, rng)
    _save(root / "GT" / "99fromGOPR0001.MP4.png", natural(rng))  # another split's: not an error
    return root


@pytest.fixture(scope="module")
def realblur(tmp_path_factory) -> Path:
    """A RealBlur root: both trees, and their train/test lists (gt first, trailing space as shipped)."""
    root = tmp_path_factory.mktemp("realblur")
    rng = np.random.default_rng(1)
    split_scenes = {"test": ["scene230", "scene050"], "train": ["scene001"]}
    for tree, letter in ((RB_J, "J"), (RB_R, "R")):
        for split, scenes in split_scenes.items():
            lines = []
            for scene in scenes:
                for n in (1, 2):
                    gt, blur = f"{tree}/{scene}/gt/gt_{n}.png", f"{tree}/{scene}/blur/blur_{n}.png"
                    _pair(root / blur, root / gt, rng)
                    lines.append(f"{gt} {blur} \n")
            (root / f"RealBlur_{letter}_{split}_list.txt").write_text("".join(lines))
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = create_model("mimo-unet", num_res=1, base_channels=8).eval()
    return save_weights(model, tmp_path_factory.mktemp("weights") / "tiny.pth")


def _pack(*args) -> int:
    return main(["pack", *map(str, args), "--no-progress"])


def _keys(out: Path) -> list[str]:
    return [k for s in shards.load_manifest(out)["shards"] for k in s["keys"]]


# ---------------------------------------------------------------- readers


def test_pack_hide_splits_and_keys(hide, tmp_path):
    assert _pack("hide", "--root", hide, "--split", "test", "--out", tmp_path / "t") == 0
    m = shards.load_manifest(tmp_path / "t")
    assert (m["dataset"], m["split"], m["total_samples"], m["skipped"]) == ("hide", "test", 5, [])
    assert _keys(tmp_path / "t") == ["test-close-ups_10fromGOPR1044-MP4", "test-close-ups_7fromGOPR1096-MP4",
                                     "test-long-shot_1fromGOPR0862-MP4", "test-long-shot_3fromGOPR0862-MP4",
                                     "test-long-shot_9fromGOPR1010-MP4"]
    sample = next(shards.iter_shard(str(tmp_path / "t" / "test-000000.tar")))
    meta = shards.read_meta(sample)
    assert (meta["scene"], meta["blur"], meta["sharp"]) == (
        "test-close-ups", "test/test-close-ups/10fromGOPR1044.MP4.png", "GT/10fromGOPR1044.MP4.png")
    for split, count in (("train", 2), ("test-long-shot", 3)):
        assert _pack("hide", "--root", hide, "--split", split, "--out", tmp_path / split) == 0
        assert shards.load_manifest(tmp_path / split)["total_samples"] == count


def test_pack_realblur_lists_and_keys(realblur, tmp_path):
    assert _pack("realblur-j", "--root", realblur, "--split", "test", "--out", tmp_path / "j") == 0
    m = shards.load_manifest(tmp_path / "j")
    assert (m["dataset"], m["total_samples"]) == ("realblur-j", 4)
    assert m["list"] == str((realblur / "RealBlur_J_test_list.txt").resolve())
    assert _keys(tmp_path / "j") == ["scene050_1", "scene050_2", "scene230_1", "scene230_2"]
    sample = next(shards.iter_shard(str(tmp_path / "j" / "test-000000.tar")))
    assert shards.read_meta(sample)["sharp"] == f"{RB_J}/scene050/gt/gt_1.png"
    assert _pack("realblur-r", "--root", realblur, "--split", "train", "--out", tmp_path / "r") == 0
    assert _keys(tmp_path / "r") == ["scene001_1", "scene001_2"]
    assert shards.load_manifest(tmp_path / "r")["dataset"] == "realblur-r"
    own = tmp_path / "mine.txt"  # --list: any list in the same format
    own.write_text(f"{RB_R}/scene230/gt/gt_2.png {RB_R}/scene230/blur/blur_2.png\n\n")
    assert _pack("realblur-r", "--root", realblur, "--split", "test", "--list", own, "--out", tmp_path / "o") == 0
    assert _keys(tmp_path / "o") == ["scene230_2"]


def test_eval_data_reads_both_layouts_like_pack(hide, realblur):
    hide_pairs = dataset_pairs(hide)  # auto: GT/ beside test/ is HIDE, split test
    assert [p.key for p in hide_pairs][:2] == ["test-close-ups_10fromGOPR1044-MP4", "test-close-ups_7fromGOPR1096-MP4"]
    assert {p.scene for p in hide_pairs} == {"test-close-ups", "test-long-shot"} and len(hide_pairs) == 5
    assert len(dataset_pairs(hide, layout="hide", split="train")) == 2
    rb = dataset_pairs(realblur, layout="realblur-r")
    assert [p.key for p in rb] == ["scene050_1", "scene050_2", "scene230_1", "scene230_2"]
    pair = rb[0]()
    assert torch.equal(pair.sharp, to_float(np.asarray(Image.open(realblur / RB_R / "scene050/gt/gt_1.png"))))


BAD_TREES = {
    "hide without GT": (["pack", "hide", "--split", "test"], lambda h, r: (h / "GT").rename(h / "gt_"),
                        "GT: HIDE 'GT' directory not found"),
    "hide without long shots": (["pack", "hide", "--split", "test"],
                                lambda h, r: (h / "test/test-long-shot").rename(h / "test/x"),
                                "test-long-shot: HIDE 'test-long-shot' directory not found"),
    "hide bad split": (["pack", "hide", "--split", "val"], None, "--split val: expected one of train, test"),
    "hide sharp missing": (["pack", "hide", "--split", "train"],
                           lambda h, r: (h / "GT/2fromGOPR0950.MP4.png").unlink(), "without a blur/sharp twin"),
    "realblur no list": (["pack", "realblur-j", "--split", "test"],
                         lambda h, r: (r / "RealBlur_J_test_list.txt").unlink(), "RealBlur list file not found"),
    "realblur swapped": (["pack", "realblur-j", "--split", "test"], lambda h, r: _swap_columns(r),
                         "RealBlur lists give the gt path first"),
    "realblur missing file": (["pack", "realblur-j", "--split", "test"],
                              lambda h, r: (r / RB_J / "scene230/blur/blur_2.png").unlink(),
                              "blur_2.png: listed in RealBlur_J_test_list.txt line 2 but missing"),
    "eval both lists": (["eval", "--weights", "W"], None, "has both RealBlur-J and -R lists"),
    "eval crop default": (["eval", "--weights", "W", "--crop-border", "4"], None,
                          "--crop-border 4: expected >= 0, and only with --protocol basicsr-y"),
}


def _swap_columns(root: Path) -> None:
    listed = root / "RealBlur_J_test_list.txt"
    listed.write_text("".join(" ".join(line.split()[::-1]) + "\n" for line in listed.read_text().splitlines()))


@pytest.mark.parametrize("case", list(BAD_TREES))
def test_bad_trees_are_one_line(case, hide, realblur, weights, tmp_path, capsys):
    import shutil

    h, r = tmp_path / "HIDE_dataset", tmp_path / "rb"
    shutil.copytree(hide, h)
    shutil.copytree(realblur, r)
    argv, breaker, expected = BAD_TREES[case]
    if breaker:
        breaker(h, r)
    data = h if "hide" in case else r
    if argv[0] == "pack":
        argv = [*argv, "--root", str(data), "--out", str(tmp_path / "out"), "--no-progress"]
    else:
        argv = [*argv[:2], str(weights), *argv[3:], "--data", str(data), "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- mimo eval --protocol


def test_eval_protocol_in_json_csv_and_summary(realblur, hide, weights, tmp_path, capsys):
    base = ["eval", "--weights", str(weights), "--device", "cpu"]
    out = {}
    for protocol in ("default", "realblur", "basicsr-y"):
        j, c = tmp_path / f"{protocol}.json", tmp_path / f"{protocol}.csv"
        assert main([*base, "--data", str(realblur), "--layout", "realblur-j", "--protocol", protocol,
                     "--json", str(j), "--csv", str(c)]) == 0
        printed = capsys.readouterr().out
        assert f"protocol {protocol} (" in printed.splitlines()[0] and "ensemble none, fp32 on cpu" in printed
        out[protocol] = json.loads(j.read_text())
        assert out[protocol]["protocol"] == protocol and out[protocol]["count"] == 4
        rows = list(csv.DictReader(open(c)))
        assert {r["protocol"] for r in rows} == {protocol}
        assert [r["key"] for r in rows] == ["scene050_1", "scene050_2", "scene230_1", "scene230_2"]
        assert set(out[protocol]["per_scene"]) == {"scene050", "scene230"}
    # RealBlur's reference scores the blurred input unaligned: the default numbers
    assert out["realblur"]["blurred_psnr"] == pytest.approx(out["default"]["blurred_psnr"], abs=1e-9)
    assert out["realblur"]["psnr"] != out["default"]["psnr"]
    assert out["basicsr-y"]["blurred_psnr"] > out["default"]["blurred_psnr"]  # Y PSNR reads higher
    j = tmp_path / "hide.json"
    assert main([*base, "--data", str(hide), "--protocol", "basicsr-y",
                 "--crop-border", "2", "--json", str(j)]) == 0
    assert "protocol basicsr-y:crop2" in capsys.readouterr().out
    summary = json.loads(j.read_text())
    assert (summary["protocol"], summary["count"]) == ("basicsr-y:crop2", 5)
    assert set(summary["per_scene"]) == {"test-close-ups", "test-long-shot"}
    # packed, the same pairs give the same numbers under the same protocol
    assert _pack("hide", "--root", hide, "--split", "test", "--out", tmp_path / "s", "--encoding", "png") == 0
    assert main([*base, "--shards", str(tmp_path / "s"), "--protocol", "basicsr-y", "--crop-border", "2",
                 "--json", str(tmp_path / "s.json")]) == 0
    packed = json.loads((tmp_path / "s.json").read_text())
    assert packed["psnr"] == pytest.approx(summary["psnr"], abs=1e-9) and packed["per_scene"].keys() == \
        summary["per_scene"].keys()


# ---------------------------------------------------------------- realblur protocol


def _t(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float()


def _reference_realblur(deblurred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """evaluation_RealBlur_ecc.py (rimchang/RealBlur) step by step, on float32 HxWx3 in [0, 1]."""
    from skimage.metrics import structural_similarity

    z, x = deblurred, gt
    zs = (np.sum(x * z) / np.sum(z * z)) * z
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 100, 0)
    _, warp = cv2.findTransformECC(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.cvtColor(zs, cv2.COLOR_RGB2GRAY),
                                   np.eye(3, 3, dtype=np.float32), cv2.MOTION_HOMOGRAPHY, criteria, None, 5)
    shape = (x.shape[1], x.shape[0])
    zr = cv2.warpPerspective(zs, warp, shape, flags=cv2.INTER_CUBIC + cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_REFLECT)
    cr = cv2.warpPerspective(np.ones_like(zs, dtype="float32"), warp, shape,
                             flags=cv2.INTER_NEAREST + cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT,
                             borderValue=0)
    zr, xr = zr * cr, x * cr
    _, smap = structural_similarity(xr, zr, channel_axis=-1, gaussian_weights=True, use_sample_covariance=False,
                                    data_range=1.0, full=True)
    smap = (smap * cr)[5:-5, 5:-5]
    ssim = np.mean(smap.sum(axis=(0, 1)) / cr[5:-5, 5:-5].sum(axis=(0, 1)))
    psnr = 10 * np.log10(1.0 / (np.sum((xr - zr) ** 2, dtype=np.float64) / np.sum(cr)))
    return float(psnr), float(ssim)


def test_realblur_aligns_a_known_homography_and_masks_the_border():
    rng = np.random.default_rng(4)
    sharp = natural(rng, (96, 128))
    restored = np.clip(sharp / 255.0 + rng.normal(0, 0.01, sharp.shape), 0, 1).astype(np.float32)
    known = np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]], np.float32)  # 2 px right, 1 down
    known[0, 1], known[1, 0] = 0.004, -0.004  # and a slight rotation
    moved = cv2.warpPerspective(restored, known, (128, 96), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
    s = _t(sharp / 255.0)

    aligned = protocols.score(_t(moved), s, "realblur")
    unaligned = protocols.score(_t(moved), s, "default")
    unwarped = protocols.score(_t(restored), s, "default")
    assert float(aligned[0]) > float(unaligned[0]) + 10  # alignment undoes the shift
    assert abs(float(aligned[0]) - float(unwarped[0])) < 1.5 and float(aligned[1]) > 0.98
    assert float(aligned[1]) > float(unaligned[1]) + 0.2

    _, _, mask, warp = protocols.align(protocols._hwc8(_t(moved)), protocols._hwc8(s))
    assert np.allclose(warp[:2], known[:2], atol=0.1)  # ECC finds the warp it was given
    # what the warp brings in from outside the frame (right columns, bottom row) is left out
    assert (mask[:, -2:] == 0).all() and mask[-1].mean() < 0.2
    assert (mask[2:-2, 2:-3] == 1).all() and 0.9 < mask.mean() < 0.99

    # the same numbers as RealBlur's script run literally (on the 8-bit image, as it reads PNGs)
    moved8 = np.round(np.clip(moved, 0, 1) * 255).astype(np.uint8).astype(np.float32) / 255
    ref_psnr, ref_ssim = _reference_realblur(moved8, (sharp / 255.0).astype(np.float32))
    assert float(aligned[0]) == pytest.approx(ref_psnr, abs=1e-4)
    assert float(aligned[1]) == pytest.approx(ref_ssim, abs=1e-5)


def test_realblur_names_the_image_it_cannot_align():
    flat = torch.full((1, 3, 24, 24), 0.5)
    with pytest.raises(HarnessError, match="k7: protocol realblur: ECC alignment failed"):
        protocols.score(flat, flat, "realblur", keys=["k7"])


# ---------------------------------------------------------------- basicsr-y


def _basicsr_by_hand(a8: np.ndarray, b8: np.ndarray, crop: int = 0) -> tuple[float, float]:
    """BasicSR's calculate_psnr/_ssim(test_y_channel=True) from its documented formula, in numpy."""
    if crop:
        a8, b8 = a8[crop:-crop, crop:-crop], b8[crop:-crop, crop:-crop]
    coef = np.array([65.481, 128.553, 24.966])  # rgb2ycbcr: Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255
    ya, yb = (a.astype(np.float64) / 255.0 @ coef + 16.0 for a in (a8, b8))
    assert 16 <= ya.min() and ya.max() <= 235
    psnr = 10 * np.log10(255.0**2 / np.mean((ya - yb) ** 2))
    g = cv2.getGaussianKernel(11, 1.5)
    win = g @ g.T
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def f(v: np.ndarray) -> np.ndarray:
        return cv2.filter2D(v, -1, win)[5:-5, 5:-5]

    mu1, mu2 = f(ya), f(yb)
    s11, s22, s12 = f(ya * ya) - mu1**2, f(yb * yb) - mu2**2, f(ya * yb) - mu1 * mu2
    ssim = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1**2 + mu2**2 + c1) * (s11 + s22 + c2))
    return float(psnr), float(ssim.mean())


def test_basicsr_y_equals_the_formula_and_reads_higher_than_rgb():
    rng = np.random.default_rng(5)
    sharp8 = natural(rng, (30, 34))
    noisy = np.clip(sharp8 / 255.0 + rng.normal(0, 0.03, sharp8.shape), 0, 1)  # independent per channel
    restored = _t(noisy)
    restored8 = np.round(noisy * 255).astype(np.uint8)  # BasicSR's tensor2img rounding
    for crop in (0, 3):
        psnr, ssim = protocols.score(restored, _t(sharp8 / 255.0), "basicsr-y", crop_border=crop)
        want = _basicsr_by_hand(restored8, sharp8, crop)
        assert float(psnr) == pytest.approx(want[0], abs=1e-4) and float(ssim) == pytest.approx(want[1], abs=1e-6)
    y = protocols.score(restored, _t(sharp8 / 255.0), "basicsr-y")
    rgb = protocols.score(restored, _t(sharp8 / 255.0), "default")
    # Y weighs R, G, B by 0.257, 0.504, 0.098: independent channel errors shrink to ~1/3 the MSE
    assert float(y[0]) > float(rgb[0]) + 3
