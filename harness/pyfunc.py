"""The servable MLflow model: a pyfunc wrapping the deblurring network.

Input: a DataFrame with one column `image` of encoded 8-bit RGB images (PNG/JPEG/... bytes, or
base64 text as JSON clients send it). Output: a DataFrame with column `image` of deblurred PNG
bytes, pixel-identical to `mimo deblur` with the same weights (same decode, `harness.infer.deblur`
with its /4 padding, same 8-bit rounding). Runs on the GPU when there is one, or on the device
named by the model config: `mlflow.pyfunc.load_model(uri, model_config={"device": "cuda:0"})`.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

import numpy as np

from harness.errors import HarnessError
from harness.files import decode_rgb8, png_bytes, to_float, to_uint8

try:
    from mlflow.pyfunc import PythonModel
except ImportError:  # the serving code itself runs without MLflow (e.g. a GPU check machine)
    PythonModel = object

IMAGE_COLUMN = "image"
WEIGHTS_ARTIFACT = "weights"


def encode_png(chw) -> bytes:
    """CHW float tensor in [0,1] -> PNG bytes (8-bit, rounded like `harness.files.write_image`)."""
    return png_bytes(to_uint8(chw))


def decode_image(data: bytes | str, row: int = 0):
    """Encoded image bytes (or base64 text) -> CHW float32 tensor in [0,1]; HarnessError naming the row."""
    if isinstance(data, str):
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise HarnessError(f"{IMAGE_COLUMN}[{row}]: text is not base64-encoded image bytes") from None
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise HarnessError(f"{IMAGE_COLUMN}[{row}]: expected encoded image bytes, got {type(data).__name__}")
    return to_float(decode_rgb8(data, f"{IMAGE_COLUMN}[{row}]"))


class DeblurModel(PythonModel):
    """Pyfunc model: encoded blurred images in, deblurred PNG bytes out."""

    def load_context(self, context) -> None:
        from harness.infer import resolve_device
        from harness.models import model_from_checkpoint

        config = getattr(context, "model_config", None) or {}
        self.device = resolve_device(config.get("device"), "model_config device")
        self.model = model_from_checkpoint(context.artifacts[WEIGHTS_ARTIFACT]).to(self.device).eval()

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd
        import torch

        from harness.infer import deblur

        images = _image_column(model_input)
        out = []
        with torch.inference_mode():
            for row, data in enumerate(images):
                x = decode_image(data, row).unsqueeze(0).to(self.device, non_blocking=True)
                out.append(encode_png(deblur(self.model, x)[0].cpu()))
        return pd.DataFrame({IMAGE_COLUMN: out})


def _image_column(model_input) -> list:
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input.columns:
            raise HarnessError(
                f"model input: expected a column {IMAGE_COLUMN!r}, got {list(model_input.columns)}"
            )
        return list(model_input[IMAGE_COLUMN])
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
    """Pinned requirements of the serving environment (given explicitly: MLflow's inference of
    them loads the model in a subprocess, which is slow and brittle inside a training job).
    The `harness` package itself must be installed there too (`pip install mimo-harness`)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("mlflow", "torch", "numpy", "pillow", "pandas"):
        try:
            reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def log_deblur_model(weights_path: str | Path, *, name: str = "model", metadata: dict | None = None):
    """Log the pyfunc into the active MLflow run -> `ModelInfo` (its `model_uri` is `models:/m-...`)."""
    import mlflow.pyfunc

    signature, example = signature_and_example()
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=DeblurModel(),
        artifacts={WEIGHTS_ARTIFACT: str(weights_path)},
        signature=signature,
        input_example=example,
        pip_requirements=pip_requirements(),
        metadata=metadata,
    )


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
