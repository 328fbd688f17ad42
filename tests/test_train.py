"""Real DeepSpeed launches on CPU ranks (gloo): smoke bf16 run + export, exact resume after
SIGKILL, elastic resume 2 -> 1 -> 2 ranks with a preemption signal on one rank only.

Exactness: on CPU in fp32 with one torch thread per rank every kernel is deterministic, so
resuming from a checkpoint that restores weights, Adam moments, LR schedule, every rank's RNG
states and loader position must reproduce the uninterrupted run *bit for bit* (tolerance 0).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
from pathlib import Path

import psutil
import pytest
import torch

from harness.checkpoint import complete_tags
from tests.fixtures.launch import Launch

pytestmark = pytest.mark.slow

TIMEOUT = 420
# fp32, no EMA, larger crops so that steps take long enough to kill between checkpoints.
FP32 = ["--recipe", "recipes/smoke.yaml", "train.steps=16", "checkpoint.every=6", "checkpoint.keep=2",
        "eval.every=100", "train.ema_decay=null", "data.crop=64"]


def _data(shards) -> list[str]:
    return [f"data.train={shards['train']}", f"data.val={shards['test']}"]


def _events(run_dir: Path, kind: str | None = None) -> list[dict]:
    path = run_dir / "log.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in lines if kind is None or e["event"] == kind]


def _last_step(run_dir: Path) -> int:
    return max((e["step"] for e in _events(run_dir, "train")), default=0)


def _losses_after_resume(run_dir: Path) -> dict[int, float]:
    events = _events(run_dir)
    start = max(i for i, e in enumerate(events) if e["event"] == "resumed")
    return {e["step"]: e["loss"] for e in events[start:] if e["event"] == "train"}


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory, train_shards) -> Path:
    """Run A: 16 uninterrupted fp32 steps on 2 ranks (reference for resume tests)."""
    run_dir = tmp_path_factory.mktemp("runA") / "run"
    launch = Launch([*FP32, "--run-dir", str(run_dir), *_data(train_shards)], nprocs=2,
                    log=run_dir.parent / "launch.log")
    try:
        assert launch.run(TIMEOUT) == 0, launch.output()[-3000:]
    finally:
        launch.kill()
    return run_dir


def test_smoke_bf16_two_ranks_validates_checkpoints_exports(launch_train, train_shards, tmp_path):
    from harness.cli import main as mimo
    from harness.models import create_model, load_weights

    run_dir = tmp_path / "run"
    launch = launch_train(["--recipe", "recipes/smoke.yaml", "--run-dir", run_dir, "train.precision=bf16",
                           "train.steps=12", "eval.every=6", "checkpoint.every=4", "checkpoint.keep=2",
                           *_data(train_shards)], nprocs=2)
    assert launch.wait(TIMEOUT) == 0, launch.output()[-3000:]
    # Each rank removed its DeepSpeed all-reduce buffer from /dev/shm at exit (66 MB each).
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{launch.port}_*"))

    # The console says what happened: a line per validation, then the end-of-run block; the
    # ranks' library noise (DeepSpeed INFO, op-build prints, deprecation warnings) is quiet.
    out = launch.output()
    assert re.search(r"^val  step 6/12  PSNR [\d.]+ dB \(blurred [\d.]+, [+-][\d.]+\)  SSIM 0\.\d+  \| 4 images, "
                     r"protocol default, fp32, on cpu", out, re.M), out[-3000:]
    block = out[out.index("train: finished step 12/12 on 2 rank(s)"):]
    assert "\n  val  step 12/12  PSNR" in block and f"\n  weights  {run_dir / 'weights.pkl'}" in block
    assert f"\n  run dir  {run_dir}" in block and "best val PSNR" in block
    for noise in ("built successfully", "[comm.py", "FutureWarning", "torch_checkpoint_engine"):
        assert noise not in out, noise

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_step"] == 12 and summary["world_size"] == 2 and not summary["stopped"]
    assert summary["skipped_steps"] == 0 and summary["images_per_sec"] > 0
    vals = _events(run_dir, "validation")
    assert [v["step"] for v in vals] == [6, 12]
    # Distributed validation: the 4 test pairs are each scored once across the 2 ranks.
    assert all(v["val_images"] == 4 for v in vals)
    assert 10 < summary["blurred_psnr"] < 40 and math.isfinite(summary["val_psnr"])
    assert summary["val_psnr"] == vals[-1]["val_psnr"]
    train = _events(run_dir, "train")
    assert [e["step"] for e in train] == list(range(1, 13))
    assert all(math.isfinite(e["loss"]) and e["lr"] > 0 and e["samples"] == 4 * e["step"] for e in train)
    assert {"content_x1", "fft_x1", "grad_norm", "data_wait", "peak_mem_mb"} <= set(train[0])

    # keep=2 newest complete checkpoints, plus the best one by PSNR; each with its COMPLETE marker.
    ckpts = run_dir / "checkpoints"
    best = (ckpts / "best").read_text().strip()
    assert set(complete_tags(ckpts)) == {"step00000008", "step00000012", best}
    assert (ckpts / "latest").read_text().strip() == "step00000012"
    assert (ckpts / "step00000012" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()

    # Final export (EMA, since smoke.yaml sets ema_decay) loads in the public format.
    assert summary["checkpoint"] == str(run_dir / "weights.pkl")
    model = create_model("mimo-unet", num_res=1, base_channels=8)
    load_weights(model, run_dir / "weights.pkl")
    assert mimo(["export", str(run_dir), "--out", str(tmp_path / "ema.pkl"), "--ema"]) == 0
    assert all(torch.equal(a, b) for a, b in zip(_weights(tmp_path / "ema.pkl").values(),
                                                 _weights(run_dir / "weights.pkl").values()))
    # fp32 master weights of the best checkpoint (bf16 run): consolidated from the ZeRO shards.
    assert mimo(["export", str(run_dir), "--out", str(tmp_path / "best.pkl"), "--tag", "best"]) == 0
    exported = torch.load(tmp_path / "best.pkl", weights_only=True)
    assert exported["model_name"] == "mimo-unet" and exported["model_overrides"] == {"num_res": 1, "base_channels": 8}
    assert all(v.dtype == torch.float32 for v in exported["model"].values())
    load_weights(create_model("mimo-unet", num_res=1, base_channels=8), tmp_path / "best.pkl")
    assert mimo(["export", str(run_dir), "--out", str(tmp_path / "x.pkl"), "--tag", "step00000001"]) == 2


def test_exact_resume_after_sigkill(launch_train, fp32_run, train_shards, tmp_path):
    run_dir = tmp_path / "B"
    args = [*FP32, "--run-dir", run_dir, *_data(train_shards)]
    first = launch_train(args, nprocs=2)
    first.wait_for(lambda: _last_step(run_dir) >= 8, timeout=TIMEOUT)  # checkpoint at 6, next at 12
    first.kill()
    killed_at = _last_step(run_dir)
    assert not (run_dir / "summary.json").exists() and killed_at < 16
    # A torn checkpoint newer than any complete one (files written, no COMPLETE) is never picked.
    torn = run_dir / "checkpoints" / f"step{killed_at:08d}"
    if not torn.exists():
        torn.mkdir()
        (torn / "mp_rank_00_model_states.pt").write_bytes(b"half a checkpoint")

    second = launch_train([*args, "--resume", "auto"], nprocs=2)
    assert second.run(TIMEOUT) == 0, second.output()[-3000:]
    resumed = _events(run_dir, "resumed")[-1]
    assert resumed["tag"] < f"step{killed_at:08d}", "the kill should land between checkpoints"
    expected = {e["step"]: e["loss"] for e in _events(fp32_run, "train")}
    after = _losses_after_resume(run_dir)
    assert min(after) == int(resumed["tag"][4:]) + 1 and max(after) == 16
    assert after == {s: expected[s] for s in after}  # bitwise equal losses
    a, b = _weights(fp32_run / "weights.pkl"), _weights(run_dir / "weights.pkl")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary_a = json.loads((fp32_run / "summary.json").read_text())
    summary_b = json.loads((run_dir / "summary.json").read_text())
    assert summary_b["val_psnr"] == summary_a["val_psnr"] and summary_b["final_step"] == 16
    assert not torn.exists()  # pruned once newer complete checkpoints exist


def _rank_process(launch: Launch, rank: int) -> psutil.Process:
    for child in psutil.Process(launch.proc.pid).children(recursive=True):
        if f"--local_rank={rank}" in " ".join(child.cmdline()):
            return child
    raise AssertionError(f"rank {rank} not found")


# fp32 reduction noise between 2 ranks x micro 2 (gloo all-reduce average) and 1 rank x micro 2 x
# accumulation 2 (DeepSpeed sums loss / 2). Measured on CPU: logged losses differ by <= 5.1e-8
# relative (the mean over ranks vs over micro-batches is summed in another order), weights by 0
# (halving is exact in binary floating point, so both gradient sums round alike).
WORLD_RTOL = 1e-6


def _rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in a)


def _weights_rel_diff(a: Path, b: Path) -> float:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).norm() / wb[k].norm().clamp_min(1e-12)) for k in wa)


def test_elastic_resume_two_to_one_and_back_with_preemption(launch_train, fp32_run, train_shards, tmp_path):
    """World-size invariance (the data order depends on the global batch only): 1 process with
    accumulation 2 trains like 2 ranks; an elastic resume 2 -> 1 continues that very run."""
    run_dir, ref = tmp_path / "E", tmp_path / "R1"
    shutil.copytree(fp32_run, run_dir)
    lr_a = _events(fp32_run, "train")[-1]["lr"]

    # The reference: 16 steps on 1 process (micro 2 x accumulation 2), then continued to 20 there.
    for steps in (16, 20):
        r1 = launch_train([*FP32, "--run-dir", ref, f"train.steps={steps}", *_data(train_shards)], nprocs=0)
        assert r1.run(TIMEOUT) == 0, r1.output()[-3000:]
        if steps == 16:
            shutil.copy(ref / "weights.pkl", tmp_path / "r1-16.pkl")
    losses_1 = {e["step"]: e["loss"] for e in _events(ref, "train")}
    losses_2 = {e["step"]: e["loss"] for e in _events(fp32_run, "train")}
    assert sorted(losses_1) == list(range(1, 21))
    world_diff = _rel_diff({s: losses_1[s] for s in losses_2}, losses_2)
    weights_diff = _weights_rel_diff(tmp_path / "r1-16.pkl", fp32_run / "weights.pkl")
    print(f"world 2 vs 1 x accum 2: losses rel diff {world_diff:.2e}, weights {weights_diff:.2e}")
    assert world_diff <= WORLD_RTOL and weights_diff <= WORLD_RTOL

    # 2 ranks -> 1 (plain python): universal checkpoint, same global batch via accumulation.
    one = launch_train([*FP32, "--run-dir", run_dir, "train.steps=20", *_data(train_shards)], nprocs=0)
    assert one.run(TIMEOUT) == 0, one.output()[-3000:]
    resumed = _events(run_dir, "resumed")[-1]
    assert (resumed["tag"], resumed["saved_world_size"], resumed["world_size"]) == ("step00000016_universal", 2, 1)
    assert json.loads((run_dir / "ds_config.json").read_text())["gradient_accumulation_steps"] == 2
    steps = [e for e in _events(run_dir, "train") if e["step"] > 16]
    assert [e["step"] for e in steps] == [17, 18, 19, 20] and steps[0]["samples"] == 68
    assert steps[0]["lr"] == lr_a  # the schedule continues where it was (after the step-10 milestone)
    # Exact elastic resume: the same batches as the uninterrupted run, so the same losses and weights.
    elastic_diff = _rel_diff({e["step"]: e["loss"] for e in steps}, {s: losses_1[s] for s in range(17, 21)})
    elastic_weights = _weights_rel_diff(run_dir / "weights.pkl", ref / "weights.pkl")
    print(f"elastic 2 -> 1 vs uninterrupted: losses rel diff {elastic_diff:.2e}, weights {elastic_weights:.2e}")
    assert elastic_diff <= WORLD_RTOL and elastic_weights <= WORLD_RTOL
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 1

    # 1 rank -> 2, then preemption: SIGUSR1 reaches rank 1 only; both ranks stop at the same step,
    # checkpoint, and exit 0.
    two = launch_train([*FP32, "--run-dir", run_dir, "train.steps=400", *_data(train_shards)], nprocs=2)
    two.wait_for(lambda: _last_step(run_dir) >= 22, timeout=TIMEOUT)
    _rank_process(two, 1).send_signal(signal.SIGUSR1)
    assert two.run(TIMEOUT) == 0, two.output()[-3000:]
    resumed = _events(run_dir, "resumed")[-1]
    assert (resumed["saved_world_size"], resumed["world_size"]) == (1, 2)
    summary = json.loads((run_dir / "summary.json").read_text())
    stop = summary["final_step"]
    assert summary["stopped"] and 22 <= stop < 400 and summary["world_size"] == 2
    assert complete_tags(run_dir / "checkpoints")[-1] == f"step{stop:08d}"
    assert [e["step"] for e in _events(run_dir, "train") if e["step"] > 20][0] == 21


def test_nonfinite_steps_are_skipped_then_abort_with_one_line(launch_train, train_shards, tmp_path):
    # lr 1e30: step 1 is finite, then the weights explode and every later loss is NaN/inf.
    run_dir = tmp_path / "nan"
    launch = launch_train(["--recipe", "recipes/smoke.yaml", "--run-dir", run_dir, "optim.lr=1e30",
                           "train.max_nonfinite=3", *_data(train_shards)], nprocs=0)
    assert launch.run(TIMEOUT) == 2
    errors = [line for line in launch.output().splitlines() if line.startswith("train: error:")]
    assert errors == ["train: error: recipes/smoke.yaml: non-finite loss or gradients for 3 steps in a row "
                      "(train.max_nonfinite); lower optim.lr or enable train.grad_clip"]
    skipped = _events(run_dir, "skipped_step")
    assert [(e["step"], e["streak"]) for e in skipped] == [(2, 1), (3, 2), (4, 3)]
    assert not (run_dir / "summary.json").exists()
