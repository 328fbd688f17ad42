"""Tracking against a real `mlflow server`: runs, metrics, images, the pyfunc model, the registry,
outages with buffering and replay, and credentials that never leak."""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from harness.cli import main as mimo
from harness.errors import HarnessError
from harness.files import to_uint8
from harness.infer import deblur
from harness.models import create_model, model_from_checkpoint, read_checkpoint, save_weights
from harness.recipe import TrackingCfg
from harness.tracking import (
    CHAMPION,
    OFFLINE_FILE,
    MlflowTracker,
    Tracker,
    fetch_weights,
    redact,
    replay,
)
from tests.conftest import free_port
from tests.fixtures.mlflow import only_run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean_tracking_env")]


def tcfg(uri: str, **kw) -> TrackingCfg:
    fields = dict(enabled=True, tracking_uri=uri, experiment=f"exp-{uuid.uuid4().hex[:8]}", run_name="t",
                  registered_model=None, log_every=1, images_every=1, system_metrics=False)  # fmt: skip
    fields.update(kw)
    return TrackingCfg(**fields)


def tiny_weights(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    return save_weights(create_model("mimo-unet", base_channels=8, num_res=1), path)


def steps(client, run_id: str, key: str) -> list[int]:
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)]


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_noop_tracker_off_rank0_or_disabled(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    for tracker in (
        Tracker.create(tcfg(dead), tmp_path, rank=1),
        Tracker.create(tcfg(dead, enabled=False), tmp_path, rank=0),
    ):
        assert type(tracker) is Tracker and tracker.run_id is None
        tracker.log_metrics({"loss": 1.0}, step=1)
        assert tracker.log_model(tmp_path / "missing.pt", 1.0) is None
        tracker.close()
    assert not (tmp_path / OFFLINE_FILE).exists()


def test_run_params_metrics_triptychs_artifacts(mlflow_server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    cfg = tcfg(mlflow_server, system_metrics=True)
    tracker = Tracker.create(cfg, tmp_path, rank=0)
    assert isinstance(tracker, MlflowTracker) and tracker.run_id
    tracker.log_params({"optim": {"lr": 1e-4, "betas": [0.9, 0.999]}, "world_size": 2, "blob": "x" * 9000})
    tracker.set_tags({"dataset.train.manifest_sha256": "ab" * 32})
    for step in (10, 20, 30):
        tracker.log_metrics({"loss": 1.0 / step, "lr": torch.tensor(1e-4)}, step=step)
    g = torch.Generator().manual_seed(0)
    blur, restored, sharp = (torch.rand(3, 16, 20, generator=g) for _ in range(3))
    tracker.log_triptychs([("scene_a/000001", blur, restored, sharp, 27.5)], step=20)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  steps: 30\n")
    tracker.log_artifact(recipe)
    time.sleep(2.5)  # a couple of system-metrics samples
    tracker.close()
    assert f"MLflow run {tracker.run_id} FINISHED; open {mlflow_server}" in capsys.readouterr().out
    assert not (tmp_path / "mlflow-pending").exists()  # sent images leave nothing behind

    client = mlflow.MlflowClient(mlflow_server, registry_uri=mlflow_server)
    run = only_run(client, cfg.experiment)
    assert run.info.run_id == tracker.run_id and run.info.status == "FINISHED"
    params = run.data.params
    assert (
        params["optim.lr"] == "0.0001"
        and params["optim.betas"] == "[0.9, 0.999]"
        and params["world_size"] == "2"
    )
    assert run.data.tags["mimo.env.torch"] == torch.__version__ and "mimo.env.host" in run.data.tags
    assert len(params["blob"]) <= 6000 and params["blob"].endswith("...")
    assert run.data.tags["dataset.train.manifest_sha256"] == "ab" * 32
    assert steps(client, run.info.run_id, "train/loss") == [10, 20, 30]
    assert steps(client, run.info.run_id, "train/lr_x1e6") == [10, 20, 30]
    assert any(k.startswith("system/cpu") for k in run.data.metrics), sorted(run.data.metrics)
    names = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "recipe.yaml" in names
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    png = [
        p for p in images if p.startswith("images/val~triptych_scene_a_000001_step0000020+step+20+") and p.endswith(".png")
    ]
    assert len(png) == 1, images
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path=png[0], dst_path=str(tmp_path)
    )
    got = np.asarray(Image.open(local))
    assert got.shape[0] > 2 * 16 and got.shape[1] >= 2 * 20 and got.shape[2] == 3  # 2 x 2 frames over the caption
    assert np.array_equal(got[:16, 20:40], to_uint8(restored)) and np.array_equal(
        got[:16, :20], to_uint8(blur)
    ) and np.array_equal(got[16:32, :20], to_uint8(sharp))


def test_resume_continues_the_run_without_duplicate_steps(mlflow_server, tmp_path):
    cfg = tcfg(mlflow_server)
    first = Tracker.create(cfg, tmp_path, rank=0)
    for step in (10, 20, 30):
        first.log_metrics({"loss": float(step)}, step=step)
    first.close("KILLED")
    # The trainer resumes from the checkpoint at step 20: steps 20 and 30 come again.
    second = Tracker.create(cfg, tmp_path, rank=0, resume_run_id=first.run_id)
    assert second.run_id == first.run_id
    for step in (20, 30, 40):
        second.log_metrics({"loss": float(step) + 0.5}, step=step)
    second.close()
    client = mlflow.MlflowClient(mlflow_server, registry_uri=mlflow_server)
    run = only_run(client, cfg.experiment)
    history = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(10, 10.0), (20, 20.0), (30, 30.0), (40, 40.5)]
    assert run.info.status == "FINISHED"


