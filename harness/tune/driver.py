"""The driver: `python -m harness.tune --recipe R [k=v ...]` / `--resume EXP_DIR` (and `mimo tune`).

Load and check the tune recipe (no Ray yet), write `tune_spec.json`, start the MLflow parent run,
run the Tuner (ASHA over validations; `Tuner.restore` for `--resume`), then turn its ResultGrid
into `results.csv`, a printed table and `best_recipe.yaml`. The experiment directory
`<storage_path>/<name>/` holds Tune's state, the spec, `trials/<id>/` (each trial's run dir) and
those files."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from pathlib import Path

from harness.errors import HarnessError
from harness.files import atomic_write
from harness.recipe import apply_overrides, dump_recipe, recipe_from_dict
from harness.tune import parent_run
from harness.tune.parent_run import BEST_RECIPE, RESULTS
from harness.tune.spec import TuneSpec, load_tune_recipe, yaml_value
from harness.tune.trial import TRIALS, VALIDATION, trainable

SPEC = "tune_spec.json"

# ----------------------------------------------------------------------------- the Ray side


def ray_search_space(spec: TuneSpec) -> dict:
    from ray import tune

    space = {}
    for p in spec.params:
        lo_hi = p.values
        if p.kind == "uniform":
            space[p.name] = tune.uniform(*lo_hi)
        elif p.kind == "loguniform":
            space[p.name] = tune.loguniform(*lo_hi)
        elif p.kind == "randint":
            space[p.name] = tune.randint(int(lo_hi[0]), int(lo_hi[1]) + 1)  # inclusive high
        elif p.kind == "choice":
            space[p.name] = tune.choice(list(p.values))
        else:
            space[p.name] = tune.grid_search(list(p.values))
    return space

def search_algorithm(spec: TuneSpec):
    if spec.search_alg == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=spec.seed), max_concurrent=spec.max_concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=spec.max_concurrent, random_state=spec.seed)

def trial_scheduler(spec: TuneSpec):
    if spec.scheduler["name"] == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # The validation index comes from the trainer's step, not from Tune's report counter: a trial
    # resumed from a trainer checkpoint newer than Tune's saved state still counts right.
    return ASHAScheduler(time_attr=VALIDATION, max_t=spec.max_t,
                         grace_period=min(spec.scheduler["grace_period"], spec.max_t),
                         reduction_factor=spec.scheduler["reduction_factor"])


# ----------------------------------------------------------------------------- results


def result_rows(spec: TuneSpec, grid, run_ids: dict[str, str] | None = None) -> list[dict]:
    """One row per trial of the ResultGrid: status, validations reached, last and best metric, its
    sampled values, its run dir and (from `run_ids`, trial id -> MLflow run) its MLflow run."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        validations = int(metrics.get(VALIDATION) or 0)
        history = result.metrics_dataframe
        best_metric = None
        if history is not None and spec.metric in history:
            series = history[spec.metric]
            best_metric = float(series.max() if spec.mode == "max" else series.min())
        status = "ERROR" if result.error else ("TERMINATED" if validations >= spec.max_t else "STOPPED")
        run_dir = spec.exp_dir / TRIALS / str(trial_id)
        rows.append({"trial_id": trial_id, "status": status, VALIDATION: validations,
                     "step": metrics.get("step"), "val_psnr": metrics.get("val_psnr"),
                     "val_ssim": metrics.get("val_ssim"), f"best_{spec.metric}": best_metric,
                     "params": spec.sampled_fields(result.config or {}), "run_dir": str(run_dir),
                     "mlflow_run_id": (run_ids or {}).get(str(trial_id))})
    return sorted(rows, key=lambda r: str(r["trial_id"]))

def pick_best(spec: TuneSpec, rows: list[dict]) -> dict | None:
    """Best last metric among trials that trained to the end (else among all that reported)."""
    scored = [r for r in rows if r[spec.metric] is not None and r["status"] != "ERROR"]
    finished = [r for r in scored if r["status"] == "TERMINATED"] or scored
    if not finished:
        return None
    sign = 1 if spec.mode == "max" else -1
    return max(finished, key=lambda r: sign * r[spec.metric])

def write_results(spec: TuneSpec, rows: list[dict]) -> Path:
    keys = sorted({k for r in rows for k in r["params"]})
    head = ["trial_id", "status", VALIDATION, "step", "val_psnr", "val_ssim", f"best_{spec.metric}", *keys,
            "mlflow_run_id", "run_dir"]
    path = spec.exp_dir / RESULTS
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(head)
        for r in rows:
            writer.writerow([_cell(r["params"].get(k, "")) if k in keys else _cell(r.get(k)) for k in head])
    return path

def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)

def _short_cell(value) -> str:
    if isinstance(value, list):  # per-scale weights, betas: 4 significant digits on screen
        return "[" + ", ".join(_cell(v) if not isinstance(v, float) else f"{v:.4g}" for v in value) + "]"
    return _cell(value)

def format_table(spec: TuneSpec, rows: list[dict]) -> str:
    keys = sorted({k for r in rows for k in r["params"]})
    head = ["trial", "status", "val#", spec.metric, *keys]
    body = [[str(r["trial_id"]), r["status"], str(r[VALIDATION]), _cell(r[spec.metric]),
             *(_short_cell(r["params"].get(k)) for k in keys)] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in [head, *body])

