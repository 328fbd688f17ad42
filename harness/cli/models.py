"""`mimo deblur` and `mimo eval`: run and score trained models (exports: harness/cli/export.py).

torch and the model code are imported inside the handlers so `mimo --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness.errors import HarnessError
from harness.precision import PRECISIONS

TRACKING_SCHEMES = ("models:/", "runs:/")


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_deblur(subparsers)
    _register_eval(subparsers)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help="architecture (mimo-unet, mimo-unet-plus); needed for bare public "
        "checkpoints, optional when the weights file records it",
    )
    p.add_argument("--weights", required=True,
                   help="weights file (.pkl/.pth/.safetensors or an exported directory), or an MLflow "
                   "models:/NAME@alias, models:/NAME/VERSION or runs:/RUN_ID/path URI")
    p.add_argument("--tracking-uri",
                   help="where models:/ and runs:/ URIs are looked up (default: $MLFLOW_TRACKING_URI, "
                   "else MLflow's default sqlite:///mlflow.db)")
    p.add_argument("--device", default="auto",
                   help="where the model runs: auto (the default: cuda when there is one, else cpu), "
                   "cpu, cuda or cuda:N")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                   help="fp32 (the default: full precision, the paper's protocol), or bf16/fp16 "
                   "autocast (faster on GPUs; outputs differ slightly)")
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
        "(a .png file, or a directory mirroring INPUT's relative names). Any image mode is read (the "
        "model sees RGB); the PNG is written atomically in the input's mode: RGB, grey (L), RGBA/LA "
        "with the input's alpha, 16-bit grey as 16-bit; palette and other modes as RGB. In a "
        "directory, an unreadable file is reported by name and the others are still written; the "
        "exit status is then 1.",
    )
    _add_model_options(p)
    p.add_argument("input", metavar="INPUT")
    p.add_argument("output", metavar="OUTPUT")
    p.set_defaults(func=run_deblur)


def _register_eval(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="PSNR/SSIM of a model on blur/sharp pairs",
        description="Deblur full frames and report mean PSNR/SSIM of the restored and of the blurred "
        "frames against the sharp ones, overall and per scene, under --protocol (default: RGB, data "
        "range 1, no border crop, as the MIMO-UNet reference). Every output names the protocol.",
    )
    _add_model_options(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--data", help="GoPro-layout tree (<scene>/blur + <scene>/sharp), a blur/ + sharp/ pair, "
        "a HIDE_dataset folder or a RealBlur root (see --layout)"
    )
    src.add_argument("--shards", help="directory of packed shards (manifest.json)")
    p.add_argument("--layout", default="auto", choices=["auto", "folders", "hide", "realblur-j", "realblur-r"],
                   help="the --data tree: auto (default: told apart by its layout), folders (GoPro layout "
                   "or blur/ + sharp/), hide, realblur-j or realblur-r")
    p.add_argument("--split", default="test",
                   help="HIDE: test (default), test-close-ups, test-long-shot or train; RealBlur: test or train")
    p.add_argument("--list", help="a RealBlur-format list (gt path, blur path per line) relative to --data")
    p.add_argument("--blur-dir", default="blur", help="blur folder name with --data (e.g. blur_gamma)")
    p.add_argument("--protocol", default="default", choices=["default", "realblur", "basicsr-y"],
                   help="default: float RGB, data range 1, full frame (MIMO-UNet's reference, GoPro/HIDE); "
                   "realblur: RealBlur's official ECC-aligned, masked scores; basicsr-y: BasicSR's 8-bit "
                   "BT.601 Y channel")
    p.add_argument("--crop-border", type=int, default=0, help="basicsr-y: px cut from each edge (default 0)")
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
        weights = fetch_weights(weights, tracking_uri=args.tracking_uri)
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


def _read_input(src: Path):
    """An input image of any mode -> (RGB CHW float tensor for the model, its `Original`)."""
    from harness.files import decode_any, to_float

    arr, original = decode_any(src)
    return to_float(arr), original


def run_deblur(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from harness.files import write_image
    from harness.infer import deblur

    jobs = plan_outputs(Path(args.input), Path(args.output))
    one_file = not Path(args.input).is_dir()
    options = _deblur_options(args)
    model, failed = None, []
    for src, dst in tqdm(jobs, desc="deblur", unit="img", disable=len(jobs) == 1 or None):
        try:
            x, original = _read_input(src)
        except HarnessError as exc:
            if one_file:
                raise  # the one-line error and exit 2, before the (slow) model load
            failed.append(src)  # a directory goes on: one bad file should not cost the others
            tqdm.write(f"mimo deblur: error: {exc}", file=sys.stderr)
            continue
        if model is None:  # after the first decode, so a bad INPUT fails fast
            model = load_model(args)
        write_image(deblur(model, x[None], **options)[0], dst, like=original)
    return _report_deblur(len(jobs), failed, args.output)


def _report_deblur(total: int, failed: list[Path], output: str) -> int:
    """Summary on stdout (the errors, one line per file, are on stderr) -> exit status."""
    if not failed:
        print(f"deblurred {total} image(s) -> {output}")
        return 0
    print(f"deblurred {total - len(failed)} of {total} image(s) -> {output}; {len(failed)} unreadable "
          "(named on stderr), not written")
    return 1


# ---------------------------------------------------------------- eval


def run_eval(args: argparse.Namespace) -> int:
    from harness import protocols
    from harness.infer import dataset_pairs, evaluate

    if args.max_images is not None and args.max_images < 1:
        raise HarnessError(f"--max-images: expected a positive number, got {args.max_images}")
    try:
        protocols.check(args.protocol, args.crop_border)
    except HarnessError:
        raise HarnessError(f"--crop-border {args.crop_border}: expected >= 0, and only with "
                           "--protocol basicsr-y") from None
    if args.data:
        pairs = dataset_pairs(args.data, layout=args.layout, split=args.split, list_file=args.list,
                              blur_dir=args.blur_dir)[: args.max_images]
    else:
        from harness.data.stream import eval_loader

        pairs = eval_loader(args.shards, rank=0, world_size=1, max_images=args.max_images)
    model = load_model(args)
    result = evaluate(model, pairs, progress=sys.stderr.isatty(), batch=args.batch, protocol=args.protocol,
                      crop_border=args.crop_border, **_deblur_options(args))
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
