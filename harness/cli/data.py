"""`mimo pack {gopro,reds,folders,hide,realblur-j,realblur-r}` and `mimo shards {verify,info,merge-manifest}`."""

from __future__ import annotations

import argparse
import json
import sys

from harness.errors import HarnessError


def register(subparsers: argparse._SubParsersAction) -> None:
    pack = subparsers.add_parser("pack", help="pack blur/sharp pairs into verified WebDataset tar shards",
                                 description="Pack a dataset into <out>/<split>-NNNNNN.tar + manifest.json. "
                                 "Atomic and resumable: re-running skips complete shards.")
    kinds = pack.add_subparsers(dest="source", metavar="SOURCE", required=True)
    gopro = kinds.add_parser("gopro", help="GOPRO_Large: <root>/<split>/<scene>/{blur,sharp}/*.png")
    gopro.add_argument("--root", required=True)
    gopro.add_argument("--split", required=True, help="train or test")
    gopro.add_argument("--blur-dir", default="blur", choices=["blur", "blur_gamma"])
    reds = kinds.add_parser("reds", help="REDS: <root>/<split>/<split>_{blur,sharp}/<clip>/*.png")
    reds.add_argument("--root", required=True)
    reds.add_argument("--split", required=True, help="train or val")
    folders = kinds.add_parser("folders", help="two trees of images paired by relative path")
    folders.add_argument("--blur", required=True)
    folders.add_argument("--sharp", required=True)
    folders.add_argument("--split", default="data", help="shard name prefix (default data)")
    hide = kinds.add_parser("hide", help="HIDE_dataset: {train,test/test-close-ups,test/test-long-shot}/*.png + GT/")
    hide.add_argument("--root", required=True, help="the HIDE_dataset folder (holding GT/, train/, test/)")
    hide.add_argument("--split", required=True, help="train, test (2,025 pairs), test-close-ups or test-long-shot")
    realblur = []
    for variant in ("realblur-j", "realblur-r"):
        rb = kinds.add_parser(variant, help=f"RealBlur-{variant[-1].upper()}: the pairs of its "
                              f"RealBlur_{variant[-1].upper()}_<split>_list.txt (gt path first, blur second)")
        rb.add_argument("--root", required=True, help="the folder holding the RealBlur trees and list files")
        rb.add_argument("--split", required=True, help="train or test")
        rb.add_argument("--list", help="another list file in the same format (paths relative to --root)")
        realblur.append(rb)
    for p in (gopro, reds, folders, hide, *realblur):
        _pack_options(p)
        p.set_defaults(func=run_pack)

    shards = subparsers.add_parser("shards", help="verify, describe or merge packed shards")
    cmds = shards.add_subparsers(dest="action", metavar="ACTION", required=True)
    verify = cmds.add_parser("verify", help="re-hash every shard and decode every sample")
    verify.add_argument("dir")
    verify.add_argument("--progress", action="store_true")
    verify.set_defaults(func=run_verify)
    info = cmds.add_parser("info", help="counts, sizes and encoding")
    info.add_argument("dir")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=run_info)
    merge = cmds.add_parser("merge-manifest", help="join the manifests of `pack --part i/N` jobs")
    merge.add_argument("dir")
    merge.set_defaults(func=run_merge)


def _pack_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory for the shards")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--shard-size", default="1GB", help="target bytes per shard (default 1GB)")
    size.add_argument("--samples-per-shard", type=int, help="samples per shard instead of a byte target")
    p.add_argument("--encoding", default="raw", choices=["png", "raw"],
                   help="raw (default): uint8 arrays, ~15x faster to stream, ~2x the bytes; "
                   "png: the original file bytes (archival)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    p.add_argument("--limit", type=int, help="pack only the first N pairs (quick subsets)")
    p.add_argument("--convert", action="store_true",
                   help="kept for compatibility: RGBA, grayscale, palette and 16-bit images are now always "
                   "converted to 8-bit RGB (alpha dropped, grey replicated, 16-bit scaled) and listed in the "
                   "manifest's 'converted'")
    p.add_argument("--on-error", default="raise", choices=["raise", "skip"],
                   help="skip: leave bad pairs out and record them in the manifest")
    p.add_argument("--part", default="0/1", help="i/N: pack slice i of N (Slurm arrays); then merge-manifest")
    p.add_argument("--no-progress", action="store_true")


def run_pack(args: argparse.Namespace) -> int:
    from harness.data import pack

    pairs, unmatched, source = _list_source(args)
    if args.limit is not None and args.limit < 1:
        raise HarnessError(f"--limit {args.limit}: expected >= 1")
    if args.samples_per_shard is not None and args.samples_per_shard < 1:
        raise HarnessError(f"--samples-per-shard {args.samples_per_shard}: expected >= 1")
    options = pack.PackOptions(
        encoding=args.encoding, shard_bytes=pack.parse_size(args.shard_size),
        samples_per_shard=args.samples_per_shard, workers=max(1, args.workers), limit=args.limit,
        convert=True, on_error=args.on_error, part=pack.parse_part(args.part),
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    m = pack.pack(pairs, unmatched, args.out, source=source, split=args.split, options=options)
    index, count = options.part
    where = "manifest.json" if count == 1 else pack.part_manifest_name(index, count)
    print(f"{args.out}: {m['total_samples']} samples in {len(m['shards'])} shard(s) ({args.encoding}), "
          f"{len(m['skipped'])} skipped; {where} written")
    return 0


def _list_source(args: argparse.Namespace) -> tuple[list, list[dict], dict]:
    """(pairs, unmatched, the manifest's description of the source) for `mimo pack SOURCE`."""
    from pathlib import Path

    from harness.data import sources

    if args.source == "folders":
        pairs, unmatched = sources.list_folders(Path(args.blur), Path(args.sharp))
        return pairs, unmatched, {"dataset": "folders", "root": str(Path(args.blur).resolve()),
                                  "sharp_root": str(Path(args.sharp).resolve())}
    root = Path(args.root)
    source = {"dataset": args.source, "root": str(root.resolve())}
    if args.source == "gopro":
        return (*sources.list_gopro(root, args.split, args.blur_dir), {**source, "blur_dir": args.blur_dir})
    if args.source == "reds":
        return (*sources.list_reds(root, args.split), source)
    if args.source == "hide":
        return (*sources.list_hide(root, args.split), source)
    listed = Path(args.list) if args.list else sources.realblur_list(root, args.source, args.split)
    return (*sources.list_realblur(root, listed), {**source, "list": str(listed.resolve())})


def run_verify(args: argparse.Namespace) -> int:
    from harness.data import shards

    problems = shards.verify(args.dir, progress=args.progress)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        raise HarnessError(f"{args.dir}: {len(problems)} problem(s); first: {problems[0]}")
    i = shards.info(args.dir)
    print(f"{args.dir}: OK, {i['samples']} samples in {i['shards']} shard(s) verified")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from harness.data import shards

    i = shards.info(args.dir)
    if args.json:
        print(json.dumps(i, indent=1))
        return 0
    sizes = ", ".join(f"{h}x{w}" for h, w in i["image_sizes"]) or "?"
    print(f"{i['directory']}: {i['dataset']} {i['split']}, {i['samples']} samples in {i['shards']} shard(s), "
          f"{i['bytes'] / 1e6:.1f} MB, encoding {i['encoding']}, images {sizes}, {i['skipped']} skipped")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from harness.data import pack

    m = pack.merge_manifests(args.dir)
    print(f"{args.dir}: manifest.json with {m['total_samples']} samples in {len(m['shards'])} shard(s) "
          f"from {m['parts_merged']} part(s)")
    return 0
