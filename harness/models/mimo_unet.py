"""MIMO-UNet and MIMO-UNet+ (Cho et al., "Rethinking Coarse-to-Fine Approach in Single Image
Deblurring", ICCV 2021) and the registry that builds them by name.

One U-Net with multiple inputs (MISE: the image at 1, 1/2 and 1/4 scale enter the single
encoder through SCM + FAM) and multiple outputs (MOSD: every decoder level emits a residual
image), with asymmetric feature fusion (AFF) on the skip connections.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import HarnessError
from harness.models.layers import AFF, FAM, SCM, BasicConv, DBlock, EBlock

# name -> defaults; the public checkpoints were trained with exactly these.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "mimo-unet": {"num_res": 8, "base_channels": 32, "dropout": 0.0},
    "mimo-unet-plus": {"num_res": 20, "base_channels": 32, "dropout": 0.1},
}
MODEL_NAMES: tuple[str, ...] = tuple(ARCHITECTURES)


class MIMOUNet(nn.Module):
    """MIMO-UNet; with `num_res=20, dropout=0.1` it is MIMO-UNet+.

    `forward(x)` takes NCHW images (H, W multiples of 4) and returns `[S3, S2, S1]`, the
    deblurred image at 1/4, 1/2 and full scale (coarse first).
    """

    def __init__(self, num_res: int = 8, base_channels: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        c = base_channels
        self.Encoder = nn.ModuleList([EBlock(c, num_res), EBlock(2 * c, num_res), EBlock(4 * c, num_res)])
        self.feat_extract = nn.ModuleList(
            [
                BasicConv(3, c, 3, stride=1, relu=True),
                BasicConv(c, 2 * c, 3, stride=2, relu=True),
                BasicConv(2 * c, 4 * c, 3, stride=2, relu=True),
                BasicConv(4 * c, 2 * c, 4, stride=2, relu=True, transpose=True),
                BasicConv(2 * c, c, 4, stride=2, relu=True, transpose=True),
                BasicConv(c, 3, 3, stride=1, relu=False),
            ]
        )
        self.Decoder = nn.ModuleList([DBlock(4 * c, num_res), DBlock(2 * c, num_res), DBlock(c, num_res)])
        # 1x1 convs that squeeze [upsampled decoder features, AFF skip] back to the level width
        self.Convs = nn.ModuleList([BasicConv(4 * c, 2 * c, 1, relu=True), BasicConv(2 * c, c, 1, relu=True)])
        # image heads of the two coarse levels (the full-scale head is feat_extract[5])
        self.ConvsOut = nn.ModuleList(
            [BasicConv(4 * c, 3, 3, relu=False), BasicConv(2 * c, 3, 3, relu=False)]
        )
        self.AFFs = nn.ModuleList([AFF(7 * c, c), AFF(7 * c, 2 * c)])
        self.FAM1 = FAM(4 * c)
        self.SCM1 = SCM(4 * c)
        self.FAM2 = FAM(2 * c)
        self.SCM2 = SCM(2 * c)
        # Dropout2d has no state, so MIMO-UNet and MIMO-UNet+ checkpoints share key layouts.
        self.drop1: nn.Module = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.drop2: nn.Module = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise HarnessError(f"MIMO-UNet expects NCHW RGB input (N, 3, H, W), got shape {tuple(x.shape)}")
        if x.shape[-2] % 4 or x.shape[-1] % 4:
            raise HarnessError(
                f"MIMO-UNet needs H and W divisible by 4, got {x.shape[-2]}x{x.shape[-1]} (pad the input)"
            )
        # MISE: nearest downsampling, as in the paper's code
        x_2 = F.interpolate(x, scale_factor=0.5)
        x_4 = F.interpolate(x_2, scale_factor=0.5)
        z2 = self.SCM2(x_2)
        z4 = self.SCM1(x_4)

        res1 = self.Encoder[0](self.feat_extract[0](x))
        z = self.FAM2(self.feat_extract[1](res1), z2)
        res2 = self.Encoder[1](z)
        z = self.FAM1(self.feat_extract[2](res2), z4)
        z = self.Encoder[2](z)

        # AFF: every skip sees the encoder features of all three scales
        z12 = F.interpolate(res1, scale_factor=0.5)
        z21 = F.interpolate(res2, scale_factor=2)
        z42 = F.interpolate(z, scale_factor=2)
        z41 = F.interpolate(z42, scale_factor=2)
        skip2 = self.drop2(self.AFFs[1](z12, res2, z42))
        skip1 = self.drop1(self.AFFs[0](res1, z21, z41))

        # MOSD: each decoder level emits a residual image added to the matching input scale
        z = self.Decoder[0](z)
        out4 = self.ConvsOut[0](z) + x_4
        z = self.feat_extract[3](z)

        z = self.Decoder[1](self.Convs[0](torch.cat([z, skip2], dim=1)))
        out2 = self.ConvsOut[1](z) + x_2
        z = self.feat_extract[4](z)

        z = self.Decoder[2](self.Convs[1](torch.cat([z, skip1], dim=1)))
        out1 = self.feat_extract[5](z) + x
        return [out4, out2, out1]


def _check_overrides(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    valid = ARCHITECTURES[name]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise HarnessError(f"model {name}: unknown override(s) {unknown}; valid: {sorted(valid)}")
    checked: dict[str, Any] = {}
    for key, value in overrides.items():
        if key == "dropout":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise HarnessError(f"model {name}: dropout must be a number in [0, 1), got {value!r}")
            checked[key] = float(value)
        else:
            minimum = 4 if key == "base_channels" else 1  # SCM splits the width into quarters
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise HarnessError(f"model {name}: {key} must be an integer >= {minimum}, got {value!r}")
            checked[key] = value
    return checked


def create_model(name: str, **overrides: Any) -> MIMOUNet:
    """Build a registered architecture ("mimo-unet", "mimo-unet-plus") with optional overrides
    (`num_res`, `base_channels`, `dropout`); `model.arch` records how to rebuild it."""
    if name not in ARCHITECTURES:
        raise HarnessError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    checked = _check_overrides(name, overrides)
    model = MIMOUNet(**{**ARCHITECTURES[name], **checked})
    model.arch = {"name": name, "overrides": checked}
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / DeepSpeed (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
