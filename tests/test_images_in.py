"""Any image in: grey, alpha, palette, 16-bit and CMYK inputs are deblurred (the model sees RGB)
and written in the input's mode; an unreadable file in a directory is named and skipped (exit 1)."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from harness.cli import build_parser, main
from harness.files import decode_any, decode_rgb8, encode_like, to_float, to_uint8
from harness.infer import deblur
from harness.models import create_model, save_weights

SIZE = (22, 30)  # H, W: neither a multiple of 4, so padding is exercised too


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("mimo-unet", num_res=1, base_channels=8).eval()
    return model, save_weights(model, tmp_path_factory.mktemp("weights") / "tiny.pth")


def _pixels(seed: int, channels: int) -> np.ndarray:
    """A smooth gradient plus noise (not flat: the model must visibly change it)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, SIZE[1])[None, :, None] + np.linspace(0, 40, SIZE[0])[:, None, None]
    return np.clip(ramp + rng.normal(0, 12, (*SIZE, channels)), 0, 255).astype(np.uint8)


def _grey16(seed: int) -> np.ndarray:
    return (_pixels(seed, 1)[..., 0].astype(np.uint16) * 257 + np.uint16(seed * 37 % 200))


# name -> (make the image file at `path`, the mode the output PNG must have)
def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


MODES = {
    "RGB": (lambda p: _save(Image.fromarray(_pixels(1, 3)), p.with_suffix(".png")), "RGB"),
    "L": (lambda p: _save(Image.fromarray(_pixels(2, 1)[..., 0]), p.with_suffix(".png")), "L"),
    "LA": (lambda p: _save(Image.fromarray(_pixels(3, 2)), p.with_suffix(".png")), "LA"),
    "RGBA": (lambda p: _save(Image.fromarray(_pixels(4, 4)), p.with_suffix(".png")), "RGBA"),
    "P": (lambda p: _save(Image.fromarray(_pixels(5, 3)).quantize(32), p.with_suffix(".png")), "RGB"),
    "P-transparent": (
        lambda p: _save(Image.fromarray(_pixels(6, 3)).quantize(32), p.with_suffix(".png"), transparency=0),
        "RGBA",
    ),
    "1": (lambda p: _save(Image.fromarray(_pixels(7, 1)[..., 0] > 100), p.with_suffix(".png")), "L"),
    "I;16": (lambda p: _save(Image.fromarray(_grey16(8)), p.with_suffix(".png")), "I;16"),
    "I;16-tiff": (lambda p: _save(Image.fromarray(_grey16(9)), p.with_suffix(".tif")), "I;16"),
    "CMYK-jpeg": (
        lambda p: _save(Image.fromarray(_pixels(10, 3)).convert("CMYK"), p.with_suffix(".jpg"), quality=95),
        "RGB",
    ),
}


def _deblurred_rgb(model, src) -> np.ndarray:
    """What the model makes of the input's plain RGB conversion (the reference for every mode)."""
    return to_uint8(deblur(model, to_float(decode_rgb8(src, convert=True))[None])[0])


def _alpha(src) -> np.ndarray:
    with Image.open(src) as img:
        return np.asarray(img.convert("RGBA"))[..., 3]


def _grey(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("L")).astype(np.int32)


def _check_output(model, src, out, mode: str) -> None:
    """`out` is in `mode`, of the input's size, and is the deblurred RGB version in that mode."""
    with Image.open(out) as img:
        assert (img.format, img.mode, img.size) == ("PNG", mode, SIZE[::-1]), out
        got = np.asarray(img)
    ref = _deblurred_rgb(model, src)
    assert not np.array_equal(ref, decode_rgb8(src, convert=True))  # the model did change it
    if mode == "RGB":
        assert np.array_equal(got, ref)
    elif mode == "RGBA":
        assert np.array_equal(got[..., :3], ref) and np.array_equal(got[..., 3], _alpha(src))
    elif mode in ("L", "LA"):  # grey of the float output vs Pillow's grey of the rounded one
        grey = got[..., 0] if mode == "LA" else got
        assert np.abs(grey.astype(np.int32) - _grey(ref)).max() <= 1
        if mode == "LA":
            assert np.array_equal(got[..., 1], _alpha(src))
    else:  # 16-bit: the model saw all 16 bits, so it is only close to the 8-bit reference ...
        assert got.dtype == np.uint16
        assert np.abs(got / 65535.0 - _grey(ref) / 255.0).max() <= 3 / 255
        assert np.any(got % 257 != 0)  # ... and the output keeps 16-bit precision


