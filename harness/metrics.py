"""PSNR and SSIM per image, numerically the same as scikit-image's functions.

Both take NCHW (or one CHW) RGB tensors in [0, 1] with data range 1 and no border crop, and
compute in float64. SSIM matches `skimage.metrics.structural_similarity(a, b,
channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=1)`: an 11x11 Gaussian window (sigma 1.5, truncated at 3.5 sigma), K1 = 0.01,
K2 = 0.03, the SSIM map averaged over the pixels at least 5 px from the border, then over
channels. skimage filters with reflected borders and then crops exactly the 5 px the
borders influence, so a "valid" convolution gives the identical map.

`data_range` (default 1) scales the peak and SSIM's constants for images on another scale
(BasicSR's Y channel is scored on 0..255). `ssim_map`, `masked_psnr` and `masked_ssim` serve the
evaluation protocols of harness.protocols (RealBlur scores only the pixels its alignment keeps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.errors import HarnessError

SIGMA = 1.5
RADIUS = int(3.5 * SIGMA + 0.5)  # scipy.ndimage's truncate=3.5 -> 5 -> an 11x11 window
WINDOW = 2 * RADIUS + 1
C1 = (0.01 * 1.0) ** 2
C2 = (0.03 * 1.0) ** 2


def _as_batch(pred: torch.Tensor, target: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.shape != target.shape:
        raise HarnessError(f"{what}: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if pred.dim() == 3:
        pred, target = pred.unsqueeze(0), target.unsqueeze(0)
    if pred.dim() != 4:
        raise HarnessError(f"{what}: expected NCHW or CHW images, got shape {tuple(pred.shape)}")
    return pred.detach().double(), target.detach().double()


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB (float64 tensor of length N); `inf` for identical images, as
    skimage's `peak_signal_noise_ratio(data_range=1)` gives (no cap: a cap would bias means silently)."""
    pred, target = _as_batch(pred, target, "psnr")
    mse = (pred - target).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


def masked_psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PSNR (data range 1) over the elements where `mask` (same shape, 0/1) is 1.

    `pred` and `target` are expected already multiplied by the mask, as RealBlur's evaluation
    does: the squared error summed over the whole image is divided by the mask's sum.
    """
    pred, target = _as_batch(pred, target, "masked_psnr")
    mask = _as_batch(mask, target, "masked_psnr")[0]
    err = (pred - target).pow(2).flatten(1).sum(1) / mask.flatten(1).sum(1)
    return 10.0 * torch.log10(1.0 / err)


def _gaussian_window(device: torch.device) -> torch.Tensor:
    x = torch.arange(-RADIUS, RADIUS + 1, dtype=torch.float64, device=device)
    g = torch.exp(-0.5 * (x / SIGMA) ** 2)
    return g / g.sum()


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian over H and W of every channel, 'valid' (no padding)."""
    c = x.shape[1]
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, WINDOW), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, WINDOW, 1), groups=c)


def ssim_map(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """The SSIM map (N, C, H - 10, W - 10): skimage's full map less the 5 px its borders influence."""
    x, y = _as_batch(pred, target, "ssim")
    if min(x.shape[-2:]) < WINDOW:
        raise HarnessError(
            f"ssim: images must be at least {WINDOW}x{WINDOW} px, got {x.shape[-2]}x{x.shape[-1]}"
        )
    g = _gaussian_window(x.device)
    c1, c2 = (C1, C2) if data_range == 1.0 else ((0.01 * data_range) ** 2, (0.03 * data_range) ** 2)
    # one grouped pass over the five local moments: x, y, x^2, y^2, xy
    ux, uy, uxx, uyy, uxy = _blur(torch.cat([x, y, x * x, y * y, x * y], dim=1), g).chunk(5, dim=1)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM (float64 tensor of length N), channel-averaged; images need H, W >= 11."""
    return ssim_map(pred, target, data_range).flatten(1).mean(1)


def masked_ssim(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SSIM (data range 1) averaged over the map where `mask` is 1, per channel, then over channels.

    As RealBlur's evaluation: the map of the (masked) images times the mask, less the 5 px border,
    summed per channel and divided by that channel's mask sum over the same cropped area.
    """
    m = _as_batch(mask, target, "masked_ssim")[0][..., RADIUS:-RADIUS, RADIUS:-RADIUS]
    s = ssim_map(pred, target) * m
    return (s.sum((2, 3)) / m.sum((2, 3))).mean(1)
