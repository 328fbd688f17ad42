"""`mimo deblur` and `mimo eval`: exact outputs, directory mode, one-line errors with exit 2."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from harness.cli import main
from harness.files import load_rgb_array, read_image, to_uint8
from harness.infer import deblur, folder_pairs
from harness.metrics import psnr
from harness.models import create_model, load_weights, save_weights


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A tiny MIMO-UNet saved in the public {"model": ...} format (with its architecture)."""
    torch.manual_seed(0)
    model = create_model("mimo-unet", num_res=1, base_channels=8).eval()
    path = save_weights(model, tmp_path_factory.mktemp("weights") / "tiny.pth")
    return model, path


def _mimo(*args):
    return subprocess.run(
        [sys.executable, "-m", "harness", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def test_checkpoint_round_trip_and_deblur_bit_identical(tiny_weights, synth_gopro, tmp_path):
    model, weights = tiny_weights
    fresh = load_weights(create_model("mimo-unet", num_res=1, base_channels=8), weights)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))

    src = synth_gopro / "test/scene_000/blur/000000.png"
    out = tmp_path / "out.png"
    assert main(["deblur", "--weights", str(weights), "--device", "cpu", str(src), str(out)]) == 0
    with torch.no_grad():
        direct = to_uint8(model(read_image(src)[None])[-1][0].clamp(0, 1))
    assert np.array_equal(load_rgb_array(out), direct)
    assert not np.array_equal(direct, load_rgb_array(src))  # the model did change the image


def test_deblur_directory_mirrors_names(tiny_weights, synth_gopro, tmp_path):
    _, weights = tiny_weights
    src = tmp_path / "in"
    shutil.copytree(synth_gopro / "test", src)
    Image.open(src / "scene_001/blur/000001.png").save(src / "scene_001/extra.jpg", quality=95)
    (src / "notes.txt").write_text("not an image: skipped by suffix")
    out = tmp_path / "out"
    assert main(["deblur", "--weights", str(weights), str(src), str(out)]) == 0
    inputs = sorted(
        p.relative_to(src).with_suffix(".png") for p in src.rglob("*") if p.suffix in (".png", ".jpg")
    )
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == inputs
    with Image.open(out / "scene_001/extra.png") as img:
        assert (img.format, img.mode, img.size) == ("PNG", "RGB", (64, 64))


def test_deblur_odd_size_and_ensemble(tiny_weights, tmp_path):
    _, weights = tiny_weights
    src = tmp_path / "odd.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 67, 3), dtype=np.uint8)).save(src)
    out = tmp_path / "res"
    out.mkdir()
    # `--ensemble` alone is rot4 (MIMO-UNet++ as published); `--ensemble d8` the 8-fold variant
    assert main(["deblur", "--weights", str(weights), str(src), str(out), "--ensemble"]) == 0
    with Image.open(out / "odd.png") as img:
        assert img.size == (67, 50)
    model = load_weights(create_model("mimo-unet", num_res=1, base_channels=8), weights).eval()
    x = read_image(src)[None]
    assert np.array_equal(load_rgb_array(out / "odd.png"), to_uint8(deblur(model, x, ensemble="rot4")[0]))
    d8 = tmp_path / "d8.png"
    assert main(["deblur", "--weights", str(weights), "--ensemble", "d8", "--device", "cpu", str(src), str(d8)]) == 0
    assert np.array_equal(load_rgb_array(d8), to_uint8(deblur(model, x, ensemble="d8")[0]))
    assert not np.array_equal(load_rgb_array(d8), load_rgb_array(out / "odd.png"))


def _bad_png(path):
    path.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    return path


def _error_cases(tmp_path, model, weights, src, out):
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    return {
        "missing input": (["--weights", weights, tmp_path / "nope.png", out], "nope.png: no such file"),
        "bad image": (
            ["--weights", weights, _bad_png(tmp_path / "bad.png"), out],
            "bad.png: not a readable image",
        ),
        "missing weights": (["--weights", tmp_path / "none.pth", src, out], "none.pth: no such weights file"),
        "garbage weights": (["--weights", _bad_png(tmp_path / "w.pth"), src, out], "w.pth: not a readable"),
        "wrong architecture": (
            ["--model", "mimo-unet-plus", "--weights", weights, src, out],
            "weights do not fit model mimo-unet-plus",
        ),
        "bare checkpoint": (
            ["--weights", tmp_path / "bare.pth", src, out],
            "does not record its architecture",
        ),
        "out not png": (["--weights", weights, src, tmp_path / "out.jpg"], "must be a .png"),
    }


