"""PSNR / SSIM parity with scikit-image on random and natural-looking images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from harness.errors import HarnessError
from harness.metrics import psnr, ssim


def _smooth_scene(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A natural-looking HxWx3 image: smooth gradients, soft blobs, a hard edge and fine texture."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([0.3 + 0.4 * xx, 0.2 + 0.5 * yy, 0.5 + 0.3 * np.sin(6 * xx + 3 * yy)], axis=-1)
    for _ in range(6):
        cy, cx, r = rng.random(3) * [1, 1, 0.2]
        img += (
            0.3
            * (rng.random(3) - 0.5)
            * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (r**2 + 1e-3))[..., None]
        )
    img[:, w // 2 :] *= 0.8  # a sharp vertical edge
    img += 0.02 * np.sin(40 * xx)[..., None]
    return np.clip(img, 0, 1)


def _pairs():
    rng = np.random.default_rng(7)
    # random noise vs noise
    yield rng.random((32, 40, 3)), rng.random((32, 40, 3))
    # a clean image vs a noisy, blurred-ish, 8-bit-quantised version of it (the deblurring case)
    for h, w in ((48, 64), (11, 13), (97, 130)):
        clean = _smooth_scene(rng, h, w)
        soft = (clean + np.roll(clean, 2, axis=1) + np.roll(clean, -2, axis=1)) / 3
        noisy = np.clip(soft + 0.03 * rng.standard_normal(clean.shape), 0, 1)
        yield clean, np.round(noisy * 255) / 255


def _to_tensor(*images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()


@pytest.mark.parametrize("index", range(4))
def test_psnr_and_ssim_match_skimage(index):
    a, b = list(_pairs())[index]
    # compare on the float32 values our tensors hold; skimage computes in float64 on them
    a32, b32 = a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64)
    want_psnr = peak_signal_noise_ratio(a32, b32, data_range=1)
    want_ssim = structural_similarity(
        a32, b32, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1
    )
    got_psnr, got_ssim = psnr(_to_tensor(b), _to_tensor(a)), ssim(_to_tensor(b), _to_tensor(a))
    assert got_psnr.shape == got_ssim.shape == (1,)
    assert got_psnr.dtype == got_ssim.dtype == torch.float64
    assert abs(got_psnr.item() - want_psnr) < 1e-4
    assert abs(got_ssim.item() - want_ssim) < 1e-4
    assert 0.0 < want_ssim < 0.999  # a non-trivial comparison


def test_batch_gives_per_image_values_in_order():
    a0, b0 = list(_pairs())[1]
    a1 = b1 = _smooth_scene(np.random.default_rng(1), 48, 64)
    got_p, got_s = psnr(_to_tensor(b0, b1), _to_tensor(a0, a1)), ssim(_to_tensor(b0, b1), _to_tensor(a0, a1))
    assert got_p.shape == got_s.shape == (2,)
    assert got_p[0].item() == pytest.approx(psnr(_to_tensor(b0), _to_tensor(a0)).item(), abs=1e-9)
    assert got_s[0].item() == pytest.approx(ssim(_to_tensor(b0), _to_tensor(a0)).item(), abs=1e-9)
    # identical images: SSIM exactly 1, PSNR +inf like skimage (documented; never a finite cap)
    assert got_s[1].item() == pytest.approx(1.0, abs=1e-12)
    assert math.isinf(got_p[1].item()) and got_p[1].item() > 0


def test_chw_input_and_errors():
    a = torch.rand(3, 16, 16)
    b = (a + 0.1).clamp(0, 1)
    assert psnr(b, a).shape == ssim(b, a).shape == (1,)
    with pytest.raises(HarnessError, match="differ"):
        psnr(a, torch.rand(3, 16, 17))
    with pytest.raises(HarnessError, match="at least 11x11"):
        ssim(torch.rand(1, 3, 10, 32), torch.rand(1, 3, 10, 32))
    with pytest.raises(HarnessError, match="NCHW"):
        ssim(torch.rand(16, 16), torch.rand(16, 16))
