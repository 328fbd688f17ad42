"""Atomic file writes and image I/O shared by every part of the harness."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from harness.errors import HarnessError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync it and rename it over `path`.

    Readers never see a half-written file: either the old file or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_rgb_array(path: str | os.PathLike) -> np.ndarray:
    """Decode an 8-bit RGB image to a uint8 HxWx3 array, or raise HarnessError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"{path}: no such image file")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode != "RGB":
                raise HarnessError(f"{path}: expected an 8-bit RGB image, got mode {img.mode}")
            return np.asarray(img, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise HarnessError(f"{path}: not a readable image ({exc.__class__.__name__})") from None


def read_image(path: str | os.PathLike):
    """Read an RGB image as a CHW float32 tensor in [0, 1]."""
    import torch

    arr = load_rgb_array(path)
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


def to_uint8(t) -> np.ndarray:
    """CHW float tensor in [0,1] -> HxWx3 uint8 (round half to even like skimage's img_as_ubyte)."""
    import torch

    t = t.detach().float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    return t.permute(1, 2, 0).cpu().numpy()


def write_image(t, path: str | os.PathLike) -> Path:
    """Write a CHW float tensor in [0,1] as an 8-bit PNG, atomically."""
    path = Path(path)
    with atomic_write(path) as tmp:
        Image.fromarray(to_uint8(t)).save(tmp, format="PNG")
    return path
