"""The logged pyfunc serves where the project is not installed: a fresh venv holding only the model's
requirements.txt loads it (`mlflow.pyfunc.load_model`) and serves it (`mlflow models serve`) with
`mimo deblur`'s pixels, in the three JSON request formats, and answers bad requests 400 with a
one-line reason."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.cli import main
from harness.files import read_image, to_uint8
from harness.infer import deblur
from harness.models import create_model, model_from_checkpoint, save_weights
from harness.pyfunc import save_deblur_model
from tests.conftest import free_port
from tests.fixtures.launch import Background, http_ok, stop_group

pytestmark = pytest.mark.slow

PROJECT_BIN = str(Path(sys.executable).parent)

# Runs inside the fresh venv, from an empty cwd: harness must come from the model's code/ only.
PROBE = """
import importlib, importlib.metadata, importlib.util, json, sys
from pathlib import Path

assert importlib.util.find_spec("harness") is None, "harness importable before the model is loaded"
import mlflow.pyfunc, pandas as pd

model_dir, src, out = map(Path, sys.argv[1:])
model = mlflow.pyfunc.load_model(str(model_dir))
files = sorted(src.iterdir())
pred = model.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}))
for f, png in zip(files, pred["image"]):
    (out / (f.stem + ".png")).write_bytes(png)
code = model_dir / "code"
carried = [".".join(p.relative_to(code).with_suffix("").parts).removesuffix(".__init__")
           for p in sorted(code.rglob("*.py"))]
for name in carried:  # each carried module imports here: nothing it needs at import is missing
    importlib.import_module(name)
installed = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
print(json.dumps({"harness": importlib.import_module("harness").__file__, "carried": carried,
                  "installed": sorted(installed)}))
