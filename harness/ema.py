"""Exponential moving average of the weights, kept in fp32 beside the (possibly bf16) model."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn


class EMA:
    """`ema = decay * ema + (1 - decay) * weights` after every applied optimizer step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        # Copied before DeepSpeed casts the model, so the average starts from fp32 weights.
        self.model = copy.deepcopy(model).float().eval()
        self.model.requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = model.state_dict()
        for name, avg in self.model.state_dict().items():
            value = current[name]
            if avg.is_floating_point():
                avg.lerp_(value.to(avg.dtype), 1.0 - self.decay)
            else:
                avg.copy_(value)

    def save(self, path: str | os.PathLike) -> Path:
        """The averaged weights as a public weights file (`mimo export --ema` copies it as is)."""
        from harness.models import save_weights

        return save_weights(self.model, path)

    def load(self, path: str | os.PathLike) -> None:
        """Restore the average from `path` when the checkpoint has one (else keep the current)."""
        from harness.models import load_weights

        if Path(path).is_file():
            load_weights(self.model, path)
