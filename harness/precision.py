"""Precision modes: the DeepSpeed config bits and the dtype the model's inputs must have.

bf16/fp16 run the model in half precision under DeepSpeed (fp32 master weights in the
optimizer); the loss, FFT included, is always computed in fp32 by harness.losses.
fp16 uses DeepSpeed's dynamic loss scaling (loss_scale 0).
"""

from __future__ import annotations

PRECISIONS = ("bf16", "fp16", "fp32")


def deepspeed_precision(precision: str) -> dict:
    """The `bf16` / `fp16` sections of a DeepSpeed config for `precision`."""
    return {
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
    }


def input_dtype(precision: str):
    """dtype of the tensors fed to the DeepSpeed-wrapped model."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
