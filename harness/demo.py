"""`make demo`: the whole pipeline on the embedded synthetic GoPro-style set, on CPU.

synth -> pack shards -> `deepspeed` with 2 CPU ranks (recipes/demo.yaml, MLflow on, the model
registered) -> eval of the exported weights on held-out shards -> deblur one frame -> the registry
-> where to open the run.
Each step is the command a user would type; the demo prints it before running it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from harness.distributed import free_port

REPO = Path(__file__).resolve().parent.parent
REGISTERED = "mimo-demo"  # the registered model the demo run logs and crowns


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, cwd=cwd, env=env)


def _cleanup_shm(before: set[str]) -> None:
    # DeepSpeed's CPU all-reduce leaves 66 MB per rank in /dev/shm (docs/design.md §6).
    for path in set(map(str, Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))) - before:
        Path(path).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo", help="demo workspace (default: ./demo)")
    parser.add_argument("--fresh", action="store_true", help="delete the workspace first")
    args = parser.parse_args(argv)

    out = (REPO / args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    bindir = Path(py).parent
    mimo = [py, "-m", "harness"]
    data, shards, run_dir = out / "data", out / "shards", out / "run"
    db = out / "mlflow.db"  # runs from `out`, so MLflow's ./mlruns artifact root lands there too
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{db}", PYTHONUNBUFFERED="1")
    t0 = time.time()

    print("== 1/6 synthesize a GoPro-style set (easy preset: horizontal 4-8 px motion blur)")
    for split, scenes, seed in (("train", 8, 0), ("test", 2, 1)):
        if not (data / split).exists():
            _run([*mimo, "synth", "--out", str(data), "--split", split, "--scenes", str(scenes),
                  "--frames", "8", "--size", "128x128", "--seed", str(seed), "--preset", "easy"], out)

    print("\n== 2/6 pack WebDataset shards (resumable: a re-run skips finished shards)")
    for split in ("train", "test"):
        _run([*mimo, "pack", "gopro", "--root", str(data), "--split", split,
              "--out", str(shards / split), "--samples-per-shard", "16", "--encoding", "raw"], out)

    print("\n== 3/6 train with DeepSpeed on 2 CPU ranks (recipes/demo.yaml, MLflow tracking on)")
    before = set(map(str, Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")))
    try:
        _run([str(bindir / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--log_level=warning",
              str(REPO / "harness/train.py"), "--recipe", str(REPO / "recipes/demo.yaml"), "--run-dir", str(run_dir),
              "--resume", "auto", f"data.train={shards / 'train'}", f"data.val={shards / 'test'}",
              "tracking.enabled=true", f"tracking.registered_model={REGISTERED}"], out, env=env)
    finally:
        _cleanup_shm(before)
    summary = json.loads((run_dir / "summary.json").read_text())

    print("\n== 4/6 evaluate the exported weights on the held-out shards")
    weights = summary["checkpoint"]
    _run([*mimo, "eval", "--weights", str(weights), "--shards", str(shards / "test"),
          "--json", str(out / "eval.json")], out, env=env)
    result = json.loads((out / "eval.json").read_text())

    print("\n== 5/6 deblur one frame")
    frame = sorted((data / "test").glob("*/blur/*.png"))[0]
    _run([*mimo, "deblur", "--weights", str(weights), str(frame), str(out / "deblurred.png")], out, env=env)

    print(f"\n== 6/6 the model registry: {REGISTERED} (the best PSNR so far is @champion)")
    _run([*mimo, "registry", "show", REGISTERED], out, env=env)

    gain = result["psnr"] - result["blurred_psnr"]
    print(f"\nblurred input PSNR {result['blurred_psnr']:.2f} dB -> restored {result['psnr']:.2f} dB "
          f"({gain:+.2f} dB), SSIM {result['blurred_ssim']:.4f} -> {result['ssim']:.4f}")
    print(f"run dir: {run_dir}   weights: {weights}   deblurred frame: {out / 'deblurred.png'}")
    if summary.get("mlflow_run_id"):
        print(f"MLflow run {summary['mlflow_run_id']}: start the UI with\n"
              f"  {bindir / 'mlflow'} ui --backend-store-uri sqlite:///{db} --host 127.0.0.1 --port 5000\n"
              f"then open {summary.get('mlflow_run_url', '').rpartition('then open ')[2] or 'http://127.0.0.1:5000'}")
    print(f"demo finished in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
