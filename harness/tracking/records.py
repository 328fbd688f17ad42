"""What a training run records and under which names: the metric name table (log.jsonl names ->
MLflow's sectioned names), params (flattened, redacted, truncated), the environment (run tags),
the shard sets it saw (tags and MLflow dataset inputs), and triptych images."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.tracking.redact import redact, redact_value

# ---------------------------------------------------------------------------- metric names

# log.jsonl name -> MLflow metric name. The MLflow UI groups a run's charts by the part of the name
# before the last "/" (one section each: train, val, test; `system/` is MLflow's own), so every
# metric carries its section. None: a counter, not a metric (the step is the charts' x axis, samples
# are step x global batch); the counters worth keeping go to run tags (COUNTER_TAGS).
# Names not listed (the loss parts content_0.., fft_0..) follow the rule of `metric_name`.
METRIC_NAMES: dict[str, str | None] = {
    # every `log_every` steps
    "loss": "train/loss",                    # mean over ranks
    "loss_rank0": "train/loss_rank0",
    "lr": "train/lr_x1e6",                   # lr x 10^6: see LR_SCALE
    "grad_norm": "train/grad_norm",
    "images_per_sec": "train/images_per_sec",
    "data_wait": "train/data_wait",
    "peak_mem_mb": "train/peak_mem_mb",
    "loss_scale": "train/loss_scale",
    "step": None,
    "samples": None,
    "skipped": None,                         # -> tag mimo.train.skipped_steps
    # each validation (data.val)
    "val_psnr": "val/psnr",
    "val_ssim": "val/ssim",
    "blurred_psnr": "val/blurred_psnr",
    "val_seconds_per_image": "val/seconds_per_image",
    "val_images": None,                      # -> tag mimo.val.images
    # the test score (data.test)
    "test_psnr": "test/psnr",
    "test_ssim": "test/ssim",
    "test_blurred_psnr": "test/blurred_psnr",
    "test_blurred_ssim": "test/blurred_ssim",
    "test_seconds_per_image": "test/seconds_per_image",
    "test_images": None,                     # -> tag mimo.test.images
}

# Counters recorded as run tags (updated when they change) instead of metrics.
COUNTER_TAGS = {"skipped": "mimo.train.skipped_steps", "val_images": "mimo.val.images",
                "test_images": "mimo.test.images"}

# The UI's line chart spans a constant series over value +- 1 with ticks 0.5 apart, so a constant
# lr of 1e-3 lies on the "0" tick and reads as zero. In units of 1e-6 the recipes' rates (3e-6 ..
# 1e-3) read as 3 .. 1000, constant or not; the name says the unit.
LR_SCALE = 1e6


def metric_name(key: str) -> str | None:
    """The MLflow name of a log.jsonl metric; None for counters (not sent as metrics). Unlisted
    names: `val_x` -> `val/x`, `test_x` -> `test/x`, a name with a section is kept, others -> `train/x`."""
    if key in METRIC_NAMES:
        return METRIC_NAMES[key]
    if "/" in key:
        return key
    for section in ("val", "test"):
        if key.startswith(section + "_"):
            return f"{section}/{key[len(section) + 1:]}"
    return f"train/{key}"


def metric_value(key: str, value: float) -> float:
    """The value sent for log.jsonl metric `key` (the lr in units of 1e-6, everything else as is)."""
    return value * LR_SCALE if key == "lr" else value


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


def environment_tags() -> dict[str, str]:
    """Package versions, git commit, host and GPU names as run tags (`mimo.env.python`,
    `mimo.env.torch`, ...): what reproduces or explains a launch. Tags, not params: they describe
    where a launch ran, not the recipe (and a resumed launch on another machine updates them)."""
    import platform
    import socket
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out = {"mimo.env.python": platform.python_version(), "mimo.env.host": socket.gethostname()}
    for pkg in ("mimo-harness", "torch", "deepspeed", "mlflow", "webdataset", "ray", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            out[f"mimo.env.{pkg}"] = version(pkg)
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    out["mimo.env.gpus"] = ", ".join(gpus) if gpus else "none"
    commit = _git_commit()
    if commit:
        out["mimo.env.git_commit"] = commit
    return out


def dataset_tags(**sources: str | os.PathLike | None) -> dict[str, str]:
    """`dataset.<name>.manifest_sha256` for each shard directory with a manifest.json, so a run
    names exactly which shards it saw, with `.name` (the manifest's dataset and split, e.g.
    `gopro-train`) and `.samples`; other sources (URL patterns) are recorded as given.
    `MlflowTracker.set_tags` turns these tags into the run's MLflow dataset inputs (`dataset_inputs`)."""
    import json

    tags = {}
    for name, source in sources.items():
        if not source:
            continue
        manifest = Path(source) / "manifest.json"
        if manifest.is_file():
            raw = manifest.read_bytes()
            tags[f"dataset.{name}.manifest_sha256"] = hashlib.sha256(raw).hexdigest()
            try:
                info = json.loads(raw)
            except ValueError:
                info = {}
            if isinstance(info, dict):
                label = "-".join(str(info[k]) for k in ("dataset", "split") if info.get(k))
                if label:
                    tags[f"dataset.{name}.name"] = label
                if isinstance(info.get("total_samples"), int):
                    tags[f"dataset.{name}.samples"] = str(info["total_samples"])
        tags[f"dataset.{name}.source"] = redact(str(source))
    return tags


