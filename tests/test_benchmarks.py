"""The benchmark scripts in --quick mode: real runs (DeepSpeed in-process or launched, real shards,
real models), checked for a complete, well-formed report. No timing assertions: the CPU is shared."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.fixtures.launch import private_torch_extensions


def _run(script: str, out: Path, *extra: str, timeout: float = 600) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", "--quick", "--out", str(out), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    report = json.loads(out.read_text())
    assert set(report) == {"host", "device", "config", "results", "speedup"}
    assert report["config"]["quick"] is True and report["device"].startswith("cpu")
    # Every report says how busy the machine was (other work shows in the load at the start).
    assert report["config"]["load_avg_end"] >= 0 and report["config"]["cpu_count"] >= 1
    for r in report["results"]:
        assert set(r) == {"variant", "metric", "value"}
        assert r["value"] is None or math.isfinite(r["value"]), r
    return report, proc.stdout


def _values(report: dict, metric: str) -> dict[str, float]:
    return {r["variant"]: r["value"] for r in report["results"] if r["metric"] == metric}


@pytest.mark.slow
def test_train_throughput_quick_reports_every_variant_with_mfu_and_loader_headroom(tmp_path):
    report, stdout = _run("train_throughput.py", tmp_path / "tt.json")
    prefix = "mimo-unet@32/b8/"  # batch 8 from 4 synthetic pairs: both loaders must cycle, not stall
    names = ["a-baseline", "b-ds-fp32", "c-bf16", "d-bf16-cl", "e-compile", "f-fused-adam"]
    ips = _values(report, "images_per_s")
    assert set(ips) == {prefix + n for n in names} and all(v > 0 for v in ips.values())
    assert all(0 < v < 1 for v in _values(report, "mfu").values())
    assert all(v > 0 for v in _values(report, "peak_mem_mb").values())
    # Speedups are images/s ratios to the baseline of the same model and batch.
    assert report["speedup"][prefix + "a-baseline"] == 1.0
    for n in names[1:]:
        assert report["speedup"][prefix + n] == pytest.approx(ips[prefix + n] / ips[prefix + "a-baseline"], rel=0.01)
    # Trainer variants record the data-wait share of the step; the baseline does not.
    assert set(_values(report, "data_wait")) == {prefix + n for n in names[1:]}
    crops, consumed = _values(report, "crops_per_s")["loader/b8"], _values(report, "trainer_images_per_s")["loader/b8"]
    assert consumed == pytest.approx(max(ips[prefix + n] for n in names[1:]), rel=0.01)
    assert _values(report, "headroom")["loader/b8"] == pytest.approx(crops / consumed, rel=0.01)
    cfg = report["config"]
    assert cfg["variants"]["e-compile"]["compile"] and cfg["variants"]["f-fused-adam"]["impl"] == "fused"
    # CPU MFU is against this CPU's measured matmul peak in the variant's precision.
    assert set(cfg["peak_tflops"]) == {"fp32", "bf16"} and all(v > 0 for v in cfg["peak_tflops"].values())
    assert cfg["peak_source"].startswith("measured") and cfg["overrides"] == {"num_res": 1, "base_channels": 8}
    assert "images/s" in stdout and "f-fused-adam" in stdout


@pytest.mark.slow
def test_scaling_quick_launches_one_and_two_ranks(tmp_path):
    report, _ = _run("scaling.py", tmp_path / "scaling.json")
    ips = _values(report, "images_per_s")
    assert set(ips) == {"ranks-1", "ranks-2"} and all(v > 0 for v in ips.values())
    assert report["speedup"]["ranks-2"] == pytest.approx(ips["ranks-2"] / ips["ranks-1"], rel=0.01)
    assert _values(report, "per_rank_images_per_s")["ranks-2"] == pytest.approx(ips["ranks-2"] / 2, rel=0.01)
    assert report["config"]["world_sizes"] == [1, 2] and report["config"]["backend"] == "gloo"


def test_inference_quick_compares_deblur_modes_with_the_plain_forward(tmp_path):
    report, _ = _run("inference.py", tmp_path / "inf.json", "--models", "mimo-unet,mimo-unet-plus")
    latency = _values(report, "latency_ms")
    variants = ["plain-fp32", "deblur-fp32", "deblur-bf16", "tiled-fp32", "rot4-fp32", "rot4-bf16", "d8-fp32"]
    models = ["mimo-unet", "mimo-unet-plus"]
    assert set(latency) == {f"{m}/{v}" for m in models for v in variants} and all(v > 0 for v in latency.values())
    for m in models:  # each model against its own plain forward
        base = latency[f"{m}/plain-fp32"]
        assert report["speedup"][f"{m}/plain-fp32"] == 1.0
        assert report["speedup"][f"{m}/rot4-fp32"] == pytest.approx(base / latency[f"{m}/rot4-fp32"], rel=0.01)
        # the published MIMO-UNet++ (rot4) against the 8-fold ensemble of the same model
        assert _values(report, "speedup_vs_d8")[f"{m}/rot4-fp32"] == pytest.approx(
            latency[f"{m}/d8-fp32"] / latency[f"{m}/rot4-fp32"], rel=0.01)
    gflop = _values(report, "forward_gflop")
    assert all(gflop[f"{m}/plain-fp32"] > 0 for m in models)
    assert report["config"]["height"] == 64 and report["config"]["width"] == 96


def test_inference_rejects_a_malformed_size(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/inference.py", "--quick", "--size", "720by1280",
                           "--out", str(tmp_path / "x.json")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--size '720by1280': expected HxW" in proc.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_loss_curves_quick_plots_fp32_and_bf16(tmp_path):
    report, _ = _run("loss_curves.py", tmp_path / "curves.json")
    png = tmp_path / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and report["config"]["plot"] == "curves.png"
    curves = report["config"]["curves"]
    assert set(curves) == {"fp32", "bf16"} and all(len(c) == 20 for c in curves.values())
    # Same seed, same data: the first step's loss (before any update) differs only by bf16 rounding.
    assert curves["bf16"][0] == pytest.approx(curves["fp32"][0], rel=0.05)
    assert curves["fp32"][0] != curves["bf16"][0]
    tail = _values(report, "tail_mean_loss")
    assert _values(report, "tail_gap")["bf16-vs-fp32"] == pytest.approx(tail["bf16"] - tail["fp32"], abs=1e-3)


def test_projected_wall_time_is_the_plus_recipe_images_over_measured_images_per_s(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import train_throughput as tt

    model, crop, images = tt.plus_recipe_images()
    assert (model, crop, images) == ("mimo-unet-plus", 256, 1_577_250 * 4)  # 3000 epochs of 2,103 pairs, batch 4
    rows = [tt.row("v", "images_per_s", 100.0), tt.row("v", "step_ms", 40.0)]
    assert tt.projected_hours(rows, model, crop, {}) == [tt.row("v", "plus_recipe_hours", images / 100 / 3600)]
    # Only for the recipe's own model and crop: other settings would project a different run.
    assert tt.projected_hours(rows, "mimo-unet", crop, {}) == []
    assert tt.projected_hours(rows, model, 64, {}) == []
    assert tt.projected_hours(rows, model, crop, {"num_res": 1}) == []


E2E_CHECKS = {"synth", "pack", "pack-val", "pack-test", "SIGKILL mid-run", "resume", "resumed", "validation on cpu",
              "validation in fp32", "seconds per frame", "resume to the end", "export", "eval",
              "mimo eval = trainer test PSNR", "deblur-ensemble", "deblur", "pyfunc on cpu"}


@pytest.mark.slow
def test_gpu_e2e_passes_on_cpu_quick(tmp_path):
    """benchmarks/device/gpu-e2e.sh with DEVICE=cpu QUICK=1: the same steps as the GPU call (real
    deepspeed launches, a SIGKILL, a resume, export, eval, deblur, the pyfunc), a tiny model."""
    out = tmp_path / "out"
    # It kills a launch on purpose: a torch extensions cache of its own (tests/fixtures/launch.py).
    proc = _device_script("gpu-e2e.sh", out, tmp_path, TORCH_EXTENSIONS_DIR=str(private_torch_extensions("e2e")))
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and not [ln for ln in lines if ln.startswith("FAIL")], proc.stdout[-4000:]
    passed = {ln[5:].split(":")[0].split(" (")[0] for ln in lines if ln.startswith("PASS ")}
    assert E2E_CHECKS <= passed, E2E_CHECKS - passed
    assert [ln for ln in lines if ln.startswith("SKIP ")] == [
        "SKIP fp16 loss scaler resume: DeepSpeed's fp16 loss scaling needs CUDA (DEVICE=cpu)"]
    summary = json.loads((out / "gpu-e2e-summary.json").read_text())
    assert summary["final_step"] == 24 and summary["eval"]["device"] == "cpu" and summary["test_psnr"] > 0
    assert "PASS resume" in (out / "gpu-e2e.log").read_text()


def _device_script(name: str, out: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """benchmarks/device/<name> as the GPU call runs it, with DEVICE=cpu QUICK=1 (tiny settings)."""
    env = {**os.environ, "DEVICE": "cpu", "QUICK": "1", "SKIP_INSTALL": "1", "PY": sys.executable,
           "OUT": str(out), "TMPDIR": str(tmp_path), **env}
    return subprocess.run(["bash", f"benchmarks/device/{name}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_gpu_suite_runs_every_step_on_cpu_quick(tmp_path):
    out = tmp_path / "out"
    proc = _device_script("gpu-suite.sh", out, tmp_path)
    log = (out / "gpu-suite.log").read_text()
    assert proc.returncode == 0, proc.stdout[-3000:]
    for step in ("train-b4", "train-compile", "train-batches", "inference"):
        assert f"== {step}: exit 0 " in log, log[-3000:]
    for name in ("train_throughput", "train_throughput-compile", "train_throughput-batches", "inference"):
        report = json.loads((out / f"gpu-{name}.json").read_text())
        assert report["config"]["quick"] is True and report["results"], name


def test_e2e_check_prints_fail_and_exits_nonzero_on_a_psnr_mismatch(tmp_path):
    (tmp_path / "eval.json").write_text(json.dumps({"psnr": 30.0, "precision": "fp32", "device": "cpu"}))
    (tmp_path / "summary.json").write_text(json.dumps({"test_psnr": 30.01}))
    proc = subprocess.run([sys.executable, "benchmarks/device/e2e_check.py", "same-psnr", "--eval-json",
                           str(tmp_path / "eval.json"), "--summary", str(tmp_path / "summary.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stdout.startswith("FAIL mimo eval = trainer test PSNR: mimo eval 30.000000 dB on cpu vs trainer "
                                  "30.010000 dB (|diff| 1.00e-02, limit 0.001)")
