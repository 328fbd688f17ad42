"""`mimo export`: a run's checkpoint, or an exported weights file, as .pkl, safetensors, ONNX or .pt2.

harness.export (and torch) are imported inside the handler so `mimo --help` stays fast.
"""

from __future__ import annotations

import argparse

from harness.errors import HarnessError
from harness.export import FORMATS  # light: torch is imported when an export runs


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a run's (or a weights file's) model as .pkl, safetensors, ONNX or torch.export",
        description="Consolidate a run's DeepSpeed checkpoint (fp32 master weights, or the EMA), or "
        "convert an exported weights file, into: pkl (the public {'model': ...} checkpoint that "
        "`mimo deblur`, `mimo eval` and the original code load), safetensors (DIR/model.safetensors + "
        "DIR/config.json, or NAME.safetensors + NAME.config.json), onnx, or torch-export (.pt2). "
        "The ONNX and .pt2 graphs take NCHW RGB float32 in [0, 1] with H and W multiples of 4 "
        "(at least 8; pad bottom/right with reflect padding, crop the output back) and return the "
        "full-scale restored image clamped to [0, 1].",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="training run directory")
    src.add_argument("--weights", help="instead of RUN_DIR: a weights file (.pkl/.pth/.safetensors) or "
                     "a safetensors export directory to convert")
    p.add_argument("--out", required=True,
                   help="file or directory to write (weights.pkl, DIR/, NAME.safetensors, model.onnx, model.pt2)")
    p.add_argument("--format", choices=FORMATS,
                   help="default from --out: .safetensors or a directory -> safetensors, .onnx -> onnx, "
                   ".pt2 -> torch-export, else pkl")
    p.add_argument("--ema", action="store_true", help="RUN_DIR: export the EMA weights (train.ema_decay runs)")
    p.add_argument("--tag", help="RUN_DIR: latest (default), best, or a checkpoint tag")
    p.add_argument("--model", help="--weights: architecture (mimo-unet, mimo-unet-plus) for bare public "
                   "checkpoints that do not record it")
    p.add_argument("--opset", type=int, help="onnx: opset version (default: torch's, 18)")
    p.add_argument("--verify", action="store_true",
                   help="onnx: run the graph in onnxruntime and compare it with PyTorch (needs onnxruntime)")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from harness.export import export

    if args.weights and (args.ema or args.tag):
        raise HarnessError("--ema/--tag select a run's checkpoint; they do not apply to --weights")
    if args.run_dir and args.model:
        raise HarnessError("--model applies to --weights only (a run records its architecture)")
    result = export(args.out, args.format, run_dir=args.run_dir, weights=args.weights, model_name=args.model,
                    ema=args.ema, tag=args.tag or "latest", opset=args.opset, verify=args.verify)
    for path in result.files:
        print(path)
    if result.max_abs_diff is not None:
        print(f"verified in onnxruntime: max abs difference to PyTorch {result.max_abs_diff:.2e}")
    return 0
