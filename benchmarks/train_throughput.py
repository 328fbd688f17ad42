"""Training throughput: the harness's trainer against a reference-style PyTorch loop, same run.

Variants, per model and batch size (ratios against (a) of the same model and batch):
  a-baseline    like the reference code: fp32, plain loop, torch DataLoader over the PNG folder
                tree (one decoded pair per crop), Adam with per-tensor kernels, `.item()` every step
  b-ds-fp32     harness.train's step under DeepSpeed (world size 1), shard stream, fp32
  c-bf16        + bf16 (the loss, FFT included, stays fp32)
  d-bf16-cl     + channels_last inputs
  e-compile     + torch.compile of the model
  f-fused-adam  + fused Adam (b-e use per-tensor Adam like the baseline)
Metrics: images/s, step time, peak memory, MFU (3 x analytic forward FLOPs from
harness.models.count_flops per image, against the peak in config), and for MIMO-UNet+ at 256x256
the projected wall time of the whole recipes/plus.yaml run. Loader headroom: the shard
loader's crops/s at the trainer's data settings over the fastest trainer variant's images/s.

    python benchmarks/train_throughput.py --quick                  # seconds; used by the tests
    python benchmarks/train_throughput.py                          # CPU: MIMO-UNet, 64x64 crops
    python benchmarks/train_throughput.py --device cuda --models mimo-unet,mimo-unet-plus \\
        --crop 256 --batch-sizes 4,8,16,max                        # the GPU run
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import PeakMemory, peak_tflops, row, speedups, sync, write_report  # noqa: E402
from loader import FolderPairs, endless, measure  # noqa: E402

from harness.losses import mimo_loss  # noqa: E402
from harness.models import count_flops, create_model  # noqa: E402

# variant -> (precision, channels_last, compile, Adam implementation) of the harness trainer
TRAINER_VARIANTS = {
    "b-ds-fp32": ("fp32", False, False, "loop"),
    "c-bf16": ("bf16", False, False, "loop"),
    "d-bf16-cl": ("bf16", True, False, "loop"),
    "e-compile": ("bf16", True, True, "loop"),
    "f-fused-adam": ("bf16", True, True, "fused"),
}
VARIANTS = ("a-baseline", *TRAINER_VARIANTS)
# threads: torch intra-op threads (None = all cores); one in --quick, where the test suite shares the CPU
# and oversubscribed OpenMP threads would make the run crawl.
# Batch 8 in --quick is larger than its 4-pair data set, as `max` on a GPU is larger than FULL's 8 pairs.
QUICK = dict(models="mimo-unet", overrides={"num_res": 1, "base_channels": 8}, crop=32, batch_sizes="8",
             warmup=2, steps=3, size=(48, 64), scenes=1, frames=4, threads=1)
FULL = dict(models="mimo-unet", overrides={}, crop=64, batch_sizes="4", warmup=3, steps=8, size=(96, 128),
            scenes=2, frames=4, threads=None)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, tiny crops, few steps (the test suite)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--models", help="comma-separated model names (default mimo-unet)")
    ap.add_argument("--crop", type=int, help="square crop size (multiple of 4)")
    ap.add_argument("--batch-sizes", help="comma-separated, 'max' = largest fp32 batch that fits (CUDA)")
    ap.add_argument("--steps", type=int, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, help="untimed steps per variant (compilation, cuDNN autotune)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="subset of " + ",".join(VARIANTS))
    ap.add_argument("--workers", type=int, default=max(1, min(4, (os.cpu_count() or 2) // 2)),
                    help="data workers of both loaders")
    ap.add_argument("--threads", type=int, help="torch threads (default: all cores; 1 with --quick)")
    ap.add_argument("--peak-tflops", type=float, help="peak the MFU is measured against")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/<host-or-gpu>-train_throughput.json)")
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for key in ("models", "crop", "batch_sizes", "steps", "warmup", "threads"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if cfg["crop"] % 4:
        ap.error(f"--crop {cfg['crop']}: expected a multiple of 4")
    args.cfg = cfg
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        ap.error(f"--variants: unknown {sorted(unknown)}, expected some of {VARIANTS}")
    return args


# ----------------------------------------------------------------------------- data


def make_data(work: Path, cfg: dict, workers: int) -> tuple[list, Path]:
    """The same synthetic pairs as a PNG folder tree (baseline) and packed raw shards (trainer)."""
    from harness.data import pack, sources
    from harness.data.synth import synthesize

    size = cfg["size"] if cfg["size"][0] >= cfg["crop"] else (cfg["crop"] * 3 // 2, cfg["crop"] * 2)
    synthesize(work / "src", scenes=cfg["scenes"], frames=cfg["frames"], size=size, seed=0, split="train")
    pairs, unmatched = sources.list_gopro(work / "src", "train")
    pack.pack(pairs, unmatched, work / "shards", source={"dataset": "gopro", "root": str(work / "src")},
              split="train", options=pack.PackOptions(encoding="raw", samples_per_shard=2, workers=workers))
    return [(p.blur, p.sharp) for p in pairs], work / "shards"


# ----------------------------------------------------------------------------- (a) baseline


def run_baseline(model_name: str, overrides: dict, pairs: list, crop: int, batch: int, steps: int,
                 warmup: int, workers: int, device: str) -> tuple[float, float]:
    """Reference-style fp32 loop; returns (seconds per step, peak MiB)."""
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    model = create_model(model_name, **overrides).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, foreach=False)
    loader = DataLoader(FolderPairs(pairs, crop, length=batch), batch_size=batch, shuffle=True, num_workers=workers,
                        drop_last=True, persistent_workers=workers > 0)
    batches = endless(loader)

    def step() -> None:
        b = next(batches)
        outputs = model(b["blur"].to(device))
        loss, _ = mimo_loss(outputs, b["sharp"].to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()  # the reference logs the loss every step (a host sync)

    return _timed(step, steps, warmup, device)


def _timed(step, steps: int, warmup: int, device: str) -> tuple[float, float]:
    for _ in range(warmup):
        step()
    with PeakMemory(device) as mem:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        dt = (time.perf_counter() - t0) / steps
    return dt, mem.peak_mb


# ----------------------------------------------------------------------------- (b)-(f) the trainer


def trainer_recipe(model_name: str, overrides: dict, shards: Path, crop: int, batch: int, workers: int, *,
                   precision: str, channels_last: bool = False, compile: bool = False, impl: str = "foreach",
                   lr: float = 1e-4, seed: int = 0, threads: int | None = None):
    """A recipe for harness.train with these switches (no validation, checkpoints or tracking)."""
    from harness.recipe import recipe_from_dict

    return recipe_from_dict({
        "name": "bench",
        "model": {"name": model_name, "overrides": overrides},
        "data": {"train": str(shards), "crop": crop, "crops_per_image": 1, "workers": workers},
        "optim": {"name": "adam", "lr": lr, "impl": impl},
        "train": {"global_batch": batch, "steps": 10**9, "precision": precision, "channels_last": channels_last,
                  "compile": compile, "log_every": 10**9, "seed": seed, "threads": threads},
        "eval": {"every": 10**9}, "checkpoint": {"every": 10**9}, "tracking": {"enabled": False},
    }, source="<benchmark recipe>")


def run_trainer(recipe, run_dir: Path, steps: int, warmup: int, device: str) -> tuple[float, float, float]:
    """harness.train's own engine setup and step; returns (seconds per step, peak MiB, data-wait share)."""
    from harness.train import Run

    job = Run(recipe, run_dir, "never", None)
    job.build()
    batches = iter(job.loader)
    job.engine.train()
    waits: list[float] = []

    def step() -> None:
        waits.append(job.one_step(batches)[2])

    try:
        dt, peak = _timed(step, steps, warmup, device)
    finally:
        job.loader.close()
        job.engine = job.ema = None  # free the engine's buffers before the next variant
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return dt, peak, sum(waits[warmup:]) / (dt * steps)


