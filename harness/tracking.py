"""MLflow tracking of training runs: params, metrics, triptychs, artifacts, a registered pyfunc model.

Only rank 0 logs; every other rank (and a disabled recipe) gets the no-op `Tracker`.
Tracking must never cost the trainer its run: every record is queued, sent in order, and when
the server cannot be reached the tracker warns once, keeps a bounded queue, retries now and
then, and writes what was not sent to `<run_dir>/mlflow-offline.jsonl` at every checkpoint
(`persist`: a run killed during an outage loses only the records its resume logs again) and at
`close`; `mimo tracking replay` sends that file later. Credentials never leave the process (see `redact`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.files import atomic_write

log = logging.getLogger(__name__)

OFFLINE_FILE = "mlflow-offline.jsonl"
PENDING_DIR = "mlflow-pending"  # images/weights of records not sent yet
CHAMPION = "champion"
PSNR_TAG = "val_psnr"  # the registry's PSNR tag of a run without a test set
TEST_PSNR_TAG = "test_psnr"  # the final test PSNR: what the champion rule compares when present
BLURRED_TAG = "blurred_psnr"  # the same set's blurred-input PSNR: no champion below it
MAX_PENDING = 10_000  # queued records kept in memory; older ones spill to the offline file
RETRY_SECONDS = 30.0  # how often an unreachable server is tried again
# Short HTTP timeouts/retries: MLflow's defaults (120 s, 7 retries with backoff) would stall
# the trainer for minutes per call while the server is down. A user's own setting wins.
_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",  # urllib3 logs a warning per retry
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
# Errors a server that answered gives for a bad record (dropped); anything else is an outage.
_SERVER_FAULT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}

# ---------------------------------------------------------------------------- redaction

_URI_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s'\"]+@")
_QUERY_SECRET = re.compile(r"(?i)([?&](?:token|access_token|password|api_key|key|sig|signature)=)[^&\s'\"]+")
_SECRET_NAME = re.compile(r"(?i)(password|passwd|secret|token|api[_-]?key|credential)")
# `password: x`, `"api_key": "x"`, `TOKEN=x` in YAML/JSON/env-style text.
_KV_SECRET = re.compile(
    r"""(?i)(["']?[\w.-]*(?:password|passwd|secret|token|api[_-]?key)[\w.-]*["']?\s*[:=]\s*["']?)[^\s"',}&]+"""
)


def _secret_env_values() -> list[str]:
    # Values of secret-looking variables (MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_TOKEN, ...);
    # short values are skipped so that e.g. "1" is not blanked out everywhere.
    return [v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 6]


def redact(text: str) -> str:
    """Remove credentials from text: `user:pass@` in URIs, token query parameters, values of
    password/token/secret keys, and the values of secret environment variables."""
    text = _URI_USERINFO.sub(r"\g<scheme>***@", str(text))
    text = _QUERY_SECRET.sub(r"\1***", text)
    text = _KV_SECRET.sub(r"\1***", text)
    for value in _secret_env_values():
        text = text.replace(value, "***")
    return text


def _redact_value(key: str, value: Any) -> str:
    return "***" if _SECRET_NAME.search(key) and value not in (None, "") else redact(str(value))


