"""The checks of gpu-e2e.sh, one subcommand each: each prints `PASS|FAIL|SKIP <check> ...` lines
and exits 1 on a FAIL (gpu-e2e.sh counts them). Reads the trainer's own files (log.jsonl,
summary.json) and runs the project's own code (harness.pyfunc), nothing re-implemented.

    e2e_check.py launch-and-signal --run-dir D --at-step N --signal KILL -- deepspeed ... harness/train.py ...
    e2e_check.py validation --run-dir D --device cuda --max-seconds 1.0
    e2e_check.py loss-scale --run-dir D
    e2e_check.py same-psnr --eval-json J --summary S --tolerance 1e-3
    e2e_check.py pyfunc --weights W --image IN.png --deblurred OUT.png --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo: harness without installing it


def report(ok: bool, check: str, detail: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'} {check}: {detail}", flush=True)
    return ok


def events(run_dir: Path, kind: str | None = None) -> list[dict]:
    path = run_dir / "log.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in lines if kind is None or e["event"] == kind]


def last_train_step(run_dir: Path) -> int:
    return max((e["step"] for e in events(run_dir, "train")), default=0)


def launch_and_signal(args: argparse.Namespace) -> bool:
    """Run the trainer in its own process group; signal the whole group once it logged step N
    after a checkpoint; PASS when it was stopped mid-run (no summary.json yet for KILL)."""
    run_dir = Path(args.run_dir)
    sig = getattr(signal, f"SIG{args.signal}")
    with open(args.log, "ab") as log:
        proc = subprocess.Popen(args.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + args.timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if last_train_step(run_dir) >= args.at_step and events(run_dir, "checkpoint"):
            os.killpg(proc.pid, sig)
            break
        time.sleep(0.05)
    else:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    rc = proc.wait(timeout=120)
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{args.port}_*"):
        path.unlink(missing_ok=True)
    step = last_train_step(run_dir)
    finished = (run_dir / "summary.json").exists() and not json.loads((run_dir / "summary.json").read_text())["stopped"]
    return report(not finished and args.at_step <= step < args.total, f"SIG{args.signal} mid-run",
                  f"stopped at step {step} of {args.total} (exit {rc})")


def validation(args: argparse.Namespace) -> bool:
    """Every validation and test scoring ran on the device, before and after the resume, in fp32."""
    run_dir = Path(args.run_dir)
    all_events = events(run_dir)
    resumed = [i for i, e in enumerate(all_events) if e["event"] == "resumed"]
    scored = [e for e in all_events if e["event"] in ("validation", "test")]
    after = [e for i, e in enumerate(all_events) if e["event"] in ("validation", "test") and resumed and i > resumed[-1]]
    ok = report(bool(resumed) and bool(after) and len(scored) > len(after), "resumed",
                f"{len(resumed)} resume(s); {len(scored) - len(after)} scorings before, {len(after)} after")
    devices = sorted({e["device"] for e in scored})
    ok &= report(bool(scored) and all(d.split(":")[0] == args.device for d in devices), f"validation on {args.device}",
                 f"devices {devices} in {len(scored)} validation/test events")
    ok &= report(all(e["precision"] == "fp32" for e in scored), "validation in fp32",
                 f"precisions {sorted({e['precision'] for e in scored})}")
    tests = [e for e in scored if e["event"] == "test"]
    spi = tests[-1]["seconds_per_image"] if tests else float("inf")
    ok &= report(spi < args.max_seconds, "seconds per frame",
                 f"final test {spi:.4f} s/frame (limit {args.max_seconds}); validations "
                 f"{[round(e['seconds_per_image'], 4) for e in scored if e['event'] == 'validation']}")
    summary = json.loads((run_dir / "summary.json").read_text())
    train = events(run_dir, "train")
    ok &= report(summary["final_step"] == summary["total_steps"] and not summary["stopped"], "resume to the end",
                 f"final step {summary['final_step']}/{summary['total_steps']}, peak_mem_mb "
                 f"{max(e['peak_mem_mb'] for e in train):.0f}, {summary['images_per_sec']:.1f} images/s")
    return ok


def loss_scale(args: argparse.Namespace) -> bool:
    """fp16: the dynamic loss scale at the stop step is the one the resumed run starts with."""
    run_dir = Path(args.run_dir)
    resumed = events(run_dir, "resumed")
    if not resumed:
        return report(False, "fp16 loss scaler resume", "no resume in log.jsonl")
    step = int(resumed[-1]["tag"].removeprefix("step").split("_")[0])
    before = [e["loss_scale"] for e in events(run_dir, "train") if e["step"] == step]
    skipped = len(events(run_dir, "skipped_step"))
    restored = resumed[-1]["loss_scale"]
    return report(bool(before) and before[0] == restored and restored is not None, "fp16 loss scaler resume",
                  f"scale {before[:1]} at step {step} -> {restored} after the resume ({skipped} overflow steps skipped)")


def same_psnr(args: argparse.Namespace) -> bool:
    got = json.loads(Path(args.eval_json).read_text())
    summary = json.loads(Path(args.summary).read_text())
    diff = abs(got["psnr"] - summary["test_psnr"])
    return report(diff <= args.tolerance and got["precision"] == "fp32", "mimo eval = trainer test PSNR",
                  f"mimo eval {got['psnr']:.6f} dB on {got['device']} vs trainer {summary['test_psnr']:.6f} dB "
                  f"(|diff| {diff:.2e}, limit {args.tolerance})")


def pyfunc(args: argparse.Namespace) -> bool:
    """The served model (harness.pyfunc.DeblurModel) on the device gives `mimo deblur`'s pixels."""
    import io
    from types import SimpleNamespace

    import numpy as np
    import pandas as pd
    from PIL import Image

    from harness import pyfunc as serve

    config = {"device": args.device}
    try:
        import mlflow.pyfunc
    except ImportError:  # not on the GPU image: the same class, loaded the way MLflow loads it
        model = serve.DeblurModel()
        model.load_context(SimpleNamespace(artifacts={serve.WEIGHTS_ARTIFACT: args.weights}, model_config=config))
        predict, device, how = (lambda df: model.predict(None, df)), model.device, "DeblurModel (no MLflow here)"
    else:
        path = Path(args.deblurred).parent / "pyfunc-model"
        mlflow.pyfunc.save_model(str(path), python_model=serve.DeblurModel(),
                                 artifacts={serve.WEIGHTS_ARTIFACT: args.weights})
        loaded = mlflow.pyfunc.load_model(str(path), model_config=config)
        predict, device, how = loaded.predict, loaded.unwrap_python_model().device, "MLflow pyfunc"
    out = predict(pd.DataFrame({serve.IMAGE_COLUMN: [Path(args.image).read_bytes()]}))
    served = np.asarray(Image.open(io.BytesIO(out[serve.IMAGE_COLUMN][0])))
    local = np.asarray(Image.open(args.deblurred))
    same = served.shape == local.shape and np.array_equal(served, local)
    return report(same and str(device).split(":")[0] == args.device, f"pyfunc on {args.device}",
                  f"{how} on {device}: {served.shape}, pixel-identical to mimo deblur: {same}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="check", required=True)
    p = sub.add_parser("launch-and-signal")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--at-step", type=int, required=True)
    p.add_argument("--total", type=int, required=True)
    p.add_argument("--signal", default="KILL", choices=["KILL", "TERM"])
    p.add_argument("--port", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--timeout", type=float, default=240)
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p = sub.add_parser("validation")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--max-seconds", type=float, required=True)
    p = sub.add_parser("loss-scale")
    p.add_argument("--run-dir", required=True)
    p = sub.add_parser("same-psnr")
    p.add_argument("--eval-json", required=True)
    p.add_argument("--summary", required=True)
    p.add_argument("--tolerance", type=float, default=1e-3)
    p = sub.add_parser("pyfunc")
    for name in ("--weights", "--image", "--deblurred", "--device"):
        p.add_argument(name, required=True)
    args = ap.parse_args()
    if getattr(args, "cmd", None) and args.cmd[0] == "--":
        args.cmd = args.cmd[1:]
    check = {"launch-and-signal": launch_and_signal, "validation": validation, "loss-scale": loss_scale,
             "same-psnr": same_psnr, "pyfunc": pyfunc}[args.check]
    try:
        return 0 if check(args) else 1
    except Exception as exc:  # noqa: BLE001 - a broken check is a FAIL line, not a traceback
        report(False, args.check, f"{exc.__class__.__name__}: {exc}")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
