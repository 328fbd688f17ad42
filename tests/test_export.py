"""`mimo export --format`: safetensors (+ config.json) round trips, ONNX in onnxruntime, torch.export,
and the one-line errors of bad safetensors exports."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import harness.cli
from harness.checkpoint import COMPLETE, EMA_FILE, file_crc32
from harness.cli import export as cli_export
from harness.export import FORMATS, full_scale, infer_format, save_safetensors
from harness.files import load_rgb_array
from harness.infer import crop_to, deblur, pad_to_multiple
from harness.models import create_model, model_from_checkpoint, save_weights

TINY = {"num_res": 1, "base_channels": 8}


@pytest.fixture
def mimo(monkeypatch):
    """harness.cli.main with `export` served by harness/cli/export.py (whether or not it is wired in
    COMMAND_MODULES yet; `models` for deblur)."""
    monkeypatch.setattr(harness.cli, "COMMAND_MODULES", ["models", "export"])
    return lambda *args: harness.cli.main([str(a) for a in args])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny MIMO-UNet (random weights) and its public .pkl."""
    torch.manual_seed(0)
    model = create_model("mimo-unet", **TINY).eval()
    return model, save_weights(model, tmp_path_factory.mktemp("tiny") / "tiny.pkl")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """An odd-size (37x53) RGB PNG: padding to /4 and cropping back are exercised."""
    path = tmp_path_factory.mktemp("img") / "odd.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(path)
    return path


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_safetensors_directory_round_trip_and_deblur(mimo, tiny, image, tmp_path, capsys):
    model, pkl = tiny
    out = tmp_path / "hf"
    assert mimo("export", "--weights", pkl, "--out", out, "--format", "safetensors") == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert capsys.readouterr().out.split() == [str(out / "model.safetensors"), str(out / "config.json")]

    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "mimo-unet" and config["overrides"] == TINY
    assert config["hyperparameters"] == {**TINY, "dropout": 0.0}
    assert config["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert config["weights"] == "model.safetensors" and config["dtype"] == "float32"
    assert config["input"]["layout"] == "NCHW" and config["input"]["multiple_of"] == 4
    assert config["source"] == {"weights": str(pkl)}

    for source in (out, out / "model.safetensors"):  # the directory (HF) or the file inside it
        loaded = model_from_checkpoint(source)
        assert loaded.arch == model.arch and _same_weights(loaded, model) and not loaded.training

    pngs = {}
    for name, weights in (("pkl", pkl), ("dir", out), ("file", out / "model.safetensors")):
        pngs[name] = tmp_path / f"{name}.png"
        assert mimo("deblur", "--weights", weights, "--device", "cpu", image, pngs[name]) == 0
    assert np.array_equal(load_rgb_array(pngs["dir"]), load_rgb_array(pngs["pkl"]))
    assert np.array_equal(load_rgb_array(pngs["file"]), load_rgb_array(pngs["pkl"]))


def test_safetensors_named_files_and_conversion_back(mimo, tiny, tmp_path):
    model, pkl = tiny
    plus = create_model("mimo-unet-plus", **TINY).eval()  # dropout 0.1: an override kept apart from TINY
    plus_pkl = save_weights(plus, tmp_path / "plus.pkl")
    # Two exports in one directory: each NAME.safetensors has its own NAME.config.json.
    assert mimo("export", "--weights", pkl, "--out", tmp_path / "a.safetensors") == 0  # format from suffix
    assert mimo("export", "--weights", plus_pkl, "--out", tmp_path / "b.safetensors") == 0
    assert json.loads((tmp_path / "a.config.json").read_text())["architecture"] == "mimo-unet"
    assert json.loads((tmp_path / "b.config.json").read_text())["architecture"] == "mimo-unet-plus"
    assert model_from_checkpoint(tmp_path / "b.safetensors").arch == plus.arch

    # A lone file (config lost, renamed) still rebuilds from the header metadata, without pickle.
    (tmp_path / "a.config.json").unlink()
    shutil.copy(tmp_path / "a.safetensors", tmp_path / "renamed.bin")
    for lone in (tmp_path / "a.safetensors", tmp_path / "renamed.bin"):
        assert _same_weights(model_from_checkpoint(lone), model)

    # safetensors -> pkl: the public checkpoint again, architecture included.
    assert mimo("export", "--weights", tmp_path / "b.safetensors", "--out", tmp_path / "back.pkl") == 0
    back = torch.load(tmp_path / "back.pkl", weights_only=True)
    assert back["model_name"] == "mimo-unet-plus" and back["model_overrides"] == plus.arch["overrides"]
    assert _same_weights(model_from_checkpoint(tmp_path / "back.pkl"), plus)


def test_run_dir_ema_export(mimo, tiny, tmp_path):
    """RUN_DIR with --ema, on a hand-made complete tag (a real run needs DeepSpeed: tests/test_train.py)."""
    model, pkl = tiny
    tag_dir = tmp_path / "run" / "checkpoints" / "step00000007"
    tag_dir.mkdir(parents=True)
    shutil.copy(pkl, tag_dir / EMA_FILE)
    entry = {"size": (tag_dir / EMA_FILE).stat().st_size, "crc32": file_crc32(tag_dir / EMA_FILE)}
    (tag_dir / COMPLETE).write_text(json.dumps({"step": 7, "world_size": 1, "files": {EMA_FILE: entry}}))

    assert mimo("export", tmp_path / "run", "--ema", "--out", tmp_path / "ema.pkl") == 0
    assert (tmp_path / "ema.pkl").read_bytes() == pkl.read_bytes()  # pkl: the EMA file as it is
    assert mimo("export", tmp_path / "run", "--ema", "--out", f"{tmp_path}/hf/") == 0  # a directory -> safetensors
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert config["source"] == {"run_dir": str(tmp_path / "run"), "tag": "step00000007", "step": 7, "ema": True}
    assert _same_weights(model_from_checkpoint(tmp_path / "hf"), model)


@pytest.fixture(scope="module")
def onnx_export(tiny, tmp_path_factory):
    """One ONNX export (the slow part: ~15 s on 2 cores), checked with --verify on the way."""
    _, pkl = tiny
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setattr(harness.cli, "COMMAND_MODULES", ["export"])
        assert harness.cli.main(["export", "--weights", str(pkl), "--out", str(out), "--verify"]) == 0
    assert printed.getvalue().startswith(f"{out}\nverified in onnxruntime: max abs difference"), printed.getvalue()
    return out


def test_onnx_matches_pytorch_on_odd_sizes(onnx_export, tiny):
    model, _ = tiny
    session = ort.InferenceSession(str(onnx_export), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, outp.name) == ("input", "output")
    assert inp.shape[0] == "batch" and inp.shape[1] == 3 and all(isinstance(d, str) for d in inp.shape[2:])

    # The caller pads (reflect, to /4) and crops back, as `mimo deblur` does around the model.
    x = torch.rand(1, 3, 37, 53, generator=torch.Generator().manual_seed(1))
    padded, size = pad_to_multiple(x, 4)
    got = crop_to(torch.from_numpy(session.run(None, {"input": padded.numpy()})[0]), size)
    assert got.shape == x.shape
    assert (got - deblur(model, x)).abs().max().item() < 1e-4

    # Dynamic axes: another batch size and another (multiple-of-4) size, same graph.
    x = torch.rand(2, 3, 24, 44, generator=torch.Generator().manual_seed(2))
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    with torch.inference_mode():
        assert (got - full_scale(model)(x)).abs().max().item() < 1e-4


def test_torch_export_pt2(mimo, tiny, tmp_path):
    model, pkl = tiny
    out = tmp_path / "tiny.pt2"
    assert mimo("export", "--weights", pkl, "--out", out) == 0  # format from the .pt2 suffix
    program = torch.export.load(out).module()
    for shape in [(1, 3, 40, 52), (3, 3, 16, 8)]:
        x = torch.rand(*shape, generator=torch.Generator().manual_seed(3))
        with torch.inference_mode():
            assert (program(x) - full_scale(model)(x)).abs().max().item() < 1e-5


def test_format_from_out(tmp_path):
    assert [infer_format(tmp_path / n) for n in ("w.pkl", "w.pth", "w.safetensors", "m.onnx", "m.pt2")] == [
        "pkl", "pkl", "safetensors", "onnx", "torch-export"]
    assert infer_format(tmp_path) == "safetensors" and infer_format("new/dir/") == "safetensors"
    assert cli_export.FORMATS == FORMATS  # the parser's copy (it imports no torch)


def _bad_dirs(tmp_path, pkl):
    """name -> (weights path, expected error text)."""
    good = tmp_path / "good"
    save_safetensors(model_from_checkpoint(pkl), good)  # loads; each case below breaks one thing
    cases = {}

    def variant(name, mutate):
        d = tmp_path / name
        shutil.copytree(good, d)
        mutate(d)
        return d

    def config(d, **changes):
        body = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**body, **changes}))

    d = tmp_path / "empty"
    d.mkdir()
    cases["no weights"] = (d, "empty: no model.safetensors (expected a directory with model.safetensors + config.json")
    d = variant("noconfig", lambda d: (d / "config.json").unlink())
    cases["no config"] = (d, "noconfig/config.json: missing")
    d = variant("badjson", lambda d: (d / "config.json").write_text("{not json"))
    cases["bad json"] = (d, "badjson/config.json: not valid JSON")
    d = variant("badarch", lambda d: config(d, architecture="unet"))
    cases["bad arch"] = (d, "badarch/config.json: 'architecture' must be one of mimo-unet, mimo-unet-plus, got 'unet'")
    d = variant("badover", lambda d: config(d, overrides={"depth": 3}))
    cases["bad override"] = (d, "badover/config.json: model mimo-unet: unknown override(s) ['depth']")
    d = variant("mismatch", lambda d: config(d, overrides={"num_res": 2, "base_channels": 8}))
    cases["tensor names"] = (d, "mismatch/model.safetensors: weights do not fit model mimo-unet")
    d = variant("torn", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]))
    cases["torn file"] = (d, "torn/model.safetensors: not a readable safetensors file")
    return cases