def largest_batch(model_name: str, overrides: dict, crop: int, device: str) -> int:
    """Largest power-of-two fp32 batch whose forward+backward fits (CUDA only)."""
    model = create_model(model_name, **overrides).to(device)
    best, b = 16, 32
    while b <= 1024:
        try:
            x = torch.rand(b, 3, crop, crop, device=device)
            loss, _ = mimo_loss(model(x), x)
            loss.backward()
            best, b = b, b * 2
        except torch.OutOfMemoryError:
            break
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    return best


# ----------------------------------------------------------------------------- the run


def plus_recipe_images() -> tuple[str, int, int]:
    """(model, crop, images) of the full `recipes/plus.yaml` run, which the projected wall time divides."""
    from harness.recipe import load_recipe, total_steps

    recipe = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "plus.yaml")
    return recipe.model.name, recipe.data.crop, total_steps(recipe) * recipe.train.global_batch


def projected_hours(rows: list[dict], model_name: str, crop: int, overrides: dict) -> list[dict]:
    """Wall time of the whole plus.yaml run at each measured images/s, for the recipe's own model and crop."""
    recipe_model, recipe_crop, images = plus_recipe_images()
    if (model_name, crop, overrides) != (recipe_model, recipe_crop, {}):
        return []
    return [row(r["variant"], "plus_recipe_hours", images / r["value"] / 3600)
            for r in rows if r["metric"] == "images_per_s" and r["value"]]