def test_pyfunc_registry_champion_rule_and_fetch(mlflow_server, tmp_path, capsys):
    name = f"deblur-{uuid.uuid4().hex[:8]}"
    w1, w2 = tiny_weights(tmp_path / "a.pt", 1), tiny_weights(tmp_path / "b.pt", 2)
    first = Tracker.create(tcfg(mlflow_server, registered_model=name), tmp_path / "r1", rank=0)
    assert first.log_model(w1, val_psnr=25.0) == 1
    first.close()
    second = Tracker.create(tcfg(mlflow_server, registered_model=name), tmp_path / "r2", rank=0)
    assert second.log_model(w2, val_psnr=24.0) == 2  # lower PSNR: registered, not champion
    second.close()
    client = mlflow.MlflowClient(mlflow_server, registry_uri=mlflow_server)
    assert client.get_model_version_by_alias(name, CHAMPION).version == "1"

    # The served model gives exactly the pixels of harness.infer.deblur (odd size: padding inside).
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 256, (30, 22, 3), dtype=np.uint8)
    model = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")
    out = model.predict(pd.DataFrame({"image": [png_bytes(arr)]}))
    got = np.asarray(Image.open(io.BytesIO(out["image"][0])))
    net = model_from_checkpoint(w1).eval()
    x = torch.from_numpy(arr).permute(2, 0, 1).float().div(255).unsqueeze(0)
    with torch.inference_mode():
        want = to_uint8(deblur(net, x)[0])
    assert got.shape == (30, 22, 3) and np.array_equal(got, want)

    fetched = fetch_weights(f"models:/{name}@{CHAMPION}", tracking_uri=mlflow_server)
    sd, ref = read_checkpoint(fetched), read_checkpoint(w1)
    assert sd["model_name"] == "mimo-unet" and sd["model_overrides"] == ref["model_overrides"]
    assert all(torch.equal(sd["model"][k], v) for k, v in ref["model"].items())

    # mimo deblur takes the champion from the server named on its command line.
    (tmp_path / "in.png").write_bytes(png_bytes(arr))
    assert mimo(["deblur", "--weights", f"models:/{name}@{CHAMPION}", "--tracking-uri", mlflow_server,
                 str(tmp_path / "in.png"), str(tmp_path / "out.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), want)

    assert mimo(["registry", "promote", name, "2", "--tracking-uri", mlflow_server]) == 0
    assert client.get_model_version_by_alias(name, CHAMPION).version == "2"
    capsys.readouterr()
    assert mimo(["registry", "show", name, "--tracking-uri", mlflow_server]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:3] == ["2", "24.000", CHAMPION] and lines[2].split()[:3] == ["1", "25.000", "-"]
    assert mimo(["registry", "promote", name, "9", "--tracking-uri", mlflow_server]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and name in err[0] and "version 9" in err[0]
    with pytest.raises(HarnessError, match=f"nosuch@champion: cannot fetch the model from {mlflow_server} "):
        fetch_weights("models:/nosuch@champion", tracking_uri=mlflow_server)  # names the store it searched


def test_outage_buffers_flushes_then_offline_file_and_replay(mlflow_own_server, tmp_path, caplog):
    server = mlflow_own_server  # not started: the tracker starts while the server is down
    name = f"deblur-{uuid.uuid4().hex[:8]}"
    cfg = tcfg(server.uri, registered_model=name)
    with caplog.at_level(logging.WARNING, logger="harness.tracking"):
        t0 = time.monotonic()
        tracker = MlflowTracker(cfg, tmp_path, retry_seconds=0.0)
        for step in (1, 2):
            tracker.log_metrics({"loss": float(step)}, step=step)
        assert time.monotonic() - t0 < 20  # short timeouts: the trainer is not held up
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(unreachable) == 1  # one warning, not one per record
    server.start()
    tracker.log_metrics({"loss": 3.0}, step=3)  # back: the run is created, the queue sent in order
    client = mlflow.MlflowClient(server.uri, registry_uri=server.uri)
    assert tracker.run_id and steps(client, tracker.run_id, "train/loss") == [1, 2, 3]

    server.kill()  # crashes mid-run
    tracker.log_metrics({"loss": 4.0}, step=4)
    g = torch.Generator().manual_seed(0)
    imgs = [torch.rand(3, 8, 8, generator=g) for _ in range(3)]
    tracker.log_triptychs([("val0", *imgs, 20.0)], step=4)
    assert tracker.log_model(tiny_weights(tmp_path / "w.pt", 0), val_psnr=20.0) is None  # queued
    tracker.close()
    records = [json.loads(line) for line in (tmp_path / OFFLINE_FILE).read_text().splitlines()]
    assert records[0]["kind"] == "run" and records[0]["run_id"] == tracker.run_id
    assert [r["kind"] for r in records[1:]] == ["metrics", "image", "model", "end"]

    server.start()  # a new server on the same backend store
    assert mimo(["tracking", "replay", str(tmp_path), "--tracking-uri", server.uri]) == 0
    run = only_run(client, cfg.experiment)
    assert run.info.run_id == tracker.run_id and run.info.status == "FINISHED"
    assert steps(client, run.info.run_id, "train/loss") == [1, 2, 3, 4]
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any(p.startswith("images/val~triptych_val0_step0000004+step+4+") for p in images)
    assert client.get_model_version_by_alias(name, CHAMPION).version == "1"
    assert not (tmp_path / OFFLINE_FILE).exists() and (tmp_path / (OFFLINE_FILE + ".replayed")).exists()


def test_spilled_records_are_sent_by_themselves_in_order_when_the_server_is_back(
    mlflow_own_server, tmp_path, caplog
):
    """No manual replay: what an outage spilled to the offline file goes out, before newer
    records, as soon as the server answers -- in the same trainer, or in the next launch."""
    server = mlflow_own_server
    server.start()
    cfg = tcfg(server.uri)
    client = mlflow.MlflowClient(server.uri, registry_uri=server.uri)
    tracker = MlflowTracker(cfg, tmp_path, retry_seconds=0.0)
    tracker.log_metrics({"loss": 1.0}, step=1)
    server.kill()
    for step in (2, 3):
        tracker.log_metrics({"loss": float(step)}, step=step)
    g = torch.Generator().manual_seed(0)
    tracker.log_triptychs([("val0", *[torch.rand(3, 8, 8, generator=g) for _ in range(3)], 20.0)], step=3)
    tracker.persist()  # a checkpoint during the outage: the queue goes to the offline file
    assert (tmp_path / OFFLINE_FILE).exists()
    tracker.log_metrics({"loss": 4.0}, step=4)  # queued after the spilled ones
    server.start()  # back on the same store
    with caplog.at_level(logging.WARNING, logger="harness.tracking"):
        tracker.log_metrics({"loss": 5.0}, step=5)
    assert not (tmp_path / OFFLINE_FILE).exists()
    assert any("sent the 3 record(s) kept in" in r.getMessage() for r in caplog.records)
    history = client.get_metric_history(tracker.run_id, "train/loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3, 4, 5]
    images = [a.path for a in client.list_artifacts(tracker.run_id, "images")]
    assert any(p.startswith("images/val~triptych_val0_step0000003+step+3+") for p in images)
    tracker.close("KILLED")

    # A launch killed during an outage leaves a spill; the next launch sends it when it starts.
    dead = MlflowTracker(tcfg(f"http://127.0.0.1:{free_port()}", experiment=cfg.experiment), tmp_path,
                         resume_run_id=tracker.run_id, log_environment=False)
    for step in (6, 7):
        dead.log_metrics({"loss": float(step)}, step=step)
    dead.persist()
    del dead  # killed: never closed
    nxt = MlflowTracker(cfg, tmp_path, resume_run_id=tracker.run_id)
    assert not (tmp_path / OFFLINE_FILE).exists()
    nxt.log_metrics({"loss": 8.0}, step=8)
    nxt.close()
    run = client.get_run(tracker.run_id)
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, 9))
    assert run.info.status == "FINISHED" and not (tmp_path / OFFLINE_FILE).exists()


def test_persist_at_checkpoint_keeps_an_outage_queue_through_a_kill(mlflow_server, tmp_path):
    """A trainer killed during an outage (no `close`) keeps what it queued up to its last
    `persist`. Replaying that file (no end record) ends a still-running run as KILLED, and keeps
    the status of one that a resumed trainer has ended since."""
    client = mlflow.MlflowClient(mlflow_server, registry_uri=mlflow_server)
    cfg = tcfg(mlflow_server)
    experiment_id = client.create_experiment(cfg.experiment)
    for before, after in (("RUNNING", "KILLED"), ("FINISHED", "FINISHED")):
        run_id = client.create_run(experiment_id).info.run_id
        client.log_metric(run_id, "train/loss", 1.0, step=1)  # what an earlier launch logged
        if before == "FINISHED":
            client.set_terminated(run_id, "FINISHED")
        run_dir = tmp_path / before
        dead = MlflowTracker(tcfg(f"http://127.0.0.1:{free_port()}", experiment=cfg.experiment), run_dir,
                             resume_run_id=run_id)
        for step in (2, 3):
            dead.log_metrics({"loss": float(step)}, step=step)
        dead.persist()  # the checkpoint at step 3
        dead.log_metrics({"loss": 4.0}, step=4)  # after it: lost with the kill, logged again by the resume
        del dead  # killed: never closed
        records = [json.loads(line) for line in (run_dir / OFFLINE_FILE).read_text().splitlines()]
        assert records[0]["run_id"] == run_id and [r["step"] for r in records if r["kind"] == "metrics"] == [2, 3]
        assert replay(run_dir, tracking_uri=mlflow_server) == run_id
        run = client.get_run(run_id)
        assert steps(client, run_id, "train/loss") == [1, 2, 3] and run.info.status == after, before


def test_offline_from_start_replays_into_a_new_run(mlflow_server, tmp_path):
    cfg = tcfg(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    t0 = time.monotonic()
    tracker = Tracker.create(cfg, tmp_path, rank=0)
    assert tracker.run_id is None
    tracker.log_params({"train": {"steps": 3}})
    for step in (1, 2, 3):
        tracker.log_metrics({"loss": float(step)}, step=step)
    tracker.close()
    assert time.monotonic() - t0 < 20
    run_id = replay(tmp_path / OFFLINE_FILE, tracking_uri=mlflow_server)
    client = mlflow.MlflowClient(mlflow_server, registry_uri=mlflow_server)
    run = only_run(client, cfg.experiment)
    assert run.info.run_id == run_id and run.data.params["train.steps"] == "3"
    assert steps(client, run_id, "train/loss") == [1, 2, 3]


def test_credentials_never_reach_params_artifacts_logs_or_files(
    mlflow_server, tmp_path, monkeypatch, caplog, capfd
):
    secrets = ("pa55-w0rd-x", "t0ken-abcdef", "hunter2-hunter2")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secrets[0])
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    uri = mlflow_server.replace("http://", f"http://bob:{secrets[1]}@")
    assert redact(uri) == mlflow_server.replace("http://", "http://***@")
    recipe = {"tracking": {"tracking_uri": uri}, "auth": {"password": secrets[2]}, "note": f"pw={secrets[0]}"}
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(json.dumps(recipe))
    cfg = tcfg(uri)
    with caplog.at_level(logging.INFO):
        tracker = Tracker.create(cfg, tmp_path / "run", rank=0)
        tracker.log_params(recipe)
        tracker.log_artifact(recipe_file)
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.close()
        # ... and the same while the server is unreachable: the offline file and warnings.
        dead = tcfg(f"http://bob:{secrets[1]}@127.0.0.1:{free_port()}")
        offline = Tracker.create(dead, tmp_path / "off", rank=0)
        offline.log_params(recipe)
        offline.close()
    client = mlflow.MlflowClient(mlflow_server, registry_uri=mlflow_server)
    run = only_run(client, cfg.experiment)
    assert run.data.params["auth.password"] == "***"
    uploaded = Path(client.download_artifacts(run.info.run_id, "recipe.yaml", str(tmp_path)))
    texts = {
        "params": json.dumps(run.data.params),
        "tags": json.dumps(run.data.tags),
        "artifact": uploaded.read_text(),
        "logs": caplog.text,
        "output": "".join(capfd.readouterr()),
        "offline": (tmp_path / "off" / OFFLINE_FILE).read_text(),
    }
    for where, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"{secret} leaked into {where}"


def test_replay_refuses_a_bad_file(tmp_path, capsys):
    bad = tmp_path / OFFLINE_FILE
    bad.write_text('{"kind": "run"}\nnot json\n')
    with pytest.raises(HarnessError, match=rf"{OFFLINE_FILE}:2: not a JSON record"):
        replay(bad)
    assert mimo(["tracking", "replay", str(tmp_path / "nowhere")]) == 2
    assert "no offline tracking file" in capsys.readouterr().err
