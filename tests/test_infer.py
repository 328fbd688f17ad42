"""harness.infer: padding, tiling, self-ensemble, precision, pair discovery and evaluation."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from harness.errors import HarnessError
from harness.files import read_image
from harness.infer import (
    EvalResult,
    Pair,
    _forward,
    crop_to,
    d8_ensemble,
    deblur,
    ensemble_mode,
    evaluate,
    folder_pairs,
    pad_to_multiple,
    resolve_device,
    rot4_ensemble,
)
from harness.metrics import psnr, ssim
from harness.models import create_model


class Passthrough(nn.Module):
    """Identity-like model with MIMO-UNet's output convention (and its /4 requirement)."""

    def forward(self, x):
        assert x.shape[-2] % 4 == 0 and x.shape[-1] % 4 == 0
        return [x[..., ::4, ::4], x[..., ::2, ::2], x]


class SmallConv(nn.Module):
    """Receptive field 5x5, deliberately not flip/rotation symmetric."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))

    def forward(self, x):
        return [x[..., ::4, ::4], x[..., ::2, ::2], x + 0.2 * self.body(x)]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("mimo-unet", num_res=1, base_channels=8).eval()


def test_pad_reflects_and_crop_restores():
    x = torch.rand(1, 3, 5, 7)
    xp, size = pad_to_multiple(x)
    assert xp.shape[-2:] == (8, 8) and size == (5, 7)
    assert torch.equal(xp[..., 5:, :7], x.flip(-2)[..., 1:4, :])  # rows 3,2,1 mirrored below row 4
    assert torch.equal(crop_to(xp, size), x)
    same, _ = pad_to_multiple(torch.rand(1, 3, 8, 12))
    assert same.shape[-2:] == (8, 12)


def test_pad_tiny_image_falls_back_to_replicate():
    x = torch.rand(3, 1, 2)  # reflect cannot pad 3 rows onto 1
    xp, size = pad_to_multiple(x)
    assert xp.shape == (3, 4, 4) and size == (1, 2)
    assert torch.equal(xp[:, 3, :2], x[:, 0, :]) and torch.equal(xp[:, 0, 3], x[:, 0, 1])


def test_odd_size_through_padding(tiny):
    x = torch.rand(1, 3, 250, 333)
    y = deblur(tiny, x)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert 0 <= float(y.min()) and float(y.max()) <= 1
    with torch.no_grad():
        expected = tiny(F.pad(x, (0, 3, 0, 2), mode="reflect"))[-1][..., :250, :333].clamp(0, 1)
    assert torch.equal(y, expected)
    assert deblur(tiny, x[0]).shape == x.shape[1:]  # CHW in, CHW out


def test_eval_mode_during_deblur_and_mode_restored():
    torch.manual_seed(0)
    model = create_model("mimo-unet-plus", num_res=1, base_channels=8)  # has Dropout2d
    model.train()
    x = torch.rand(1, 3, 32, 32)
    a, b = deblur(model, x), deblur(model, x)
    assert torch.equal(a, b)  # dropout off
    assert model.training
    a.add_(1)  # an ordinary tensor, not an inference-mode one


def test_self_ensembles_of_identity_return_input():
    x = torch.rand(2, 3, 20, 28)
    for mode in (True, "rot4", "d8"):
        assert torch.allclose(deblur(Passthrough(), x, ensemble=mode), x, atol=1e-6)
    y = torch.rand(1, 3, 9, 14)  # non-square, odd: rotations swap H and W
    assert torch.allclose(d8_ensemble(lambda t: t, y), y, atol=1e-6)
    assert torch.allclose(rot4_ensemble(lambda t: t, y), y, atol=1e-6)


def test_rot4_is_the_mean_of_four_rotated_runs_in_two_batched_forwards():
    torch.manual_seed(0)
    model = create_model("mimo-unet", num_res=1, base_channels=8).eval()  # not rotation-equivariant
    calls = []
    model.register_forward_pre_hook(lambda mod, args: calls.append(tuple(args[0].shape)))
    x = torch.rand(2, 3, 18, 26)  # odd multiples of 2: every rotation is padded to /4 and cropped back
    rot4 = deblur(model, x, ensemble=True)
    # two forwards of 2 x batch: (0, 180 degrees) in the input's shape, (90, 270) in the transposed one
    assert calls == [(4, 3, 20, 28), (4, 3, 28, 20)]
    # the four rotated single runs (each padded to /4 and cropped back, unclamped), rotated back
    with torch.inference_mode():
        singles = [torch.rot90(_forward(model, torch.rot90(x, k, (-2, -1))), -k, (-2, -1)) for k in range(4)]
    mean = sum(singles) / 4
    assert float((rot4 - mean.clamp(0, 1)).abs().max()) < 1e-6  # deblur clamps the average once
    # 8-fold: 8 forwards, a different average (flips are not in the published MIMO-UNet++)
    calls.clear()
    d8 = deblur(model, x, ensemble="d8")
    assert len(calls) == 8 and float((d8 - rot4).abs().max()) > 1e-3
    plain = deblur(model, x)
    assert float((plain - rot4).abs().max()) > 1e-3
    assert ensemble_mode(True) == "rot4" and ensemble_mode(False) is None and ensemble_mode("d8") == "d8"
    with pytest.raises(HarnessError, match="ensemble: expected true/false, rot4 or d8, got 'rot8'"):
        deblur(model, x, ensemble="rot8")


def test_resolve_device_names_the_setting():
    assert resolve_device("cpu", "--device") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(HarnessError, match="--device tpu: expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu", "--device")
    if not torch.cuda.is_available():
        with pytest.raises(HarnessError, match="--device cuda: no CUDA device is available"):
            resolve_device("cuda", "--device")


def test_self_ensemble_is_equivariant():
    # every transform is undone correctly iff the ensemble commutes with the 8 transforms
    conv = SmallConv()
    fn = lambda t: conv(t)[-1]  # noqa: E731
    x = torch.rand(1, 3, 12, 16)
    with torch.no_grad():
        base = d8_ensemble(fn, x)
        assert not torch.allclose(fn(x.flip(-1)).flip(-1), fn(x), atol=1e-3)  # fn itself is not
        for k in range(4):
            moved = d8_ensemble(fn, torch.rot90(x, k, dims=(-2, -1)).flip(-1))
            assert torch.allclose(moved, torch.rot90(base, k, dims=(-2, -1)).flip(-1), atol=1e-5)


def test_tiled_equals_untiled_for_small_receptive_field():
    model = SmallConv()
    x = torch.rand(1, 3, 101, 90)
    full = deblur(model, x)
    tiled = deblur(model, x, tile=40, overlap=16)
    assert tiled.shape == full.shape
    assert float((tiled - full).abs().max()) < 5e-3
    assert float((tiled - full).abs().mean()) < 2e-4


def test_tiled_close_for_mimo_unet(tiny):
    x = torch.rand(1, 3, 130, 150)
    full = deblur(tiny, x)
    tiled = deblur(tiny, x, tile=66, overlap=32)  # tiles not /4: each is padded
    assert float(psnr(tiled, full)[0]) > 40


def test_low_precision_close_to_fp32(tiny):
    x = torch.rand(1, 3, 32, 48)
    full = deblur(tiny, x)
    for precision in ("bf16", "fp16"):
        y = deblur(tiny, x, precision=precision)
        assert y.dtype == torch.float32 and float(psnr(y, full)[0]) > 35


def test_bad_arguments_are_harness_errors(tiny):
    with pytest.raises(HarnessError, match="precision"):
        deblur(tiny, torch.rand(1, 3, 8, 8), precision="fp8")
    with pytest.raises(HarnessError, match="tile"):
        deblur(tiny, torch.rand(1, 3, 8, 8), tile=16, overlap=16)
    with pytest.raises(HarnessError, match="3 channels"):
        deblur(tiny, torch.rand(1, 1, 8, 8))


def test_folder_pairs_gopro_layout(synth_gopro):
    pairs = folder_pairs(synth_gopro / "test")
    assert [p.key for p in pairs] == [f"scene_00{s}/00000{f}.png" for s in range(2) for f in range(2)]
    assert [p.scene for p in pairs] == ["scene_000"] * 2 + ["scene_001"] * 2
    pair = pairs[3]()
    assert isinstance(pair, Pair) and pair.blur.shape == pair.sharp.shape == (3, 64, 64)
    assert torch.equal(pair.sharp, read_image(synth_gopro / "test/scene_001/sharp/000001.png"))


def _write(path, size=(16, 16), colour=(10, 20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_folder_pairs_plain_folders_and_errors(tmp_path):
    for name in ("a.png", "b.png"):
        _write(tmp_path / "set/blur" / name)
        _write(tmp_path / "set/sharp" / name)
    (tmp_path / "set/blur/.a.png.123.tmp").write_text("half-written")  # ignored
    pairs = folder_pairs(tmp_path / "set")
    assert [(p.key, p.scene) for p in pairs] == [("a.png", "set"), ("b.png", "set")]

    with pytest.raises(HarnessError, match="no such directory"):
        folder_pairs(tmp_path / "nope")
    with pytest.raises(HarnessError, match="no blur/ folder"):
        folder_pairs(tmp_path / "set/blur")
    _write(tmp_path / "set/blur/c.png")
    with pytest.raises(HarnessError, match=r"c\.png: no sharp twin"):
        folder_pairs(tmp_path / "set")
    _write(tmp_path / "set/sharp/c.png", size=(16, 20))
    with pytest.raises(HarnessError, match=r"c\.png: size 16x16 differs from its sharp twin"):
        folder_pairs(tmp_path / "set")[2]()


def test_evaluate_reports_blurred_baseline(synth_gopro, tmp_path):
    pairs = folder_pairs(synth_gopro / "test")
    result = evaluate(Passthrough(), pairs)
    loaded = [p() for p in pairs]
    blur = torch.stack([p.blur for p in loaded])
    sharp = torch.stack([p.sharp for p in loaded])
    assert result.count == 4
    assert result.blurred_psnr == pytest.approx(float(psnr(blur, sharp).mean()), abs=1e-9)
    assert result.blurred_ssim == pytest.approx(float(ssim(blur, sharp).mean()), abs=1e-9)
    assert result.psnr == pytest.approx(result.blurred_psnr, abs=1e-9)  # identity restores nothing
    assert result.blurred_psnr < 30
    scene0 = float(psnr(blur[:2], sharp[:2]).mean())
    assert result.per_scene["scene_000"]["blurred_psnr"] == pytest.approx(scene0, abs=1e-9)
    assert result.per_scene["scene_001"]["count"] == 2

    summary = result.to_dict()
    assert set(summary) == {"psnr", "ssim", "blurred_psnr", "blurred_ssim", "count", "per_scene", "ensemble",
                            "precision", "device", "seconds_per_image", "protocol"}
    assert summary["protocol"] == "default"  # the scoring protocol travels with the numbers too
    assert (summary["ensemble"], summary["precision"], summary["device"]) == ("none", "fp32", "cpu")
    assert summary["seconds_per_image"] > 0
    rows = list(csv.DictReader(open(result.write_csv(tmp_path / "rows.csv"))))
    assert rows[0]["ensemble"] == "none" and rows[0]["precision"] == "fp32"
    assert rows[0]["protocol"] == "default"
    assert [r["key"] for r in rows] == [p.key for p in pairs]
    assert float(rows[1]["blurred_psnr"]) == pytest.approx(float(psnr(blur[1:2], sharp[1:2])[0]), abs=1e-9)
    assert "scene_001" in result.format()


def test_evaluate_with_real_model_and_in_memory_pairs(tiny):
    torch.manual_seed(1)
    sharp = torch.rand(3, 36, 44)
    blur = (sharp + sharp.roll(2, -1) + sharp.roll(-2, -1)) / 3
    result = evaluate(tiny, [Pair("k0", "s", blur, sharp), Pair("k1", "s", sharp, sharp)], ensemble=True)
    restored = deblur(tiny, blur[None], ensemble=True)
    assert result.rows[0]["psnr"] == pytest.approx(float(psnr(restored, sharp[None])[0]), abs=1e-9)
    assert isinstance(result, EvalResult) and result.count == 2
    assert result.ensemble == "rot4"


def test_evaluate_batches_equal_size_frames_with_the_same_scores(tiny):
    torch.manual_seed(2)
    frames = [torch.rand(3, 24, 32) for _ in range(3)] + [torch.rand(3, 20, 28)]
    pairs = [Pair(f"k{i}", "s", f.roll(1, -1), f) for i, f in enumerate(frames)]
    calls = []
    hook = tiny.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    try:
        one = evaluate(tiny, pairs)
        assert calls == [1, 1, 1, 1]
        calls.clear()
        batched = evaluate(tiny, pairs, batch=2)
        assert calls == [2, 1, 1]  # k0+k1, k2 (the next frame has another size), k3
    finally:
        hook.remove()
    for a, b in zip(one.rows, batched.rows):
        assert a["key"] == b["key"] and a["psnr"] == pytest.approx(b["psnr"], abs=1e-6)
    with pytest.raises(HarnessError, match="batch: expected a positive number, got 0"):
        evaluate(tiny, pairs, batch=0)


def test_evaluate_rejects_bad_pairs(tiny):
    torch.manual_seed(1)
    sharp = torch.rand(3, 36, 44)
    blur = (sharp + sharp.roll(2, -1) + sharp.roll(-2, -1)) / 3
    with pytest.raises(HarnessError, match="k2: expected blur and sharp"):
        evaluate(tiny, [Pair("k2", "s", blur, sharp[:, :20])])
    with pytest.raises(HarnessError, match="no image pairs"):
        evaluate(tiny, [])


def test_evaluate_protocols_score_differently_and_say_so(tiny):
    torch.manual_seed(3)
    sharp = F.avg_pool2d(torch.rand(1, 3, 40, 48), 5, 1, 2)[0]  # smooth: ECC has gradients to follow
    blur = (sharp + sharp.roll(1, -1)) / 2
    pairs = [Pair("k0", "s", blur, sharp)]
    results = {p: evaluate(tiny, pairs, protocol=p) for p in ("default", "realblur", "basicsr-y")}
    assert {p: r.settings()["protocol"] for p, r in results.items()} == {p: p for p in results}
    assert results["realblur"].blurred_psnr == pytest.approx(results["default"].blurred_psnr, abs=1e-9)
    assert results["basicsr-y"].psnr != results["default"].psnr
    crop = evaluate(tiny, pairs, protocol="basicsr-y", crop_border=4)
    assert crop.settings()["protocol"] == "basicsr-y:crop4" and "protocol basicsr-y:crop4" in crop.format()
    with pytest.raises(HarnessError, match="only basicsr-y crops"):
        evaluate(tiny, pairs, crop_border=4)
    with pytest.raises(HarnessError, match="protocol 'psnr-y'"):
        evaluate(tiny, pairs, protocol="psnr-y")