@pytest.mark.parametrize("case", MODES)
def test_each_mode_is_deblurred_and_written_in_its_mode(case, tiny, tmp_path):
    model, weights = tiny
    make, mode = MODES[case]
    src = make(tmp_path / "in")
    out = tmp_path / "out.png"
    assert main(["deblur", "--weights", str(weights), "--device", "cpu", str(src), str(out)]) == 0
    _check_output(model, src, out, mode)


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "RGBA", "I;16"])
def test_codec_round_trip_is_lossless_in_each_mode(mode):
    arrays = {"RGB": _pixels(1, 3), "L": _pixels(2, 1)[..., 0], "LA": _pixels(3, 2), "RGBA": _pixels(4, 4),
              "I;16": _grey16(5)}
    buf = io.BytesIO()
    Image.fromarray(arrays[mode]).save(buf, format="PNG")
    arr, original = decode_any(buf.getvalue(), "x")
    assert arr.shape == (*SIZE, 3) and original.mode == mode
    back = Image.open(io.BytesIO(encode_like(to_float(arr), original)))  # an identity "model"
    assert back.mode == mode and np.array_equal(np.asarray(back), arrays[mode])


def _truncated_png(path):
    buf = io.BytesIO()
    Image.fromarray(_pixels(0, 3)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue()[:80])  # a real PNG header, the data cut short
    return path


def test_directory_names_the_unreadable_file_writes_the_others_exits_1(tiny, tmp_path, capsys):
    model, weights = tiny
    src = tmp_path / "in"
    src.mkdir()
    expected = {}
    for stem, case in zip("abdef", ["RGBA", "L", "I;16-tiff", "CMYK-jpeg", "P"]):
        make, mode = MODES[case]
        expected[make(src / stem)] = mode
    bad = _truncated_png(src / "c.png")  # sorted in the middle: files after it must be written too
    out = tmp_path / "out"
    rc = main(["deblur", "--weights", str(weights), str(src), str(out)])
    captured = capsys.readouterr()
    assert rc == 1
    err = captured.err.splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "not a readable image" in err[0], captured.err
    assert "5 of 6" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "d.png", "e.png", "f.png"]
    for path, mode in expected.items():
        _check_output(model, path, out / (path.stem + ".png"), mode)


def test_one_unreadable_file_is_still_a_one_line_error_exit_2(tiny, tmp_path, capsys):
    _, weights = tiny
    out = tmp_path / "out.png"
    assert main(["deblur", "--weights", str(weights), str(_truncated_png(tmp_path / "c.png")), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "c.png: not a readable image" in err and not out.exists()


def test_served_model_gives_mimo_deblurs_bytes_for_any_mode(tiny, tmp_path, capsys):
    import mlflow.pyfunc

    from harness.pyfunc import RequestError, save_deblur_model

    _, weights = tiny
    src = tmp_path / "in"
    src.mkdir()
    files = [MODES[case][0](src / case.replace(";", "")) for case in ("RGBA", "L", "LA", "I;16", "P")]
    assert main(["deblur", "--weights", str(weights), str(src), str(tmp_path / "out")]) == 0
    served = mlflow.pyfunc.load_model(str(save_deblur_model(weights, tmp_path / "model")))
    out = served.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}))
    for f, png in zip(files, out["image"]):
        assert png == (tmp_path / "out" / (f.stem + ".png")).read_bytes(), f.name
    with pytest.raises(RequestError, match=r"^image\[1\]: not a readable image"):
        served.predict(pd.DataFrame({"image": [files[0].read_bytes(), b"\x89PNG\r\n\x1a\n cut"]}))


def test_eval_accepts_alpha_and_grey_frames(tiny, tmp_path):
    _, weights = tiny
    for side, case in (("blur", "RGBA"), ("sharp", "L")):
        (tmp_path / "pair" / side).mkdir(parents=True)
        MODES[case][0](tmp_path / "pair" / side / "000")
    summary = tmp_path / "r.json"
    assert main(["eval", "--weights", str(weights), "--data", str(tmp_path / "pair"), "--json", str(summary)]) == 0
    assert json.loads(summary.read_text())["count"] == 1


def test_device_and_precision_help_name_their_defaults():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for command in ("deblur", "eval"):
        opts = {a.dest: a.help for a in sub.choices[command]._actions}
        assert "auto (the default" in opts["device"] and "fp32 (the default" in opts["precision"]
