"""`mimo synth`: write a synthetic GoPro-style blur/sharp tree (harness.data.synth)."""

from __future__ import annotations

import argparse
import re

from harness.errors import HarnessError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "synth",
        help="write a synthetic GoPro-style dataset",
        description="Write <out>/<split>/<scene>/{blur,sharp}/NNNNNN.png: a textured scene moving across "
        "K sub-frames; blur = their mean, sharp = the middle one. Deterministic by --seed.",
    )
    p.add_argument("--out", required=True, help="output root (the split directory is created inside)")
    p.add_argument("--scenes", type=int, required=True, help="number of scenes")
    p.add_argument("--frames", type=int, required=True, help="blur/sharp pairs per scene")
    p.add_argument("--size", default="128x128", help="frame size HxW (default 128x128)")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument(
        "--split", default="train", help="split directory name, e.g. train or test (default train)"
    )
    p.add_argument(
        "--preset",
        default="easy",
        choices=["easy", "gopro"],
        help="easy: horizontal 4-8 px; gopro: random direction 3-12 px, slight rotation and shake",
    )
    p.add_argument("--displacement", help="blur length range in px, A-B (overrides the preset)")
    p.add_argument("--direction", choices=["horizontal", "random"], help="overrides the preset")
    p.add_argument("--rotation", type=float, help="max rotation in degrees during an exposure")
    p.add_argument("--shake", type=float, help="hand-shake jitter std in px per sub-frame")
    p.add_argument("--subframes", type=int, help="sub-frames averaged per blurred frame (odd)")
    p.add_argument("--gamma", type=float, help="average in x**gamma space (2.2 ~ GoPro blur_gamma)")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    p.set_defaults(func=run)


def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise HarnessError(f"--size: expected HxW such as 128x128, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def parse_range(text: str | None, option: str) -> tuple[float, float] | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*(?:-\s*(\d+(?:\.\d*)?))?\s*", text)
    if not m:
        raise HarnessError(f"{option}: expected A-B in px such as 4-8, got {text!r}")
    lo = float(m.group(1))
    return lo, float(m.group(2)) if m.group(2) else lo


def run(args: argparse.Namespace) -> int:
    from harness.data.synth import synthesize

    root = synthesize(
        args.out,
        scenes=args.scenes,
        frames=args.frames,
        size=parse_size(args.size),
        seed=args.seed,
        split=args.split,
        preset=args.preset,
        subframes=args.subframes,
        displacement=parse_range(args.displacement, "--displacement"),
        direction=args.direction,
        rotation=args.rotation,
        shake=args.shake,
        gamma=args.gamma,
        progress=args.progress,
    )
    print(f"wrote {args.scenes * args.frames} blur/sharp pairs in {args.scenes} scene(s) under {root}")
    return 0
