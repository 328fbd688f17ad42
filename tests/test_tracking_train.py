"""The trainer with tracking on, for real: 2 DeepSpeed CPU ranks logging to a real `mlflow server`.

One scenario, because every launch costs about a minute of the two shared cores: a run is
killed mid-run and resumed with `--resume auto`; during the resumed launch the tracking server
crashes, and the trainer is killed again during the outage, after a checkpoint; a third launch
resumes while the server is still down and finishes; the server comes back on the same store and
`mimo tracking replay` sends what the offline file holds from both outage launches. In the end there must be exactly one
MLflow run with every metric's steps strictly increasing, params, dataset tags, triptychs,
artifacts, and a registered `champion` pyfunc that deblurs exactly like `mimo deblur`.
"""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from harness.cli import main as mimo
from harness.tracking import CHAMPION, OFFLINE_FILE
from tests.fixtures.launch import private_torch_extensions
from tests.fixtures.mlflow import only_run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean_tracking_env")]

TIMEOUT = 420
STEPS = 24
# fp32 and 64 px crops: steps slow enough to kill the launch / the server between events.
BASE = [
    "--recipe",
    "recipes/smoke.yaml",
    f"train.steps={STEPS}",
    "eval.every=8",
    "checkpoint.every=6",
    "data.crop=64",
    "train.ema_decay=null",
    "eval.images=2",
    "tracking.enabled=true",
    "tracking.log_every=1",
]


@pytest.fixture(scope="module")
def ds_env() -> dict[str, str]:
    """These launches are killed on purpose: a cache of their own (tests/fixtures/launch.py)."""
    return {"TORCH_EXTENSIONS_DIR": str(private_torch_extensions("tracking"))}


def _args(run_dir: Path, shards: dict, uri: str, experiment: str, model: str | None = None) -> list[str]:
    args = [
        *BASE,
        "--run-dir",
        run_dir,
        f"data.train={shards['train']}",
        f"data.val={shards['test']}",
        f"tracking.tracking_uri={uri}",
        f"tracking.experiment={experiment}",
    ]
    return args + ([f"tracking.registered_model={model}"] if model else [])


def _events(run_dir: Path) -> list[dict]:
    path = run_dir / "log.jsonl"
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )


def _last_step(run_dir: Path, after_resume: bool = False) -> int:
    events = _events(run_dir)
    if after_resume:
        starts = [i for i, e in enumerate(events) if e["event"] == "resumed"]
        events = events[starts[-1] :] if starts else []
    return max((e["step"] for e in events if e["event"] == "train"), default=0)


def _checkpointed_after(run_dir: Path, step: int) -> bool:
    return any(e["event"] == "checkpoint" and e["step"] > step for e in _events(run_dir))


def _history_steps(client, run_id: str, key: str) -> list[int]:
    history = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))
    return [m.step for m in history]


