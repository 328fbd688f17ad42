"""The two cluster paths of cluster/ray/README.md, for real on loopback:
(1) `ray job submit --working-dir .` to a head started with `ray start --head`;
(2) `ray up` + `ray submit` with the on-prem cluster YAML, through an sshd on 127.0.0.1 that the
test starts (its own config, host key and client key; stopped by PID)."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, free_port
from tests.fixtures.ray import RAY_ENV, torch_extensions_dir
from tests.fixtures.system import require

pytestmark = pytest.mark.slow
RAY_BIN = Path(sys.executable).with_name("ray")
# What the working-dir upload leaves out besides .gitignore'd files (Ray honours .gitignore).
EXCLUDES = [".git", ".venv", "runs", "demo", "shards", "mlruns", "mlflow.db", "**/__pycache__"]


def tiny_args(shards: dict[str, Path], storage: Path) -> list[str]:
    return [f"data.train={shards['train']}", f"data.val={shards['test']}", f"search.storage_path={storage}",
            "search.num_samples=2", "search.scheduler=none", "train.steps=5"]


def check_experiment(exp: Path) -> None:
    with open(exp / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and all(r["status"] == "TERMINATED" and r["step"] == "5" for r in rows), rows
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


# ----------------------------------------------------------------------------- ray up + ray submit


class Sshd:
    """sshd on 127.0.0.1:<free port> with its own host key, a generated client key for root and
    HOME set to a temp dir (so `~` of the "remote" head — .bashrc, ~/mimo-harness — is ours)."""

    def __init__(self, root: Path):
        require("ssh")  # openssh-server + rsync are not on a fresh image: cluster/system-deps.sh
        self.root, self.home, self.port = root, root / "home", free_port()
        self.key = root / "id_ed25519"
        self.home.mkdir(mode=0o700)
        for key in (root / "host_ed25519", self.key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        (root / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
        config = root / "sshd_config"
        config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {root / 'host_ed25519'}",
            f"PidFile {root / 'sshd.pid'}", f"AuthorizedKeysFile {root / 'authorized_keys'}",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "UsePAM no", "StrictModes no", f"SetEnv HOME={self.home}", "Subsystem sftp internal-sftp", ""]))
        # ssh/rsync on this side reach it through `ssh` on PATH: a wrapper adding the port (what a
        # `Port` line in ~/.ssh/config does for a real on-prem head on another port than 22).
        self.bin = root / "bin"
        self.bin.mkdir()
        wrapper = self.bin / "ssh"
        wrapper.write_text(f"#!/bin/sh\nexec /usr/bin/ssh -p {self.port} \"$@\"\n")
        wrapper.chmod(0o755)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        with open(root / "sshd.log", "wb") as log:
            self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while not _port_open(self.port):
            assert self.proc.poll() is None and time.monotonic() < deadline, (root / "sshd.log").read_text()
            time.sleep(0.2)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # sshd -D leads its group; sessions are its children
            self.proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def launcher_config(sshd: Sshd, name: str, ray_ports: dict[str, int], temp_dir: Path) -> dict:
    """cluster/ray/cluster.yaml (the on-prem variant) pointed at the test's sshd on 127.0.0.1."""
    config = yaml.safe_load((REPO / "cluster" / "ray" / "cluster.yaml").read_text())
    config["cluster_name"] = name
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["auth"] = {"ssh_user": "root", "ssh_private_key": str(sshd.key)}
    config.update(min_workers=0, max_workers=0)
    venv = Path(sys.executable).parent.parent
    # The shared venv stands in for the per-node install (`pip install -e` would repoint it).
    setup = [c for c in config["setup_commands"] if "pip install" not in c]
    env = {**RAY_ENV, "TORCH_EXTENSIONS_DIR": torch_extensions_dir(), "RAY_ADDRESS": f"127.0.0.1:{ray_ports['port']}"}
    config["setup_commands"] = [f"mkdir -p ~/mimo-harness && ln -sfn {venv} ~/mimo-harness/.venv", *setup,
                                *(f"echo 'export {k}={v}' >> ~/.bashrc" for k, v in env.items())]
    # The head in its own session with --block, its PID kept, so the test stops exactly it; free
    # ports and a private temp dir instead of 6379 (other Ray heads may run on this machine).
    ports = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in ray_ports.items())
    config["head_start_ray_commands"] = [
        f"setsid nohup ray start --head --block --node-ip-address 127.0.0.1 {ports} --num-cpus 2 "
        f"--temp-dir {temp_dir} --include-dashboard false --disable-usage-stats "
        "--autoscaling-config=~/ray_bootstrap_config.yaml > ~/ray-head.log 2>&1 < /dev/null & echo $! > ~/ray-head.pid"]
    return config


def test_ray_up_and_ray_submit_on_prem_config(train_shards, tmp_path):
    root = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths live under it
    sshd = Sshd(root)
    name = f"mimo-test-{sshd.port}"
    names = ("port", "ray_client_server_port", "dashboard_agent_listen_port", "dashboard_agent_grpc_port",
             "runtime_env_agent_port", "metrics_export_port", "node_manager_port", "object_manager_port")
    ports: set[int] = set()
    while len(ports) < len(names):  # free_port() may hand out a port twice: Ray refuses shared ports
        ports.add(free_port())
    ray_ports = dict(zip(names, sorted(ports)))
    config_path = root / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(launcher_config(sshd, name, ray_ports, root / "ray")))
    env = {**os.environ, **RAY_ENV, "PATH": f"{sshd.bin}{os.pathsep}{os.environ['PATH']}"}
    pid_file = sshd.home / "ray-head.pid"
    try:
        up = subprocess.run([str(RAY_BIN), "up", "-y", "--no-config-cache", str(config_path)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300, start_new_session=True)
        assert up.returncode == 0, (up.stdout + up.stderr)[-4000:]
        assert (sshd.home / "mimo-harness" / "recipes" / "tune-smoke.yaml").is_file()  # file_mounts synced
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in _read(sshd.home / "ray-head.log"):
            assert time.monotonic() < deadline, _read(sshd.home / "ray-head.log")[-3000:]
            time.sleep(0.5)
        recipe = sshd.home / "mimo-harness" / "recipes" / "tune-smoke.yaml"
        sub = subprocess.run([str(RAY_BIN), "submit", str(config_path), "harness/tune/__main__.py", "--",
                              "--recipe", str(recipe), *tiny_args(train_shards, tmp_path)],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=480, start_new_session=True)
        out = sub.stdout + sub.stderr
        assert sub.returncode == 0, out[-4000:]
        assert "best: trial" in out, out[-4000:]
        check_experiment(tmp_path / "tune-smoke")
    finally:
        if pid_file.is_file():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.killpg(int(pid_file.read_text().strip()), signal.SIGKILL)  # setsid: the head's group
        sshd.stop()
        for suffix in (".state", ".lock"):
            Path(f"/tmp/ray/cluster-{name}{suffix}").unlink(missing_ok=True)
        shutil.rmtree(root, ignore_errors=True)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
