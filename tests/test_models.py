"""MIMO-UNet family: exact reference layout, forward contract, weight files, FLOPs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.errors import HarnessError
from harness.models import (
    MODEL_NAMES,
    count_flops,
    create_model,
    load_weights,
    model_from_checkpoint,
    read_checkpoint,
    save_weights,
)

TINY = {"base_channels": 8, "num_res": 1}

# name -> (trainable params, state-dict tensors, GFLOP 256x256, GFLOP 1280x720) from the paper / docs/design.md §1
REFERENCE = {
    "mimo-unet": (6_807_171, 244, 127.5, 1792),
    "mimo-unet-plus": (16_107_651, 532, 301.4, 4239),
}
KEY_SHAPES = {
    "Encoder.0.layers.0.main.0.main.0.weight": (32, 32, 3, 3),
    "SCM1.main.0.main.0.weight": (32, 3, 3, 3),
    "SCM2.conv.main.0.weight": (64, 64, 1, 1),
    "AFFs.1.conv.0.main.0.weight": (64, 224, 1, 1),
    "ConvsOut.0.main.0.weight": (3, 128, 3, 3),
    "feat_extract.3.main.0.weight": (128, 64, 4, 4),  # ConvTranspose2d: (in, out, k, k)
    "FAM1.merge.main.0.weight": (128, 128, 3, 3),
    "Convs.1.main.0.bias": (32,),
}


@pytest.fixture(scope="module")
def full_models() -> dict[str, nn.Module]:
    return {name: create_model(name) for name in MODEL_NAMES}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_full_models_match_reference_layout_and_cost(full_models, name):
    model = full_models[name]
    params, tensors, gflop_256, gflop_720p = REFERENCE[name]
    sd = model.state_dict()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == params
    assert len(sd) == tensors
    for key, shape in KEY_SHAPES.items():
        assert tuple(sd[key].shape) == shape, key
    num_res = model.arch["overrides"].get("num_res", 20 if name.endswith("plus") else 8)
    assert f"Decoder.2.layers.{num_res - 1}.main.1.main.0.weight" in sd
    assert f"Decoder.2.layers.{num_res}.main.1.main.0.weight" not in sd
    assert count_flops(model, 256, 256) / 1e9 == pytest.approx(gflop_256, rel=0.01)
    assert count_flops(model, 720, 1280) / 1e9 == pytest.approx(gflop_720p, rel=0.01)


def test_dropout_only_in_plus_and_only_in_training():
    torch.manual_seed(0)
    plain, plus = create_model("mimo-unet", **TINY), create_model("mimo-unet-plus", **TINY)
    assert isinstance(plus.drop1, nn.Dropout2d) and plus.drop1.p == pytest.approx(0.1)
    assert isinstance(plus.drop2, nn.Dropout2d)
    assert not any(isinstance(m, nn.Dropout2d) for m in plain.modules())
    # same weights except the AFF dropout: key layouts agree
    assert plain.state_dict().keys() == plus.state_dict().keys()
    x = torch.rand(1, 3, 32, 32)
    plus.train()
    assert not torch.equal(plus(x)[2], plus(x)[2])
    plus.eval()
    assert torch.equal(plus(x)[2], plus(x)[2])


def test_forward_returns_three_scales_coarse_first():
    model = create_model("mimo-unet", **TINY).eval()
    with torch.no_grad():
        outs = model(torch.rand(2, 3, 256, 256))
        assert [tuple(o.shape) for o in outs] == [(2, 3, 64, 64), (2, 3, 128, 128), (2, 3, 256, 256)]
        outs = model(torch.rand(1, 3, 36, 52))
        assert [tuple(o.shape[-2:]) for o in outs] == [(9, 13), (18, 26), (36, 52)]


def test_forward_rejects_sizes_not_multiple_of_4():
    model = create_model("mimo-unet", **TINY)
    with pytest.raises(HarnessError, match="divisible by 4.*250x333"):
        model(torch.rand(1, 3, 250, 333))
    with pytest.raises(HarnessError, match="RGB"):
        model(torch.rand(1, 1, 32, 32))


def test_zero_residual_model_is_identity_at_every_scale():
    # with the output heads zeroed, MOSD's outputs are exactly the (nearest-)downsampled inputs
    model = create_model("mimo-unet", **TINY).eval()
    for head in (model.ConvsOut[0], model.ConvsOut[1], model.feat_extract[5]):
        nn.init.zeros_(head.main[0].weight)
        nn.init.zeros_(head.main[0].bias)
    x = torch.rand(1, 3, 16, 24)
    with torch.no_grad():
        s4, s2, s1 = model(x)
    assert torch.equal(s1, x)
    assert torch.equal(s2, x[..., ::2, ::2])
    assert torch.equal(s4, x[..., ::4, ::4])


def test_create_model_errors_list_valid_choices():
    with pytest.raises(HarnessError, match="mimo-unet, mimo-unet-plus"):
        create_model("mimo-unet-pro")
    with pytest.raises(HarnessError, match=r"\['width'\].*base_channels"):
        create_model("mimo-unet", width=8)
    with pytest.raises(HarnessError, match="num_res must be an integer"):
        create_model("mimo-unet", num_res=0)
    with pytest.raises(HarnessError, match="dropout"):
        create_model("mimo-unet-plus", dropout=1.5)


def test_arch_records_name_and_overrides():
    model = create_model("mimo-unet-plus", num_res=2, base_channels=8, dropout=0.2)
    assert model.arch == {
        "name": "mimo-unet-plus",
        "overrides": {"num_res": 2, "base_channels": 8, "dropout": 0.2},
    }
    assert model.drop1.p == pytest.approx(0.2)
    assert len(model.Encoder[0].layers) == 2
    assert create_model("mimo-unet").arch == {"name": "mimo-unet", "overrides": {}}


def test_channels_last_bf16_autocast_and_compile_friendly():
    torch.manual_seed(0)
    model = create_model("mimo-unet-plus", **TINY).eval()
    x = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        ref = model(x)
        cl_model = create_model("mimo-unet-plus", **TINY).eval()
        cl_model.load_state_dict(model.state_dict())
        cl_model = cl_model.to(memory_format=torch.channels_last)
        cl = cl_model(x.contiguous(memory_format=torch.channels_last))
        for a, b in zip(ref, cl):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
        for a, b in zip(ref, low):
            assert torch.isfinite(b).all()
            torch.testing.assert_close(b.float(), a, rtol=0.05, atol=0.05)
        # fullgraph=True fails on any graph break (Python-side data-dependent control flow)
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        for a, b in zip(ref, compiled(x)):
            torch.testing.assert_close(a, b)


def test_count_flops_scales_with_pixels_and_ignores_model_state():
    model = create_model("mimo-unet", **TINY)
    small, big = count_flops(model, 32, 32), count_flops(model, 64, 128)
    assert big == 8 * small
    assert next(model.parameters()).device.type == "cpu" and model.training


# ---- weight files -------------------------------------------------------------------------


def _tiny(name="mimo-unet", seed=0, **over):
    torch.manual_seed(seed)
    return create_model(name, **{**TINY, **over}).eval()


def test_save_weights_round_trips_with_architecture(tmp_path):
    model = _tiny("mimo-unet-plus")
    path = save_weights(model, tmp_path / "w.pkl", step=7, val_psnr=30.5)
    raw = torch.load(path, weights_only=True)
    assert raw["model_name"] == "mimo-unet-plus" and raw["model_overrides"] == TINY
    assert raw["step"] == 7 and raw["val_psnr"] == 30.5
    assert raw["model"].keys() == model.state_dict().keys()
    ckpt = read_checkpoint(path)
    assert ckpt["model_name"] == "mimo-unet-plus" and ckpt["model_overrides"] == TINY

    rebuilt = model_from_checkpoint(path)
    assert rebuilt.arch == model.arch and not rebuilt.training
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x), rebuilt(x)))
    other = load_weights(_tiny("mimo-unet-plus", seed=1), path)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))
    assert [p.name for p in tmp_path.iterdir()] == ["w.pkl"]  # no temp files left behind


def test_save_weights_stores_fp32_cpu_from_bf16_channels_last(tmp_path):
    model = _tiny().to(torch.bfloat16).to(memory_format=torch.channels_last)
    sd = torch.load(save_weights(model, tmp_path / "w.pkl"), weights_only=True)["model"]
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in sd.values())
    with pytest.raises(HarnessError, match="reserved"):
        save_weights(model, tmp_path / "x.pkl", model_name="other")


def test_wrapped_models_save_bare_keys_and_architecture(tmp_path):
    model = _tiny()
    flops = count_flops(model, 32, 32)
    for wrapped in (nn.DataParallel(model), torch.compile(model, backend="eager")):
        assert count_flops(wrapped, 32, 32) == flops
        raw = torch.load(save_weights(wrapped, tmp_path / "w.pkl"), weights_only=True)
        assert raw["model"].keys() == model.state_dict().keys()
        assert raw["model_name"] == "mimo-unet" and raw["model_overrides"] == TINY


def test_bare_and_ddp_prefixed_state_dicts_load(tmp_path):
    model = _tiny()
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "ddp.pth")
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "public.pkl")
    for name in ("ddp.pth", "public.pkl"):
        assert read_checkpoint(tmp_path / name)["model_name"] is None
        loaded = load_weights(_tiny(seed=1), tmp_path / name)
        assert torch.equal(loaded.SCM1.conv.main[0].weight, model.SCM1.conv.main[0].weight)
        with pytest.raises(
            HarnessError, match=rf"{name}: the file does not record its architecture.*mimo-unet"
        ):
            model_from_checkpoint(tmp_path / name)
        built = model_from_checkpoint(tmp_path / name, "mimo-unet", **TINY)
        assert torch.equal(built.feat_extract[5].main[0].bias, model.feat_extract[5].main[0].bias)


def test_wrong_architecture_is_one_error_naming_file_and_keys(tmp_path):
    path = save_weights(_tiny(num_res=2), tmp_path / "w.pkl")
    with pytest.raises(HarnessError) as err:
        load_weights(_tiny(num_res=1), path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    assert "24 unexpected (Encoder.0.layers.1.main.0.main.0.weight" in msg and "missing" not in msg

    with pytest.raises(HarnessError) as err:
        load_weights(_tiny(num_res=2, base_channels=4), path)
    msg = str(err.value)
    assert (
        "shape mismatch" in msg
        and "Encoder.0.layers.0.main.0.main.0.weight (8, 8, 3, 3) vs (4, 4, 3, 3)" in msg
    )

    with pytest.raises(HarnessError, match=r"w.pkl: weights do not fit model mimo-unet.*missing"):
        model_from_checkpoint(path, num_res=3)


def test_unreadable_files_are_one_line_errors(tmp_path):
    with pytest.raises(HarnessError, match="nope.pkl: no such weights file"):
        read_checkpoint(tmp_path / "nope.pkl")
    (tmp_path / "text.pkl").write_text("not a checkpoint\n")
    with pytest.raises(HarnessError, match="text.pkl: not a readable PyTorch weights file"):
        load_weights(_tiny(), tmp_path / "text.pkl")
    torch.save({"optimizer": {"lr": 1e-4}}, tmp_path / "opt.pkl")
    with pytest.raises(HarnessError, match="opt.pkl: not a model checkpoint"):
        read_checkpoint(tmp_path / "opt.pkl")
    torch.save({"model": {"a": 1}}, tmp_path / "nontensor.pkl")
    with pytest.raises(HarnessError, match="nontensor.pkl: not a model checkpoint.*not tensors"):
        read_checkpoint(tmp_path / "nontensor.pkl")


class _Payload:
    """Unpickling this (without weights_only) would create a file: proves it is never executed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_weights_are_loaded_with_weights_only(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {"x": torch.zeros(1)}, "evil": _Payload(marker)}, tmp_path / "evil.pkl")
    with pytest.raises(HarnessError, match="evil.pkl: not a readable PyTorch weights file"):
        read_checkpoint(tmp_path / "evil.pkl")
    assert not marker.exists()
