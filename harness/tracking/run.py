"""Live logging of one training run: the no-op `Tracker` (tracking off, ranks other than 0) and
`MlflowTracker`, which queues every record, sends it in order, survives outages (bounded queue,
retries, spill to the offline file at checkpoints and at close) and catches up when the server
is back. Its state (the MLflow run id) goes into every checkpoint through `state_dict`."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.tracking import offline, registry
from harness.tracking.client import (
    get_or_create_experiment,
    is_outage,
    mlflow_client,
    never_raises,
    now_ms,
    open_hint,
    resolve_tracking_uri,
    run_url,
    set_global_tracking_uri,
)
from harness.tracking.offline import OFFLINE_FILE, PENDING_DIR, read_offline
from harness.tracking.records import (
    COUNTER_TAGS,
    clean_params,
    dataset_inputs,
    environment_tags,
    image_key,
    metric_name,
    metric_value,
    triptych_caption,
    triptych_image,
)
from harness.tracking.redact import redact, redact_value, redacted_copy, redacted_stdout, short_error
from harness.tracking.registry import PSNR_TAG

log = logging.getLogger("harness.tracking")

MAX_PENDING = 10_000  # queued records kept in memory; older ones spill to the offline file

RETRY_SECONDS = 30.0  # how often an unreachable server is tried again


class Tracker:
    """No-op tracker (tracking disabled, or a rank other than 0). `create` picks the real one."""

    run_id: str | None = None
    run_url: str | None = None  # the run's page in the MLflow UI, once the run exists

    @classmethod
    def create(
        cls, cfg, run_dir: str | os.PathLike, *, rank: int, resume_run_id: str | None = None
    ) -> Tracker:
        """`MlflowTracker` on rank 0 when `cfg.enabled`, else a tracker that does nothing."""
        if not cfg.enabled or rank != 0:
            return cls()
        try:
            return MlflowTracker(cfg, run_dir, resume_run_id=resume_run_id)
        except Exception as exc:  # noqa: BLE001 - e.g. mlflow missing: train without tracking
            log.warning("tracking: disabled, could not start: %s", short_error(exc))
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

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the tracker: the MLflow run a resume continues."""
        self.persist()
        return {"run_id": self.run_id}

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
        set_global_tracking_uri(self.uri)  # the fluent API (start_run, pyfunc.log_model) reads it
        self.client = mlflow_client(self.uri)
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
        # The last point of each metric (MLflow name -> value, step, timestamp): what the logged
        # model gets as its metrics, re-sent exactly so the run's history gains no duplicate.
        self._final: dict[str, dict] = {}
        self._counters: dict[str, str] = {}  # counter tags (skipped steps, image counts) last set
        self._tags: dict[str, str] = {}  # tags set through this tracker (the model's description reads them)
        self._datasets: dict[str, dict] = {}  # dataset context -> its input record (dataset_inputs)
        self._status_before: str | None = None  # a resumed run's status before we resumed it
        self._monitor = None
        # Records spilled to the offline file (by this tracker or an earlier launch of the run) are
        # sent, oldest first, before the queue once the server answers (`replay` reads it itself).
        self._catch_up = catch_up and (self.run_dir / OFFLINE_FILE).is_file()
        self._catch_up_enabled = catch_up
        if log_environment:  # where this launch runs: run tags (mimo.env.*), not params
            self._queue.append({"kind": "tags", "tags": environment_tags()})
        self._flush(force=True)

    # -- public API --------------------------------------------------------------------

    @never_raises
    def log_params(self, params: Mapping[str, Any]) -> None:
        self._submit({"kind": "params", "params": clean_params(params)})

    @never_raises
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags; `dataset.<name>.*` tags (records.dataset_tags) also log the shard sets as
        the run's MLflow dataset inputs (context train / validation / test)."""
        tags = {k: redact_value(k, v) for k, v in tags.items()}
        self._tags.update(tags)
        self._submit({"kind": "tags", "tags": tags})
        datasets = dataset_inputs(tags)
        if datasets:
            self._datasets.update({d["context"]: d for d in datasets})
            self._submit({"kind": "inputs", "datasets": datasets})

    @never_raises
    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log log.jsonl-named metrics under their MLflow names (records.METRIC_NAMES: `train/loss`,
        `val/psnr`, ...); counters go to run tags (records.COUNTER_TAGS) or nowhere."""
        values, counters = {}, {}
        timestamp = now_ms()
        for key, value in metrics.items():
            if value is None:
                continue
            if key in COUNTER_TAGS:
                text = str(int(value))
                if self._counters.get(key) != text:
                    counters[COUNTER_TAGS[key]] = self._counters[key] = text
            name = metric_name(key)
            if name is None or step <= self._last_step.get(name, -1) or step in self._history.get(name, ()):
                continue  # a counter, or a resumed run: this step was logged before the restart
            values[name] = metric_value(key, float(value))
            self._last_step[name] = step
            self._final[name] = {"value": values[name], "step": int(step), "timestamp": timestamp}
        if counters:
            self._submit({"kind": "tags", "tags": counters})
        if values:
            self._submit({"kind": "metrics", "step": int(step), "timestamp": timestamp, "metrics": values})

    @never_raises
    def log_triptychs(self, items: Iterable[tuple], step: int) -> None:
        """One image per (name, blurred, restored, sharp, restored PSNR), captioned with the blurred
        input's PSNR (computed here) and the restored one, under its own key per step (image_key)."""
        from harness.metrics import psnr as psnr_of

        for name, blur, restored, sharp, psnr in items:
            blurred = float(psnr_of(blur[None].float(), sharp[None].float())[0])
            caption = triptych_caption(str(name), blurred, float(psnr))
            key = image_key(name, step)
            path = self._pending_path(key.replace("/", "_"), ".png")
            triptych_image(blur, restored, sharp, caption).save(path)
            self._submit({"kind": "image", "path": str(path), "key": key, "step": int(step)})

    @never_raises
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._submit({"kind": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    @never_raises
    def log_model(self, weights_path: str | os.PathLike, val_psnr: float, *, blurred_psnr: float | None = None,
                  metric: str = PSNR_TAG) -> int | None:
        """Log the pyfunc model, register it and maybe make it champion -> version (None when
        not registered, or queued because the server is unreachable). `val_psnr` is the PSNR that
        `metric` names (the trainer passes the final test PSNR as "test_psnr"); `blurred_psnr`
        is the blurred input's on the same set (`maybe_promote`)."""
        # A copy: the weights file may be overwritten (a re-export) before a queued record is sent.
        copy = self._pending_path(Path(weights_path).stem, Path(weights_path).suffix)
        shutil.copy2(weights_path, copy)
        op = self._submit({"kind": "model", "weights": str(copy), "val_psnr": float(val_psnr), "metric": metric,
                           "blurred_psnr": None if blurred_psnr is None else float(blurred_psnr),
                           "final_metrics": self._model_metrics(), "about": self._model_about(metric)})
        return op.get("version")

    def _model_metrics(self) -> list[dict]:
        """The run's last train/val/test points, for the logged model (with the dataset each was
        measured on): the same key, value, step and timestamp, so re-sending them adds nothing to
        the run's own history."""
        contexts = {"train": "train", "val": "validation", "test": "test"}
        out = []
        for name, point in sorted(self._final.items()):
            section = name.split("/", 1)[0]
            if section not in contexts or name.startswith("train/") and name != "train/loss":
                continue
            dataset = self._datasets.get(contexts[section])
            where = {"dataset_name": dataset["name"], "dataset_digest": dataset["digest"]} if dataset else {}
            out.append({"key": name, **point, **where})
        return out

    def _model_about(self, metric: str) -> dict:
        """What the model's description says besides its PSNR: steps trained, how it was scored."""
        name = metric_name(metric) or metric
        point = self._final.get(name)
        steps = point["step"] if point else max((p["step"] for p in self._final.values()), default=None)
        context = "test" if name.startswith("test/") else "validation"
        dataset = self._datasets.get(context)
        final = {k: p["value"] for k, p in self._final.items() if k.startswith(name.split("/")[0] + "/")}
        return {"steps": steps, "metric": name, "scores": final, "dataset": dataset["name"] if dataset else None,
                "eval": {k.split(".")[-1]: v for k, v in self._tags.items() if k.startswith("mimo.eval.")},
                "run_name": self.cfg.run_name}

    @never_raises
    def persist(self) -> None:
        """At a checkpoint: while the server is unreachable, move the queue to the offline file, so
        that a run killed now (SIGKILL, node failure) keeps every record up to its checkpoint."""
        if not self._online and self._queue:
            self._spill(list(self._queue))
            self._queue.clear()

    @never_raises
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

    # -- for replay: send a journal's records through this tracker -----------------------

    @property
    def connected(self) -> bool:
        """The server answered the last time it was tried."""
        return self._online

    @property
    def status_before(self) -> str | None:
        """A resumed run's status before this tracker resumed it (start_run sets it RUNNING)."""
        return self._status_before

    def send(self, records: list[dict]) -> bool:
        """Queue `records` and send everything now -> True when nothing is left unsent."""
        self._queue.extend(records)
        self._flush(force=True)
        return not self._queue

    def abandon(self) -> None:
        """Give up the run locally (the server stopped answering): the process holds no active run."""
        self._abandon_active_run()

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
            if is_outage(exc):
                raise
            log.warning("tracking: MLflow refused a %s record, dropped it: %s", op["kind"], short_error(exc))

    def _send_offline_file(self) -> None:
        """Send what the offline file holds for this run, in order; what an outage leaves unsent
        stays in the file (rewritten), the file goes once everything is sent."""
        path = self.run_dir / OFFLINE_FILE
        if not path.is_file():
            self._catch_up = False
            return
        try:
            header, ops = read_offline(path)
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
                offline.rewrite(path, {**header, "run_id": self.run_id}, ops[sent:])
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
                short_error(exc),
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
        header = {"kind": "run", "run_id": self.run_id, "experiment": self.cfg.experiment,
                  "run_name": self.cfg.run_name, "tracking_uri": redact(self.uri),
                  "registered_model": self.cfg.registered_model, "parent_run_id": self.cfg.parent_run_id}
        offline.append(self.run_dir, header, ops)
        self._spilled += len(ops)
        self._catch_up = self._catch_up_enabled

    # -- the MLflow run ----------------------------------------------------------------

    def _start_run(self) -> None:
        import mlflow

        experiment_id = get_or_create_experiment(self.client, self.cfg.experiment)
        run = None
        if self.run_id:
            try:
                run = self.client.get_run(self.run_id)
            except Exception as exc:  # noqa: BLE001
                if is_outage(exc):
                    raise
                log.warning(
                    "tracking: run %s not found on %s, starting a new run", self.run_id, redact(self.uri)
                )
        if run is not None:
            self._status_before = run.info.status  # start_run sets it RUNNING again
            self._load_history(run)
            active = mlflow.start_run(run_id=self.run_id)
        else:
            tags = {"mimo.run_dir": str(self.run_dir.resolve()), **self.cfg.tags}
            if self.cfg.parent_run_id:
                tags["mlflow.parentRunId"] = self.cfg.parent_run_id
            active = mlflow.start_run(experiment_id=experiment_id, run_name=self.cfg.run_name, tags=tags)
        self.run_id = active.info.run_id
        self.run_url = run_url(self.uri, active.info.experiment_id, self.run_id)
        self._started = True
        self._start_system_metrics(resumed=run is not None)
        log.info("tracking: MLflow run %s at %s", self.run_id, redact(self.uri))

    def _load_history(self, run) -> None:
        self._params = dict(run.data.params)
        for key in run.data.metrics:
            history = self.client.get_metric_history(self.run_id, key)
            self._history[key] = {m.step for m in history}
            if history and key not in self._final:  # what this launch logs later replaces it
                last = max(history, key=lambda m: (m.step, m.timestamp))
                self._final[key] = {"value": last.value, "step": last.step, "timestamp": last.timestamp}
        # A tracker that only registers the model of an earlier launch (tune's best trial) still
        # knows the run's datasets and evaluation settings for the model's metrics and description.
        for item in getattr(run.inputs, "dataset_inputs", None) or []:
            context = next((t.value for t in item.tags if t.key == "mlflow.data.context"), None)
            if context:
                self._datasets.setdefault(context, {"name": item.dataset.name, "digest": item.dataset.digest})
        for key, value in run.data.tags.items():
            if key.startswith("mimo.eval."):
                self._tags.setdefault(key, value)

    def _start_system_metrics(self, resumed: bool) -> None:
        if not self.cfg.system_metrics:
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

        with redacted_stdout():  # MLflow prints the run's URL, user:password@ included
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
        elif kind == "inputs":
            from harness.tracking.records import dataset_entity

            self.client.log_inputs(self.run_id, datasets=[dataset_entity(d) for d in op["datasets"]])
        elif kind == "image":
            self._send_image(op)
        elif kind == "artifact":
            self._send_artifact(Path(op["path"]), op.get("artifact_path"))
        elif kind == "model":
            op["version"] = self._send_model(Path(op["weights"]), op["val_psnr"], op.get("metric", PSNR_TAG),
                                             op.get("blurred_psnr"), op.get("final_metrics"), op.get("about"))
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
        with redacted_copy(path) as upload:
            self.client.log_artifact(self.run_id, str(upload), artifact_path)

    def _send_model(self, weights: Path, psnr: float, metric: str = PSNR_TAG, blurred_psnr: float | None = None,
                    final_metrics: list[dict] | None = None, about: dict | None = None) -> int | None:
        return registry.log_and_register(self.client, self.run_id, weights, psnr, metric=metric,
                                         blurred_psnr=blurred_psnr, registered_model=self.cfg.registered_model,
                                         final_metrics=final_metrics, about=about)
