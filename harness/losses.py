"""Multi-scale content + frequency reconstruction loss of MIMO-UNet (docs/design.md §2).

    L = sum_k w_k * ( mean|S_k - gt_k|  +  fft_weight * mean|FFT(S_k) - FFT(gt_k)| )

over the three output scales, with gt_k the sharp image bilinearly downsampled to 1/2 and
1/4 exactly as the reference training code does (`F.interpolate(sharp, scale_factor=s,
mode="bilinear")`, both from full resolution). The FFT term compares the real and imaginary
parts of `torch.fft.fft2` (`view_as_real`). Everything runs in float32: FFT has no bf16
kernel and needs power-of-two sizes in fp16 on cuFFT, and the loss should not depend on the
training precision anyway.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from harness.errors import HarnessError

SCALES = ("x4", "x2", "x1")  # the model's output order: 1/4, 1/2, full
_FACTORS = (0.25, 0.5, None)


def _targets(sharp: torch.Tensor) -> list[torch.Tensor]:
    return [
        sharp if f is None else F.interpolate(sharp, scale_factor=f, mode="bilinear", align_corners=False)
        for f in _FACTORS
    ]


def _fft_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (
        (torch.view_as_real(torch.fft.fft2(pred)) - torch.view_as_real(torch.fft.fft2(target))).abs().mean()
    )


def mimo_loss(
    outputs: Sequence[torch.Tensor],
    sharp: torch.Tensor,
    fft_weight: float = 0.1,
    scale_weights: Sequence[float] = (1.0, 1.0, 1.0),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`outputs` = the model's `[S3, S2, S1]`, `sharp` = NCHW full-resolution target.

    Returns `(total, parts)`: the float32 scalar to backpropagate and detached per-scale terms
    `content_x4, content_x2, content_x1, fft_x4, fft_x2, fft_x1` (unweighted) for logging.
    """
    if len(outputs) != 3 or len(scale_weights) != 3:
        raise HarnessError(
            f"mimo_loss: expected 3 outputs and 3 scale_weights, got {len(outputs)} and {len(scale_weights)}"
        )
    # autocast off: under torch.autocast the ops below would otherwise drop back to bf16/fp16
    with torch.autocast(device_type=sharp.device.type, enabled=False):
        targets = _targets(sharp.float())
        total = sharp.new_zeros((), dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        for scale, out, gt, weight in zip(SCALES, outputs, targets, scale_weights):
            if out.shape != gt.shape:
                raise HarnessError(
                    f"mimo_loss: output {scale} has shape {tuple(out.shape)}, target is {tuple(gt.shape)}"
                )
            out = out.float()
            content = (out - gt).abs().mean()
            freq = _fft_l1(out, gt)
            total = total + weight * (content + fft_weight * freq)
            parts[f"content_{scale}"] = content.detach()
            parts[f"fft_{scale}"] = freq.detach()
    ordered = {f"{kind}_{s}": parts[f"{kind}_{s}"] for kind in ("content", "fft") for s in SCALES}
    return total, ordered
