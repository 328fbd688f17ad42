"""The experiment's MLflow parent run: created with the search space before Ray starts; each
trial's trainer nests its own run under it (`tracking.parent_run_id` in the trial recipe); at the
end the trials' runs are closed with their Tune status, the best trial's model is registered (the
usual champion rule) and the best config is recorded on the parent. All through the one client of
`harness.tracking`; a tracking failure is a warning, never a lost experiment."""

from __future__ import annotations

from pathlib import Path

from harness.tracking.client import get_or_create_experiment, log_params, mlflow_client, now_ms, safely
from harness.tracking.records import clean_params, environment_tags
from harness.tune.spec import EXPERIMENT_TAG, TRIAL_TAG, TuneSpec

PARENT_TAG = "mimo.tune.parent"
BEST_RECIPE = "best_recipe.yaml"
RESULTS = "results.csv"


def start_parent_run(spec: TuneSpec) -> None:
    """Create the experiment's parent run and log the search space (once)."""
    cfg = spec.base_recipe.tracking
    with safely("tune: create the MLflow parent run (trials are not tracked)"):
        client = mlflow_client(spec.tracking_uri)
        spec.experiment_id = get_or_create_experiment(client, cfg.experiment)
        run = client.create_run(spec.experiment_id, run_name=spec.name,
                                tags={EXPERIMENT_TAG: str(spec.exp_dir), PARENT_TAG: "true", **environment_tags()})
        spec.parent_run_id = run.info.run_id
    if not spec.parent_run_id:
        return
    params = {"search.space." + p.name: f"{p.kind}{list(p.values)}" + (f" when {dict(p.when)}" if p.when else "")
              for p in spec.params}
    params.update({f"search.{k}": v for k, v in (("metric", spec.metric), ("mode", spec.mode),
                   ("num_samples", spec.num_samples), ("search_alg", spec.search_alg),
                   ("max_concurrent", spec.max_concurrent), ("scheduler", spec.scheduler),
                   ("resources", spec.resources), ("seed", spec.seed))})
    with safely("tune: log the search space"):
        log_params(client, spec.parent_run_id, clean_params(params))


def trial_runs(spec: TuneSpec) -> dict[str, str]:
    """trial id -> the MLflow run its trainer created under the parent (the newest, if a trial
    restarted from scratch made two)."""
    found: dict[str, str] = {}
    with safely("tune: list the trial runs"):
        runs = mlflow_client(spec.tracking_uri).search_runs(
            [spec.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{spec.parent_run_id}'",
            order_by=["attributes.start_time ASC"], max_results=10_000)
        for run in runs:
            if TRIAL_TAG in run.data.tags:
                found[run.data.tags[TRIAL_TAG]] = run.info.run_id
    return found


def finish_tracking(spec: TuneSpec, rows: list[dict], best: dict | None) -> None:
    """Close the trials' runs, register the best model, record the best config on the parent."""
    client = mlflow_client(spec.tracking_uri)
    for row in rows:
        if row["mlflow_run_id"]:
            with safely(f"tune: close the run of trial {row['trial_id']}"):
                _close_child(client, row)
    if best is not None and best["mlflow_run_id"]:
        with safely("tune: register the best model"):
            register_best(spec, best)
    with safely("tune: record the best trial"):
        _record_best(client, spec, best)


def _record_best(client, spec: TuneSpec, best: dict | None) -> None:
    from mlflow.entities import Metric

    run_id = spec.parent_run_id
    if best is not None:
        log_params(client, run_id, clean_params({f"best.{k}": v for k, v in best["params"].items()}
                                                | {"best.trial_id": best["trial_id"]}))
        client.log_batch(run_id, metrics=[Metric(f"best_{spec.metric}", best[spec.metric], now_ms(), 0)])
    for name in (RESULTS, BEST_RECIPE):
        if (spec.exp_dir / name).is_file():
            client.log_artifact(run_id, str(spec.exp_dir / name))
    client.set_terminated(run_id, "FINISHED")


def _close_child(client, row: dict) -> None:
    """An ASHA-stopped trial reads KILLED (the trainer saw Tune's stop as a failure, or never
    closed its run); a trial still RUNNING after the experiment failed."""
    run_id = row["mlflow_run_id"]
    client.set_tag(run_id, "mimo.tune.status", row["status"])
    if row["status"] == "STOPPED":
        client.set_terminated(run_id, "KILLED")
    elif client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, "FAILED")

def register_best(spec: TuneSpec, best: dict) -> int | None:
    """Log the best trial's weights on its child run and register them (champion by the usual rule)."""
    from harness import checkpoint
    from harness.tracking.run import MlflowTracker
    from harness.train import WEIGHTS

    cfg = spec.base_recipe.tracking
    if not cfg.registered_model:
        return None
    run_dir = Path(best["run_dir"])
    weights = run_dir / WEIGHTS
    if not weights.is_file():  # stopped by ASHA before its final export
        weights = checkpoint.export(run_dir, weights, ema=spec.base_recipe.train.ema_decay is not None)
    cfg = cfg.model_copy(update={"tracking_uri": spec.tracking_uri})
    tracker = MlflowTracker(cfg, run_dir, resume_run_id=best["mlflow_run_id"], log_environment=False)
    version = tracker.log_model(weights, best["val_psnr"])
    tracker.close("FINISHED")
    return version
