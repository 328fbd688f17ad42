"""The evaluation protocols behind `mimo eval --protocol`: how a restored frame is scored.

Deblurring papers report PSNR/SSIM under different rules, and numbers from two rules are not
comparable, so every result names the protocol it was computed under (`EvalResult.settings()`).

- `default`: the MIMO-UNet reference evaluation (GoPro, HIDE): float RGB in [0, 1] as the model
  returns it (clamped), data range 1, the full frame, scikit-image's PSNR and Gaussian SSIM
  (harness.metrics).
- `realblur`: RealBlur's official evaluation, as its authors run it. We followed
  `evaluation_RealBlur_ecc.py` of github.com/rimchang/RealBlur (commit cf28b80; it credits
  Köhler et al.'s benchmark code for the alignment). The camera pair that recorded RealBlur is
  not pixel-aligned, so each restored frame is first aligned to its sharp frame:
  1. both are 8-bit images read as float32 / 255 (we quantize the restored frame to 8 bits as
     `mimo deblur` writes it, since the reference scores saved PNGs);
  2. intensity matching: the restored frame z is scaled by sum(x*z) / sum(z*z), x the sharp frame;
  3. an ECC homography (OpenCV `findTransformECC`, MOTION_HOMOGRAPHY) from the identity, on the
     grey versions (COLOR_RGB2GRAY) of the sharp (template) and the scaled restored frame, 100
     iterations with epsilon 0 (so always 100), Gaussian pre-filter 5, no mask, no pyramid;
  4. the scaled frame is warped onto the sharp one (bicubic, inverse map, reflected border) and
     a mask is made by warping an all-ones image the same way (nearest, constant 0 border);
  5. both frames are multiplied by the mask; PSNR = the squared error summed over all pixels and
     channels divided by the mask's sum; SSIM = scikit-image's map (Gaussian, sigma 1.5, data
     range 1) of the masked frames times the mask, 5 px border cut, summed per channel and divided
     by that channel's mask sum, then averaged over channels.
  The reference scores the blurred input without alignment (plain full-frame PSNR) and leaves its
  SSIM at 0; here the blurred input is scored under `default` (unaligned, full frame, both
  metrics). Its pins (OpenCV 4.2, scikit-image 0.17.2) are not needed: the metrics are ours
  (equal to scikit-image's) and ECC runs on whichever OpenCV is installed; a different OpenCV
  may move the alignment, and so the numbers, slightly.
- `basicsr-y`: BasicSR's `calculate_psnr`/`calculate_ssim` with `test_y_channel=True` (Restormer,
  NAFNet and others report these): both frames as 8-bit images (rounded, as BasicSR's
  `tensor2img`), the BT.601 luma of its `rgb2ycbcr(y_only=True)`,
  Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255 on 0..255 (range 16..235, kept unrounded in
  float32 as BasicSR does), `crop_border` px cut from each edge (default 0), PSNR with peak 255,
  SSIM on Y with an 11x11 Gaussian window (sigma 1.5), C1 = (0.01*255)^2, C2 = (0.03*255)^2, valid
  region only. Y PSNR is usually higher than RGB PSNR on natural images (Y weighs the channels
  down and averages their independent errors).
"""

from __future__ import annotations

import numpy as np
import torch

from harness.errors import HarnessError
from harness.metrics import masked_psnr, masked_ssim, psnr, ssim

PROTOCOLS = ("default", "realblur", "basicsr-y")

# RealBlur's evaluation_RealBlur_ecc.py, image_align(): the ECC settings it runs with.
ECC_ITERATIONS = 100
ECC_EPS = 0.0
ECC_GAUSS_FILTER = 5

# BasicSR rgb2ycbcr(y_only=True): Y = 16 + R*65.481/255 + G*128.553/255 + B*24.966/255 (0..255).
BT601_Y = (65.481, 128.553, 24.966)

_DESCRIPTIONS = {
    "default": "RGB, data range 1, full frame",
    "realblur": "RealBlur: ECC-aligned, RGB in the valid mask; blurred frames unaligned",
    "basicsr-y": "BasicSR: 8-bit BT.601 Y 16..235",
}


