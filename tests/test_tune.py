"""Ray Tune over the real trainer: a local Ray head (tests/fixtures/ray.py), synthetic shards,
a real `mlflow server`; the tiny recipe recipes/tune-smoke.yaml (20 steps, validation every 5)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.fixtures.launch import Background
from tests.fixtures.ray import torch_extensions_dir

pytestmark = pytest.mark.slow
SMOKE = REPO / "recipes" / "tune-smoke.yaml"


class Driver(Background):
    """`python -m harness.tune ...` against the test's Ray head, in its own process group."""

    def __init__(self, args: list[str], head, log: Path):
        super().__init__([sys.executable, "-m", "harness.tune", *map(str, args)], log=log, env=head.env())


def data_args(shards: dict[str, Path], storage: Path) -> list[str]:
    return [f"data.train={shards['train']}", f"data.val={shards['test']}", f"search.storage_path={storage}"]


def read_results(exp: Path) -> list[dict]:
    with open(exp / "results.csv", newline="") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------- errors before Ray


@pytest.mark.parametrize("override, expected", [
    ("search.space={optim.learning_rate: {loguniform: [0.001, 0.01]}}", "search.space.optim.learning_rate: value"),
    ("search.space={optim.lr: {loguniform: [0, 0.01]}}", "search.space.optim.lr.loguniform: bounds [0, 0.01]"),
    ("search.space={loss.fft_weight: {uniform: [0.5, 0.1]}}", "low must be below high"),
    ("search.space={data.crop: {choice: [32, 30]}}", "search.space.data.crop: value 30"),
    ("search.space={schedule.gamma: {uniform: [0.1, 0.5], when: {schedule.name: multistep}}}",
     "schedule.name is not a choice/grid param"),
    ("search.scheduler={name: hyperband}", "search.scheduler.name: 'hyperband'"),
])
def test_search_space_error_is_one_line_before_ray(train_shards, tmp_path, override, expected):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run([sys.executable, "-m", "harness", "tune", "--recipe", str(SMOKE),
                          *data_args(train_shards, tmp_path), override],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("mimo tune: error: ") and expected in lines[0], lines[0]
    assert str(SMOKE) in lines[0]
    assert not (tmp_path / "tune-smoke").exists()  # nothing written, no Ray started
    assert "ray" not in res.stdout.lower()


# ----------------------------------------------------------------------------- a full experiment


def test_asha_mlflow_best_recipe(ray_head, mlflow_server, train_shards, tmp_path, launch_train):
    import mlflow

    model = "tune-smoke-model"
    args = ["--recipe", SMOKE, *data_args(train_shards, tmp_path), "search.num_samples=4",
            "tracking.enabled=true", f"tracking.tracking_uri={mlflow_server}", "tracking.experiment=tune-test",
            f"tracking.registered_model={model}"]
    driver = Driver(args, ray_head, tmp_path / "driver.log")
    assert driver.wait(480) == 0, driver.output()[-4000:]
    exp = tmp_path / "tune-smoke"
    rows = read_results(exp)
    assert len(rows) == 4
    # ASHA (grace 1 validation, reduction 2) stops at least one trial early; one runs to the end.
    assert any(r["status"] == "STOPPED" and int(r["validation"]) < 4 for r in rows), rows
    assert any(r["status"] == "TERMINATED" and int(r["validation"]) == 4 for r in rows), rows
    assert "best: trial" in driver.output()

    client = mlflow.MlflowClient(mlflow_server)
    exp_id = client.get_experiment_by_name("tune-test").experiment_id
    runs = client.search_runs([exp_id])
    parents = [r for r in runs if r.data.tags.get("mimo.tune.parent") == "true"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.params["search.space.optim.lr"].startswith("loguniform")
    assert "best_val_psnr" in parent.data.metrics
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4  # one per trial, nothing else nested
    by_id = {r["trial_id"]: r for r in rows}
    for child in children:
        row = by_id[child.data.tags["mimo.tune.trial_id"]]
        assert row["mlflow_run_id"] == child.info.run_id
        # The child holds the trainer's own params: this trial's sampled values, logged once.
        assert float(child.data.params["optim.lr"]) == pytest.approx(float(row["optim.lr"]), rel=1e-5)
        assert "val/psnr" in child.data.metrics
        assert child.info.status in ("FINISHED", "KILLED")

    best = max((r for r in rows if r["status"] == "TERMINATED"), key=lambda r: float(r["val_psnr"]))
    assert float(parent.data.metrics["best_val_psnr"]) == pytest.approx(float(best["val_psnr"]), rel=1e-5)
    champion = client.get_model_version_by_alias(model, "champion")
    assert champion.run_id == best["mlflow_run_id"]

    # best_recipe.yaml is a plain training recipe with the winning values, and it trains.
    from harness.recipe import load_recipe

    recipe = load_recipe(exp / "best_recipe.yaml")
    assert recipe.optim.lr == pytest.approx(float(best["optim.lr"]), rel=1e-5)
    assert recipe.loss.fft_weight == pytest.approx(float(best["loss.fft_weight"]), rel=1e-5)
    assert recipe.schedule.name == best["schedule.name"]
    run_dir = tmp_path / "best-run"
    proc = launch_train(["--recipe", exp / "best_recipe.yaml", "--run-dir", run_dir, "train.steps=2",
                         "eval.every=2", "tracking.enabled=false"], nprocs=0,
                        env={"TORCH_EXTENSIONS_DIR": torch_extensions_dir()})
    assert proc.run(timeout=300) == 0, proc.output()[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_step"] == 2 and summary["val_psnr"] is not None


# ----------------------------------------------------------------------------- kill and resume


def test_killed_experiment_resumes_from_checkpoints(ray_head, train_shards, tmp_path):
    exp = tmp_path / "tune-smoke"
    trials = exp / "trials"
    args = ["--recipe", SMOKE, *data_args(train_shards, tmp_path), "search.num_samples=3",
            "search.scheduler=none", "search.max_concurrent=2"]
    driver = Driver(args, ray_head, tmp_path / "driver.log")

    def progress() -> tuple[list[Path], list[Path]]:
        """(run dirs of trials Tune has recorded as done, run dirs of trials part-way)."""
        done = [trials / t for t in tune_terminated(exp)]
        mid = [d for d in trials.glob("*") if d not in done and not (d / "summary.json").exists()
               and any(d.glob("checkpoints/step*/COMPLETE"))]
        return done, mid

    deadline = time.monotonic() + 360
    while not all(progress()):  # one trial done (in Tune's saved state), another one part-way
        assert driver.proc.poll() is None, driver.output()[-4000:]
        assert time.monotonic() < deadline, driver.output()[-4000:]
        time.sleep(0.2)
    driver.kill()  # SIGKILL to the driver's process group: Ray ends the job's trials
    wait_quiet(trials, 3.0, timeout=60)
    done, mid = progress()
    stamps = {d: (d / "summary.json").stat().st_mtime_ns for d in done}
    assert not (exp / "results.csv").exists()

    resumed = Driver(["--resume", exp], ray_head, tmp_path / "resume.log")
    assert resumed.wait(480) == 0, resumed.output()[-4000:]
    rows = read_results(exp)
    assert len(rows) == 3 and {r["status"] for r in rows} == {"TERMINATED"}, rows
    assert all(int(r["validation"]) == 4 and int(r["step"]) == 20 for r in rows), rows
    assert len(list(trials.iterdir())) == 3
    for d, stamp in stamps.items():  # finished trials were not run again
        assert (d / "summary.json").stat().st_mtime_ns == stamp
    events = [json.loads(line) for d in mid for line in (d / "log.jsonl").read_text().splitlines()]
    assert any(e["event"] == "resumed" for e in events), "an interrupted trial restarted from scratch"
    assert (exp / "best_recipe.yaml").is_file()


def tune_terminated(exp: Path) -> list[str]:
    """Trial ids that Tune's saved experiment state records as TERMINATED."""
    out = []
    for path in exp.glob("experiment_state-*.json"):
        try:
            trials = json.loads(path.read_text())["trial_data"]
        except (OSError, ValueError, KeyError):  # being written: try again later
            continue
        out += [t["trial_id"] for t in (json.loads(item[0]) for item in trials) if t["status"] == "TERMINATED"]
    return out


def wait_quiet(root: Path, quiet: float, timeout: float) -> None:
    """Wait until nothing under `root` has changed for `quiet` seconds (the killed trials are gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        newest = max((_mtime(p) for p in root.rglob("*")), default=0.0)
        if time.time() - newest > quiet:
            return
        time.sleep(0.5)
    raise AssertionError(f"trials under {root} still writing {timeout} s after the driver was killed")


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # a temp file renamed meanwhile
        return 0.0


# ----------------------------------------------------------------------------- a 2-rank trial


def test_two_worker_trial_runs_torchtrainer_deepspeed(ray_head, train_shards, tmp_path):
    args = ["--recipe", SMOKE, *data_args(train_shards, tmp_path), "search.num_samples=1",
            "search.scheduler=none", "search.resources={cpus: 1, gpus: 0, workers: 2}", "train.steps=10"]
    driver = Driver(args, ray_head, tmp_path / "driver.log")
    assert driver.wait(480) == 0, driver.output()[-4000:]
    exp = tmp_path / "tune-smoke"
    rows = read_results(exp)
    assert len(rows) == 1 and rows[0]["status"] == "TERMINATED" and int(rows[0]["validation"]) == 2, rows
    summary = json.loads((Path(rows[0]["run_dir"]) / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["final_step"] == 10
    assert float(rows[0]["val_psnr"]) == pytest.approx(summary["val_psnr"], rel=1e-5)
