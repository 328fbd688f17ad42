"""Building blocks of MIMO-UNet (Cho et al., ICCV 2021).

Attribute names (`main`, `layers`, `conv`, `merge`) follow the public reference code on
purpose: they are the state-dict keys of the released checkpoints, which must load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicConv(nn.Module):
    """Conv (or 4x4 stride-2 transposed conv) + optional BatchNorm + optional ReLU, in `.main`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        *,
        bias: bool = True,
        norm: bool = False,
        relu: bool = True,
        transpose: bool = False,
    ) -> None:
        super().__init__()
        bias = bias and not norm  # BatchNorm's shift makes a conv bias redundant
        layers: list[nn.Module] = []
        if transpose:
            # padding k//2 - 1 makes a 4x4 stride-2 transposed conv exactly double H and W
            layers.append(
                nn.ConvTranspose2d(
                    in_channels,
                    out_channels,
                    kernel_size,
                    stride=stride,
                    padding=kernel_size // 2 - 1,
                    bias=bias,
                )
            )
        else:
            layers.append(
                nn.Conv2d(
                    in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias
                )
            )
        if norm:
            layers.append(nn.BatchNorm2d(out_channels))
        if relu:
            layers.append(nn.ReLU(inplace=True))
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class ResBlock(nn.Module):
    """Two 3x3 BasicConvs (the second without ReLU) plus the identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.main = nn.Sequential(
            BasicConv(channels, channels, 3, relu=True),
            BasicConv(channels, channels, 3, relu=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + x


class ResStack(nn.Module):
    """`num_res` ResBlocks in `.layers`: the reference's EBlock and DBlock (identical modules)."""

    def __init__(self, channels: int, num_res: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(ResBlock(channels) for _ in range(num_res)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class EBlock(ResStack):
    """Encoder block of one scale."""


class DBlock(ResStack):
    """Decoder block of one scale."""


class AFF(nn.Module):
    """Asymmetric feature fusion: concat the encoder features of all scales, 1x1 conv + ReLU, 3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            BasicConv(in_channels, out_channels, 1, relu=True),
            BasicConv(out_channels, out_channels, 3, relu=False),
        )

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, x4: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([x1, x2, x4], dim=1))


class SCM(nn.Module):
    """Shallow convolution module: features of a downsampled input image, concatenated with the image."""

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        c = out_channels
        self.main = nn.Sequential(
            BasicConv(3, c // 4, 3, relu=True),
            BasicConv(c // 4, c // 2, 1, relu=True),
            BasicConv(c // 2, c // 2, 3, relu=True),
            BasicConv(c // 2, c - 3, 1, relu=True),
        )
        self.conv = BasicConv(c, c, 1, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([x, self.main(x)], dim=1))


class FAM(nn.Module):
    """Feature attention module: `x1 + conv3x3(x1 * x2)` merges SCM features into the encoder."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.merge = BasicConv(channels, channels, 3, relu=False)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return x1 + self.merge(x1 * x2)
