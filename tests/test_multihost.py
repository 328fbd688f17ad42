"""The cluster scripts on two hosts with their own addresses (tests/fixtures/hosts.py: h1 =
10.77.0.1, h2 = 10.77.0.2, network namespaces): Slurm's train.sbatch with srun (2 nodes x 1 task,
preempted + requeued + exact resume), train.sbatch with `deepspeed --hostfile` (pdsh over ssh,
one rank per host, trains, checkpoints and resumes), and tune.sbatch with a Ray worker on h2."""

from __future__ import annotations

import csv
import json
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.fixtures.hosts import STATE
from tests.fixtures.slurm import remove_shm_leftovers
from tests.test_slurm import logged_step, private_extensions, train_env

pytestmark = pytest.mark.slow
STEPS = 40  # the uninterrupted run; the deepspeed run does 20, then resumes to 40
ONE_PER_NODE = ["--gpus-per-node=0", "--cpus-per-task=1", "--nodes=2", "--ntasks-per-node=1"]


def _env(run_dir: Path, shards: dict[str, Path], extensions: Path, steps: int, **extra: str) -> dict[str, str]:
    env = train_env(run_dir, shards, extensions)
    env["OVERRIDES"] = re.sub(r"train\.steps=\d+", f"train.steps={steps}", env["OVERRIDES"])
    env["OVERRIDES"] = env["OVERRIDES"].replace("eval.every=60", "eval.every=20").replace(
        "checkpoint.every=60", "checkpoint.every=20")
    return {**env, **extra}


def _weights(run_dir: Path) -> dict:
    import torch

    return torch.load(run_dir / "weights.pkl", weights_only=True)["model"]


