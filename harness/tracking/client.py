"""The one MLflow client of the harness: short HTTP timeouts, the registry beside the tracking
server, the experiment lookup, and the rule that tracking failures are logged, never raised."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from harness.tracking.redact import redact, short_error

log = logging.getLogger("harness.tracking")

# Short HTTP timeouts/retries: MLflow's defaults (120 s, 7 retries with backoff) would stall
# the trainer for minutes per call while the server is down. A user's own setting wins.
_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",  # urllib3 logs a warning per retry
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}

# Errors a server that answered gives for a bad record (dropped); anything else is an outage.
_SERVER_FAULT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow 3's own default


def resolve_tracking_uri(configured: str | None) -> str:
    """The user's MLFLOW_TRACKING_URI when set, else the recipe's URI, else MLflow's default."""
    return os.environ.get("MLFLOW_TRACKING_URI") or configured or DEFAULT_TRACKING_URI

def mlflow_client(tracking_uri: str | None):
    import mlflow

    for key, value in _HTTP_ENV.items():  # fail fast when the server is down (trainer and CLI alike)
        os.environ.setdefault(key, value)

    uri = tracking_uri or resolve_tracking_uri(None)
    # The registry follows the tracking server unless the user points it elsewhere; without
    # this MlflowClient would take the process-global registry URI (MLflow's local sqlite).
    return mlflow.MlflowClient(uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)

def set_global_tracking_uri(uri: str) -> None:
    import mlflow

    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI; put the user's value back so the
    # variable keeps meaning "what the user chose" for every later resolve_tracking_uri.
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before

# What an experiment is about: MLflow 3 UIs open an experiment without this tag in their GenAI
# view (traces, judges, no metric columns); the UI sets it itself when a user switches.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# MLflow 3.17's UI no longer reads the tag to pick the view: it takes the mode from its "GenAI |
# Model training" switch (kept in the browser, GenAI on a first visit) or from this query of the
# page's link, so the links the harness prints carry it (`run_url`).
WORKFLOW_QUERY = "workflowType=machine_learning"


def get_or_create_experiment(client, name: str) -> str:
    """The experiment's id, created when missing, tagged as a model-training experiment (an existing
    one without the tag gets it; a kind set by a user, say in the UI, is left as it is)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:  # created meanwhile by a parallel run (Tune trials)
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
        with safely(f"tag experiment {name!r} as {EXPERIMENT_KIND}"):
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id

def is_outage(exc: BaseException) -> bool:
    """True when the server could not be reached (retry later), False when it refused the record."""
    from mlflow.exceptions import RestException

    return not isinstance(exc, RestException) or exc.error_code in _SERVER_FAULT_CODES

def now_ms() -> int:
    return int(time.time() * 1000)


def log_params(client, run_id: str, params: Mapping[str, str]) -> None:
    """Log string params in batches of 100 (MLflow's limit per batch)."""
    from mlflow.entities import Param

    items = list(params.items())
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in items[i : i + 100]])


@contextlib.contextmanager
def safely(what: str) -> Iterator[None]:
    """Run a tracking step whose failure must not cost the caller its work: warn in one line."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - a tracking bug or outage never stops training or tuning
        log.warning("tracking: %s failed: %s", what, short_error(exc))


def never_raises(method):
    """Method form of `safely`: failures are logged (naming the method), never raised; returns None then."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with safely(method.__name__):
            return method(self, *args, **kwargs)
        return None

    return wrapper


def run_url(tracking_uri: str, experiment_id: str | None, run_id: str | None) -> str:
    """The run's page: its URL on a tracking server, or for a local store the `mlflow ui` command
    and the page's address once it runs (MLflow's default port); in the UI's model-training mode
    (WORKFLOW_QUERY)."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}?{WORKFLOW_QUERY}"
    uri = redact(tracking_uri)
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"run `mlflow ui --backend-store-uri {_absolute_sqlite(uri)}`, then open http://127.0.0.1:5000/{page}"


def open_hint(tracking_uri: str, run_id: str | None) -> str:
    """How a person opens the run: the server's URL, or the `mlflow ui` command for a local store."""
    uri = redact(tracking_uri)
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')} (run {run_id})"
    return f"open it with `mlflow ui --backend-store-uri {_absolute_sqlite(uri)}` (run {run_id})"


def _absolute_sqlite(uri: str) -> str:
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # relative to the cwd
        return f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"
    return uri
