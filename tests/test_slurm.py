"""The cluster/slurm scripts on a real two-node Slurm (tests/fixtures/slurm.py starts it)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.fixtures.launch import private_torch_extensions
from tests.fixtures.slurm import remove_shm_leftovers

pytestmark = pytest.mark.slow


def test_local_cluster_runs_a_job_on_both_nodes(slurm, tmp_path: Path):
    script = tmp_path / "hello.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --nodes=2 --ntasks-per-node=1\n"
        "srun bash -c 'echo \"task $SLURM_PROCID on $SLURMD_NODENAME\"'\n"
    )
    job = slurm.sbatch("--output", tmp_path / "hello-%j.out", script)
    record = slurm.wait(job, timeout=60)
    assert record["NodeList"] == "n[1-2]"
    out = (tmp_path / f"hello-{job}.out").read_text()
    assert sorted(out.split("\n")[:2]) == ["task 0 on n1", "task 1 on n2"], out


# ----------------------------------------------------------------------------- train.sbatch

# Long enough (120 steps, a few seconds) to be signalled mid-run; validation and periodic
# checkpoints at step 60 so the preempted run crosses both before and after its requeue.
TRAIN_STEPS = 120
RESOURCES = ["--gpus-per-node=0", "--cpus-per-task=1"]  # the local nodes have 2 CPUs and no GPUs


def train_env(run_dir: Path, shards: dict[str, Path], extensions: Path) -> dict[str, str]:
    """The header variables the tests set (a fresh clone's venv is the one running pytest)."""
    overrides = [f"data.train={shards['train']}", f"data.val={shards['test']}", f"train.steps={TRAIN_STEPS}",
                 "eval.every=60", "checkpoint.every=60"]
    return {"REPO": str(REPO), "VENV": sys.prefix, "RUN_DIR": str(run_dir), "OVERRIDES": " ".join(overrides),
            "PYTHONUNBUFFERED": "1", "TORCH_EXTENSIONS_DIR": str(extensions)}


def private_extensions() -> Path:
    """The Slurm jobs' own extensions cache (tests/fixtures/launch.py), with DeepSpeed's shm op
    built in it before any job starts (so job start-up is seconds, not a compile)."""
    dest = private_torch_extensions("slurm")
    # The venv's bin first, as in the jobs (they activate it): torch runs whichever `ninja` is on
    # PATH, and the venv's (1.13) and the system's (1.11) hash commands differently, so a build
    # by one is "command line changed" to the other: a full rebuild at every switch.
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(dest),
           "PATH": f"{Path(sys.prefix) / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    build = ("from deepspeed.accelerator import get_accelerator; "
             "get_accelerator().create_op_builder('ShareMemCommBuilder').load()")
    proc = subprocess.run([sys.executable, "-c", build], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"building DeepSpeed's shm op failed:\n{proc.stderr[-3000:]}"
    return dest


def logged_step(run_dir: Path) -> int:
    """The newest step in the trainer's log.jsonl (0 before the first)."""
    log = run_dir / "log.jsonl"
    steps = [json.loads(line).get("step", 0) for line in log.read_text().splitlines() if line.strip()] \
        if log.exists() else []
    return max(steps, default=0)


@pytest.fixture(scope="module")
def train_jobs(slurm, train_shards, tmp_path_factory) -> dict:
    """Two smoke trainings through train.sbatch: uninterrupted on 2 nodes x 1 task, and
    1 node x 2 tasks preempted mid-run with `scancel --full --signal=USR1`, requeued, resumed."""
    out = tmp_path_factory.mktemp("slurm-train")
    script = REPO / "cluster" / "slurm" / "train.sbatch"
    extensions = private_extensions()
    jobs = {}
    # The preempted job first: it needs both CPUs of one node, the other job one CPU of each,
    # so the uninterrupted job runs while the preempted one waits to be requeued.
    for name, shape in (("preempted", ["--nodes=1", "--ntasks-per-node=2"]),
                        ("nodes2", ["--nodes=2", "--ntasks-per-node=1"])):
        run_dir = out / name
        job = slurm.sbatch(*RESOURCES, *shape, f"--output={out}/{name}-%j.out", script,
                           env=train_env(run_dir, train_shards, extensions))
        jobs[name] = {"job": job, "run_dir": run_dir, "log": out / f"{name}-{job}.out"}
    try:
        pre = jobs["preempted"]
        slurm.preempt_and_requeue(pre["job"], lambda: logged_step(pre["run_dir"]), min_step=10, timeout=180)
        pre["stopped_summary"] = json.loads((pre["run_dir"] / "summary.json").read_text())
        for info in jobs.values():
            info["record"] = slurm.wait(info["job"], timeout=240)
        yield jobs
    finally:
        remove_shm_leftovers(info["job"] for info in jobs.values())


def rank_nodes(log: Path) -> dict[int, str]:
    """rank -> node from train.sbatch's "rank R on NODE" lines (of the last attempt)."""
    return {int(m[0]): m[1] for m in re.findall(r"train\.sbatch: rank (\d+) on (\S+)", log.read_text())}


def test_train_sbatch_two_nodes_one_task_each(train_jobs):
    job = train_jobs["nodes2"]
    assert job["record"]["JobState"] == "COMPLETED" and job["record"]["NodeList"] == "n[1-2]"
    assert rank_nodes(job["log"]) == {0: "n1", 1: "n2"}, job["log"].read_text()[-3000:]
    summary = json.loads((job["run_dir"] / "summary.json").read_text())
    assert summary["final_step"] == TRAIN_STEPS and summary["world_size"] == 2 and not summary["stopped"]
    assert (job["run_dir"] / "weights.pkl").is_file()  # exported
    assert (job["run_dir"] / "checkpoints" / f"step{TRAIN_STEPS:08d}" / "COMPLETE").is_file()


def test_train_sbatch_preempted_requeued_resumes_exactly(train_jobs):
    import torch

    job = train_jobs["preempted"]
    text = job["log"].read_text()
    # First attempt: stopped by the signal with a checkpoint, then requeued under the same id.
    stopped = job["stopped_summary"]
    assert stopped["stopped"] and 10 <= stopped["final_step"] < TRAIN_STEPS, stopped
    assert f"train.sbatch: job {job['job']} restart 0 " in text
    assert f"train.sbatch: preempted, requeueing job {job['job']}" in text
    # Second attempt: SLURM_RESTART_COUNT=1, resumed and finished.
    assert f"train.sbatch: job {job['job']} restart 1 " in text
    assert job["record"]["JobState"] == "COMPLETED" and job["record"]["Restarts"] == "1"
    assert set(rank_nodes(job["log"]).values()) in ({"n1"}, {"n2"})  # 1 node x 2 tasks
    events = [json.loads(line) for line in (job["run_dir"] / "log.jsonl").read_text().splitlines()]
    resumed_from = [e.get("tag") for e in events if e.get("event") == "resumed"]
    assert resumed_from == [f"step{stopped['final_step']:08d}"], resumed_from
    summary = json.loads((job["run_dir"] / "summary.json").read_text())
    assert summary["final_step"] == TRAIN_STEPS and not summary["stopped"]
    # Exact resume, now through Slurm: the same weights as the uninterrupted run.
    resumed = torch.load(job["run_dir"] / "weights.pkl", weights_only=True)["model"]
    straight = torch.load(train_jobs["nodes2"]["run_dir"] / "weights.pkl", weights_only=True)["model"]
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


# ----------------------------------------------------------------------------- pack.sbatch


def test_pack_sbatch_array_then_merge_and_verify(slurm, synth_gopro, tmp_path):
    from harness.data import shards

    out = tmp_path / "shards"
    env = {"REPO": str(REPO), "VENV": sys.prefix, "ROOT": str(synth_gopro), "SPLIT": "train", "OUT": str(out),
           "PACK_ARGS": "--samples-per-shard 2 --no-progress"}  # 6 pairs -> 3 shards over 2 parts
    array = slurm.sbatch("--array=0-1", "--cpus-per-task=1", f"--output={tmp_path}/pack-%A_%a.out",
                         REPO / "cluster" / "slurm" / "pack.sbatch", env=env)
    slurm.wait(array, timeout=120)
    first = (tmp_path / f"pack-{array}_0.out").read_text()
    found = re.search(r"pack\.sbatch: merge job (\d+) \(after array job (\d+)\)", first)
    assert found and int(found[2]) == array, first
    merge = int(found[1])
    record = slurm.wait(merge, timeout=120)
    assert record["Dependency"] == "(null)" and record["JobState"] == "COMPLETED"
    # Each part wrote its own manifest; the merge job joined them and `mimo shards verify` passed.
    assert sorted(p.name for p in out.glob("manifest.part-*.json")) == [
        "manifest.part-0000-of-0002.json", "manifest.part-0001-of-0002.json"]
    manifest = shards.load_manifest(out)
    assert manifest["total_samples"] == 6 and len(manifest["shards"]) == 3
    assert shards.verify(out) == []
    assert record["StdOut"].startswith(str(tmp_path)), record  # beside the array's output



# ----------------------------------------------------------------------------- tune.sbatch


def test_tune_sbatch_runs_a_two_trial_experiment(slurm, train_shards, tmp_path):
    """Ray head in the batch shell of a one-node job (on 127.0.0.1), two trials to completion,
    results written, Ray torn down by PID. (Two Ray nodes on one host share an address, which
    Ray Train's worker placement does not survive here; multi-node is left to real clusters.)"""
    import csv

    storage = tmp_path / "tune"
    overrides = [f"data.train={train_shards['train']}", f"data.val={train_shards['test']}", "train.steps=10",
                 "search.num_samples=2", "search.max_concurrent=1", "search.scheduler.name=none",
                 f"search.storage_path={storage}", "search.name=slurm"]
    env = {"REPO": str(REPO), "VENV": sys.prefix, "RECIPE": "recipes/tune-smoke.yaml",
           "TUNE_ARGS": " ".join(overrides), "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "TORCH_EXTENSIONS_DIR": str(private_extensions())}
    job = slurm.sbatch("--gpus-per-node=0", "--cpus-per-task=2", "--nodes=1", "--ntasks-per-node=1",
                       f"--output={tmp_path}/tune-%j.out", REPO / "cluster" / "slurm" / "tune.sbatch", env=env)
    record = slurm.wait(job, timeout=600)
    text = Path(record["StdOut"]).read_text()
    assert record["JobState"] == "COMPLETED", text[-3000:]
    assert "tune.sbatch: Ray cluster up (1 nodes)" in text, text[-3000:]
    assert "tune.sbatch: harness.tune exited 0" in text and "tune.sbatch: Ray stopped" in text, text[-3000:]
    with open(storage / "slurm" / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2, rows
    assert (storage / "slurm" / "best_recipe.yaml").is_file()
    # Torn down: no process of this job's Ray session is left.
    deadline = time.monotonic() + 30
    while _ray_processes(job) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _ray_processes(job) == []


def _ray_processes(job: int) -> list[int]:
    """PIDs whose command line names the job's Ray session dir (/tmp/ray-<job>)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if f"/tmp/ray-{job}".encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids
