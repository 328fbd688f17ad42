"""Atomic file writes and the one image codec of the harness.

Every image the harness reads or writes goes through here: encoded file/bytes <-> uint8 HxWx3
array <-> float32 CHW tensor in [0, 1]. One decoder, one PNG encoder, one rounding rule, so a
served model, `mimo deblur`, the packer and the trainer's samples agree pixel for pixel.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from harness.errors import HarnessError

_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError)


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


# ---------------------------------------------------------------- decode


def _open(src: str | os.PathLike | bytes, name: str):
    if isinstance(src, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(src)))
    if not Path(src).is_file():
        raise HarnessError(f"{name}: no such image file")
    return Image.open(src)


def _rgb8(img: Image.Image) -> np.ndarray:
    """Any Pillow image -> uint8 HxWx3: alpha dropped, grey repeated, 16/32-bit grey scaled."""
    if img.mode.startswith("I") or img.mode == "F":  # 16/32-bit grey: scale, don't clip
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if arr.max() > 255 or img.mode.startswith("I;16") else 255.0
        grey = np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def decode_rgb8(src: str | os.PathLike | bytes, name: str | None = None, *, convert: bool = False) -> np.ndarray:
    """Decode an image file or encoded bytes to a uint8 HxWx3 array; HarnessError names `name`.

    Without `convert` only 8-bit RGB is accepted; with it any mode Pillow reads is converted.
    """
    name = str(src) if name is None else name
    try:
        with _open(src, name) as img:
            img.load()
            if img.mode != "RGB" and not convert:
                raise HarnessError(f"{name}: expected an 8-bit RGB image, got mode {img.mode}")
            return _rgb8(img)
    except _DECODE_ERRORS as exc:
        raise HarnessError(f"{name}: not a readable image ({exc.__class__.__name__})") from None


def load_rgb_array(path: str | os.PathLike) -> np.ndarray:
    """Decode an 8-bit RGB image file to a uint8 HxWx3 array, or raise HarnessError naming the file."""
    return decode_rgb8(path)


def to_float(arr: np.ndarray):
    """uint8 HxWx3 array -> float32 CHW tensor in [0, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div_(255.0)


def read_image(path: str | os.PathLike):
    """Read an RGB image as a CHW float32 tensor in [0, 1]."""
    return to_float(load_rgb_array(path))


# ---------------------------------------------------------------- encode


def to_uint8(t) -> np.ndarray:
    """CHW float tensor in [0,1] -> HxWx3 uint8 (round half to even like skimage's img_as_ubyte)."""
    import torch

    t = t.detach().float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    return t.permute(1, 2, 0).cpu().numpy()


def png_bytes(arr: np.ndarray, compress_level: int = 6) -> bytes:
    """uint8 HxWx3 (or HxW) array -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def write_png(arr: np.ndarray, path: str | os.PathLike, compress_level: int = 6) -> Path:
    """Write a uint8 array as a PNG, atomically."""
    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_bytes(png_bytes(arr, compress_level))
    return path


def write_image(t, path: str | os.PathLike) -> Path:
    """Write a CHW float tensor in [0,1] as an 8-bit PNG, atomically."""
    return write_png(to_uint8(t), path)
