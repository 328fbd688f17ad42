"""fp32 vs bf16 loss curves of the harness trainer, side by side (a PNG plot and JSON).

Both runs use the same seed, so the same initial weights and the same crops in the same order;
only the precision differs (bf16 model under DeepSpeed, fp32 master weights and fp32 loss).
"Equal within noise": the bf16 run's mean loss over the last quarter of the steps is compared
with the fp32 run's, in units of the fp32 run's step-to-step standard deviation there.

    python benchmarks/loss_curves.py --quick      # tiny model, 20 steps; the test suite
    python benchmarks/loss_curves.py              # MIMO-UNet (1 ResBlock, width 32), 64x64, 300 steps
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import result_path, row, speedups, write_report  # noqa: E402
from train_throughput import make_data, trainer_recipe  # noqa: E402

from harness.files import atomic_write  # noqa: E402

PRECISIONS = ("fp32", "bf16")
QUICK = dict(model="mimo-unet", overrides={"num_res": 1, "base_channels": 8}, crop=32, batch=4, steps=20,
             lr=1e-3, size=(48, 64), scenes=1, frames=4, threads=1)
# The demo recipe's model and settings: it learns visibly within a few hundred steps on CPU.
FULL = dict(model="mimo-unet", overrides={"num_res": 1, "base_channels": 32}, crop=64, batch=4, steps=300,
            lr=1e-3, size=(96, 128), scenes=4, frames=4, threads=None)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 20 steps (the test suite)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", help="JSON path (default benchmarks/results/<host-or-gpu>-loss_curves.json; "
                                  "the PNG goes beside it)")
    args = ap.parse_args(argv)
    args.cfg = dict(QUICK if args.quick else FULL)
    if args.steps:
        args.cfg["steps"] = args.steps
    return args


def curve(recipe, run_dir: Path, steps: int) -> tuple[list[float], float]:
    """Per-step losses of harness.train's step (read every step: this is the curve) and seconds/step."""
    from harness.train import Run

    job = Run(recipe, run_dir, "never", None)
    job.build()
    batches, losses = iter(job.loader), []
    job.engine.train()
    t0 = time.perf_counter()
    try:
        for _ in range(steps):
            losses.append(float(job.one_step(batches)[0]))
    finally:
        job.loader.close()
        job.engine = job.ema = None
        gc.collect()
    return losses, (time.perf_counter() - t0) / steps


def smooth(values: list[float], k: int) -> list[float]:
    """Trailing moving average over k steps (the raw curves are noisy: one random batch per step)."""
    return [statistics.fmean(values[max(0, i - k + 1): i + 1]) for i in range(len(values))]


def plot(curves: dict[str, list[float]], k: int, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, losses), color in zip(curves.items(), ("tab:blue", "tab:orange")):
        ax.plot(losses, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(smooth(losses, k), color=color, label=f"{name} (moving mean, {k} steps)")
    ax.set(xlabel="step", ylabel="training loss (L1 + 0.1 FFT, 3 scales)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = args.cfg
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    curves, times = {}, {}
    with tempfile.TemporaryDirectory(prefix="mimo-bench-loss-") as tmp:
        work = Path(tmp)
        _, shards = make_data(work, cfg, args.workers)
        for precision in PRECISIONS:
            print(f"[loss_curves] {precision}: {cfg['steps']} steps ...", flush=True)
            recipe = trainer_recipe(cfg["model"], cfg["overrides"], shards, cfg["crop"], cfg["batch"], args.workers,
                                    precision=precision, lr=cfg["lr"], threads=cfg["threads"])
            curves[precision], times[precision] = curve(recipe, work / f"run-{precision}", cfg["steps"])
    tail = max(2, cfg["steps"] // 4)
    fp32_tail, bf16_tail = curves["fp32"][-tail:], curves["bf16"][-tail:]
    noise = statistics.stdev(fp32_tail)
    gap = statistics.fmean(bf16_tail) - statistics.fmean(fp32_tail)
    rows = []
    for p in PRECISIONS:
        rows += [row(p, "first_loss", curves[p][0]), row(p, "tail_mean_loss", statistics.fmean(curves[p][-tail:])),
                 row(p, "step_ms", times[p] * 1e3), row(p, "steps_per_s", 1 / times[p])]
    rows += [row("bf16-vs-fp32", "tail_gap", gap), row("bf16-vs-fp32", "tail_gap_in_fp32_std", gap / noise)]
    out = Path(args.out) if args.out else result_path("loss_curves", args.device)
    png = out.with_suffix(".png")
    k = max(1, cfg["steps"] // 20)
    arch = ", ".join(f"{k_} {v}" for k_, v in cfg["overrides"].items())
    plot(curves, k, f"{cfg['model']} ({arch or 'default'}), crop {cfg['crop']}, batch {cfg['batch']}: fp32 vs bf16", png)
    config = {k_: v for k_, v in cfg.items() if k_ != "size"} | {
        "device": args.device, "quick": args.quick, "tail_steps": tail, "plot": png.name, "baseline": "fp32",
        "curves": curves, "torch": torch.__version__}
    write_report("loss_curves", device=args.device, config=config, rows=rows,
                 speedup=speedups(rows, "steps_per_s", "fp32"), out=out)
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