def _check_one_line_error(rc, stderr, message, out, tmp_path):
    assert rc == 2, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("mimo deblur: error: "), stderr
    assert message in stderr, stderr
    assert not out.exists() and not list(tmp_path.glob(".*tmp"))  # nothing (half-)written


# A real process for the common cases (exit code, and nothing else on stderr: no warnings,
# no traceback); the rest in-process, since each `python -m harness` pays a torch import.
@pytest.mark.parametrize("case", ["missing input", "bad image", "garbage weights", "wrong architecture"])
def test_deblur_errors_are_one_line_process(case, tiny_weights, synth_gopro, tmp_path):
    out = tmp_path / "out.png"
    argv, message = _error_cases(
        tmp_path, *tiny_weights, synth_gopro / "test/scene_000/blur/000000.png", out
    )[case]
    res = _mimo("deblur", *argv)
    _check_one_line_error(res.returncode, res.stderr, message, out, tmp_path)


@pytest.mark.parametrize("case", ["missing weights", "bare checkpoint", "out not png"])
def test_deblur_errors_are_one_line(case, tiny_weights, synth_gopro, tmp_path, capsys):
    out = tmp_path / "out.png"
    argv, message = _error_cases(
        tmp_path, *tiny_weights, synth_gopro / "test/scene_000/blur/000000.png", out
    )[case]
    rc = main(["deblur", *map(str, argv)])
    _check_one_line_error(rc, capsys.readouterr().err, message, out, tmp_path)


def test_eval_folders_json_csv(tiny_weights, synth_gopro, tmp_path, capsys):
    _, weights = tiny_weights
    data = synth_gopro / "test"
    rc = main(
        [
            "eval",
            "--weights",
            str(weights),
            "--data",
            str(data),
            "--json",
            str(tmp_path / "r.json"),
            "--csv",
            str(tmp_path / "rows.csv"),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "scene_000" in printed and "scene_001" in printed and "blur PSNR" in printed
    summary = json.loads((tmp_path / "r.json").read_text())
    pairs = [p() for p in folder_pairs(data)]
    direct = psnr(torch.stack([p.blur for p in pairs]), torch.stack([p.sharp for p in pairs]))
    assert summary["count"] == 4
    assert summary["blurred_psnr"] == pytest.approx(float(direct.mean()), abs=1e-9)
    assert summary["per_scene"]["scene_001"]["count"] == 2
    rows = list(csv.DictReader(open(tmp_path / "rows.csv")))
    assert len(rows) == 4 and float(rows[0]["blurred_psnr"]) == pytest.approx(float(direct[0]), abs=1e-9)
    assert float(rows[0]["psnr"]) != float(rows[0]["blurred_psnr"])
    # the protocol travels with the numbers
    assert (summary["ensemble"], summary["precision"], summary["device"]) == ("none", "fp32", "cpu")
    assert rows[0]["ensemble"] == "none" and "ensemble none, fp32 on cpu" in printed

    rc = main(["eval", "--weights", str(weights), "--data", str(data), "--ensemble", "--batch", "2",
               "--json", str(tmp_path / "rot4.json"), "--csv", str(tmp_path / "rot4.csv")])
    assert rc == 0
    rot4 = json.loads((tmp_path / "rot4.json").read_text())
    assert rot4["ensemble"] == "rot4" and rot4["psnr"] != summary["psnr"]
    assert {r["ensemble"] for r in csv.DictReader(open(tmp_path / "rot4.csv"))} == {"rot4"}

    assert (
        main(
            [
                "eval",
                "--weights",
                str(weights),
                "--data",
                str(data),
                "--max-images",
                "1",
                "--json",
                str(tmp_path / "one.json"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "one.json").read_text())["count"] == 1


def test_eval_missing_data_is_one_line(tiny_weights, tmp_path, capsys):
    _, weights = tiny_weights
    assert main(["eval", "--weights", str(weights), "--data", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none: no such directory" in err


def test_eval_shards_matches_folders(tiny_weights, synth_gopro, pack_shards, tmp_path):
    _, weights = tiny_weights
    shards = pack_shards(synth_gopro, split="test")
    results = {}
    for source in (["--data", synth_gopro / "test"], ["--shards", shards]):
        out = tmp_path / f"{source[0][2:]}.json"
        assert main(["eval", "--weights", str(weights), *map(str, source), "--json", str(out)]) == 0
        results[source[0]] = json.loads(out.read_text())
    folders, packed = results["--data"], results["--shards"]
    assert packed["count"] == folders["count"] == 4
    for metric in ("psnr", "ssim", "blurred_psnr", "blurred_ssim"):
        assert packed[metric] == pytest.approx(folders[metric], abs=1e-9)  # lossless PNG shards
