"""Find blur/sharp pairs in the layouts users have on disk (docs/design.md §4) and check them.

Layouts: GoPro, REDS, two paired folders, and the test sets the field reports on besides GoPro:
- HIDE (`HIDE_dataset.zip` of the HA_deblur authors; GoPro-trained models are tested on its 2,025
  test pairs): blurred images in `train/` and `test/{test-close-ups,test-long-shot}/`, every
  sharp image in one `GT/` folder under the same file name.
- RealBlur-J / -R (rimchang/RealBlur): `RealBlur_{J,R}_{train,test}_list.txt` beside the
  `RealBlur-J_ECC_IMCORR_centroid_itensity_ref/` (-R: `..._BM3D_ECC_...`) trees, one pair a line,
  gt path first: `<tree>/scene230/gt/gt_1.png <tree>/scene230/blur/blur_1.png`.

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
    blur_mode: str = "RGB"  # what a converted file was: Pillow's mode, ';16' for 16-bit RGB
    sharp_mode: str = "RGB"


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


HIDE_TEST_SUBSETS = ("test-close-ups", "test-long-shot")  # HIDE II (close-ups) and HIDE I (long shots)
HIDE_SPLITS = ("train", "test", *HIDE_TEST_SUBSETS)


def list_hide(root: Path, split: str) -> tuple[list[PairSource], list[dict]]:
    """HIDE_dataset: blurred `<root>/train/*.png` or `<root>/test/<subset>/*.png`, sharp `<root>/GT/`.

    `split` test is both subsets; test-close-ups / test-long-shot one of them. The scene is the
    subset (or `train`), so per-scene means are HIDE's close-up / long-shot split. GT/ holds the
    sharp images of both splits, so GT files without a blurred twin in this split are not errors.
    """
    if split not in HIDE_SPLITS:
        raise HarnessError(f"--split {split}: expected one of {', '.join(HIDE_SPLITS)} for HIDE")
    root = _need_dir(Path(root), "dataset root")
    gt = _need_dir(root / "GT", "HIDE 'GT'", _hide_hint(root))
    if split == "test":
        split_dir = _need_dir(root / "test", "split 'test'")
        subsets = [(s, _need_dir(split_dir / s, f"HIDE '{s}'")) for s in HIDE_TEST_SUBSETS]
    elif split == "train":
        subsets = [("train", _need_dir(root / "train", "split 'train'"))]
    else:
        subsets = [(split, _need_dir(root / "test" / split, f"HIDE '{split}'"))]
    pairs, unmatched = [], []
    for scene, directory in subsets:
        for rel, blur in sorted(_images(directory).items()):
            sharp = gt / Path(rel).name
            if not sharp.is_file():
                unmatched.append({"file": str(blur), "reason": f"no sharp twin (expected {sharp})"})
                continue
            frame = Path(rel).name.rsplit(".", 1)[0]
            pairs.append(PairSource(make_key(scene, frame), scene, frame, blur, sharp,
                                    blur.relative_to(root).as_posix(), sharp.relative_to(root).as_posix()))
    if not pairs and not unmatched:
        raise HarnessError(f"{root / split}: no blurred images (expected HIDE's *.png under it)")
    return pairs, unmatched


def _hide_hint(root: Path) -> str:
    nested = root / "HIDE_dataset"  # the zip unpacks to HIDE_dataset/; some copies nest it twice
    if (nested / "GT").is_dir():
        return f"; {nested} has it: pass that folder"
    return " (expected HIDE_dataset/ with GT/, train/ and test/ in it)"


REALBLUR_VARIANTS = {"realblur-j": "J", "realblur-r": "R"}


def realblur_list(root: Path, variant: str, split: str) -> Path:
    """The list file RealBlur ships for a variant and split: `<root>/RealBlur_J_test_list.txt`."""
    if variant not in REALBLUR_VARIANTS:
        raise HarnessError(f"{variant}: expected one of {', '.join(REALBLUR_VARIANTS)}")
    if split not in ("train", "test"):
        raise HarnessError(f"--split {split}: expected train or test for RealBlur")
    return Path(root) / f"RealBlur_{REALBLUR_VARIANTS[variant]}_{split}_list.txt"


def list_realblur(root: Path, list_file: Path) -> tuple[list[PairSource], list[dict]]:
    """The pairs a RealBlur list names, in its order; paths in the list are relative to `root`.

    Each line is `<tree>/<scene>/gt/gt_N.png <tree>/<scene>/blur/blur_N.png`; the key is
    `<scene>_<N>`. A listed file that is missing means a wrong root: one error, not a skip.
    """
    root = _need_dir(Path(root), "dataset root")
    list_file = Path(list_file)
    if not list_file.is_file():
        raise HarnessError(f"{list_file}: RealBlur list file not found (expected RealBlur_J_test_list.txt "
                           f"or similar beside the RealBlur-J/-R trees, or pass --list)")
    pairs, missing = [], []
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        if line.strip():
            pair = _realblur_line(root, list_file, number, line)
            missing += [(number, p) for p in (pair.sharp, pair.blur) if not p.is_file()]
            pairs.append(pair)
    if missing:
        number, path = missing[0]
        raise HarnessError(f"{path}: listed in {list_file.name} line {number} but missing "
                           f"({len(missing)} listed file(s) missing; is {root} the folder holding the RealBlur trees?)")
    if not pairs:
        raise HarnessError(f"{list_file}: no pairs listed")
    return pairs, []


def _realblur_line(root: Path, list_file: Path, number: int, line: str) -> PairSource:
    fields = line.split()
    where = f"{list_file}:{number}"
    if len(fields) != 2:
        raise HarnessError(f"{where}: expected '<scene>/gt/gt_N.png <scene>/blur/blur_N.png', got {line.strip()!r}")
    sharp_rel, blur_rel = (Path(f) for f in fields)
    if sharp_rel.parent.name != "gt" or blur_rel.parent.name != "blur":
        swapped = " (RealBlur lists give the gt path first)" if blur_rel.parent.name == "gt" else ""
        raise HarnessError(f"{where}: expected '<scene>/gt/<name> <scene>/blur/<name>'{swapped}, got {line.strip()!r}")
    scene = blur_rel.parent.parent.name
    frame = blur_rel.stem.removeprefix("blur_")
    return PairSource(make_key(scene, frame), scene, frame, root / blur_rel, root / sharp_rel,
                      blur_rel.as_posix(), sharp_rel.as_posix())


def check_unique_keys(pairs: list[PairSource]) -> None:
    seen: dict[str, PairSource] = {}
    for p in pairs:
        if p.key in seen:
            raise HarnessError(f"{p.blur} and {seen[p.key].blur} map to the same sample key '{p.key}'")
        seen[p.key] = p


# ---------------------------------------------------------------- per-image checks


def _image_header(path: Path, deep: bool) -> tuple[int, int, str]:
    """(height, width, mode) from the header, mode "RGB" for 8-bit RGB (nothing to convert) and
    e.g. "RGBA", "L", "P", "I;16" or "RGB;16" otherwise; `deep` also checks every chunk's CRC.

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
    sixteen = ";16" in rawmode and mode == "RGB"
    return size[1], size[0], "RGB;16" if sixteen else mode


def inspect_pair(pair: PairSource, convert: bool, deep: bool = True) -> PairInfo:
    """Check one pair (modes, sizes, and with `deep` file integrity); ValueError names the file.

    Without `convert` (the API's strict mode; `mimo pack` always converts) only 8-bit RGB passes.
    """
    bh, bw, bmode = _image_header(pair.blur, deep)
    sh, sw, smode = _image_header(pair.sharp, deep)
    for path, mode in ((pair.blur, bmode), (pair.sharp, smode)):
        if mode != "RGB" and not convert:
            raise ValueError(f"{path}: expected an 8-bit RGB image, got {_describe(path)} "
                             "(pass --convert to convert it)")
    if (bh, bw) != (sh, sw):
        raise ValueError(f"{pair.blur} is {bh}x{bw} but {pair.sharp} is {sh}x{sw}")
    return PairInfo(bh, bw, bmode != "RGB", smode != "RGB", pair.blur.stat().st_size, pair.sharp.stat().st_size,
                    bmode, smode)


def _describe(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as img:
        deep = ";16" in str(img.tile[0][3]) if img.tile else False
        return f"mode {img.mode}{' 16-bit' if deep and img.mode == 'RGB' else ''}"
