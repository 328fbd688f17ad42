"""The servable MLflow model: a pyfunc wrapping the deblurring network.

Input: a DataFrame with one column `image` of encoded images in any mode Pillow reads (PNG/JPEG/...
bytes, or base64 text as JSON clients send it). Output: a DataFrame with column `image` of deblurred
PNG bytes, byte-identical to `mimo deblur` with the same weights: the same decode, `harness.infer.
deblur` with its /4 padding, the same rounding, and the same output mode (grey in -> grey out, RGBA
with the input's alpha, 16-bit grey -> 16-bit; see `harness.files.decode_any`). Runs on the GPU when
there is one, or on the device the model config names:
`mlflow.pyfunc.load_model(uri, model_config={"device": "cuda:0"})`.

Self-contained: the logged model carries the `harness` modules serving imports (`code/harness`,
MLflow's `code_paths`; nothing of training, tracking or the data pipeline) and pins the exact
versions of its requirements, so `mlflow models serve` / `load_model` work where the project is
not installed. A bad request raises `RequestError`: `mlflow models serve` answers HTTP 400 with
{"error_code": "INVALID_PARAMETER_VALUE", "message": "<one line naming the row and the problem>"}.
"""

from __future__ import annotations

import ast
import base64
import binascii
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from harness.errors import HarnessError
from harness.files import RGB, Original, decode_any, encode_like, png_bytes, to_float

try:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
    from mlflow.pyfunc import PythonModel
except ImportError:  # the serving code itself runs without MLflow (e.g. a GPU check machine)
    PythonModel = object

IMAGE_COLUMN = "image"
WEIGHTS_ARTIFACT = "weights"
PACKAGE_DIR = Path(__file__).resolve().parent
# What the serving environment installs (pinned to this environment's versions at log time).
# mlflow-skinny, not mlflow: load_model and `mlflow models serve` need only the skinny client
# (FastAPI/uvicorn scoring server included); full mlflow adds the tracking server's stack.
SERVING_DISTRIBUTIONS = ("mlflow-skinny", "cloudpickle", "numpy", "pandas", "pillow", "torch")


if PythonModel is object:
    RequestError = HarnessError
else:

    class RequestError(MlflowException):
        """A bad request: `mlflow models serve` answers 400 with `message`, one line, as its reason.

        The scoring server rewrites the message of an MlflowException from predict into
        "Failed to predict data '<repr of the whole input>'. \\nError: <message>": many lines that
        echo the request's image bytes back. The read-only `message` keeps just the reason.
        """

        def __init__(self, reason: str):
            self._reason = reason
            super().__init__(reason, error_code=INVALID_PARAMETER_VALUE)

        @property
        def message(self) -> str:
            return self._reason

        @message.setter
        def message(self, value: str) -> None:
            pass  # see the class docstring


def encode_png(chw, like: Original = RGB) -> bytes:
    """CHW float tensor in [0,1] -> PNG bytes, in the input's mode (`harness.files.encode_like`)."""
    return encode_like(chw, like)


def _unbase64(data: bytes | str) -> bytes | None:
    """The bytes that base64 text (line breaks allowed, as base64.encodebytes writes) encodes."""
    text = "".join(data.split()) if isinstance(data, str) else b"".join(bytes(data).split())
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _decode(data: bytes, name: str):
    arr, original = decode_any(data, name)
    return to_float(arr), original


def decode_image(data: bytes | str, row: int = 0):
    """Encoded image bytes (or base64 text) -> (CHW float32 tensor in [0,1], `Original` to restore
    on output); HarnessError naming the row."""
    name = f"{IMAGE_COLUMN}[{row}]"
    if isinstance(data, str):
        raw = _unbase64(data)
        if raw is None:
            raise HarnessError(f"{name}: text is not base64-encoded image bytes")
        return _decode(raw, name)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise HarnessError(f"{name}: expected encoded image bytes, got {type(data).__name__}")
    try:
        return _decode(bytes(data), name)
    except HarnessError:
        # `inputs`/`instances` requests reach predict as the base64 text's ASCII bytes: MLflow
        # base64-decodes a binary column only in dataframe_split/dataframe_records payloads.
        raw = _unbase64(data)
        if raw is None:
            raise
        return _decode(raw, name)


class DeblurModel(PythonModel):
    """Pyfunc model: encoded blurred images in, deblurred PNG bytes out."""

    def load_context(self, context) -> None:
        from harness.infer import resolve_device
        from harness.models import model_from_checkpoint

        config = getattr(context, "model_config", None) or {}
        self.device = resolve_device(config.get("device"), "model_config device")
        self.model = model_from_checkpoint(context.artifacts[WEIGHTS_ARTIFACT]).to(self.device).eval()

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        try:
            return self._predict(model_input)
        except HarnessError as exc:  # the caller's input: a 400 with the one-line reason
            raise RequestError(str(exc)) from None

    def _predict(self, model_input):
        import pandas as pd
        import torch

        from harness.infer import deblur

        out = []
        with torch.inference_mode():
            for row, data in enumerate(_image_column(model_input)):
                x, original = decode_image(data, row)
                y = deblur(self.model, x.unsqueeze(0).to(self.device, non_blocking=True))
                out.append(encode_png(y[0].cpu(), original))
        return pd.DataFrame({IMAGE_COLUMN: out})


