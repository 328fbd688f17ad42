"""Aligned random crops and geometric augmentations of blur/sharp pairs.

Crop positions and flips are drawn from the image size alone (known from meta.json or the file
header), never from pixels, so a resumed stream can replay the draws without decoding.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from harness.errors import HarnessError

AUGMENTS = ("hflip", "vflip", "rot90")  # geometric only: colour changes would break the blur model


@dataclass(frozen=True)
class CropSpec:
    y: int
    x: int
    hflip: bool
    vflip: bool
    rot: int  # quarter turns


def parse_augment(augment: bool | str | Iterable[str] | None) -> tuple[str, ...]:
    """True -> ('hflip',) as in the paper; False/None/'' -> (); 'hflip,rot90' or a list -> checked names."""
    if augment is True:
        return ("hflip",)
    if not augment:
        return ()
    names = [a.strip() for a in (augment.split(",") if isinstance(augment, str) else augment) if a.strip()]
    bad = [a for a in names if a not in AUGMENTS]
    if bad:
        raise HarnessError(f"augment: unknown {bad}, expected some of {list(AUGMENTS)}")
    return tuple(a for a in AUGMENTS if a in names)


def crop_size(crop: int | tuple[int, int]) -> tuple[int, int]:
    ch, cw = (crop, crop) if isinstance(crop, int) else tuple(crop)
    if ch < 1 or cw < 1:
        raise HarnessError(f"crop: expected a positive size, got {crop!r}")
    return int(ch), int(cw)


def draw(rng: np.random.Generator, h: int, w: int, ch: int, cw: int, augs: tuple[str, ...]) -> CropSpec:
    """One crop position and augmentation; always the same number of draws for the same config."""
    y = int(rng.integers(0, h - ch + 1))
    x = int(rng.integers(0, w - cw + 1))
    hflip = "hflip" in augs and bool(rng.integers(2))
    vflip = "vflip" in augs and bool(rng.integers(2))
    # Non-square crops may only turn by 0 or 180 degrees, so every crop keeps the batch shape.
    rot = int(rng.integers(4) if ch == cw else 2 * rng.integers(2)) if "rot90" in augs else 0
    return CropSpec(y, x, hflip, vflip, rot)


def cut(arr: np.ndarray, spec: CropSpec, ch: int, cw: int) -> np.ndarray:
    """The crop of an HxWx3 array as a view (flips and turns are strided views, no copy)."""
    out = arr[spec.y : spec.y + ch, spec.x : spec.x + cw]
    if spec.hflip:
        out = out[:, ::-1]
    if spec.vflip:
        out = out[::-1]
    return np.rot90(out, spec.rot) if spec.rot else out


def to_tensor_batch(crops: list[np.ndarray]):
    """uint8 HxWx3 crops -> one uint8 NCHW tensor in channels_last memory (a single copy).

    Batches stay uint8 until they reach the training device (`to_float` there): a quarter of the
    bytes through the loader workers' shared memory, pinned memory and the host-to-device copy,
    and no float conversion in the workers, which was half of a raw sample's loader cost.
    """
    import torch

    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2)


def to_float(batch, dtype=None):
    """A loader batch (uint8 0..255, or float already in [0, 1]) as `dtype` (default float32) in [0, 1].

    The division is done in float32 whatever `dtype` is, so bf16/fp16 inputs round only once.
    """
    import torch

    if batch.dtype == torch.uint8:
        batch = batch.float().div_(255.0)
    return batch.to(dtype or torch.float32)