"""


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def served(tmp_path_factory) -> dict[str, Path]:
    """A tiny model saved as the pyfunc; inputs (odd-size RGB, RGBA, grey); `mimo deblur` outputs."""
    root = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    weights = save_weights(create_model("mimo-unet", num_res=1, base_channels=8), root / "tiny.pth")
    rng = np.random.default_rng(0)
    src = root / "in"
    src.mkdir()
    (src / "rgb.png").write_bytes(_png(rng.integers(0, 256, (30, 22, 3), dtype=np.uint8)))
    (src / "rgba.png").write_bytes(_png(rng.integers(0, 256, (17, 26, 4), dtype=np.uint8)))
    (src / "grey.png").write_bytes(_png(rng.integers(0, 256, (21, 19), dtype=np.uint8)))
    assert main(["deblur", "--weights", str(weights), "--device", "cpu", str(src), str(root / "mimo")]) == 0
    return {"weights": weights, "model": save_deblur_model(weights, root / "model"), "in": src,
            "mimo": root / "mimo", "root": root}


def _fresh_env(venv: Path) -> dict[str, str]:
    """The fresh venv's bin first (the server execs its `uvicorn`), no project venv, no PYTHONPATH.
    Byte-code writes are allowed: the venv is installed with --no-compile, so the first import
    compiles what it needs and later processes reuse it."""
    drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONDONTWRITEBYTECODE", "VIRTUAL_ENV"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("MLFLOW_")}
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != PROJECT_BIN]
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *path])
    return env


@pytest.fixture(scope="session")
def fresh_venv(served, tmp_path_factory):
    """A venv (no system site-packages, no pip) holding only the model's requirements.txt, built
    once per session with this venv's pip (`--python`). --no-compile: byte-compiling all of torch
    costs ~50 s of the ~70; imports compile only what they use. Removed after the session (~1 GB)."""
    venv = tmp_path_factory.mktemp("serving-venv") / "venv"
    started = time.monotonic()
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
         "--no-compile", "-r", str(served["model"] / "requirements.txt")],
        capture_output=True, text=True, timeout=600,
    )
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-3000:]
    print(f"\nfresh serving venv built in {time.monotonic() - started:.1f} s", file=sys.stderr)
    yield venv
    shutil.rmtree(venv, ignore_errors=True)


@pytest.fixture(scope="module")
def server(served, fresh_venv):
    """`mlflow models serve` from the fresh venv, in its own process group; started (not waited
    for) when first requested, so its start overlaps the load test. Stopped by process group
    after this module's tests."""
    cwd = served["root"] / "server-cwd"
    cwd.mkdir()
    port = free_port()
    cmd = [str(fresh_venv / "bin" / "mlflow"), "models", "serve", "-m", str(served["model"]),
           "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)]
    bg = Background(cmd, log=served["root"] / "server.log", env=_fresh_env(fresh_venv), cwd=cwd)
    bg.url = f"http://127.0.0.1:{port}"
    try:
        yield bg
    finally:
        stop_group(bg.proc, term_grace=5.0)


def _pinned(model_dir: Path) -> list[str]:
    return (model_dir / "requirements.txt").read_text().split()


def test_model_is_self_contained_with_exact_pins(served):
    model = served["model"]
    reqs = _pinned(model)
    assert all("==" in r for r in reqs), reqs
    assert {r.split("==")[0] for r in reqs} == {"mlflow-skinny", "cloudpickle", "numpy", "pandas", "pillow",
                                                "torch"}
    carried = {str(p.relative_to(model / "code")) for p in (model / "code").rglob("*.py")}
    assert {"harness/pyfunc.py", "harness/files.py", "harness/infer.py", "harness/models/weights.py"} <= carried
    heavy = {"harness/train.py", "harness/distributed.py", "harness/cli/__init__.py", "harness/data/stream.py"}
    assert not carried & heavy and not any(c.startswith(("harness/tracking", "harness/tune")) for c in carried)


def test_fresh_venv_loads_the_model_with_mimo_deblurs_pixels(served, fresh_venv, server, tmp_path):
    # `server` is requested only to start it now: its boot overlaps this test.
    env, py = _fresh_env(fresh_venv), str(fresh_venv / "bin" / "python")
    no_harness = subprocess.run([py, "-c", "import harness"], cwd=tmp_path, env=env, capture_output=True,
                                text=True)
    assert no_harness.returncode != 0 and "No module named 'harness'" in no_harness.stderr
    out = tmp_path / "out"
    out.mkdir()
    probe = subprocess.run([py, "-c", PROBE, str(served["model"]), str(served["in"]), str(out)], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    report = json.loads(probe.stdout.strip().splitlines()[-1])
    assert Path(report["harness"]).is_relative_to(served["model"] / "code")
    assert "mlflow" not in report["installed"] and not {"deepspeed", "ray", "webdataset"} & set(report["installed"])
    # pixels: harness.infer.deblur here, in the project venv
    net = model_from_checkpoint(served["weights"]).eval()
    want = to_uint8(deblur(net, read_image(served["in"] / "rgb.png")[None])[0])
    assert np.array_equal(np.asarray(Image.open(out / "rgb.png")), want)
    for name in ("rgb", "rgba", "grey"):  # bytes: `mimo deblur`'s files, whatever the mode
        assert (out / f"{name}.png").read_bytes() == (served["mimo"] / f"{name}.png").read_bytes(), name


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def test_served_formats_give_mimo_deblurs_png_and_bad_requests_one_line(served, server):
    server.wait_for(lambda: http_ok(f"{server.url}/ping"), timeout=180)
    names = ["rgb", "rgba", "grey"]
    images = [_b64((served["in"] / f"{n}.png").read_bytes()) for n in names]
    bodies = {
        "dataframe_split": {"dataframe_split": {"columns": ["image"], "data": [[t] for t in images]}},
        "dataframe_records": {"dataframe_records": [{"image": t} for t in images]},
        "inputs": {"inputs": {"image": images}},
        "inputs-list": {"inputs": images},  # documented variants of the same two formats
        "instances": {"instances": [{"image": t} for t in images]},
    }
    for fmt, body in bodies.items():
        status, answer = _post(server.url, body)
        assert status == 200, (fmt, answer)
        for name, row in zip(names, answer["predictions"]):
            png = base64.b64decode(row["image"])
            assert png == (served["mimo"] / f"{name}.png").read_bytes(), (fmt, name)

    bad = {
        "dataframe_split": {"dataframe_split": {"columns": ["image"], "data": [[_b64(b"not an image")]]}},
        "inputs": {"inputs": {"image": [images[0], "@@ not base64 @@"]}},
    }
    for (fmt, body), row in zip(bad.items(), (0, 1)):
        status, answer = _post(server.url, body)
        assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE", (fmt, answer)
        assert answer["message"] == f"image[{row}]: not a readable image (UnidentifiedImageError)", answer
        assert set(answer) <= {"error_code", "message", "sqlstate", "error_class"}  # no stack trace
