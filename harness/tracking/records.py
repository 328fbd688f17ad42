"""What a training run records besides metrics: params (flattened, redacted, truncated), the
environment, the shard sets it saw, and triptych images."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.tracking.redact import redact, redact_value


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> one level with dotted keys (`optim.lr`); other values kept as they are."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, f"{name}."))
        else:
            out[name] = value
    return out

def _param_limit() -> int:
    try:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        return int(MAX_PARAM_VAL_LENGTH)
    except (ImportError, AttributeError):  # older MLflow
        return 500

def clean_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Flatten, stringify, redact and truncate params to what MLflow accepts."""
    limit = _param_limit()
    out = {}
    for key, value in flatten_params(params).items():
        text = redact_value(key, value if not isinstance(value, (list, tuple)) else list(value))
        if len(text) > limit:
            text = text[: limit - 3] + "..."  # MLflow rejects longer values outright
        out[re.sub(r"[^A-Za-z0-9_\-./ ]", "_", key)] = text
    return out

def _git_commit() -> str | None:
    import subprocess

    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None

def environment_params() -> dict[str, str]:
    """Package versions, git commit, host and GPU names: what reproduces or explains a run."""
    import platform
    import socket
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out = {"env.python": platform.python_version(), "env.host": socket.gethostname()}
    for pkg in ("mimo-harness", "torch", "deepspeed", "mlflow", "webdataset", "ray", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            out[f"env.{pkg}"] = version(pkg)
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    out["env.gpus"] = ", ".join(gpus) if gpus else "none"
    commit = _git_commit()
    if commit:
        out["env.git_commit"] = commit
    return out

def dataset_tags(**sources: str | os.PathLike | None) -> dict[str, str]:
    """`dataset.<name>.manifest_sha256` for each shard directory with a manifest.json, so a run
    names exactly which shards it saw; other sources (URL patterns) are recorded as given."""
    tags = {}
    for name, source in sources.items():
        if not source:
            continue
        manifest = Path(source) / "manifest.json"
        if manifest.is_file():
            tags[f"dataset.{name}.manifest_sha256"] = hashlib.sha256(manifest.read_bytes()).hexdigest()
        tags[f"dataset.{name}.source"] = redact(str(source))
    return tags

def triptych_image(blur, restored, sharp, caption: str):
    """blurred | restored | sharp side by side (exact 8-bit pixels) over a caption strip."""
    import numpy as np
    from PIL import Image, ImageDraw

    from harness.files import to_uint8

    row = np.concatenate([to_uint8(t) for t in (blur, restored, sharp)], axis=1)
    canvas = Image.new("RGB", (row.shape[1], row.shape[0] + 12), "black")
    canvas.paste(Image.fromarray(row), (0, 0))
    ImageDraw.Draw(canvas).text((2, row.shape[0]), caption, fill="white")
    return canvas

def image_key(name: str) -> str:
    # MLflow image keys allow only these characters; the key must stay the same across steps.
    return "triptych/" + (re.sub(r"[^A-Za-z0-9_\-./ ]", "_", str(name)) or "image")
