"""Model weight files: the public `{"model": state_dict, ...}` format, read safely and strictly.

A file written by `save_weights` also records the architecture (`model_name`,
`model_overrides`), so `model_from_checkpoint` can rebuild the model without being told.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.errors import HarnessError
from harness.files import atomic_write
from harness.models.mimo_unet import MODEL_NAMES, create_model, unwrap_model

RESERVED_KEYS = ("model", "model_name", "model_overrides")
# Wrappers that prefix every key: DistributedDataParallel/DeepSpeed ("module.") and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 5  # keys listed per kind of mismatch in an error message


def _strip_prefixes(sd: dict[str, Any]) -> dict[str, Any]:
    for prefix in _WRAPPER_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _as_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    sd = obj.get("model") if isinstance(obj, dict) and "model" in obj else obj
    if not isinstance(sd, dict) or not sd:
        raise HarnessError(
            f"{path}: not a model checkpoint (expected {{'model': state_dict, ...}} or a state_dict)"
        )
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise HarnessError(
            f"{path}: not a model checkpoint: {len(bad)} state-dict entries are not tensors (e.g. {bad[0]!r})"
        )
    return _strip_prefixes(sd)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a weights file on CPU (weights_only) -> `{"model": sd, "model_name", "model_overrides"}`."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"{path}: no such weights file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError) as exc:
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else exc.__class__.__name__
        raise HarnessError(f"{path}: not a readable PyTorch weights file ({reason})") from None
    sd = _as_state_dict(obj, path)
    name = obj.get("model_name") if isinstance(obj, dict) else None
    overrides = obj.get("model_overrides") if isinstance(obj, dict) else None
    return {
        "model": sd,
        "model_name": name if isinstance(name, str) else None,
        "model_overrides": dict(overrides) if isinstance(overrides, dict) else {},
    }


def _mismatch_message(model: nn.Module, sd: dict[str, torch.Tensor], path: Path) -> str | None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if not (missing or unexpected or shapes):
        return None
    parts = [
        f"{len(items)} {label} ({', '.join(items[:_SHOW])}{', ...' if len(items) > _SHOW else ''})"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch(es)", shapes))
        if items
    ]
    arch = getattr(model, "arch", None)
    target = f"model {arch['name']} {arch['overrides'] or ''}".rstrip() if arch else "the model"
    return f"{path}: weights do not fit {target}: " + "; ".join(parts) + " (wrong --model or overrides?)"


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load `{"model": sd, ...}` or a bare state_dict into `model`, strictly; returns `model`."""
    path = Path(path)
    return _load_state(model, read_checkpoint(path)["model"], path)


def _load_state(model: nn.Module, sd: dict[str, torch.Tensor], path: Path) -> nn.Module:
    message = _mismatch_message(model, sd, path)
    if message:
        raise HarnessError(message)
    model.load_state_dict(sd, strict=True)
    return model


def model_from_checkpoint(path: str | os.PathLike, name: str | None = None, **overrides: Any) -> nn.Module:
    """Build the architecture recorded in the checkpoint (or `name`) and load its weights; eval mode.

    Overrides given here win over the recorded ones; when `name` differs from the recorded
    name the recorded overrides are not used.
    """
    path = Path(path)
    ckpt = read_checkpoint(path)
    recorded = ckpt["model_name"]
    arch_name = name or recorded
    if arch_name is None:
        raise HarnessError(
            f"{path}: the file does not record its architecture; name the model (one of {', '.join(MODEL_NAMES)})"
        )
    base = ckpt["model_overrides"] if arch_name == recorded else {}
    model = create_model(arch_name, **{**base, **overrides})
    return _load_state(model, ckpt["model"], path).eval()


def save_weights(model: nn.Module, path: str | os.PathLike, **extra: Any) -> Path:
    """Write `{"model": fp32 CPU state_dict, "model_name", "model_overrides", **extra}` atomically.

    `extra` values must be plain data (numbers, strings, lists, dicts, tensors) so the file
    stays loadable with `weights_only=True`.
    """
    clash = sorted(set(extra) & set(RESERVED_KEYS))
    if clash:
        raise HarnessError(f"save_weights: extra keys {clash} are reserved")
    model = unwrap_model(model)
    sd = {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous().clone()
        for k, v in model.state_dict().items()
    }
    arch = getattr(model, "arch", None) or {}
    payload = {
        "model": sd,
        "model_name": arch.get("name"),
        "model_overrides": dict(arch.get("overrides", {})),
        **extra,
    }
    path = Path(path)
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)
    return path