def _same(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def train_jobs(hosts, train_shards, tmp_path_factory) -> dict:
    """train.sbatch on n1 (h1) + n2 (h2): uninterrupted (srun), preempted with USR1 + requeued
    (srun), and with LAUNCHER=deepspeed in two jobs on one run dir (20 steps, then resumed to 40)."""
    slurm, out = hosts.slurm, tmp_path_factory.mktemp("multihost-train")
    script, ext = REPO / "cluster" / "slurm" / "train.sbatch", private_extensions()
    jobs: dict = {}

    def submit(name: str, steps: int, run: str | None = None, **extra: str) -> None:
        run_dir = out / (run or name)
        job = slurm.sbatch(*ONE_PER_NODE, f"--output={out}/{name}-%j.out", script,
                           env=_env(run_dir, train_shards, ext, steps, **extra))
        jobs[name] = {"job": job, "run_dir": run_dir, "log": out / f"{name}-{job}.out"}

    try:
        submit("preempted", STEPS)
        submit("straight", STEPS)
        pre = jobs["preempted"]
        slurm.preempt_and_requeue(pre["job"], lambda: logged_step(pre["run_dir"]), min_step=5, timeout=240)
        pre["stopped"] = json.loads((pre["run_dir"] / "summary.json").read_text())
        submit("ds-first", STEPS // 2, run="deepspeed", LAUNCHER="deepspeed")
        jobs["ds-first"]["record"] = slurm.wait(jobs["ds-first"]["job"], timeout=300)
        jobs["ds-first"]["summary"] = json.loads((jobs["ds-first"]["run_dir"] / "summary.json").read_text())
        submit("ds-resumed", STEPS, run="deepspeed", LAUNCHER="deepspeed")
        for info in jobs.values():
            info["record"] = slurm.wait(info["job"], timeout=300)
        yield jobs
    finally:
        remove_shm_leftovers(info["job"] for info in jobs.values())


def _ifname_lines(text: str) -> dict[str, str]:
    """rank -> interface from the harness's "distributed: rank R: GLOO_SOCKET_IFNAME... =IF" lines."""
    return {m[0]: m[1] for m in re.findall(r"distributed: rank (\d+): GLOO_SOCKET_IFNAME\S*=(\S+) ", text)}


def test_socket_ifname_derived_per_host_unless_set(hosts):
    """The interface toward MASTER_ADDR is the host's own (h2 has veth-h2 only); a value the
    user set is kept; a loopback master (one host) changes nothing."""
    probe = ("import json, sys; from harness.distributed import bind_socket_ifname; "
             "env = json.loads(sys.argv[1]); bind_socket_ifname(env); print(json.dumps(env))")

    def derive(host: str, **env: str) -> dict:
        proc = hosts.run_in(host, sys.executable, "-c", probe, json.dumps(env))
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    master = hosts.addrs["h1"]
    assert derive("h2", MASTER_ADDR=master, RANK="1") == {
        "MASTER_ADDR": master, "RANK": "1", "GLOO_SOCKET_IFNAME": "veth-h2", "NCCL_SOCKET_IFNAME": "veth-h2"}
    assert derive("h1", MASTER_ADDR=master)["GLOO_SOCKET_IFNAME"] == "veth-h1"
    assert derive("h2", MASTER_ADDR=master, GLOO_SOCKET_IFNAME="lo") == {
        "MASTER_ADDR": master, "GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "veth-h2"}
    assert derive("h2", MASTER_ADDR="127.0.0.1") == {"MASTER_ADDR": "127.0.0.1"}
    ifname = hosts.run_in("h2", sys.executable, "-m", "harness.distributed", "ifname", master)
    assert ifname.stdout.strip() == "veth-h2", ifname.stderr


def test_srun_two_hosts_master_addr_and_gloo_interface(hosts, train_jobs):
    job = train_jobs["straight"]
    text = job["log"].read_text()
    assert job["record"]["JobState"] == "COMPLETED" and job["record"]["NodeList"] == "n[1-2]", text[-3000:]
    assert f"master {hosts.addrs['h1']}:" in text, text[-3000:]  # n1's NodeAddr, not a name or 127.0.0.1
    # Each rank found its own host's interface toward the master (h2 has no veth-h1).
    assert _ifname_lines(text) == {"0": "veth-h1", "1": "veth-h2"}, text[-3000:]
    summary = json.loads((job["run_dir"] / "summary.json").read_text())
    assert summary["final_step"] == STEPS and summary["world_size"] == 2 and not summary["stopped"]


def test_srun_two_hosts_preempted_requeued_resumes_exactly(train_jobs):
    job = train_jobs["preempted"]
    text = job["log"].read_text()
    stopped = job["stopped"]
    assert stopped["stopped"] and 5 <= stopped["final_step"] < STEPS, stopped
    assert f"train.sbatch: preempted, requeueing job {job['job']}" in text
    assert f"train.sbatch: job {job['job']} restart 1 " in text
    assert job["record"]["JobState"] == "COMPLETED" and job["record"]["Restarts"] == "1", text[-3000:]
    events = [json.loads(line) for line in (job["run_dir"] / "log.jsonl").read_text().splitlines()]
    assert [e.get("tag") for e in events if e.get("event") == "resumed"] == [f"step{stopped['final_step']:08d}"]
    assert _same(_weights(job["run_dir"]), _weights(train_jobs["straight"]["run_dir"]))


def test_deepspeed_hostfile_one_rank_per_host_trains_and_resumes(hosts, train_jobs):
    first, resumed = train_jobs["ds-first"], train_jobs["ds-resumed"]
    for info in (first, resumed):
        assert info["record"]["JobState"] == "COMPLETED", info["log"].read_text()[-4000:]
    text = first["log"].read_text()
    # The hostfile holds both hosts' addresses; pdsh started one rank on each over ssh.
    assert (first["run_dir"] / "hostfile").read_text().split("\n")[:2] == [
        f"{hosts.addrs['h1']} slots=1", f"{hosts.addrs['h2']} slots=1"]
    assert "train.sbatch: deepspeed exited 0" in text, text[-4000:]
    assert re.search(rf"^{re.escape(hosts.addrs['h2'])}: distributed: rank 1: \S+=veth-h2 ", text, re.M), text[-4000:]
    assert re.search(rf"^{re.escape(hosts.addrs['h1'])}: distributed: rank 0: \S+=veth-h1 ", text, re.M), text[-4000:]
    assert first["summary"]["final_step"] == STEPS // 2 and first["summary"]["world_size"] == 2
    # The second job resumed the first one's last checkpoint and finished.
    events = [json.loads(line) for line in (resumed["run_dir"] / "log.jsonl").read_text().splitlines()]
    assert [e.get("tag") for e in events if e.get("event") == "resumed"] == [f"step{STEPS // 2:08d}"]
    summary = json.loads((resumed["run_dir"] / "summary.json").read_text())
    assert summary["final_step"] == STEPS and summary["world_size"] == 2 and not summary["stopped"]
    assert _same(_weights(resumed["run_dir"]), _weights(train_jobs["straight"]["run_dir"]))


# ----------------------------------------------------------------------------- tune.sbatch


def _tune(hosts, shards: dict[str, Path], tmp_path: Path, name: str, search: list[str]) -> tuple[Path, Path]:
    """tune.sbatch on both hosts (Ray head on h1, a Ray worker on h2, 2 CPUs each); the Ray
    session dir of the head (the worker's is <it>-n2) and the experiment dir."""
    storage = tmp_path / "tune"
    overrides = [f"data.train={shards['train']}", f"data.val={shards['test']}", "train.steps=10",
                 "search.scheduler.name=none", f"search.storage_path={storage}", f"search.name={name}", *search]
    env = {"REPO": str(REPO), "VENV": sys.prefix, "RECIPE": "recipes/tune-smoke.yaml",
           "TUNE_ARGS": " ".join(overrides), "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "TORCH_EXTENSIONS_DIR": str(private_extensions()),
           # Not /tmp/ray-<job id>: the one-host test cluster counts job ids from 1 too.
           "RAY_TMP": f"/tmp/{STATE.name}-ray-{name}"}
    ray_tmp = Path(env["RAY_TMP"])
    _cleanup(ray_tmp)
    job = hosts.slurm.sbatch("--gpus-per-node=0", "--cpus-per-task=2", "--nodes=2", "--ntasks-per-node=1",
                             f"--output={tmp_path}/tune-%j.out", REPO / "cluster" / "slurm" / "tune.sbatch",
                             env=env)
    record = hosts.slurm.wait(job, timeout=600)
    text = Path(record["StdOut"]).read_text()
    assert "tune.sbatch: Ray cluster up (2 nodes)" in text, text[-4000:]
    assert "tune.sbatch: harness.tune exited 0" in text and "tune.sbatch: Ray stopped" in text, text[-4000:]
    deadline = time.monotonic() + 30
    while _processes_naming(ray_tmp) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_naming(ray_tmp) == []  # head and worker torn down by PID
    return ray_tmp, storage / name


def _processes_naming(path: Path) -> list[int]:
    """PIDs whose command line names `path` (a Ray session dir of the job)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(path).encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def _actors_on(session_root: Path, actor: str) -> int:
    """How many worker logs of this Ray node's session dir ran `actor` (Ray writes ':actor_name:X')."""
    return sum(f":actor_name:{actor}" in p.read_text(errors="replace")
               for p in session_root.glob("session_*/logs/worker-*.out"))


def _cleanup(ray_tmp: Path) -> None:
    for path in ray_tmp.parent.glob(f"{ray_tmp.name}*"):  # the head's, the worker's (-n2) and -logs
        shutil.rmtree(path, ignore_errors=True)


def test_tune_sbatch_two_hosts_trial_on_h2(hosts, train_shards, tmp_path):
    """Two trials at once, 1.5 CPUs each on 2-CPU Ray nodes: one runs on each host."""
    ray_tmp, exp = _tune(hosts, train_shards, tmp_path, "spread",
                        ["search.num_samples=2", "search.max_concurrent=2", "search.resources.cpus=1.5"])
    try:
        with open(exp / "results.csv") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == 2 and all(r["status"] == "TERMINATED" for r in rows), rows
        ips = {json.loads(p.read_text().splitlines()[-1])["node_ip"] for p in exp.glob("*/result.json")}
        assert ips == {hosts.addrs["h1"], hosts.addrs["h2"]}, ips
    finally:
        _cleanup(ray_tmp)


def test_tune_sbatch_two_hosts_ray_train_worker_per_host(hosts, train_shards, tmp_path):
    """resources.workers: 2 with 1.5 CPUs per worker: Ray Train puts one rank on each host, whose
    gloo group spans h1 and h2 (tune.sbatch gave each Ray node its interface)."""
    ray_tmp, exp = _tune(hosts, train_shards, tmp_path, "workers",
                        ["search.num_samples=1", "search.max_concurrent=1", "search.resources.cpus=3",
                         "search.resources.workers=2"])
    try:
        with open(exp / "results.csv") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == 1 and rows[0]["status"] == "TERMINATED" and rows[0]["step"] == "10", rows
        # Worker logs live on the node that ran them: Train workers on both hosts (2 workers in all).
        assert _actors_on(ray_tmp, "RayTrainWorker") >= 1  # h1 (the head's node)
        assert _actors_on(Path(f"{ray_tmp}-n2"), "RayTrainWorker") >= 1  # h2
    finally:
        _cleanup(ray_tmp)
