"""Find blur/sharp pairs in the layouts users have on disk (design.md §4) and check them.

Everything here runs before a single shard is written, so bad input fails fast with one line
naming the file(s).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from harness.data.shards import make_key
from harness.errors import HarnessError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class PairSource:
    """One blur/sharp pair on disk; `*_rel` are paths relative to the dataset root."""

    key: str
    scene: str
    frame: str
    blur: Path
    sharp: Path
    blur_rel: str
    sharp_rel: str


@dataclass(frozen=True)
class PairInfo:
    """What inspecting a pair found: its size and whether either image needs --convert."""

    height: int
    width: int
    blur_convert: bool
    sharp_convert: bool
    blur_bytes: int
    sharp_bytes: int


def _need_dir(path: Path, what: str, hint: str = "") -> Path:
    if not path.is_dir():
        raise HarnessError(f"{path}: {what} directory not found{hint}")
    return path


def _images(directory: Path) -> dict[str, Path]:
    """Relative path (posix) -> file, for every image under `directory`."""
    out = {}
    for dirpath, _, files in os.walk(directory):
        for f in files:
            if f.lower().endswith(IMAGE_SUFFIXES):
                p = Path(dirpath) / f
                out[p.relative_to(directory).as_posix()] = p
    return out


def _twins(blur_dir: Path, sharp_dir: Path, scene: str, root: Path, skipped: list[dict]) -> list[PairSource]:
    """Pairs matched by relative path; unmatched frames go to `skipped` (caller decides to fail)."""
    blur, sharp = _images(blur_dir), _images(sharp_dir)
    for rel in sorted(set(blur) ^ set(sharp)):
        where, other = (blur_dir, "sharp") if rel in blur else (sharp_dir, "blur")
        skipped.append({"file": str(where / rel), "reason": f"no {other} twin"})
    pairs = []
    for rel in sorted(set(blur) & set(sharp)):
        frame = rel.rsplit(".", 1)[0]
        pairs.append(PairSource(
            key=make_key(scene, frame), scene=scene, frame=frame, blur=blur[rel], sharp=sharp[rel],
            blur_rel=blur[rel].relative_to(root).as_posix(), sharp_rel=sharp[rel].relative_to(root).as_posix(),
        ))
    return pairs


def list_gopro(root: Path, split: str, blur_dir: str = "blur") -> tuple[list[PairSource], list[dict]]:
    """GOPRO_Large: `<root>/<split>/<scene>/{blur|blur_gamma,sharp}/NNNNNN.png`."""
    split_dir = _need_dir(_need_dir(Path(root), "dataset root") / split, f"split '{split}'")
    scenes = sorted(p for p in split_dir.iterdir() if p.is_dir())
    if not scenes:
        raise HarnessError(f"{split_dir}: no scene directories")
    pairs, unmatched = [], []
    for scene in scenes:
        b = _need_dir(scene / blur_dir, f"'{blur_dir}'", _other_blur_dirs(scene, blur_dir))
        s = _need_dir(scene / "sharp", "'sharp'")
        pairs += _twins(b, s, scene.name, Path(root), unmatched)
    return pairs, unmatched


def _other_blur_dirs(scene: Path, blur_dir: str) -> str:
    """`mimo pack gopro` hint when the scene has another blur folder (GoPro ships blur_gamma too)."""
    others = sorted(p.name for p in scene.iterdir() if p.is_dir() and p.name.startswith("blur") and p.name != blur_dir)
    return f"; the scene has {', '.join(others)}/: pass --blur-dir {others[0]}" if others else ""


def list_reds(root: Path, split: str) -> tuple[list[PairSource], list[dict]]:
    """REDS: `<root>/<split>/<split>_blur/<clip>/<frame>.png` and `<split>_sharp`."""
    split_dir = _need_dir(_need_dir(Path(root), "dataset root") / split, f"split '{split}'")
    b = _need_dir(split_dir / f"{split}_blur", f"'{split}_blur'")
    s = _need_dir(split_dir / f"{split}_sharp", f"'{split}_sharp'")
    unmatched: list[dict] = []
    pairs = _twins(b, s, "", Path(root), unmatched)
    # In REDS the clip is the first path component: key `<clip>_<frame>`.
    pairs = [PairSource(make_key(*p.frame.split("/", 1)), p.frame.split("/")[0], p.frame.split("/")[-1],
                        p.blur, p.sharp, p.blur_rel, p.sharp_rel) for p in pairs]
    return pairs, unmatched


def list_folders(blur: Path, sharp: Path) -> tuple[list[PairSource], list[dict]]:
    """Two trees with pairs matched by relative path; the scene is the parent folder (or '')."""
    b = _need_dir(Path(blur), "blur")
    s = _need_dir(Path(sharp), "sharp")
    unmatched: list[dict] = []
    root = Path(os.path.commonpath([b.resolve(), s.resolve()]))
    pairs = _twins(b.resolve(), s.resolve(), "", root, unmatched)
    out = []
    for p in pairs:
        scene, _, frame = p.frame.rpartition("/")
        out.append(PairSource(make_key(scene, frame), scene, frame, p.blur, p.sharp, p.blur_rel, p.sharp_rel))
    return out, unmatched


def check_unique_keys(pairs: list[PairSource]) -> None:
    seen: dict[str, PairSource] = {}
    for p in pairs:
        if p.key in seen:
            raise HarnessError(f"{p.blur} and {seen[p.key].blur} map to the same sample key '{p.key}'")
        seen[p.key] = p


# ---------------------------------------------------------------- per-image checks


def _image_header(path: Path, deep: bool) -> tuple[int, int, bool]:
    """(height, width, needs_convert) from the header; `deep` also checks every chunk's CRC.

    ValueError names the file when it is not a readable image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            mode, size = img.mode, img.size
            rawmode = str(img.tile[0][3]) if img.tile else ""
            if deep:
                img.verify()  # reads the whole file: catches truncated/corrupt files without decoding
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable image ({exc.__class__.__name__})") from None
    # Pillow silently keeps only the high byte of 16-bit RGB PNGs; the tile's rawmode gives it away.
    sixteen = ";16" in rawmode or mode.startswith("I")
    return size[1], size[0], mode != "RGB" or sixteen


def inspect_pair(pair: PairSource, convert: bool, deep: bool = True) -> PairInfo:
    """Check one pair (modes, sizes, and with `deep` file integrity); ValueError names the file."""
    bh, bw, bconv = _image_header(pair.blur, deep)
    sh, sw, sconv = _image_header(pair.sharp, deep)
    for path, needs in ((pair.blur, bconv), (pair.sharp, sconv)):
        if needs and not convert:
            raise ValueError(f"{path}: expected an 8-bit RGB image, got {_describe(path)} "
                             "(pass --convert to convert it)")
    if (bh, bw) != (sh, sw):
        raise ValueError(f"{pair.blur} is {bh}x{bw} but {pair.sharp} is {sh}x{sw}")
    return PairInfo(bh, bw, bconv, sconv, pair.blur.stat().st_size, pair.sharp.stat().st_size)


def _describe(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as img:
        deep = ";16" in str(img.tile[0][3]) if img.tile else False
        return f"mode {img.mode}{' 16-bit' if deep and img.mode == 'RGB' else ''}"
