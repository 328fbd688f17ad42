"""MIMO-UNet family: build by name, load/save weights, count FLOPs (see docs/interfaces.md)."""

from harness.models.flops import count_flops
from harness.models.mimo_unet import ARCHITECTURES, MODEL_NAMES, MIMOUNet, create_model, unwrap_model
from harness.models.weights import load_weights, model_from_checkpoint, read_checkpoint, save_weights

__all__ = [
    "ARCHITECTURES",
    "MODEL_NAMES",
    "MIMOUNet",
    "count_flops",
    "create_model",
    "load_weights",
    "model_from_checkpoint",
    "read_checkpoint",
    "save_weights",
    "unwrap_model",
]