def _short(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
    return redact(first)[:200]


# ---------------------------------------------------------------------------- params & tags


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
        text = _redact_value(key, value if not isinstance(value, (list, tuple)) else list(value))
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


# ---------------------------------------------------------------------------- triptychs


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


def _image_key(name: str) -> str:
    # MLflow image keys allow only these characters; the key must stay the same across steps.
    return "triptych/" + (re.sub(r"[^A-Za-z0-9_\-./ ]", "_", str(name)) or "image")


# ---------------------------------------------------------------------------- tracking URI

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow 3's own default


def resolve_tracking_uri(configured: str | None) -> str:
    """The user's MLFLOW_TRACKING_URI when set, else the recipe's URI, else MLflow's default."""
    return os.environ.get("MLFLOW_TRACKING_URI") or configured or DEFAULT_TRACKING_URI


def open_hint(tracking_uri: str, run_id: str | None) -> str:
    """How a person opens the run: the server's URL, or the `mlflow ui` command for a local store."""
    uri = redact(tracking_uri)
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')} (run {run_id})"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # relative to the cwd
        uri = f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"
    return f"open it with `mlflow ui --backend-store-uri {uri}` (run {run_id})"


def _set_global_tracking_uri(uri: str) -> None:
    import mlflow

    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI; put the user's value back so the
    # variable keeps meaning "what the user chose" for every later resolve_tracking_uri.
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


# ---------------------------------------------------------------------------- the trackers


def _never_raises(method):
    """Tracking failures are logged, never raised into the trainer."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the trainer must survive any tracking bug
            log.warning("tracking: %s failed: %s", method.__name__, _short(exc))
            return None

    return wrapper


class Tracker:
    """No-op tracker (tracking disabled, or a rank other than 0). `create` picks the real one."""

    run_id: str | None = None

    @classmethod
    def create(
        cls, cfg, run_dir: str | os.PathLike, *, rank: int, resume_run_id: str | None = None
    ) -> Tracker:
        """`MlflowTracker` on rank 0 when `cfg.enabled`, else a tracker that does nothing."""
        if not getattr(cfg, "enabled", False) or rank != 0:
            return cls()
        try:
            return MlflowTracker(cfg, run_dir, resume_run_id=resume_run_id)
        except Exception as exc:  # noqa: BLE001 - e.g. mlflow missing: train without tracking
            log.warning("tracking: disabled, could not start: %s", _short(exc))
            return cls()

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None: ...
    def log_triptychs(self, items: Iterable[tuple], step: int) -> None: ...
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None: ...

    def log_model(self, weights_path: str | os.PathLike, val_psnr: float, *, blurred_psnr: float | None = None,
                  metric: str = PSNR_TAG) -> int | None:
        return None

    def persist(self) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


def _is_outage(exc: BaseException) -> bool:
    """True when the server could not be reached (retry later), False when it refused the record."""
    from mlflow.exceptions import RestException

    return not isinstance(exc, RestException) or exc.error_code in _SERVER_FAULT_CODES


class MlflowTracker(Tracker):
    """Records one training run in MLflow; see the module docstring for the failure behaviour."""

    def __init__(
        self,
        cfg,
        run_dir: str | os.PathLike,
        *,
        resume_run_id: str | None = None,
        retry_seconds: float = RETRY_SECONDS,
        log_environment: bool = True,
        catch_up: bool = True,
    ):

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.uri = resolve_tracking_uri(cfg.tracking_uri)
        _set_global_tracking_uri(self.uri)  # the fluent API (start_run, pyfunc.log_model) reads it
        self.client = _client(self.uri)
        self.run_id = resume_run_id
        self.retry_seconds = retry_seconds
        self._queue: deque[dict] = deque()
        self._started = False  # the MLflow run exists and is the active run of this process
        self._online = False
        self._next_try = 0.0
        self._warned = False
        self._history: dict[str, set[int]] = {}  # steps the run had before we resumed it
        self._last_step: dict[str, int] = {}
        self._params: dict[str, str] = {}  # params the run already has (they cannot change)
        self._status_before: str | None = None  # a resumed run's status before we resumed it
        self._monitor = None
        # Records spilled to the offline file (by this tracker or an earlier launch of the run) are
        # sent, oldest first, before the queue once the server answers (`replay` reads it itself).
        self._catch_up = catch_up and (self.run_dir / OFFLINE_FILE).is_file()
        self._catch_up_enabled = catch_up
        if log_environment:
            self._queue.append({"kind": "params", "params": environment_params()})
        self._flush(force=True)

    # -- public API --------------------------------------------------------------------

    @_never_raises
    def log_params(self, params: Mapping[str, Any]) -> None:
        self._submit({"kind": "params", "params": clean_params(params)})

    @_never_raises
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._submit({"kind": "tags", "tags": {k: _redact_value(k, v) for k, v in tags.items()}})

    @_never_raises
    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        values = {}
        for key, value in metrics.items():
            if value is None or step <= self._last_step.get(key, -1) or step in self._history.get(key, ()):
                continue  # resumed run: this step was logged before the restart
            values[key] = float(value)
            self._last_step[key] = step
        if values:
            self._submit({"kind": "metrics", "step": int(step), "timestamp": _now_ms(), "metrics": values})

    @_never_raises
    def log_triptychs(self, items: Iterable[tuple], step: int) -> None:
        for name, blur, restored, sharp, psnr in items:
            caption = f"{name}  blurred | restored {float(psnr):.2f} dB | sharp"
            path = self._pending_path(f"{_image_key(name).replace('/', '_')}-step{step}", ".png")
            triptych_image(blur, restored, sharp, caption).save(path)
            self._submit({"kind": "image", "path": str(path), "key": _image_key(name), "step": int(step)})

    @_never_raises
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._submit({"kind": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    @_never_raises
    def log_model(self, weights_path: str | os.PathLike, val_psnr: float, *, blurred_psnr: float | None = None,
                  metric: str = PSNR_TAG) -> int | None:
        """Log the pyfunc model, register it and maybe make it champion -> version (None when
        not registered, or queued because the server is unreachable). `val_psnr` is the PSNR that
        `metric` names (the trainer passes the final test PSNR as "test_psnr"); `blurred_psnr`
        is the blurred input's on the same set (`maybe_promote`)."""
        # A copy: the trainer may overwrite `best.pt` before a queued record is sent.
        copy = self._pending_path(Path(weights_path).stem, Path(weights_path).suffix)
        shutil.copy2(weights_path, copy)
        op = self._submit({"kind": "model", "weights": str(copy), "val_psnr": float(val_psnr), "metric": metric,
                           "blurred_psnr": None if blurred_psnr is None else float(blurred_psnr)})
        return op.get("version")

    @_never_raises
    def persist(self) -> None:
        """At a checkpoint: while the server is unreachable, move the queue to the offline file, so
        that a run killed now (SIGKILL, node failure) keeps every record up to its checkpoint."""
        if not self._online and self._queue:
            self._spill(list(self._queue))
            self._queue.clear()

    @_never_raises
    def close(self, status: str = "FINISHED") -> None:
        self._flush(force=True)
        self._stop_system_metrics()
        if self._started and not self._queue:
            with contextlib.suppress(Exception):
                self._end_run(status)
                if (self.run_dir / OFFLINE_FILE).exists():  # spilled during an outage, online since:
                    self._spill([])  # the file's header learns the run id its records belong to
                with contextlib.suppress(OSError):  # empty once everything was sent
                    (self.run_dir / PENDING_DIR).rmdir()
                return
        if self._started:
            self._abandon_active_run()
        self._queue.append({"kind": "end", "status": status})
        self._spill(list(self._queue))
        self._queue.clear()
        log.warning(
            "tracking: %d record(s) could not be sent to %s; they are in %s — send them with "
            "`mimo tracking replay %s`",
            self._spilled,
            redact(self.uri),
            self.run_dir / OFFLINE_FILE,
            self.run_dir,
        )

    # -- queue -------------------------------------------------------------------------

    def _submit(self, op: dict) -> dict:
        self._queue.append(op)
        if len(self._queue) > MAX_PENDING:
            self._spill([self._queue.popleft() for _ in range(MAX_PENDING // 2)])
        self._flush()
        return op

    def _flush(self, force: bool = False) -> None:
        if not self._online and not force and time.monotonic() < self._next_try:
            return
        try:
            if not self._started:
                self._start_run()
            if self._catch_up:
                self._send_offline_file()
            while self._queue:
                op = self._queue[0]
                self._send_or_drop(op)
                self._queue.popleft()
                self._done(op)
        except Exception as exc:  # noqa: BLE001 - an outage: keep the queue, try again later
            self._went_offline(exc)
            return
        if not self._online and self._warned:
            log.warning(
                "tracking: MLflow server %s is reachable again; queued records sent", redact(self.uri)
            )
        self._online = True

    def _send_or_drop(self, op: dict) -> None:
        """Send one record; a record the server refuses is dropped, an outage raises."""
        try:
            self._send(op)
        except Exception as exc:  # noqa: BLE001
            if _is_outage(exc):
                raise
            log.warning("tracking: MLflow refused a %s record, dropped it: %s", op["kind"], _short(exc))

    def _send_offline_file(self) -> None:
        """Send what the offline file holds for this run, in order; what an outage leaves unsent
        stays in the file (rewritten), the file goes once everything is sent."""
        path = self.run_dir / OFFLINE_FILE
        if not path.is_file():
            self._catch_up = False
            return
        try:
            header, ops = _read_offline(path)
        except HarnessError as exc:  # unreadable: left for a person (`replay` names the line)
            log.warning("tracking: not sending %s by itself: %s", path, exc)
            self._catch_up = False
            return
        if header.get("run_id") not in (None, self.run_id):
            log.warning("tracking: %s holds records of run %s, not %s: left for `mimo tracking replay`",
                        path, header.get("run_id"), self.run_id)
            self._catch_up = False
            return
        ops = [op for op in ops if op["kind"] != "end"]  # an earlier launch's end: this run goes on
        sent = 0
        try:
            for op in ops:
                self._send_or_drop(op)
                self._done(op)
                sent += 1
        finally:
            if sent < len(ops):
                lines = [json.dumps({**header, "run_id": self.run_id}), *(json.dumps(op) for op in ops[sent:])]
                with atomic_write(path) as tmp:
                    tmp.write_text("\n".join(lines) + "\n")
        path.unlink()
        self._catch_up = False
        self._spilled = 0
        log.warning("tracking: sent the %d record(s) kept in %s during the outage", len(ops), path)

    def _went_offline(self, exc: BaseException) -> None:
        self._online = False
        self._next_try = time.monotonic() + self.retry_seconds
        if not self._warned:
            self._warned = True
            log.warning(
                "tracking: MLflow server %s unreachable (%s); training continues, records are queued "
                "and sent when it is back (else written to %s at checkpoints and at the end)",
                redact(self.uri),
                _short(exc),
                self.run_dir / OFFLINE_FILE,
            )

    def _done(self, op: dict) -> None:
        # Pending files were only needed until their record was sent.
        for key in ("path", "weights"):
            if op["kind"] in ("image", "model") and key in op:
                Path(op[key]).unlink(missing_ok=True)

    def _pending_path(self, stem: str, suffix: str) -> Path:
        folder = self.run_dir / PENDING_DIR
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{stem}-{uuid.uuid4().hex[:8]}{suffix}"

    _spilled = 0

    def _spill(self, ops: list[dict]) -> None:
        """Append records to the offline file (atomically: old content + new lines)."""
        path = self.run_dir / OFFLINE_FILE
        old = path.read_text() if path.exists() else ""
        if not old:
            header = {
                "kind": "run",
                "run_id": self.run_id,
                "experiment": self.cfg.experiment,
                "run_name": self.cfg.run_name,
                "tracking_uri": redact(self.uri),
                "registered_model": getattr(self.cfg, "registered_model", None),
            }
            old = json.dumps(header) + "\n"
        elif self.run_id and '"run_id": null' in old.splitlines()[0]:
            old = (
                json.dumps({**json.loads(old.splitlines()[0]), "run_id": self.run_id})
                + "\n"
                + old.split("\n", 1)[1]
            )
        lines = "".join(json.dumps(op) + "\n" for op in ops)
        with atomic_write(path) as tmp:
            tmp.write_text(redact(old + lines))
        self._spilled += len(ops)
        self._catch_up = self._catch_up_enabled

    # -- the MLflow run ----------------------------------------------------------------

    def _start_run(self) -> None:
        import mlflow

        experiment_id = _experiment_id(self.client, self.cfg.experiment)
        run = None
        if self.run_id:
            try:
                run = self.client.get_run(self.run_id)
            except Exception as exc:  # noqa: BLE001
                if _is_outage(exc):
                    raise
                log.warning(
                    "tracking: run %s not found on %s, starting a new run", self.run_id, redact(self.uri)
                )
        if run is not None:
            self._status_before = run.info.status  # start_run sets it RUNNING again
            self._load_history(run)
            active = mlflow.start_run(run_id=self.run_id)
        else:
            tags = {"mimo.run_dir": str(self.run_dir.resolve())}
            active = mlflow.start_run(experiment_id=experiment_id, run_name=self.cfg.run_name, tags=tags)
        self.run_id = active.info.run_id
        self._started = True
        self._start_system_metrics(resumed=run is not None)
        log.info("tracking: MLflow run %s at %s", self.run_id, redact(self.uri))

    def _load_history(self, run) -> None:
        self._params = dict(run.data.params)
        for key in run.data.metrics:
            self._history[key] = {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def _start_system_metrics(self, resumed: bool) -> None:
        if not getattr(self.cfg, "system_metrics", False):
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=resumed, tracking_uri=self.uri)
        self._monitor.start()

    def _stop_system_metrics(self) -> None:
        if self._monitor is not None:
            with contextlib.suppress(Exception):
                self._monitor.finish()
            self._monitor = None

    def _end_run(self, status: str) -> None:
        import mlflow

        with _redacted_stdout():  # MLflow prints the run's URL, user:password@ included
            mlflow.end_run(status)  # pops the active run first, then tells the server
        # Printed, not logged: the one line a person needs after a run is where to look at it.
        print(f"tracking: MLflow run {self.run_id} {status}; {open_hint(self.uri, self.run_id)}", flush=True)

    def _abandon_active_run(self) -> None:
        import mlflow

        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            with contextlib.suppress(Exception):
                mlflow.end_run("FAILED")  # local stack only matters; the server is down

    # -- sending one record ------------------------------------------------------------

    def _send(self, op: dict) -> None:
        kind = op["kind"]
        if kind == "params":
            self._send_params(op["params"])
        elif kind == "tags":
            from mlflow.entities import RunTag

            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in op["tags"].items()])
        elif kind == "metrics":
            from mlflow.entities import Metric

            metrics = [
                Metric(k, v, op["timestamp"], op["step"])
                for k, v in op["metrics"].items()
                if op["step"] not in self._history.get(k, ())
            ]
            if metrics:
                self.client.log_batch(self.run_id, metrics=metrics)
        elif kind == "image":
            self._send_image(op)
        elif kind == "artifact":
            self._send_artifact(Path(op["path"]), op.get("artifact_path"))
        elif kind == "model":
            op["version"] = self._send_model(Path(op["weights"]), op["val_psnr"], op.get("metric", PSNR_TAG),
                                             op.get("blurred_psnr"))
        elif kind == "end":
            self._end_run(op["status"])
            self._started = False

    def _send_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        changed = sorted(k for k, v in params.items() if k in self._params and self._params[k] != v)
        if changed:
            log.warning(
                "tracking: params cannot change within a run, kept the logged values of %s",
                ", ".join(changed[:10]),
            )
        new = {k: v for k, v in params.items() if k not in self._params}
        items = list(new.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i : i + 100]])
            self._params.update(items[i : i + 100])

    def _send_image(self, op: dict) -> None:
        from PIL import Image

        path = Path(op["path"])
        if not path.is_file():
            log.warning("tracking: queued image %s is gone, skipped", path)
            return
        with Image.open(path) as img:
            img.load()
            self.client.log_image(self.run_id, img, key=op["key"], step=op["step"], synchronous=True)

    def _send_artifact(self, path: Path, artifact_path: str | None) -> None:
        if not path.exists():
            log.warning("tracking: artifact %s does not exist, skipped", path)
            return
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path or path.name)
            return
        with _redacted_copy(path) as upload:
            self.client.log_artifact(self.run_id, str(upload), artifact_path)

    def _send_model(self, weights: Path, val_psnr: float, metric: str = PSNR_TAG,
                    blurred_psnr: float | None = None) -> int | None:
        import mlflow

        from harness.models import read_checkpoint
        from harness.pyfunc import log_deblur_model

        ckpt = read_checkpoint(weights)
        metadata = {
            "model_name": ckpt["model_name"],
            "model_overrides": ckpt["model_overrides"],
            metric: val_psnr,
            BLURRED_TAG: blurred_psnr,
        }
        info = log_deblur_model(weights, metadata=metadata)
        name = getattr(self.cfg, "registered_model", None)
        if not name:
            return None
        tags = {metric: repr(float(val_psnr)), "mimo.run_id": self.run_id}
        if blurred_psnr is not None:
            tags[BLURRED_TAG] = repr(float(blurred_psnr))
        version = mlflow.register_model(info.model_uri, name, tags=tags)
        promoted = maybe_promote(self.client, name, version.version, val_psnr, metric=metric,
                                 blurred_psnr=blurred_psnr)
        log.info(
            "tracking: registered %s version %s (%s %.3f dB)%s",
            name,
            version.version,
            metric,
            val_psnr,
            f", now @{CHAMPION}" if promoted else "",
        )
        return int(version.version)