def bench_config(args, model_name: str, batch: int, pairs, shards: Path, work: Path,
                 peak: dict[str, float]) -> tuple[list[dict], dict, float]:
    """All variants for one model and batch size: rows, speedups, and the best trainer images/s."""
    cfg, device = args.cfg, args.device
    crop, steps, warmup = cfg["crop"], cfg["steps"], cfg["warmup"]
    flops_img = 3 * count_flops(create_model(model_name, **cfg["overrides"]), crop, crop)
    prefix = f"{model_name}@{crop}/b{batch}/"
    rows, best = [], 0.0
    for variant in args.variants.split(","):
        print(f"[train_throughput] {prefix}{variant} ...", flush=True)
        wait, precision = None, "fp32"
        if variant == "a-baseline":
            dt, mem = run_baseline(model_name, cfg["overrides"], pairs, crop, batch, steps, warmup,
                                   args.workers, device)
        else:
            switches = dict(zip(("precision", "channels_last", "compile", "impl"), TRAINER_VARIANTS[variant]))
            precision = switches["precision"]
            recipe = trainer_recipe(model_name, cfg["overrides"], shards, crop, batch, args.workers,
                                    threads=cfg["threads"], **switches)
            dt, mem, wait = run_trainer(recipe, work / f"run-{variant}", steps, warmup, device)
        ips = batch / dt
        if variant != "a-baseline":
            best = max(best, ips)
        rows += [row(prefix + variant, "images_per_s", ips), row(prefix + variant, "step_ms", dt * 1e3),
                 row(prefix + variant, "peak_mem_mb", mem), row(prefix + variant, "mfu", ips * flops_img / (peak[precision] * 1e12))]
        if wait is not None:
            rows.append(row(prefix + variant, "data_wait", wait))
    rows += projected_hours(rows, model_name, crop, cfg["overrides"])
    return rows, speedups(rows, "images_per_s", prefix + "a-baseline"), best


def loader_headroom(shards: Path, crop: int, batch: int, workers: int, consumed: float, steps: int) -> list[dict]:
    """The shard loader alone at the trainer's settings vs what the fastest trainer variant consumes."""
    from harness.data.stream import train_loader

    stream = train_loader(shards, crop=crop, crops_per_image=1, batch_size=batch, seed=0, workers=workers)
    try:
        crops = measure(stream, 2, max(steps, 4) * 2, batch)
    finally:
        stream.close()
    return [row(f"loader/b{batch}", "crops_per_s", crops), row(f"loader/b{batch}", "trainer_images_per_s", consumed),
            row(f"loader/b{batch}", "headroom", crops / consumed if consumed else None)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg, device = args.cfg, args.device
    # World size 1 in this process: the trainer's distributed.init() finds a loopback group.
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    torch.set_num_threads(cfg["threads"] or os.cpu_count() or 1)  # the baseline; the trainer sets its own
    peak, peak_src = peak_tflops(device, args.peak_tflops, n=256 if args.quick else 2048)
    rows, speedup = [], {}
    with tempfile.TemporaryDirectory(prefix="mimo-bench-train-") as tmp:
        work = Path(tmp)
        pairs, shards = make_data(work, cfg, args.workers)
        batch_sizes = []
        for name in cfg["models"].split(","):
            for b in str(cfg["batch_sizes"]).split(","):
                if b == "max":
                    if not device.startswith("cuda"):
                        continue  # "largest that fits" means GPU memory
                    b = largest_batch(name, cfg["overrides"], cfg["crop"], device)
                batch_sizes.append(int(b))
                r, s, best = bench_config(args, name, int(b), pairs, shards, work, peak)
                rows += r
                speedup.update(s)
                rows += loader_headroom(shards, cfg["crop"], int(b), args.workers, best, cfg["steps"])
    config = {**{k: v for k, v in cfg.items() if k != "size"}, "batch_sizes": batch_sizes, "device": device,
              "quick": args.quick, "workers": args.workers, "variants": {"a-baseline": "reference-style fp32 loop",
              **{k: dict(zip(("precision", "channels_last", "compile", "impl"), v))
                 for k, v in TRAINER_VARIANTS.items()}},
              "peak_tflops": peak, "peak_source": peak_src, "flops": "3 x forward (harness.models.count_flops)",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "baseline": "a-baseline"}
    write_report("train_throughput", device=device, config=config, rows=rows, speedup=speedup, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
