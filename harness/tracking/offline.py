"""The offline journal: `<run_dir>/mlflow-offline.jsonl` holds what a tracker could not send (a
header naming the run, then one JSON record per line), and `replay` sends it later."""

from __future__ import annotations

import json
import os
from pathlib import Path

from harness.errors import HarnessError
from harness.files import atomic_write
from harness.tracking.client import resolve_tracking_uri
from harness.tracking.redact import redact

OFFLINE_FILE = "mlflow-offline.jsonl"
PENDING_DIR = "mlflow-pending"  # images/weights of records not sent yet


def append(run_dir: Path, header: dict, ops: list[dict]) -> Path:
    """Append records to the run's offline file, atomically (old content + new lines); a file whose
    header did not know the run id yet (the run was never created) learns it from `header`."""
    path = Path(run_dir) / OFFLINE_FILE
    old = path.read_text() if path.exists() else ""
    if not old:
        old = json.dumps(header) + "\n"
    elif header.get("run_id") and '"run_id": null' in old.splitlines()[0]:
        first, rest = old.split("\n", 1)
        old = json.dumps({**json.loads(first), "run_id": header["run_id"]}) + "\n" + rest
    with atomic_write(path) as tmp:
        tmp.write_text(redact(old + "".join(json.dumps(op) + "\n" for op in ops)))
    return path


def rewrite(path: Path, header: dict, ops: list[dict]) -> None:
    """Replace the file with `header` + `ops` (what is left after a partial catch-up)."""
    with atomic_write(path) as tmp:
        tmp.write_text(redact("".join(json.dumps(r) + "\n" for r in [header, *ops])))


def read_offline(path: Path) -> tuple[dict, list[dict]]:
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
    from harness.recipe import TrackingCfg
    from harness.tracking.run import MlflowTracker

    path = Path(path)
    file = path / OFFLINE_FILE if path.is_dir() else path
    if not file.is_file():
        raise HarnessError(f"{file}: no offline tracking file")
    header, ops = read_offline(file)
    recorded = header.get("tracking_uri") or None
    if "***" in str(recorded):  # redacted: the user must say where
        recorded = None
    uri = tracking_uri or resolve_tracking_uri(recorded)
    cfg = TrackingCfg(enabled=True, tracking_uri=uri, experiment=header.get("experiment") or "mimo-harness",
                      run_name=header.get("run_name"), registered_model=header.get("registered_model"),
                      parent_run_id=header.get("parent_run_id"))
    tracker = MlflowTracker(cfg, file.parent, resume_run_id=header.get("run_id"), log_environment=False,
                            catch_up=False)
    if not tracker.connected:
        raise HarnessError(f"{redact(tracker.uri)}: MLflow server unreachable; nothing replayed from {file}")
    if not any(op["kind"] == "end" for op in ops):
        # Its trainer died before `close`: KILLED, unless a resumed trainer has ended the run since.
        ended = tracker.status_before if tracker.status_before in ("FINISHED", "FAILED", "KILLED") else None
        ops.append({"kind": "end", "status": ended or "KILLED"})
    if not tracker.send(ops):
        tracker.abandon()
        raise HarnessError(
            f"{file}: the server stopped answering after part of the records; run the replay again"
        )
    os.replace(file, file.with_name(file.name + ".replayed"))
    return str(tracker.run_id)