# MLflow's dataset context per dataset_tags name: the run page lists each input with it.
DATASET_CONTEXTS = {"train": "train", "val": "validation", "test": "test"}

DIGEST_CHARS = 16  # MLflow keeps at most 36 characters of a dataset digest; the full sha256 is in the profile


def dataset_inputs(tags: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The dataset inputs (plain dicts, journal-safe) that `dataset_tags` describe, one per
    `dataset.<name>.source`: name (the manifest's `gopro-train`, else `<name>: <folder>`), digest
    (the manifest sha256's first 16 hex digits, else of the source text), source, context."""
    out = []
    for key in sorted(tags):
        m = re.fullmatch(r"dataset\.([^.]+)\.source", key)
        if not m:
            continue
        name, source = m.group(1), str(tags[key])
        sha = tags.get(f"dataset.{name}.manifest_sha256")
        label = tags.get(f"dataset.{name}.name") or f"{name}: {Path(source.rstrip('/')).name or source}"
        profile: dict[str, Any] = ({"manifest_sha256": sha} if sha
                                   else {"digest_of": "source text (no manifest.json)"})
        if tags.get(f"dataset.{name}.samples"):
            profile["samples"] = int(tags[f"dataset.{name}.samples"])
        digest = (sha or hashlib.sha256(source.encode()).hexdigest())[:DIGEST_CHARS]
        out.append({"name": str(label), "digest": digest, "source": source, "profile": profile,
                    "context": DATASET_CONTEXTS.get(name, name)})
    return out


def dataset_entity(record: Mapping[str, Any]):
    """A `dataset_inputs` record -> MLflow's DatasetInput (with its mlflow.data.context tag)."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    source = record["source"]
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", source)
    if scheme is None:
        source_type, spec = "local", {"uri": source}
    elif scheme.group(1) in ("http", "https"):
        source_type, spec = "http", {"url": source}
    else:
        source_type, spec = scheme.group(1), {"uri": source}
    dataset = Dataset(name=record["name"], digest=record["digest"], source_type=source_type,
                      source=json.dumps(spec), profile=json.dumps(record["profile"]))
    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, record["context"])])

ERROR_GAIN = 4  # the error panel shows |restored - sharp| x 4


def triptych_caption(name: str, blurred_psnr: float, restored_psnr: float) -> str:
    """The caption under a triptych; its parts name the panels in reading order."""
    return f"{name}  blurred {blurred_psnr:.2f} dB | restored {restored_psnr:.2f} dB | sharp | error x{ERROR_GAIN}"

MIN_FONT = 16  # px: readable when the image is opened at full size, however small the crop


def _caption_lines(font, caption: str, width: int) -> list[str]:
    """The caption in lines no wider than `width` where it can be: the name first, then its
    " | "-separated parts, as many on a line as fit."""
    name, _, rest = caption.partition("  ")
    if font.getlength(caption) <= width:
        return [caption]
    lines, line = [name], ""
    for part in rest.split(" | ") if rest else []:
        joined = f"{line} | {part}" if line else part
        if line and font.getlength(joined) > width:
            lines.append(line)
            joined = part
        line = joined
    return lines + ([line] if line else [])


def triptych_image(blur, restored, sharp, caption: str):
    """The blurred input and the restored frame side by side over the sharp frame and the error
    |restored - sharp| x 4 (exact 8-bit pixels; the blurred frame at the top left), above a caption.

    Two by two rather than in one row: MLflow's image cards draw every image centred in a square
    box as wide as the card, so a 3:1 strip sat as a thin band half way down it, below the fold of
    the card (under its list of run params) and of its full-screen view. The font grows with the
    image (1/45 of its width, at least 16 px); a caption wider than the image wraps at its parts."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw, ImageFont

    from harness.files import to_uint8

    error = ((restored.float() - sharp.float()).abs() * ERROR_GAIN).clamp(0, 1)
    grid = np.concatenate([np.concatenate([to_uint8(a), to_uint8(b)], axis=1)
                           for a, b in ((blur, restored), (sharp, error.to(torch.float32)))], axis=0)
    height, width = grid.shape[:2]
    size = max(MIN_FONT, width // 45)
    font = ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font, no system fonts needed
    pad = max(2, size // 4)
    lines = _caption_lines(font, caption, width - 2 * pad)
    line_h = int(size * 1.25)
    text_w = int(max(font.getlength(line) for line in lines)) + 2 * pad
    canvas = Image.new("RGB", (max(width, text_w), height + len(lines) * line_h + 2 * pad), "black")
    canvas.paste(Image.fromarray(grid), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((pad, height + pad + i * line_h), line, fill="white", font=font)
    return canvas

def image_key(name: str, step: int) -> str:
    """MLflow image key of a triptych: `val/triptych_<name>_step<step, 7 digits>`.

    One key per image and step, because the UI's image card opens at step 0 and moves by itself
    only when its key has a single step: with one key across validations every card would show
    "No image logged at this step" until the slider is moved. So each card shows its image at its
    step, in the `val` section (the part before the last "/"), in name-then-step order (the UI sorts
    keys as text, hence the zero padding)."""
    clean = re.sub(r"[^A-Za-z0-9_\-. ]", "_", str(name)) or "image"  # MLflow's key characters, no "/"
    return f"val/triptych_{clean}_step{int(step):07d}"