def write_best_recipe(spec: TuneSpec, best: dict) -> Path:
    """A plain training recipe with the winning values (tracking/registry as in the base recipe)."""
    raw = apply_overrides(spec.base, [f"{k}={yaml_value(v)}" for k, v in best["params"].items()]
                          + [f"name={spec.name}-best"], spec.source)
    recipe = recipe_from_dict(raw, f"{spec.source} (best trial {best['trial_id']})")
    path = spec.exp_dir / BEST_RECIPE
    header = (f"# Best of tune experiment {spec.exp_dir} (trial {best['trial_id']}, "
              f"{spec.metric} {best[spec.metric]:.4f}).\n# Train it: deepspeed harness/train.py --recipe {path}\n")
    with atomic_write(path) as tmp:
        tmp.write_text(header + dump_recipe(recipe))
    return path


# ----------------------------------------------------------------------------- the command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m harness.tune", description="Ray Tune over training recipes.")
    add_arguments(p)
    return p.parse_intermixed_args(argv)

def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `python -m harness.tune` and `mimo tune` (one definition for both)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--recipe", help="tune recipe YAML (recipes/tune-*.yaml)")
    src.add_argument("--resume", metavar="EXP_DIR", help="continue an interrupted experiment")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="search.* keys change the search, others the base training recipe")

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return execute(args)
    except HarnessError as exc:
        print(f"tune: error: {exc}", file=sys.stderr)
        return 2

def execute(args: argparse.Namespace) -> int:
    """Run (or resume) an experiment and print its results; HarnessError for bad input."""
    spec = prepare(args)
    rows, best = run_experiment(spec, resume=bool(args.resume), address=args.address)
    print(format_table(spec, rows))
    print(f"results: {spec.exp_dir / RESULTS}")
    if best is None:
        print("tune: no trial reported a metric; no best recipe", file=sys.stderr)
        return 1
    print(f"best: trial {best['trial_id']} {spec.metric}={best[spec.metric]:.4f}; "
          f"recipe {spec.exp_dir / BEST_RECIPE}")
    return 0

def prepare(args: argparse.Namespace) -> TuneSpec:
    """Load and check everything (no Ray yet); write tune_spec.json; start the MLflow parent run."""
    if args.resume:
        if args.overrides:
            raise HarnessError("--resume takes no overrides: the experiment keeps its recipe")
        path = Path(args.resume) / SPEC
        if not path.is_file():
            raise HarnessError(f"--resume {args.resume}: no {SPEC} there (expected an experiment directory)")
        return TuneSpec.from_json(path.read_text())
    spec = load_tune_recipe(args.recipe, args.overrides)
    from harness.train import preflight

    preflight(spec.base_recipe, None, spec.resources["workers"])  # model, shards, batch split
    if (spec.exp_dir / SPEC).exists():
        raise HarnessError(f"{spec.exp_dir}: experiment exists; continue it with --resume {spec.exp_dir} "
                           "or set search.name")
    _check_tracking(spec)
    spec.exp_dir.mkdir(parents=True, exist_ok=True)
    if spec.tracking_uri:
        parent_run.start_parent_run(spec)
    with atomic_write(spec.exp_dir / SPEC) as tmp:
        tmp.write_text(spec.to_json())
    return spec

def _check_tracking(spec: TuneSpec) -> None:
    """Parallel trials need an MLflow server: several processes on one sqlite file lock it."""
    from harness.tracking.client import resolve_tracking_uri

    cfg = spec.base_recipe.tracking
    if not cfg.enabled:
        return
    uri = resolve_tracking_uri(cfg.tracking_uri)
    if not uri.startswith(("http://", "https://", "databricks")):
        raise HarnessError(f"{spec.source}: tracking.tracking_uri: {uri!r}; tune trials need an MLflow server "
                           "(http://host:port), not a local store shared by parallel processes")
    spec.tracking_uri = uri

def run_experiment(spec: TuneSpec, *, resume: bool, address: str | None) -> tuple[list[dict], dict | None]:
    import ray
    from ray import tune

    # Tune's experiment state is what --resume restores: save it often (it is small).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    try:
        fn = trainable(spec)
        if resume:
            tuner = tune.Tuner.restore(str(spec.exp_dir), trainable=fn, resume_errored=True)
        else:
            tuner = tune.Tuner(
                fn, param_space=ray_search_space(spec),
                tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                                            scheduler=trial_scheduler(spec), search_alg=search_algorithm(spec)),
                run_config=tune.RunConfig(name=spec.name, storage_path=spec.storage_path, verbose=1,
                                          failure_config=tune.FailureConfig(max_failures=0)))
        grid = tuner.fit()
    finally:
        ray.shutdown()
    tracked = bool(spec.tracking_uri and spec.parent_run_id)
    rows = result_rows(spec, grid, parent_run.trial_runs(spec) if tracked else None)
    write_results(spec, rows)
    best = pick_best(spec, rows)
    if best is not None:
        write_best_recipe(spec, best)
    if tracked:
        parent_run.finish_tracking(spec, rows, best)
    return rows, best
