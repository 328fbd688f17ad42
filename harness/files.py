"""Atomic file writes and the one image codec of the harness.

Every image the harness reads or writes goes through here: encoded file/bytes <-> uint8 HxWx3
array <-> float32 CHW tensor in [0, 1]. One decoder, one PNG encoder, one rounding rule, so a
served model, `mimo deblur`, the packer and the trainer's samples agree pixel for pixel.

Deblurring takes any image: `decode_any` gives the RGB the model sees (uint8, or uint16 for
16-bit grey) plus an `Original` (the output mode and the input's alpha), and `encode_like` /
`write_image(..., like=original)` write the restored RGB back in that mode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from harness.errors import HarnessError

_DECODE_ERRORS = (
    UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError, Image.DecompressionBombError,
)
# Pillow's "L" conversion weights (ITU-R 601-2 luma, /65536), used to write grey from RGB output.
_LUMA = (19595 / 65536, 38470 / 65536, 7471 / 65536)


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
        # mkstemp makes the file 0600: give it the mode an ordinary open() would (0666 - umask).
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    # Read, not set-and-restore: os.umask() would change it for every thread for a moment.
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


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


def _is_wide_grey(img: Image.Image) -> bool:
    return img.mode.startswith("I") or img.mode == "F"  # 16/32-bit integer or float grey


def _wide_grey(img: Image.Image, top_out: float) -> np.ndarray:
    """16/32-bit grey -> HxW float64 scaled to [0, top_out] (scaled, not clipped: 16-bit data
    would otherwise saturate)."""
    arr = np.asarray(img).astype(np.float64)
    peak = arr.max(initial=0.0)
    if img.mode == "F" and peak <= 1.0:
        top = 1.0  # float grey in [0, 1] (float TIFFs), not 0..255
    else:
        top = 65535.0 if peak > 255 or img.mode.startswith("I;16") else 255.0
    return np.clip(np.round(arr * (top_out / top)), 0, top_out)


def _rgb8(img: Image.Image) -> np.ndarray:
    """Any Pillow image -> uint8 HxWx3: alpha dropped, grey repeated, 16/32-bit grey scaled."""
    if _is_wide_grey(img):
        return np.repeat(_wide_grey(img, 255.0).astype(np.uint8)[..., None], 3, axis=2)
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


@dataclasses.dataclass(frozen=True, eq=False)
class Original:
    """What the RGB a model sees drops from an input image, to restore on output.

    `mode`: the PNG mode to write: "RGB", "L" (grey), "RGBA"/"LA" (re-attaching `alpha`, the
    input's own HxW uint8 alpha) or "I;16" (16-bit grey).
    """

    mode: str = "RGB"
    alpha: np.ndarray | None = None


RGB = Original()


def _split(img: Image.Image) -> tuple[np.ndarray, Original]:
    """Pillow image -> (HxWx3 uint8, or uint16 for 16/32-bit grey; its `Original`)."""
    if img.mode in ("P", "PA"):  # palette: colours (and transparency, if any) become explicit
        transparent = img.mode == "PA" or "transparency" in img.info
        img = img.convert("RGBA" if transparent else "RGB")
    if _is_wide_grey(img):  # keep all 16 bits for the model: the output is written as 16-bit too
        grey = _wide_grey(img, 65535.0).astype(np.uint16)
        return np.repeat(grey[..., None], 3, axis=2), Original("I;16")
    if img.mode in ("1", "L"):
        return _rgb8(img), Original("L")
    if img.mode in ("LA", "La", "RGBA", "RGBa"):
        # The colour channels as stored (not composited): alpha is re-attached on output, so
        # compositing would apply it twice. Premultiplied modes are un-premultiplied by convert.
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint8)
        mode = "LA" if img.mode in ("LA", "La") else "RGBA"
        return np.ascontiguousarray(rgba[..., :3]), Original(mode, rgba[..., 3].copy())
    return _rgb8(img), RGB  # RGB, and CMYK, YCbCr, LAB, HSV, RGBX: written as RGB


def decode_any(src: str | os.PathLike | bytes, name: str | None = None) -> tuple[np.ndarray, Original]:
    """Decode any image Pillow reads -> (HxWx3 array for the model, `Original` to restore on
    output): grey is repeated to RGB, alpha set aside, palettes expanded; 16-bit grey stays
    uint16 (`to_float` scales either). HarnessError naming `name` if it is not a readable image."""
    name = str(src) if name is None else name
    try:
        with _open(src, name) as img:
            img.load()
            return _split(img)
    except _DECODE_ERRORS as exc:
        raise HarnessError(f"{name}: not a readable image ({exc.__class__.__name__})") from None


def load_rgb_array(path: str | os.PathLike) -> np.ndarray:
    """Decode an 8-bit RGB image file to a uint8 HxWx3 array, or raise HarnessError naming the file."""
    return decode_rgb8(path)


def to_float(arr: np.ndarray):
    """uint8 (or uint16) HxWx3 array -> float32 CHW tensor in [0, 1]."""
    import torch

    top = 65535.0 if arr.dtype == np.uint16 else 255.0
    t = torch.from_numpy(np.ascontiguousarray(arr).astype(np.float32, copy=False))
    return t.permute(2, 0, 1).div_(top)


def read_image(path: str | os.PathLike):
    """Read any image as an RGB CHW float32 tensor in [0, 1] (8-bit RGB as stored; other modes
    converted like `decode_rgb8(..., convert=True)`: alpha dropped, grey repeated, 16-bit scaled)."""
    return to_float(decode_rgb8(path, convert=True))


# ---------------------------------------------------------------- encode


def to_uint8(t) -> np.ndarray:
    """CHW float tensor in [0,1] -> HxWx3 uint8 (round half to even like skimage's img_as_ubyte)."""
    import torch

    t = t.detach().float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    return t.permute(1, 2, 0).cpu().numpy()


def png_bytes(arr: np.ndarray, compress_level: int = 6) -> bytes:
    """uint8 HxWx3/HxWx4/HxWx2 (RGB/RGBA/LA), uint8 HxW (L) or uint16 HxW (16-bit grey) -> PNG."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def write_png(arr: np.ndarray, path: str | os.PathLike, compress_level: int = 6) -> Path:
    """Write a uint8 array as a PNG, atomically."""
    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_bytes(png_bytes(arr, compress_level))
    return path


def _grey(t):
    """CHW float RGB -> HW float grey, weighted as Pillow's convert("L") weighs 8-bit RGB."""
    t = t.detach().float().cpu()
    return t[0] * _LUMA[0] + t[1] * _LUMA[1] + t[2] * _LUMA[2]


def _quantize(t, top: float, dtype) -> np.ndarray:
    """float in [0,1] -> integers 0..top, rounded half to even like `to_uint8`."""
    return t.clamp(0.0, 1.0).mul(top).round().numpy().astype(dtype)


def like_array(t, like: Original = RGB) -> np.ndarray:
    """CHW float RGB in [0,1] -> the array `png_bytes` writes in `like`'s mode: HxWx3 uint8
    (RGB), HxW uint8 (L), HxW uint16 (I;16), HxWx4 / HxWx2 uint8 with its alpha (RGBA / LA)."""
    if like.mode == "RGB":
        return to_uint8(t)
    if like.mode == "I;16":
        return _quantize(_grey(t), 65535.0, np.uint16)
    colour = to_uint8(t) if like.mode == "RGBA" else _quantize(_grey(t), 255.0, np.uint8)[..., None]
    if like.mode == "L":
        return colour[..., 0]
    if like.mode not in ("LA", "RGBA"):
        raise HarnessError(f"output mode {like.mode}: expected RGB, L, LA, RGBA or I;16")
    if like.alpha is None or like.alpha.shape != colour.shape[:2]:
        raise HarnessError(f"output: {like.mode} needs the input's alpha of size {colour.shape[1::-1]}")
    return np.concatenate([colour, like.alpha[..., None]], axis=2)


def encode_like(t, like: Original = RGB, compress_level: int = 6) -> bytes:
    """CHW float RGB in [0,1] -> PNG bytes in the input's mode (see `Original`)."""
    return png_bytes(like_array(t, like), compress_level)


def write_image(t, path: str | os.PathLike, like: Original = RGB) -> Path:
    """Write a CHW float tensor in [0,1] as a PNG, atomically: 8-bit RGB, or in the mode of the
    input that `like` describes (grey, with its alpha, 16-bit)."""
    return write_png(like_array(t, like), path)
