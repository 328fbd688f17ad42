"""Inference latency and memory: harness.infer.deblur (fp32/bf16, tiled, self-ensembles) vs a plain forward.

Variants per model (ratios are latency speedups against `plain-fp32` of the same model; below 1
means slower, e.g. the ensembles):
  plain-fp32      model(x)[-1] under torch.inference_mode, the reference code's test loop
  deblur-fp32     harness.infer.deblur: pad to /4, crop back, clamp
  deblur-bf16     + bf16 autocast
  tiled-fp32      + tiles with raised-cosine blending (memory bounded by the tile)
  rot4-fp32       + MIMO-UNet++ as published: 4 rotations averaged, 2 batched forwards of 2 images
  rot4-bf16       + bf16
  d8-fp32         + the 8-fold flip x rotation ensemble, 8 forwards of 1 image
The rot4 rows also get `speedup_vs_d8` (d8 latency / rot4 latency of the same model and precision).

    python benchmarks/inference.py --quick            # tiny model, 64x96 image; the test suite
    python benchmarks/inference.py                    # CPU: MIMO-UNet and MIMO-UNet+, 320x180
    python benchmarks/inference.py --device cuda --size 720x1280 --tile 512
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import PeakMemory, row, speedups, sync, write_report  # noqa: E402

from harness.infer import deblur  # noqa: E402
from harness.models import count_flops, create_model  # noqa: E402

# variant -> deblur keyword arguments (None: the plain forward)
VARIANTS = {
    "plain-fp32": None,
    "deblur-fp32": {"precision": "fp32"},
    "deblur-bf16": {"precision": "bf16"},
    "tiled-fp32": {"precision": "fp32", "tile": True},
    "rot4-fp32": {"precision": "fp32", "ensemble": "rot4"},
    "rot4-bf16": {"precision": "bf16", "ensemble": "rot4"},
    "d8-fp32": {"precision": "fp32", "ensemble": "d8"},
}
# threads: torch intra-op threads (None = torch's default); one in --quick (the test suite shares the CPU).
QUICK = dict(models="mimo-unet", overrides={"num_res": 1, "base_channels": 8}, size="64x96", tile=48, reps=2,
             threads=1)
FULL = dict(models="mimo-unet,mimo-unet-plus", overrides={}, size="180x320", tile=128, reps=2, threads=None)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model and image (the test suite)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--models", help="comma-separated model names")
    ap.add_argument("--size", help="HxW of the test image (the paper: 720x1280)")
    ap.add_argument("--tile", type=int, help="tile size of the tiled variant (overlap 32, 8 in --quick)")
    ap.add_argument("--reps", type=int, help="timed repetitions per variant (median reported)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 with --quick)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/<host-or-gpu>-inference.json)")
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for key in ("models", "size", "tile", "reps", "threads"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    try:
        h, w = (int(v) for v in cfg["size"].lower().split("x"))
    except ValueError:
        ap.error(f"--size {cfg['size']!r}: expected HxW, e.g. 720x1280")
    cfg["hw"], cfg["overlap"] = (h, w), 8 if args.quick else 32
    args.cfg = cfg
    return args


def run_variant(model, x: torch.Tensor, kwargs: dict | None, cfg: dict, device: str) -> tuple[float, float]:
    """Median latency (s) over cfg['reps'] runs after one warm-up, and peak MiB."""
    if kwargs is None:
        def call() -> None:
            with torch.inference_mode():
                model(x)[-1].clamp(0, 1)
    else:
        kw = dict(kwargs)
        if kw.pop("tile", False):
            kw.update(tile=cfg["tile"], overlap=cfg["overlap"])

        def call() -> None:
            deblur(model, x, **kw)

    call()  # warm-up: allocator, oneDNN/cuDNN algorithm choice
    times = []
    with PeakMemory(device) as mem:
        for _ in range(cfg["reps"]):
            sync(device)
            t0 = time.perf_counter()
            call()
            sync(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), mem.peak_mb


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg, device = args.cfg, args.device
    h, w = cfg["hw"]
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    x = torch.rand(1, 3, h, w, device=device)
    rows, speedup = [], {}
    for name in cfg["models"].split(","):
        model_rows: list[dict] = []
        model = create_model(name, **cfg["overrides"]).to(device).eval()
        gflop = count_flops(model, h, w) / 1e9
        for variant, kwargs in VARIANTS.items():
            print(f"[inference] {name}/{variant} ...", flush=True)
            dt, mem = run_variant(model, x, kwargs, cfg, device)
            v = f"{name}/{variant}"
            model_rows += [row(v, "latency_ms", dt * 1e3), row(v, "peak_mem_mb", mem),
                           row(v, "mpix_per_s", h * w / dt / 1e6), row(v, "forward_gflop", gflop)]
        latency = {r["variant"]: r["value"] for r in model_rows if r["metric"] == "latency_ms"}
        model_rows.append(row(f"{name}/rot4-fp32", "speedup_vs_d8",
                              latency[f"{name}/d8-fp32"] / latency[f"{name}/rot4-fp32"]))
        # Each model's variants against its own plain forward.
        speedup.update(speedups(model_rows, "latency_ms", f"{name}/plain-fp32", lower_is_better=True))
        rows += model_rows
    config = {k: v for k, v in cfg.items() if k != "hw"} | {
        "height": h, "width": w, "device": device, "quick": args.quick, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "baseline": "plain-fp32", "speedup": "plain latency / variant latency"}
    write_report("inference", device=device, config=config, rows=rows, speedup=speedup, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