def _image_column(model_input) -> list:
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input.columns:
            raise HarnessError(
                f"model input: expected a column {IMAGE_COLUMN!r}, got {list(model_input.columns)}"
            )
        return list(model_input[IMAGE_COLUMN])
    if isinstance(model_input, dict):
        if IMAGE_COLUMN not in model_input:
            raise HarnessError(f"model input: expected a key {IMAGE_COLUMN!r}, got {list(model_input)}")
        return list(np.atleast_1d(model_input[IMAGE_COLUMN]))
    if isinstance(model_input, (bytes, str)):
        return [model_input]
    return list(model_input)


def signature_and_example():
    """The model signature (binary `image` column in and out) and a tiny input example."""
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema

    schema = Schema([ColSpec(DataType.binary, IMAGE_COLUMN)])
    # 6x10: not a multiple of 4, so the example also exercises the padding.
    rng = np.random.default_rng(0)
    example = png_bytes(rng.integers(0, 256, (6, 10, 3), dtype=np.uint8))
    return ModelSignature(inputs=schema, outputs=schema), pd.DataFrame({IMAGE_COLUMN: [example]})


def pip_requirements() -> list[str]:
    """Exact pins of the serving environment, from this environment (given explicitly: MLflow's
    inference of them loads the model in a subprocess, slow and brittle inside a training job).
    torch is pinned without its local tag (2.13.0, not 2.13.0+cpu): a GPU host gets its CUDA build
    of the same release."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in SERVING_DISTRIBUTIONS:
        try:
            reqs.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:  # a source build without metadata: still name it
            reqs.append(dist)
    return reqs


# ---------------------------------------------------------------- the code the model carries


def _harness_imports(path: Path) -> set[str]:
    """`harness...` modules a source file imports anywhere (lazy imports inside functions too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.split(".")[0] == "harness")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] == "harness":
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)  # maybe submodules
    return names


def _module_file(name: str) -> Path | None:
    """The source of module `harness.x.y`, or None when the name is not a module (an attribute)."""
    rel = Path(*name.split(".")[1:])
    if not rel.parts:
        return PACKAGE_DIR / "__init__.py"
    for candidate in (PACKAGE_DIR / rel.with_suffix(".py"), PACKAGE_DIR / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def serving_modules() -> list[Path]:
    """Source files of `harness` that serving imports: this module and everything it imports,
    transitively, with their packages' __init__.py (import a package -> its __init__ runs)."""
    todo, seen = ["harness.pyfunc"], set()
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            path = _module_file(".".join(parts[:i]))
            if path is not None and path not in seen:
                seen.add(path)
                todo.extend(_harness_imports(path))
    return sorted(seen)


def _stage_code(root: Path) -> Path:
    """Copy `serving_modules()` to root/harness (the tree MLflow copies to the model's code/)."""
    dest = root / "harness"
    for path in serving_modules():
        target = dest / path.relative_to(PACKAGE_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return dest


def _model_kwargs(weights_path: str | Path, code_root: Path) -> dict:
    """What `log_deblur_model` and `save_deblur_model` both give MLflow: the same model either way."""
    signature, example = signature_and_example()
    return {
        "python_model": DeblurModel(),
        "artifacts": {WEIGHTS_ARTIFACT: str(weights_path)},
        "code_paths": [str(_stage_code(code_root))],
        "signature": signature,
        "input_example": example,
        "pip_requirements": pip_requirements(),
    }


def log_deblur_model(weights_path: str | Path, *, name: str = "model", metadata: dict | None = None):
    """Log the pyfunc into the active MLflow run -> `ModelInfo` (its `model_uri` is `models:/m-...`)."""
    import mlflow.pyfunc

    with tempfile.TemporaryDirectory(prefix="mimo-pyfunc-code-") as tmp:
        return mlflow.pyfunc.log_model(name=name, metadata=metadata, **_model_kwargs(weights_path, Path(tmp)))


def save_deblur_model(weights_path: str | Path, path: str | Path, *, metadata: dict | None = None) -> Path:
    """Write the same pyfunc as `log_deblur_model` to a local directory (no tracking server) -> it."""
    import mlflow.pyfunc

    with tempfile.TemporaryDirectory(prefix="mimo-pyfunc-code-") as tmp:
        mlflow.pyfunc.save_model(str(path), metadata=metadata, **_model_kwargs(weights_path, Path(tmp)))
    return Path(path)


def weights_in_model_dir(model_dir: str | Path) -> Path:
    """Path of the weights file inside a downloaded pyfunc model directory."""
    from mlflow.models import Model

    model_dir = Path(model_dir)
    flavor = Model.load(str(model_dir / "MLmodel")).flavors.get("python_function", {})
    entry = (flavor.get("artifacts") or {}).get(WEIGHTS_ARTIFACT)
    if not entry:
        raise HarnessError(
            f"{model_dir}: MLflow model has no {WEIGHTS_ARTIFACT!r} artifact (not a mimo model)"
        )
    path = model_dir / (entry["path"] if isinstance(entry, dict) else entry)
    if not path.is_file():
        raise HarnessError(f"{path}: weights file missing from the downloaded model")
    return path
