"""The model registry: log and register a run's model, the champion rule, promotion, and fetching
weights for `models:/` and `runs:/` URIs (cached per immutable version)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import uuid
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.tracking.client import mlflow_client
from harness.tracking.redact import redact, short_error

log = logging.getLogger("harness.tracking")

CHAMPION = "champion"

PSNR_TAG = "val_psnr"  # the registry's PSNR tag of a run without a test set

TEST_PSNR_TAG = "test_psnr"  # the final test PSNR: what the champion rule compares when present

BLURRED_TAG = "blurred_psnr"  # the same set's blurred-input PSNR: no champion below it


def log_and_register(client, run_id: str, weights: Path, psnr: float, *, metric: str = PSNR_TAG,
                     blurred_psnr: float | None = None, registered_model: str | None = None) -> int | None:
    """Log `weights` as the run's pyfunc model; register it as `registered_model` (when set) with
    its PSNR tags and maybe make it champion -> the version, or None when not registered."""
    import mlflow

    from harness.models import read_checkpoint
    from harness.pyfunc import log_deblur_model

    ckpt = read_checkpoint(weights)
    metadata = {"model_name": ckpt["model_name"], "model_overrides": ckpt["model_overrides"],
                metric: psnr, BLURRED_TAG: blurred_psnr}
    info = log_deblur_model(weights, metadata=metadata)
    if not registered_model:
        return None
    tags = {metric: repr(float(psnr)), "mimo.run_id": run_id}
    if blurred_psnr is not None:
        tags[BLURRED_TAG] = repr(float(blurred_psnr))
    version = mlflow.register_model(info.model_uri, registered_model, tags=tags)
    promoted = maybe_promote(client, registered_model, version.version, psnr, metric=metric,
                             blurred_psnr=blurred_psnr)
    log.info("tracking: registered %s version %s (%s %.3f dB)%s", registered_model, version.version, metric,
             psnr, f", now @{CHAMPION}" if promoted else "")
    return int(version.version)


def psnr_of(version, metric: str = PSNR_TAG) -> float:
    try:
        return float(version.tags.get(metric, "nan"))
    except (TypeError, ValueError):
        return math.nan

def maybe_promote(client, name: str, version: int | str, val_psnr: float, *, metric: str = PSNR_TAG,
                  blurred_psnr: float | None = None) -> bool:
    """Give `version` the champion alias when its PSNR (the `metric` tag: "test_psnr", the final
    test score, or "val_psnr" for runs without a test set) beats the current champion's, or there
    is none; never when it does not beat `blurred_psnr`, the blurred input's on the same set
    (a model that makes images worse is no champion; warns naming both numbers).

    Not atomic across processes: two runs finishing at the same moment may both read the old
    champion; the later writer wins (Tune trials end at different times in practice)."""
    if blurred_psnr is not None and not val_psnr > blurred_psnr:
        log.warning("tracking: %s version %s not made @%s: its %s %.3f dB is below the blurred input's %.3f dB",
                    name, version, CHAMPION, metric, val_psnr, blurred_psnr)
        return False
    current = champion_version(client, name)
    best = psnr_of(current, metric) if current is not None else -math.inf
    if current is not None and str(current.version) == str(version):
        return False
    if math.isnan(best) or val_psnr > best:
        client.set_registered_model_alias(name, CHAMPION, str(version))
        return True
    return False

def champion_version(client, name: str):
    """The model version holding the champion alias, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise

@contextlib.contextmanager
def _registry_errors(what: str):
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        raise HarnessError(f"{what}: {short_error(exc)}") from None

def promote(name: str, version: int | str, tracking_uri: str | None = None) -> None:
    """Make `version` of registered model `name` the champion, whatever its PSNR (a human's call)."""
    client = mlflow_client(tracking_uri)
    with _registry_errors(f"registered model {name!r} version {version}"):
        client.get_model_version(name, str(version))
        client.set_registered_model_alias(name, CHAMPION, str(version))

def registry_rows(name: str, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """One row per version of `name`: version, aliases, val PSNR, run id, creation time; newest first."""
    client = mlflow_client(tracking_uri)
    with _registry_errors(f"registered model {name!r}"):
        # Version search results carry no aliases; the registered model has them all.
        aliases = client.get_registered_model(name).aliases or {}
        versions = client.search_model_versions(f"name = '{name}'")
    rows = [
        {
            "version": int(v.version),
            "aliases": sorted(a for a, ver in aliases.items() if str(ver) == str(v.version)),
            PSNR_TAG: psnr_of(v),
            TEST_PSNR_TAG: psnr_of(v, TEST_PSNR_TAG),
            "run_id": v.run_id,
            "created": v.creation_timestamp,
        }
        for v in versions
    ]
    return sorted(rows, key=lambda r: -r["version"])


# ---------------------------------------------------------------------------- fetching weights

WEIGHT_SUFFIXES = (".pkl", ".pt", ".pth", ".bin", ".safetensors")  # what a runs:/ artifact may be


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mimo-harness" / "mlflow"

def _resolve_alias(client, uri: str) -> str:
    """`models:/NAME@alias` -> `models:/NAME/VERSION`, so the cache key names an immutable version."""
    m = re.fullmatch(r"models:/([^/@]+)@([^/]+)", uri)
    if not m:
        return uri
    version = client.get_model_version_by_alias(m.group(1), m.group(2))
    return f"models:/{m.group(1)}/{version.version}"

def fetch_weights(uri: str, tracking_uri: str | None = None) -> Path:
    """A local weights file (our export format) for `models:/NAME@alias`, `models:/NAME/VERSION`,
    `models:/m-...` or `runs:/RUN_ID/path`; downloads are cached per immutable version."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow_client(tracking_uri)
    try:
        resolved = _resolve_alias(client, uri)
        key = hashlib.sha256(f"{redact(client.tracking_uri)}|{resolved}".encode()).hexdigest()[:20]
        target = _cache_root() / key
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.parent / f".{key}.{uuid.uuid4().hex[:8]}"
            mlflow.artifacts.download_artifacts(
                artifact_uri=resolved, dst_path=str(tmp), tracking_uri=client.tracking_uri
            )
            os.replace(tmp, target)
    except (MlflowException, OSError) as exc:
        raise HarnessError(f"{redact(uri)}: cannot fetch the model from {redact(client.tracking_uri)} "
                          f"({short_error(exc)})") from None
    return _weights_in(target, uri)

def _weights_in(folder: Path, uri: str) -> Path:
    from harness.pyfunc import weights_in_model_dir

    found = sorted(folder.rglob("MLmodel"))
    if found:
        return weights_in_model_dir(found[0].parent)
    files = [p for p in folder.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in WEIGHT_SUFFIXES]
    if len(files) == 1:
        return files[0]
    if len(weights) == 1:
        return weights[0]
    raise HarnessError(
        f"{redact(uri)}: expected one weights file ({'/'.join(WEIGHT_SUFFIXES)}) or an MLflow model, "
        f"found {len(files)} files"
    )
