"""The evaluation protocol, for real: validation in fp32 on the training device, `best` chosen on
data.val only, data.test scored at the end (or every eval.test_every steps) and reported, `mimo
eval` equal to the trainer's numbers for the same weights, and the registry's champion rule on the
final test PSNR with a floor at the blurred input's. Real DeepSpeed launches (2 gloo ranks, and a
plain one-process run), a real `mlflow server`."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import mlflow
import pytest
import torch

from harness.cli import main as mimo
from harness.models import create_model, save_weights
from harness.recipe import TrackingCfg, load_recipe
from harness.tracking import CHAMPION, Tracker
from tests.conftest import REPO

TIMEOUT = 420


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]


def _of(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["event"] == kind]


@pytest.mark.parametrize("name", ["plus", "base", "reds"])
def test_paper_recipes_train_on_everything_and_report_test_in_fp32(name):
    recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
    assert recipe.data.val is None and recipe.data.test  # nothing chosen, the test set reported
    assert recipe.eval.precision == "fp32" and recipe.train.precision == "bf16"
    assert recipe.eval.test_every is None
    text = (REPO / "recipes" / f"{name}.yaml").read_text()
    assert "carve" in text and "data.val=" in text  # each says how to carve a validation split


@pytest.mark.slow
def test_bf16_run_validates_in_fp32_chooses_on_val_reports_test_and_mimo_eval_agrees(
        launch_train, train_shards, tmp_path):
    """2 ranks, bf16, no EMA: validation scores the fp32 master weights in fp32, so `mimo eval` of the
    exported weights gives the same PSNR; data.test is read once, after the last step."""
    run_dir = tmp_path / "run"
    val, test = train_shards["test"], train_shards["train"]  # two different sets
    launch = launch_train(["--recipe", "recipes/smoke.yaml", "--run-dir", run_dir, "train.precision=bf16",
                           "train.ema_decay=null", "train.steps=8", "eval.every=4", "checkpoint.every=4",
                           "eval.images=0", f"data.train={train_shards['train']}", f"data.val={val}",
                           f"data.test={test}"], nprocs=2)
    assert launch.run(TIMEOUT) == 0, launch.output()[-3000:]
    events = _events(run_dir)
    vals, tests = _of(events, "validation"), _of(events, "test")
    assert [v["step"] for v in vals] == [4, 8]
    for v in vals:  # the protocol travels with every validation
        assert (v["device"], v["precision"], v["ensemble"], v["protocol"]) == ("cpu", "fp32", "none", "default")
        assert v["seconds_per_image"] > 0 and v["val_images"] == 4 and "test_psnr" not in v
    # data.test: scored once, at the end, after the last training step and validation
    assert [t["step"] for t in tests] == [8] and tests[0]["test_images"] == 16
    assert events.index(tests[0]) > max(i for i, e in enumerate(events) if e["event"] in ("train", "validation"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test_psnr"] == tests[0]["test_psnr"] and summary["test_ssim"] == tests[0]["test_ssim"]
    assert summary["eval"] == {"precision": "fp32", "ensemble": "none", "device": "cpu", "protocol": "default"}
    # best follows validation only
    best = max(vals, key=lambda v: v["val_psnr"])
    assert (summary["best_psnr"], summary["best_step"]) == (best["val_psnr"], best["step"])
    assert (run_dir / "checkpoints" / "best").read_text().strip() == f"step{best['step']:08d}"

    # `mimo eval` of the exported (fp32 master) weights = the trainer's final validation and test
    for shards, key, expected in ((val, "psnr", vals[-1]["val_psnr"]), (test, "psnr", summary["test_psnr"]),
                                  (test, "blurred_psnr", summary["test_blurred_psnr"])):
        out = tmp_path / f"{Path(shards).name}.json"
        assert mimo(["eval", "--weights", str(run_dir / "weights.pkl"), "--shards", str(shards),
                     "--device", "cpu", "--json", str(out)]) == 0
        assert json.loads(out.read_text())[key] == pytest.approx(expected, abs=1e-6)


@pytest.mark.slow
def test_recipe_without_val_trains_scores_test_every_n_steps_and_exports(launch_train, train_shards, tmp_path):
    run_dir = tmp_path / "run"
    launch = launch_train(["--recipe", "recipes/smoke.yaml", "--run-dir", run_dir, "train.steps=6",
                           "checkpoint.every=3", "eval.test_every=3", "eval.images=0", "eval.precision=bf16",
                           f"data.train={train_shards['train']}", "data.val=null",
                           f"data.test={train_shards['test']}"], nprocs=0)
    assert launch.run(TIMEOUT) == 0, launch.output()[-3000:]
    events = _events(run_dir)
    assert _of(events, "validation") == []
    tests = _of(events, "test")
    assert [t["step"] for t in tests] == [3, 6] and all(t["precision"] == "bf16" for t in tests)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_psnr"] is None and summary["val_psnr"] is None
    assert summary["test_psnr"] == tests[-1]["test_psnr"] and summary["eval"]["precision"] == "bf16"
    assert not (run_dir / "checkpoints" / "best").exists() and (run_dir / "weights.pkl").is_file()


@pytest.mark.slow
@pytest.mark.usefixtures("clean_tracking_env")
def test_champion_rule_compares_test_psnr_and_refuses_models_below_the_blurred_input(
        mlflow_server, tmp_path, caplog):
    name = f"deblur-{uuid.uuid4().hex[:8]}"
    cfg = TrackingCfg(enabled=True, tracking_uri=mlflow_server, experiment=f"exp-{uuid.uuid4().hex[:8]}",
                      run_name="t", registered_model=name, log_every=1, images_every=1, system_metrics=False)
    client = mlflow.MlflowClient(mlflow_server, registry_uri=mlflow_server)

    def register(i: int, test_psnr: float, blurred: float) -> int:
        torch.manual_seed(i)
        weights = save_weights(create_model("mimo-unet", base_channels=8, num_res=1), tmp_path / f"w{i}.pkl")
        tracker = Tracker.create(cfg, tmp_path / f"r{i}", rank=0)
        version = tracker.log_model(weights, test_psnr, blurred_psnr=blurred, metric="test_psnr")
        tracker.close()
        return version

    assert register(1, 25.0, 24.0) == 1
    assert client.get_model_version_by_alias(name, CHAMPION).version == "1"
    with caplog.at_level(logging.WARNING, logger="harness.tracking"):
        assert register(2, 30.0, 31.5) == 2  # higher than the champion, but worse than its blurred input
    assert client.get_model_version_by_alias(name, CHAMPION).version == "1"
    assert "version 2 not made @champion: its test_psnr 30.000 dB is below the blurred input's 31.500 dB" \
        in caplog.text
    assert register(3, 26.0, 24.0) == 3
    version = client.get_model_version_by_alias(name, CHAMPION)
    assert version.version == "3" and float(version.tags["test_psnr"]) == 26.0
    assert float(version.tags["blurred_psnr"]) == 24.0
