"""MLflow tracking of training runs, one concern per file.

- `run.py`      the trainer's `Tracker`: live logging (params, metrics, triptychs, artifacts, the
                model) through a queue that survives outages; `Tracker.create` picks the real one
                on rank 0 when `tracking.enabled`, a no-op elsewhere. Never raises into training.
- `offline.py`  the offline journal (`<run_dir>/mlflow-offline.jsonl`) and `replay`, which sends it later.
- `registry.py` logging + registering the model, the champion rule, `promote`, `registry_rows`,
                and `fetch_weights` for `models:/` / `runs:/` URIs.
- `records.py`  what a run records besides metrics: params, environment, dataset inputs, triptychs.
- `client.py`   the one MLflow client (short HTTP timeouts, registry URI, experiment lookup) and
                `safely` / `never_raises`, the rule that tracking failures are logged, not raised.
- `redact.py`   credentials never leave the process: every record, artifact and error line passes it.
"""

from harness.tracking.client import resolve_tracking_uri
from harness.tracking.offline import OFFLINE_FILE, replay
from harness.tracking.records import clean_params, dataset_tags, environment_tags
from harness.tracking.redact import redact
from harness.tracking.registry import (
    BLURRED_TAG,
    CHAMPION,
    PSNR_TAG,
    TEST_PSNR_TAG,
    fetch_weights,
    promote,
    registry_rows,
)
from harness.tracking.run import MlflowTracker, Tracker

create = Tracker.create

__all__ = ["BLURRED_TAG", "CHAMPION", "OFFLINE_FILE", "PSNR_TAG", "TEST_PSNR_TAG", "MlflowTracker", "Tracker",
           "clean_params", "create", "dataset_tags", "environment_tags", "fetch_weights", "promote", "redact",
           "registry_rows", "replay", "resolve_tracking_uri"]
