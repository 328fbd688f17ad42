"""Analytic forward cost of a model: 2 x multiply-accumulates of its convolutions."""

from __future__ import annotations

import copy

import torch
from torch import nn

from harness.models.mimo_unet import unwrap_model


def _conv_macs(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
    kh, kw = module.kernel_size
    if isinstance(module, nn.ConvTranspose2d):
        # every input pixel scatters a kernel of weights into the output
        return inputs[0].numel() * (module.out_channels // module.groups) * kh * kw
    return output.numel() * (module.in_channels // module.groups) * kh * kw


def count_flops(model: nn.Module, h: int, w: int) -> int:
    """Forward FLOPs (2 x MACs of Conv2d / ConvTranspose2d) for one 3 x h x w image.

    Runs a shape-only forward on a meta-device copy, so it costs no real compute and leaves
    `model` (and any DDP / torch.compile wrapper around it) untouched. Element-wise work (ReLU, adds, resizes) is not counted,
    the usual convention for these figures.
    """
    shadow = copy.deepcopy(unwrap_model(model)).to("meta").eval()
    macs = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal macs
        macs += _conv_macs(module, inputs, output)

    for m in shadow.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        shadow(torch.empty(1, 3, h, w, device="meta"))
    return 2 * macs