def check(protocol: str, crop_border: int = 0) -> str:
    """The protocol's name, or one HarnessError naming the bad setting."""
    if protocol not in PROTOCOLS:
        raise HarnessError(f"protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    if crop_border < 0 or (crop_border and protocol != "basicsr-y"):
        raise HarnessError(f"crop_border {crop_border}: only basicsr-y crops, by a border >= 0")
    return protocol


def label(protocol: str, crop_border: int = 0) -> str:
    """One token stating the protocol beside the numbers: 'default', 'basicsr-y', 'basicsr-y:crop4'."""
    return f"{protocol}:crop{crop_border}" if crop_border else protocol


def describe(protocol: str, crop_border: int = 0) -> str:
    """A few words for the printed summary."""
    crop = f", {crop_border} px border cut" if crop_border else ", full frame" if protocol == "basicsr-y" else ""
    return _DESCRIPTIONS[protocol] + crop


def score(
    pred: torch.Tensor,
    target: torch.Tensor,
    protocol: str = "default",
    *,
    crop_border: int = 0,
    baseline: bool = False,
    keys: list[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (PSNR, SSIM) float64 tensors for NCHW (or CHW) RGB in [0, 1] under `protocol`.

    `baseline`: `pred` is the blurred input, which RealBlur's reference scores unaligned.
    `keys` name the images in alignment errors.
    """
    check(protocol, crop_border)
    if protocol == "default" or (protocol == "realblur" and baseline):
        return default(pred, target)
    if protocol == "basicsr-y":
        return basicsr_y(pred, target, crop_border)
    return realblur(pred, target, keys)


# ---------------------------------------------------------------- default


def default(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float RGB, data range 1, full frame (harness.metrics as it is)."""
    return psnr(pred, target), ssim(pred, target)


# ---------------------------------------------------------------- basicsr-y


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> float32 values 0..255 of the 8-bit image (round half to even, as
    harness.files.to_uint8 and BasicSR's tensor2img)."""
    return x.detach().float().clamp(0.0, 1.0).mul(255.0).round()


def y_channel(rgb255: torch.Tensor) -> torch.Tensor:
    """NCHW 8-bit RGB values (0..255) -> N1HW BT.601 Y on 0..255 (16..235), as BasicSR's
    `to_y_channel`: float32 / 255, the dot product in float64, then through float32 again."""
    x = rgb255.float() / 255.0
    r, g, b = (x[:, i : i + 1].double() for i in range(3))
    y = (b * BT601_Y[2] + g * BT601_Y[1] + r * BT601_Y[0] + 16.0) / 255.0  # BGR order, as BasicSR's dot
    return (y.float() * 255.0).double()


def basicsr_y(pred: torch.Tensor, target: torch.Tensor, crop_border: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """BasicSR's Y-channel PSNR (peak 255) and SSIM of the 8-bit images, `crop_border` px cut."""
    a, b = (quantize(t if t.dim() == 4 else t.unsqueeze(0)) for t in (pred, target))
    if crop_border:
        a = a[..., crop_border:-crop_border, crop_border:-crop_border]
        b = b[..., crop_border:-crop_border, crop_border:-crop_border]
    ya, yb = y_channel(a), y_channel(b)
    return psnr(ya, yb, data_range=255.0), ssim(ya, yb, data_range=255.0)


# ---------------------------------------------------------------- realblur


def _cv2():
    try:
        import cv2
    except ImportError:
        raise HarnessError("protocol realblur: needs OpenCV (pip install opencv-python-headless)") from None
    return cv2


def _hwc8(t: torch.Tensor) -> np.ndarray:
    """CHW [0, 1] -> HxWx3 float32 of the 8-bit image / 255, as the reference reads its PNGs."""
    return (quantize(t).permute(1, 2, 0).cpu().numpy() / 255.0).astype(np.float32)


def align(restored: np.ndarray, sharp: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """RealBlur's image_align on HxWx3 float32 arrays -> (aligned restored * mask, sharp * mask,
    mask, 3x3 homography). ValueError when ECC fails (e.g. an image without texture)."""
    cv2 = _cv2()
    energy = np.sum(restored * restored)
    if not energy > 0:
        raise ValueError("the restored image is black")
    scaled = (np.sum(sharp * restored) / energy) * restored  # intensity matching
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, ECC_ITERATIONS, ECC_EPS)
    grey = [cv2.cvtColor(a, cv2.COLOR_RGB2GRAY) for a in (sharp, scaled)]
    try:
        _, warp = cv2.findTransformECC(grey[0], grey[1], np.eye(3, dtype=np.float32), cv2.MOTION_HOMOGRAPHY,
                                       criteria, None, ECC_GAUSS_FILTER)
    except cv2.error as exc:
        raise ValueError(f"ECC alignment failed ({str(exc).strip().splitlines()[-1]})") from None
    size = (sharp.shape[1], sharp.shape[0])
    inverse = cv2.WARP_INVERSE_MAP  # warp maps sharp-frame coordinates into the restored frame
    aligned = cv2.warpPerspective(scaled, warp, size, flags=cv2.INTER_CUBIC + inverse,
                                  borderMode=cv2.BORDER_REFLECT)
    mask = cv2.warpPerspective(np.ones_like(scaled, dtype=np.float32), warp, size,
                               flags=cv2.INTER_NEAREST + inverse, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return aligned * mask, sharp * mask, mask, warp


def realblur(
    pred: torch.Tensor, target: torch.Tensor, keys: list[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RealBlur's aligned, masked PSNR/SSIM, one image at a time on the CPU (OpenCV)."""
    pred, target = (t if t.dim() == 4 else t.unsqueeze(0) for t in (pred, target))
    if pred.shape != target.shape:
        raise HarnessError(f"realblur: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    scores = []
    for i in range(pred.shape[0]):
        try:
            aligned, sharp, mask, _ = align(_hwc8(pred[i]), _hwc8(target[i]))
        except ValueError as exc:
            name = keys[i] if keys else f"image {i}"
            raise HarnessError(f"{name}: protocol realblur: {exc}") from None
        a, s, m = (torch.from_numpy(v).permute(2, 0, 1)[None].double() for v in (aligned, sharp, mask))
        scores.append((masked_psnr(a, s, m), masked_ssim(a, s, m)))
    return torch.cat([p for p, _ in scores]), torch.cat([s for _, s in scores])