def test_bad_safetensors_dirs_are_one_line_errors(mimo, tiny, image, tmp_path, capsys):
    _, pkl = tiny
    for name, (weights, expected) in _bad_dirs(tmp_path, pkl).items():
        assert mimo("deblur", "--weights", weights, "--device", "cpu", image, tmp_path / "o.png") == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("mimo deblur: error: "), (name, err)
        assert expected in err, (name, err)
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--weights", "{pkl}", "--out", "{tmp}/w.safetensors", "--opset", "17"],
         "--opset/--verify apply to --format onnx only, not safetensors"),
        (["--weights", "{pkl}", "--out", "{tmp}/w.pkl", "--ema"], "--ema/--tag select a run's checkpoint"),
        (["{tmp}", "--out", "{tmp}/w.pkl", "--model", "mimo-unet"], "--model applies to --weights only"),
        (["{tmp}", "--out", "{tmp}/w.onnx"], "not a run directory (no checkpoints/)"),
        (["--weights", "{tmp}/w.onnx", "--out", "{tmp}/x.pkl"], "w.onnx: no such weights file or directory"),
        (["--weights", "{pkl}", "--out", "{tmp}", "--format", "onnx"], "is a directory; --format onnx writes one file"),
    ],
)
def test_export_errors_are_one_line(mimo, tiny, tmp_path, capsys, args, expected):
    _, pkl = tiny
    argv = [a.format(pkl=pkl, tmp=tmp_path) for a in args]
    assert mimo("export", *argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mimo export: error: ") and expected in err, err
