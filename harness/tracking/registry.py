"""The model registry: log and register a run's model, the champion rule, promotion, and fetching
weights for `models:/` and `runs:/` URIs (cached per immutable version)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import re
import uuid
import warnings
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.tracking.client import mlflow_client, safely
from harness.tracking.redact import redact, short_error

log = logging.getLogger("harness.tracking")

CHAMPION = "champion"

PSNR_TAG = "val_psnr"  # the registry's PSNR tag of a run without a test set

TEST_PSNR_TAG = "test_psnr"  # the final test PSNR: what the champion rule compares when present

BLURRED_TAG = "blurred_psnr"  # the same set's blurred-input PSNR: no champion below it


def log_and_register(client, run_id: str, weights: Path, psnr: float, *, metric: str = PSNR_TAG,
                     blurred_psnr: float | None = None, registered_model: str | None = None,
                     final_metrics: list[dict] | None = None, about: dict | None = None) -> int | None:
    """Log `weights` as the run's pyfunc model, named after its architecture (`mimo-unet-plus`),
    with the run's final metrics (`final_metrics`, from the tracker), params and a description
    (`describe_model`); register it as `registered_model` (when set) with its PSNR tags and maybe
    make it champion -> the version, or None when not registered."""
    import mlflow

    from harness.models import read_checkpoint

    with warnings.catch_warnings():  # MLflow's advice to type-hint `predict` is about our class, not the run
        warnings.filterwarnings("ignore", message=".*type hints to the `predict` method", category=UserWarning)
        from harness.pyfunc import log_deblur_model

    ckpt = read_checkpoint(weights)
    metadata = {"model_name": ckpt["model_name"], "model_overrides": ckpt["model_overrides"],
                metric: psnr, BLURRED_TAG: blurred_psnr}
    info = log_deblur_model(weights, name=logged_model_name(ckpt["model_name"]), metadata=metadata)
    description = describe_model(ckpt["model_name"], ckpt["model_overrides"], psnr, metric=metric,
                                 blurred_psnr=blurred_psnr, about=about or {})
    with safely("describe the logged model"):  # a model without its description is still a model
        _annotate_logged_model(client, run_id, info.model_id, ckpt, description, psnr, metric=metric,
                               blurred_psnr=blurred_psnr, final_metrics=final_metrics or [], about=about or {})
    if not registered_model:
        return None
    tags = {metric: repr(float(psnr)), "mimo.run_id": run_id}
    if blurred_psnr is not None:
        tags[BLURRED_TAG] = repr(float(blurred_psnr))
    with contextlib.redirect_stderr(io.StringIO()):  # its "Successfully registered" prints: our line below says it
        version = mlflow.register_model(info.model_uri, registered_model, tags=tags)
    with safely("describe the model version"):
        client.update_model_version(registered_model, version.version, description=description)
    promoted = maybe_promote(client, registered_model, version.version, psnr, metric=metric,
                             blurred_psnr=blurred_psnr)
    log.info("tracking: registered %s version %s (%s %.3f dB)%s", registered_model, version.version, metric,
             psnr, f", now @{CHAMPION}" if promoted else "")
    return int(version.version)


_ARCHITECTURES = {"mimo-unet": "MIMO-UNet", "mimo-unet-plus": "MIMO-UNet+"}

DESCRIPTION_TAG = "mlflow.note.content"  # what the MLflow UI shows as a logged model's description


def logged_model_name(model_name: str) -> str:
    """The LoggedModel's name: the architecture (MLflow refuses / : . % and quotes in it)."""
    return re.sub(r"[/:.%\"']", "_", str(model_name)) or "model"


def _variant(model_name: str, overrides: dict | None) -> str:
    label = _ARCHITECTURES.get(model_name, model_name)
    if overrides:
        label += " (" + ", ".join(f"{k}={v}" for k, v in sorted(overrides.items())) + ")"
    return label


def describe_model(model_name: str, overrides: dict | None, psnr: float, *, metric: str = PSNR_TAG,
                   blurred_psnr: float | None = None, about: dict | None = None) -> str:
    """One paragraph saying what a logged model is: variant, steps trained, its score and how that
    score was measured (the set, the protocol, precision, ensemble, device)."""
    about = about or {}
    which = "test" if metric.startswith("test") else "validation"
    scores = about.get("scores") or {}
    parts = [f"{_variant(model_name, overrides)} deblurring model"]
    if about.get("steps") is not None:
        parts[0] += f", trained {about['steps']} steps"
    if about.get("run_name"):
        parts[0] += f" (run {about['run_name']})"
    score = f"{which} PSNR {psnr:.2f} dB"
    ssim = next((v for k, v in scores.items() if k.endswith("/ssim")), None)
    if ssim is not None:
        score += f", SSIM {ssim:.4f}"
    if blurred_psnr is not None:
        score += f" (blurred input {blurred_psnr:.2f} dB)"
    if about.get("dataset"):
        score += f" on {about['dataset']}"
    parts.append(score[0].upper() + score[1:])
    ev = about.get("eval") or {}
    protocol = ("Scored under the `default` protocol (the MIMO-UNet reference: RGB in [0, 1], full frame, "
                "data range 1, scikit-image PSNR and Gaussian SSIM)")
    settings = ", ".join(f"{k} {ev[k]}" for k in ("precision", "ensemble", "device") if ev.get(k))
    parts.append(protocol + (f", {settings}" if settings else ""))
    parts.append("A pyfunc: PNG/JPEG bytes in, deblurred PNG out "
                 "(`mlflow models serve`, `mimo deblur --weights models:/...`)")
    return ". ".join(parts) + "."


def _annotate_logged_model(client, run_id: str, model_id: str, ckpt: dict, description: str, psnr: float, *,
                           metric: str, blurred_psnr: float | None, final_metrics: list[dict],
                           about: dict) -> None:
    """The LoggedModel's metrics (the run's final points, with their datasets) and tags: description,
    architecture, steps trained, how it was scored."""
    from mlflow.entities import Metric

    metrics = [Metric(m["key"], float(m["value"]), int(m["timestamp"]), int(m["step"]), model_id=model_id,
                      dataset_name=m.get("dataset_name"), dataset_digest=m.get("dataset_digest"))
               for m in final_metrics if math.isfinite(float(m["value"]))]
    for i in range(0, len(metrics), 1000):
        # The run's own last points, now also the model's: same key/value/step/timestamp, so the
        # run's history is unchanged (MLflow skips a point it already has).
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    # Params: MLflow gives the model its run's params (the recipe) by itself.
    tags = {DESCRIPTION_TAG: description,
            "mimo.architecture": _variant(ckpt["model_name"], ckpt["model_overrides"]),
            "mimo.eval.protocol": "default", metric: repr(float(psnr)), "mimo.run_id": run_id}
    if blurred_psnr is not None:
        tags[BLURRED_TAG] = repr(float(blurred_psnr))
    if about.get("steps") is not None:
        tags["mimo.trained_steps"] = str(about["steps"])
    if about.get("dataset"):
        tags["mimo.eval.dataset"] = str(about["dataset"])
    tags.update({f"mimo.eval.{k}": str(v) for k, v in (about.get("eval") or {}).items()})
    client.set_logged_model_tags(model_id, tags)


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
