"""The trainer with tracking on, for real: 2 DeepSpeed CPU ranks logging to a real `mlflow server`.

One launch is killed mid-run and resumed (`--resume auto`): still one MLflow run, every metric's
steps strictly increasing, params, triptychs, artifacts, and a registered `champion` pyfunc that
deblurs exactly like `mimo deblur`. Another launch loses its server mid-run: training finishes,
the offline file is written, and `mimo tracking replay` brings the metrics in.
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
from tests.test_slurm import private_extensions

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean_tracking_env")]

TIMEOUT = 420
# fp32 and 64 px crops: steps slow enough to kill the launch between its checkpoints.
BASE = [
    "--recipe",
    "recipes/smoke.yaml",
    "train.steps=16",
    "eval.every=8",
    "checkpoint.every=6",
    "data.crop=64",
    "train.ema_decay=null",
    "eval.images=2",
    "tracking.enabled=true",
    "tracking.log_every=1",
]


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


@pytest.fixture(scope="module")
def ds_env(tmp_path_factory) -> dict[str, str]:
    """A private copy of the DeepSpeed JIT-op cache: a rank killed elsewhere while loading the op
    leaves the shared cache's lock behind, and launches on it would wait forever."""
    return {"TORCH_EXTENSIONS_DIR": str(private_extensions(tmp_path_factory.mktemp("torch_extensions")))}


def _last_step(run_dir: Path) -> int:
    path = run_dir / "log.jsonl"
    if not path.exists():
        return 0
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return max((e["step"] for e in events if e["event"] == "train"), default=0)


def _only_run(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def _history_steps(client, run_id: str, key: str) -> list[int]:
    history = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))
    return [m.step for m in history]


def test_two_ranks_kill_resume_one_run_champion_pyfunc_equals_mimo_deblur(
    launch_train, train_shards, mlflow_server, ds_env, tmp_path, monkeypatch
):
    experiment, name = f"train-{uuid.uuid4().hex[:8]}", f"deblur-{uuid.uuid4().hex[:8]}"
    run_dir = tmp_path / "run"
    args = _args(run_dir, train_shards, mlflow_server, experiment, name)
    first = launch_train(args, nprocs=2, env=ds_env)
    first.wait_for(lambda: _last_step(run_dir) >= 10, timeout=TIMEOUT)  # after the checkpoint at 8
    first.kill()
    assert not (run_dir / "summary.json").exists(), "the kill should land before the end"
    second = launch_train([*args, "--resume", "auto"], nprocs=2, env=ds_env)
    assert second.run(TIMEOUT) == 0, second.output()[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())

    client = mlflow.MlflowClient(mlflow_server, registry_uri=mlflow_server)
    run = _only_run(client, experiment)
    assert run.info.run_id == summary["mlflow_run_id"] and run.info.status == "FINISHED"
    params = run.data.params
    assert params["world_size"] == "2" and params["train.precision"] == "fp32"
    assert params["train.zero_stage"] == "1" and params["model.overrides.base_channels"] == "8"
    assert "env.torch" in params and "env.host" in params
    assert run.data.tags["dataset.train.manifest_sha256"] and run.data.tags["dataset.val.manifest_sha256"]
    for key in ("loss", "lr", "grad_norm", "images_per_sec", "data_wait"):
        steps = _history_steps(client, run.info.run_id, key)
        assert steps == list(range(1, 17)), (key, steps)  # strictly increasing, none duplicated
    for key in ("val_psnr", "val_ssim", "blurred_psnr"):
        assert _history_steps(client, run.info.run_id, key) == [8, 16], key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"recipe.yaml", "ds_config.json", "log.jsonl"} <= artifacts
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images") if a.path.endswith(".png")]
    assert sum("+step+8+" in p for p in images) == 2 and sum("+step+16+" in p for p in images) == 2, images

    version = client.get_model_version_by_alias(name, CHAMPION)
    assert version.run_id == run.info.run_id and float(version.tags["val_psnr"]) == pytest.approx(
        summary["val_psnr"]
    )

    # The registered pyfunc, `mimo deblur` with the exported weights, and with models:/NAME@champion.
    mlflow.set_tracking_uri(mlflow_server)  # for pyfunc.load_model (reset by clean_tracking_env's env only)
    rng = np.random.default_rng(7)
    blurred = rng.integers(0, 256, (38, 30, 3), dtype=np.uint8)  # not a multiple of 4
    src = tmp_path / "in.png"
    Image.fromarray(blurred).save(src)
    served = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}").predict(
        pd.DataFrame({"image": [src.read_bytes()]})
    )
    served_px = np.asarray(Image.open(io.BytesIO(served["image"][0])))
    assert mimo(["deblur", "--weights", summary["checkpoint"], str(src), str(tmp_path / "local.png")]) == 0
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    assert (
        mimo(["deblur", "--weights", f"models:/{name}@{CHAMPION}", str(src), str(tmp_path / "reg.png")]) == 0
    )
    local_px = np.asarray(Image.open(tmp_path / "local.png"))
    assert served_px.shape == blurred.shape
    assert np.array_equal(served_px, local_px) and np.array_equal(
        np.asarray(Image.open(tmp_path / "reg.png")), local_px
    )


def test_server_lost_mid_run_training_finishes_offline_file_replayed(
    launch_train, train_shards, mlflow_own_server, ds_env, tmp_path
):
    server = mlflow_own_server
    server.start()
    experiment = f"outage-{uuid.uuid4().hex[:8]}"
    run_dir = tmp_path / "run"
    launch = launch_train(_args(run_dir, train_shards, server.uri, experiment), nprocs=2, env=ds_env)
    launch.wait_for(lambda: _last_step(run_dir) >= 3, timeout=TIMEOUT)
    server.stop()
    assert launch.run(TIMEOUT) == 0, launch.output()[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_step"] == 16
    out = launch.output()
    assert out.count("unreachable") == 1, out[-3000:]  # one warning for the whole outage
    assert f"mimo tracking replay {run_dir}" in out
    records = [json.loads(line) for line in (run_dir / OFFLINE_FILE).read_text().splitlines()]
    assert records[0]["run_id"] == summary["mlflow_run_id"]

    server.start()
    assert mimo(["tracking", "replay", str(run_dir), "--tracking-uri", server.uri]) == 0
    client = mlflow.MlflowClient(server.uri, registry_uri=server.uri)
    run = _only_run(client, experiment)
    assert run.info.run_id == summary["mlflow_run_id"] and run.info.status == "FINISHED"
    assert _history_steps(client, run.info.run_id, "loss") == list(range(1, 17))
    assert _history_steps(client, run.info.run_id, "val_psnr") == [8, 16]
    assert "log.jsonl" in {a.path for a in client.list_artifacts(run.info.run_id)}
