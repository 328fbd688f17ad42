"""`mimo deblur`, `mimo eval` (and `mimo export`): run and score trained models.

torch and the model code are imported inside the handlers so `mimo --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness.errors import HarnessError

TRACKING_SCHEMES = ("models:/", "runs:/")


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_deblur(subparsers)
    _register_eval(subparsers)
    # `mimo export` (training area) registers here: _register_export(subparsers).


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help="architecture (mimo-unet, mimo-unet-plus); needed for bare public "
        "checkpoints, optional when the weights file records it",
    )
    p.add_argument("--weights", required=True, help="weights file, or an MLflow models:/ or runs:/ URI")
    p.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda or cuda:N")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="fp32 (default: the paper's protocol), or bf16/fp16 autocast")
    p.add_argument("--tile", type=int, help="run in tiles of N px (large images), blended over --overlap")
    p.add_argument("--overlap", type=int, default=32, help="tile overlap in px (default 32)")
    p.add_argument(
        "--ensemble",
        nargs="?",
        const="rot4",
        default=None,
        choices=["rot4", "d8"],
        help="self-ensemble: rot4 (the default when given alone; MIMO-UNet+ -> MIMO-UNet++ as published: "
        "the input rotated by 0/90/180/270 degrees, averaged, 2 batched forwards) or d8 (8 flips x "
        "rotations, 8 forwards)",
    )


def _register_deblur(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "deblur",
        help="deblur an image or a directory of images",
        description="Deblur INPUT (an image, or a directory: every image below it) into OUTPUT "
        "(a .png file, or a directory mirroring INPUT's relative names). Writes 8-bit PNG atomically.",
    )
    _add_model_options(p)
    p.add_argument("input", metavar="INPUT")
    p.add_argument("output", metavar="OUTPUT")
    p.set_defaults(func=run_deblur)


def _register_eval(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="PSNR/SSIM of a model on blur/sharp pairs",
        description="Deblur full frames and report mean PSNR/SSIM (RGB, data range 1, no border crop) "
        "of the restored and of the blurred frames against the sharp ones, overall and per scene.",
    )
    _add_model_options(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--data", help="GoPro-layout tree (<scene>/blur + <scene>/sharp) or a blur/ + sharp/ pair"
    )
    src.add_argument("--shards", help="directory of packed shards (manifest.json)")
    p.add_argument("--blur-dir", default="blur", help="blur folder name with --data (e.g. blur_gamma)")
    p.add_argument("--max-images", type=int, help="evaluate only the first N pairs")
    p.add_argument("--batch", type=int, default=1, help="equal-size frames per forward (default 1)")
    p.add_argument("--json", help="write the summary and per-scene means as JSON")
    p.add_argument("--csv", help="write one row per image as CSV")
    p.set_defaults(func=run_eval)


# ---------------------------------------------------------------- shared


def load_model(args: argparse.Namespace):
    """The model named by --weights/--model on the --device, in eval mode."""
    from harness.infer import resolve_device
    from harness.models import model_from_checkpoint

    device = resolve_device(args.device, "--device")
    weights = args.weights
    if weights.startswith(TRACKING_SCHEMES):
        try:  # only MLflow URIs need the tracking stack
            from harness.tracking import fetch_weights
        except ImportError as exc:
            raise HarnessError(f"--weights {weights}: MLflow URIs need harness.tracking ({exc})") from None
        weights = fetch_weights(weights)
    return model_from_checkpoint(Path(weights), args.model).to(device).eval()


def _deblur_options(args: argparse.Namespace) -> dict:
    return {
        "tile": args.tile,
        "overlap": args.overlap,
        "ensemble": args.ensemble,
        "precision": args.precision,
    }


# ---------------------------------------------------------------- deblur


def plan_outputs(inp: Path, out: Path) -> list[tuple[Path, Path]]:
    """(source, destination) pairs; every destination is a .png, none collides with an input."""
    from harness.infer import list_images

    if not inp.exists():
        raise HarnessError(f"{inp}: no such file or directory")
    if inp.is_dir():
        if out.exists() and not out.is_dir():
            raise HarnessError(f"{out}: INPUT is a directory, so OUTPUT must be a directory")
        if out.resolve() == inp.resolve():
            raise HarnessError(f"{out}: OUTPUT must differ from INPUT (it would overwrite the inputs)")
        sources = list_images(inp, recursive=True)
        if not sources:
            raise HarnessError(f"{inp}: no images found (looked for png, jpg, bmp, tif, webp, ppm)")
        jobs = [(src, out / src.relative_to(inp).with_suffix(".png")) for src in sources]
        _check_collisions(jobs)
        return jobs
    dst = out / (inp.stem + ".png") if out.is_dir() else out
    if dst.suffix.lower() != ".png":
        raise HarnessError(f"{out}: OUTPUT must be a .png file name or an existing directory")
    if dst.resolve() == inp.resolve():
        raise HarnessError(f"{out}: OUTPUT must differ from INPUT")
    return [(inp, dst)]


def _check_collisions(jobs: list[tuple[Path, Path]]) -> None:
    seen: dict[Path, Path] = {}
    for src, dst in jobs:
        if dst in seen:
            raise HarnessError(f"{src}: would overwrite the output of {seen[dst]} ({dst})")
        seen[dst] = src


def run_deblur(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from harness.files import read_image, write_image
    from harness.infer import deblur

    jobs = plan_outputs(Path(args.input), Path(args.output))
    first = read_image(jobs[0][0])  # fail on a bad input before the (slow) model load
    model = load_model(args)
    options = _deblur_options(args)
    for i, (src, dst) in enumerate(tqdm(jobs, desc="deblur", unit="img", disable=len(jobs) == 1 or None)):
        x = first if i == 0 else read_image(src)
        write_image(deblur(model, x[None], **options)[0], dst)
    print(f"deblurred {len(jobs)} image(s) -> {args.output}")
    return 0


# ---------------------------------------------------------------- eval


def run_eval(args: argparse.Namespace) -> int:
    from harness.infer import evaluate, folder_pairs

    if args.max_images is not None and args.max_images < 1:
        raise HarnessError(f"--max-images: expected a positive number, got {args.max_images}")
    if args.data:
        pairs = folder_pairs(args.data, blur_dir=args.blur_dir)[: args.max_images]
    else:
        from harness.data.stream import eval_loader

        pairs = eval_loader(args.shards, rank=0, world_size=1, max_images=args.max_images)
    model = load_model(args)
    result = evaluate(model, pairs, progress=sys.stderr.isatty(), batch=args.batch, **_deblur_options(args))
    print(result.format())
    if args.json:
        _write_json(result.to_dict(), Path(args.json))
    if args.csv:
        result.write_csv(args.csv)
    return 0


def _write_json(data: dict, path: Path) -> None:
    from harness.files import atomic_write

    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
