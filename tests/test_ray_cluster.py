"""The two cluster paths of cluster/ray/README.md, for real on loopback:
(1) `ray job submit --working-dir .` to a head started with `ray start --head`;
(2) `ray up` + `ray submit` with the on-prem cluster YAML, through an sshd on 127.0.0.1 that the
test starts (its own config, host key and client key; stopped by PID)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow
RAY_BIN = Path(sys.executable).with_name("ray")
# What the working-dir upload leaves out besides .gitignore'd files (Ray honours .gitignore).
EXCLUDES = [".git", ".venv", "runs", "demo", "shards", "mlruns", "mlflow.db", "**/__pycache__"]


def tiny_args(shards: dict[str, Path], storage: Path) -> list[str]:
    return [f"data.train={shards['train']}", f"data.val={shards['test']}", f"search.storage_path={storage}",
            "search.num_samples=2", "search.scheduler=none", "train.steps=10"]


def check_experiment(exp: Path) -> None:
    with open(exp / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and all(r["status"] == "TERMINATED" and r["step"] == "10" for r in rows), rows
    assert (exp / "best_recipe.yaml").is_file()


def test_ray_job_submit_runs_a_tuning_experiment(ray_head, train_shards, tmp_path):
    cmd = [str(RAY_BIN), "job", "submit", "--address", ray_head.dashboard, "--working-dir", ".",
           "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--",
           "python", "-m", "harness.tune", "--recipe", "recipes/tune-smoke.yaml", *tiny_args(train_shards, tmp_path)]
    # The job's `python` is the first on the head's PATH: the venv's (the head was started from it).
    res = subprocess.run(cmd, cwd=REPO, env=ray_head.env(), capture_output=True, text=True, timeout=480,
                         start_new_session=True)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "succeeded" in out, out[-4000:]
    assert "best: trial" in out
    check_experiment(tmp_path / "tune-smoke")
