"""PSNR and SSIM per image, numerically the same as scikit-image's functions.

Both take NCHW (or one CHW) RGB tensors in [0, 1] with data range 1 and no border crop, and
compute in float64. SSIM matches `skimage.metrics.structural_similarity(a, b,
channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=1)`: an 11x11 Gaussian window (sigma 1.5, truncated at 3.5 sigma), K1 = 0.01,
K2 = 0.03, the SSIM map averaged over the pixels at least 5 px from the border, then over
channels. skimage filters with reflected borders and then crops exactly the 5 px the
borders influence, so a "valid" convolution gives the identical map.
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


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (float64 tensor of length N); `inf` for identical images, as
    skimage's `peak_signal_noise_ratio(data_range=1)` gives (no cap: a cap would bias means silently)."""
    pred, target = _as_batch(pred, target, "psnr")
    mse = (pred - target).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse)


def _gaussian_window(device: torch.device) -> torch.Tensor:
    x = torch.arange(-RADIUS, RADIUS + 1, dtype=torch.float64, device=device)
    g = torch.exp(-0.5 * (x / SIGMA) ** 2)
    return g / g.sum()


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian over H and W of every channel, 'valid' (no padding)."""
    c = x.shape[1]
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, WINDOW), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, WINDOW, 1), groups=c)


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (float64 tensor of length N), channel-averaged; images need H, W >= 11."""
    x, y = _as_batch(pred, target, "ssim")
    if min(x.shape[-2:]) < WINDOW:
        raise HarnessError(
            f"ssim: images must be at least {WINDOW}x{WINDOW} px, got {x.shape[-2]}x{x.shape[-1]}"
        )
    g = _gaussian_window(x.device)
    # one grouped pass over the five local moments: x, y, x^2, y^2, xy
    ux, uy, uxx, uyy, uxy = _blur(torch.cat([x, y, x * x, y * y, x * y], dim=1), g).chunk(5, dim=1)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    s = ((2 * ux * uy + C1) * (2 * vxy + C2)) / ((ux * ux + uy * uy + C1) * (vx + vy + C2))
    return s.flatten(1).mean(1)
