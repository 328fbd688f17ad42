"""mimo_loss against an independent numpy computation, and its float32 behaviour under autocast."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.errors import HarnessError
from harness.losses import mimo_loss
from harness.models import create_model

KEYS = ["content_x4", "content_x2", "content_x1", "fft_x4", "fft_x2", "fft_x1"]


def _np_targets(sharp: np.ndarray) -> list[np.ndarray]:
    # bilinear, align_corners=False, exact factor s: output pixel d samples input at s*d + (s-1)/2,
    # i.e. the mean of the two middle pixels of each s-block along each axis
    def down(x: np.ndarray, s: int) -> np.ndarray:
        a, b = s // 2 - 1, s // 2
        return (x[..., a::s, a::s] + x[..., a::s, b::s] + x[..., b::s, a::s] + x[..., b::s, b::s]) / 4

    return [down(sharp, 4), down(sharp, 2), sharp]


def _np_loss(outputs, sharp, fft_weight, scale_weights):
    total, parts = 0.0, {}
    for scale, out, gt, w in zip(["x4", "x2", "x1"], outputs, _np_targets(sharp), scale_weights):
        content = np.abs(out - gt).mean()
        diff = np.fft.fft2(out) - np.fft.fft2(gt)  # over the last two axes, per image and channel
        freq = np.concatenate([diff.real, diff.imag]).__abs__().mean()
        parts[f"content_{scale}"], parts[f"fft_{scale}"] = content, freq
        total += w * (content + fft_weight * freq)
    return total, parts


def test_loss_matches_independent_numpy_computation():
    rng = np.random.default_rng(0)
    sharp = rng.random((2, 3, 16, 24))
    outputs = [rng.random((2, 3, 4, 6)), rng.random((2, 3, 8, 12)), rng.random((2, 3, 16, 24))]
    want_total, want_parts = _np_loss(outputs, sharp, 0.3, (0.5, 1.0, 2.0))

    t = [torch.tensor(o, dtype=torch.float32, requires_grad=True) for o in outputs]
    total, parts = mimo_loss(
        t, torch.tensor(sharp, dtype=torch.float32), fft_weight=0.3, scale_weights=(0.5, 1.0, 2.0)
    )
    assert list(parts) == KEYS
    assert total.dtype == torch.float32 and total.dim() == 0
    assert total.item() == pytest.approx(want_total, rel=1e-5)
    for key in KEYS:
        assert not parts[key].requires_grad
        assert parts[key].item() == pytest.approx(want_parts[key], rel=1e-5), key
    total.backward()
    assert all(o.grad is not None and o.grad.abs().sum() > 0 for o in t)


def test_defaults_are_paper_weights():
    torch.manual_seed(0)
    sharp = torch.rand(1, 3, 8, 8)
    outputs = [torch.rand(1, 3, 2, 2), torch.rand(1, 3, 4, 4), torch.rand(1, 3, 8, 8)]
    total, parts = mimo_loss(outputs, sharp)
    want = sum(parts[f"content_{s}"] + 0.1 * parts[f"fft_{s}"] for s in ("x4", "x2", "x1"))
    torch.testing.assert_close(total, want)


def test_loss_is_float32_under_bf16_autocast():
    torch.manual_seed(0)
    # a bf16 model (as DeepSpeed's bf16 mode runs it) under autocast: the outputs are bf16
    model = create_model("mimo-unet", base_channels=8, num_res=1).to(torch.bfloat16)
    blur, sharp = torch.rand(2, 3, 32, 32, dtype=torch.bfloat16), torch.rand(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(blur)
        assert all(o.dtype == torch.bfloat16 for o in outputs)  # the mixed-precision case is really exercised
        total, parts = mimo_loss(outputs, sharp.bfloat16())
    assert total.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in parts.values())
    # same numbers as an fp32 evaluation of the very same (bf16-valued) tensors outside autocast
    ref_total, ref_parts = mimo_loss([o.detach().float() for o in outputs], sharp.bfloat16().float())
    torch.testing.assert_close(total.detach(), ref_total, rtol=1e-6, atol=0)
    for key in KEYS:
        torch.testing.assert_close(parts[key], ref_parts[key], rtol=1e-6, atol=0)
    total.backward()
    assert model.feat_extract[0].main[0].weight.grad.dtype == torch.bfloat16


def test_loss_rejects_mismatched_outputs():
    sharp = torch.rand(1, 3, 16, 16)
    with pytest.raises(HarnessError, match="output x2 has shape"):
        mimo_loss([torch.rand(1, 3, 4, 4), torch.rand(1, 3, 16, 16), sharp], sharp)
    with pytest.raises(HarnessError, match="expected 3 outputs"):
        mimo_loss([sharp], sharp)
