"""Precision modes: the DeepSpeed config bits and the dtype the model's inputs must have.

bf16/fp16 run the model in half precision under DeepSpeed (fp32 master weights in the
optimizer); the loss, FFT included, is always computed in fp32 by harness.losses.
fp16 uses DeepSpeed's dynamic loss scaling (loss_scale 0).
"""

from __future__ import annotations

from typing import Literal, get_args

from harness.errors import HarnessError

Precision = Literal["bf16", "fp16", "fp32"]  # the recipe's train.precision, --precision of the CLIs
PRECISIONS: tuple[str, ...] = get_args(Precision)


def deepspeed_precision(precision: str) -> dict:
    """The `bf16` / `fp16` sections of a DeepSpeed config for `precision`."""
    return {
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
    }


def dtype_of(precision: str):
    """The torch dtype of a precision name (the only such map); HarnessError for another name."""
    import torch

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if precision not in dtypes:
        raise HarnessError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    return dtypes[precision]