def test_kill_resume_server_crash_replay_one_run_champion_pyfunc_equals_mimo_deblur(
    launch_train, train_shards, mlflow_own_server, ds_env, tmp_path, monkeypatch
):
    server = mlflow_own_server
    server.start()
    experiment, name = f"train-{uuid.uuid4().hex[:8]}", f"deblur-{uuid.uuid4().hex[:8]}"
    run_dir = tmp_path / "run"
    args = _args(run_dir, train_shards, server.uri, experiment, name)

    first = launch_train(args, nprocs=2, env=ds_env)
    first.wait_for(lambda: _last_step(run_dir) >= 10, timeout=TIMEOUT)  # after the checkpoint at 8
    first.kill()
    assert not (run_dir / "summary.json").exists(), "the kill should land before the end"

    second = launch_train([*args, "--resume", "auto"], nprocs=2, env=ds_env)
    second.wait_for(lambda: _last_step(run_dir, after_resume=True) >= 12, timeout=TIMEOUT)
    server.kill()  # the tracking server crashes mid-run ...
    # ... and the trainer is killed during the outage, after its next checkpoint: what it queued
    # up to that checkpoint is on disk by then (Tracker.persist); its resume logs the rest again.
    down_at = _last_step(run_dir)
    second.wait_for(lambda: _checkpointed_after(run_dir, down_at), timeout=TIMEOUT)
    second.kill()
    assert not (run_dir / "summary.json").exists(), "the kill should land before the end"
    assert (run_dir / OFFLINE_FILE).exists(), "records queued during the outage were not persisted"

    third = launch_train([*args, "--resume", "auto"], nprocs=2, env=ds_env)
    assert third.run(TIMEOUT) == 0, third.output()[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_step"] == STEPS
    for launch in (second, third):  # one warning for each launch's outage
        assert launch.output().count("unreachable") == 1, launch.output()[-3000:]
    # The trainer's last line says what is unsent and how to send it.
    ours = [line for line in third.output().splitlines() if line.startswith("train:")]
    assert ours[-1] == (f"train: tracking records not sent yet are in {run_dir / OFFLINE_FILE}; send them with "
                        f"`mimo tracking replay {run_dir}`"), ours
    header = json.loads((run_dir / OFFLINE_FILE).read_text().splitlines()[0])
    assert header["run_id"] == summary["mlflow_run_id"]

    server.start()  # back, on the same backend store
    assert mimo(["tracking", "replay", str(run_dir), "--tracking-uri", server.uri]) == 0
    client = mlflow.MlflowClient(server.uri, registry_uri=server.uri)
    run = only_run(client, experiment)
    assert run.info.run_id == summary["mlflow_run_id"] and run.info.status == "FINISHED"
    params = run.data.params
    assert params["world_size"] == "2" and params["train.precision"] == "fp32"
    assert params["train.zero_stage"] == "1" and params["model.overrides.base_channels"] == "8"
    assert "mimo.env.torch" in run.data.tags and "mimo.env.host" in run.data.tags
    assert run.data.tags["dataset.train.manifest_sha256"] and run.data.tags["dataset.val.manifest_sha256"]
    for key in ("train/loss", "train/lr_x1e6", "train/grad_norm", "train/images_per_sec", "train/data_wait"):
        steps = _history_steps(client, run.info.run_id, key)
        assert steps == list(range(1, STEPS + 1)), (key, steps)  # strictly increasing, none duplicated
    for key in ("val/psnr", "val/ssim", "val/blurred_psnr"):
        assert _history_steps(client, run.info.run_id, key) == [8, 16, 24], key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"recipe.yaml", "ds_config.json", "log.jsonl"} <= artifacts
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images") if a.path.endswith(".png")]
    for step in (8, 16, 24):
        assert sum(f"+step+{step}+" in p for p in images) == 2, (step, images)

    version = client.get_model_version_by_alias(name, CHAMPION)
    assert version.run_id == run.info.run_id and float(version.tags["val_psnr"]) == pytest.approx(
        summary["val_psnr"]
    )

    # The registered pyfunc, `mimo deblur` with the exported weights, and with models:/NAME@champion.
    mlflow.set_tracking_uri(server.uri)  # for pyfunc.load_model
    rng = np.random.default_rng(7)
    blurred = rng.integers(0, 256, (38, 30, 3), dtype=np.uint8)  # not a multiple of 4
    src = tmp_path / "in.png"
    Image.fromarray(blurred).save(src)
    served = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}").predict(
        pd.DataFrame({"image": [src.read_bytes()]})
    )
    served_px = np.asarray(Image.open(io.BytesIO(served["image"][0])))
    assert mimo(["deblur", "--weights", summary["checkpoint"], str(src), str(tmp_path / "local.png")]) == 0
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    assert (
        mimo(["deblur", "--weights", f"models:/{name}@{CHAMPION}", str(src), str(tmp_path / "reg.png")]) == 0
    )
    local_px = np.asarray(Image.open(tmp_path / "local.png"))
    assert served_px.shape == blurred.shape
    assert np.array_equal(served_px, local_px) and np.array_equal(
        np.asarray(Image.open(tmp_path / "reg.png")), local_px
    )