@contextlib.contextmanager
def _redacted_stdout():
    import io
    import sys

    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        sys.stdout.write(redact(buf.getvalue()))


def _now_ms() -> int:
    return int(time.time() * 1000)


def _experiment_id(client, name: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # created meanwhile by a parallel run (Tune trials)
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


_TEXT_SUFFIXES = {".yaml", ".yml", ".json", ".jsonl", ".txt", ".log", ".cfg", ".toml", ".ini"}


@contextlib.contextmanager
def _redacted_copy(path: Path):
    """The file itself, or for a text file holding a credential a redacted copy of it."""
    if path.suffix.lower() not in _TEXT_SUFFIXES:
        yield path
        return
    text = path.read_text(errors="replace")
    clean = redact(text)
    if clean == text:
        yield path
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mimo-redacted-") as tmp:
        copy = Path(tmp) / path.name
        copy.write_text(clean)
        yield copy


# ---------------------------------------------------------------------------- registry


def _psnr_of(version, metric: str = PSNR_TAG) -> float:
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
    best = _psnr_of(current, metric) if current is not None else -math.inf
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


def _client(tracking_uri: str | None):
    import mlflow

    for key, value in _HTTP_ENV.items():  # fail fast when the server is down (trainer and CLI alike)
        os.environ.setdefault(key, value)

    uri = tracking_uri or resolve_tracking_uri(None)
    # The registry follows the tracking server unless the user points it elsewhere; without
    # this MlflowClient would take the process-global registry URI (MLflow's local sqlite).
    return mlflow.MlflowClient(uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)


@contextlib.contextmanager
def _registry_errors(what: str):
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        raise HarnessError(f"{what}: {_short(exc)}") from None


def promote(name: str, version: int | str, tracking_uri: str | None = None) -> None:
    """Make `version` of registered model `name` the champion, whatever its PSNR (a human's call)."""
    client = _client(tracking_uri)
    with _registry_errors(f"registered model {name!r} version {version}"):
        client.get_model_version(name, str(version))
        client.set_registered_model_alias(name, CHAMPION, str(version))


def registry_rows(name: str, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """One row per version of `name`: version, aliases, val PSNR, run id, creation time; newest first."""
    client = _client(tracking_uri)
    with _registry_errors(f"registered model {name!r}"):
        # Version search results carry no aliases; the registered model has them all.
        aliases = client.get_registered_model(name).aliases or {}
        versions = client.search_model_versions(f"name = '{name}'")
    rows = [
        {
            "version": int(v.version),
            "aliases": sorted(a for a, ver in aliases.items() if str(ver) == str(v.version)),
            PSNR_TAG: _psnr_of(v),
            TEST_PSNR_TAG: _psnr_of(v, TEST_PSNR_TAG),
            "run_id": v.run_id,
            "created": v.creation_timestamp,
        }
        for v in versions
    ]
    return sorted(rows, key=lambda r: -r["version"])


# ---------------------------------------------------------------------------- fetching weights

MODEL_URI_PREFIXES = ("models:/", "runs:/")


def is_model_uri(text: str) -> bool:
    return str(text).startswith(MODEL_URI_PREFIXES)


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

    client = _client(tracking_uri)
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
        raise HarnessError(f"{redact(uri)}: cannot fetch the model ({_short(exc)})") from None
    return _weights_in(target, uri)


def _weights_in(folder: Path, uri: str) -> Path:
    from harness.pyfunc import weights_in_model_dir

    found = sorted(folder.rglob("MLmodel"))
    if found:
        return weights_in_model_dir(found[0].parent)
    files = [p for p in folder.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in (".pt", ".pth", ".bin")]
    if len(files) == 1:
        return files[0]
    if len(weights) == 1:
        return weights[0]
    raise HarnessError(
        f"{redact(uri)}: expected one weights file (.pt/.pth) or an MLflow model, found {len(files)} files"
    )


# ---------------------------------------------------------------------------- replay


def _read_offline(path: Path) -> tuple[dict, list[dict]]:
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise HarnessError(
                f"{path}:{lineno}: not a JSON record (is this an mlflow-offline.jsonl?)"
            ) from None
        if not isinstance(record, dict) or "kind" not in record:
            raise HarnessError(f"{path}:{lineno}: expected a JSON object with a 'kind' field")
        records.append(record)
    if not records or records[0]["kind"] != "run":
        raise HarnessError(f"{path}:1: expected the header record {{'kind': 'run', ...}}")
    return records[0], records[1:]


def replay(path: str | os.PathLike, tracking_uri: str | None = None) -> str:
    """Send an offline file (or `<run_dir>/mlflow-offline.jsonl`) to MLflow -> the run id.

    Records go to the run they came from when it exists there (steps it already has are
    skipped), else to a new run in the same experiment. The file is renamed `*.replayed` after.
    A file without an end record (its trainer died) ends the run as KILLED."""
    from types import SimpleNamespace

    path = Path(path)
    file = path / OFFLINE_FILE if path.is_dir() else path
    if not file.is_file():
        raise HarnessError(f"{file}: no offline tracking file")
    header, ops = _read_offline(file)
    recorded = header.get("tracking_uri") or None
    if "***" in str(recorded):  # redacted: the user must say where
        recorded = None
    uri = tracking_uri or resolve_tracking_uri(recorded)
    cfg = SimpleNamespace(
        enabled=True,
        tracking_uri=uri,
        experiment=header.get("experiment") or "mimo-harness",
        run_name=header.get("run_name"),
        registered_model=header.get("registered_model"),
        system_metrics=False,
    )
    tracker = MlflowTracker(cfg, file.parent, resume_run_id=header.get("run_id"), log_environment=False,
                            catch_up=False)
    if not tracker._online:
        raise HarnessError(f"{redact(tracker.uri)}: MLflow server unreachable; nothing replayed from {file}")
    if not any(op["kind"] == "end" for op in ops):
        # Its trainer died before `close`: KILLED, unless a resumed trainer has ended the run since.
        ended = tracker._status_before if tracker._status_before in ("FINISHED", "FAILED", "KILLED") else None
        ops.append({"kind": "end", "status": ended or "KILLED"})
    tracker._queue.extend(ops)
    tracker._flush(force=True)
    if tracker._queue:
        tracker._abandon_active_run()
        raise HarnessError(
            f"{file}: the server stopped answering after part of the records; run the replay again"
        )
    os.replace(file, file.with_name(file.name + ".replayed"))
    return str(tracker.run_id)
