"""Model weight files, read safely and strictly: the public `{"model": state_dict, ...}` format
(torch.load with weights_only) and safetensors (no pickle at all; `mimo export --format safetensors`).

A file written by `save_weights` also records the architecture (`model_name`,
`model_overrides`), so `model_from_checkpoint` can rebuild the model without being told.
Safetensors exports record it in config.json beside the weights (Hugging Face layout: a directory
with model.safetensors + config.json, or `<stem>.safetensors` + `<stem>.config.json`) and in the
file's header metadata, so a lone .safetensors file still rebuilds.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.errors import HarnessError
from harness.files import atomic_write
from harness.models.mimo_unet import MODEL_NAMES, _check_overrides, create_model, unwrap_model

RESERVED_KEYS = ("model", "model_name", "model_overrides")
# Wrappers that prefix every key: DistributedDataParallel/DeepSpeed ("module.") and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 5  # keys listed per kind of mismatch in an error message
WEIGHTS_FILE = "model.safetensors"  # the Hugging Face names inside an export directory
CONFIG_FILE = "config.json"
_GRAPH_SUFFIXES = {".onnx": "ONNX", ".pt2": "torch.export"}  # `mimo export` graphs hold no state dict


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
    """Load weights on CPU -> `{"model": sd, "model_name", "model_overrides"}`.

    `path`: a PyTorch file (`weights_only=True`), a .safetensors file, or a directory holding
    model.safetensors + config.json.
    """
    path = Path(path)
    if path.is_dir():
        return _read_safetensors_dir(path)
    if not path.is_file():
        raise HarnessError(f"{path}: no such weights file or directory")
    if is_safetensors(path):
        return _read_safetensors(path, config_path_for(path))
    if path.suffix in _GRAPH_SUFFIXES:
        raise HarnessError(f"{path}: a graph export ({_GRAPH_SUFFIXES[path.suffix]}), not a weights file "
                           "(use the .pkl or safetensors export)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError) as exc:
        raise HarnessError(f"{path}: not a readable PyTorch weights file ({_reason(exc)})") from None
    sd = _as_state_dict(obj, path)
    name = obj.get("model_name") if isinstance(obj, dict) else None
    overrides = obj.get("model_overrides") if isinstance(obj, dict) else None
    return {
        "model": sd,
        "model_name": name if isinstance(name, str) else None,
        "model_overrides": dict(overrides) if isinstance(overrides, dict) else {},
    }


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:120] if text else exc.__class__.__name__


# ---------------------------------------------------------------- safetensors


def is_safetensors(path: Path) -> bool:
    """By suffix, or by content (an 8-byte header length, then the JSON header's `{`): a file
    fetched under another name still loads without pickle."""
    if path.suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
            size = os.fstat(fh.fileno()).st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8


def config_path_for(weights: Path) -> Path:
    """config.json beside model.safetensors (Hugging Face); `<stem>.config.json` beside any
    other name, so two exports can share a directory."""
    return weights.with_name(CONFIG_FILE if weights.name == WEIGHTS_FILE else f"{weights.stem}.config.json")


def _read_safetensors_dir(path: Path) -> dict[str, Any]:
    weights, config = path / WEIGHTS_FILE, path / CONFIG_FILE
    if not weights.is_file():
        raise HarnessError(
            f"{path}: no {WEIGHTS_FILE} (expected a directory with {WEIGHTS_FILE} + {CONFIG_FILE}, "
            "as `mimo export --format safetensors` writes)"
        )
    if not config.is_file():
        raise HarnessError(f"{config}: missing (a safetensors export directory records its architecture there)")
    return _read_safetensors(weights, config)


def _read_safetensors(path: Path, config: Path) -> dict[str, Any]:
    """The architecture comes from the config file when there is one, else the header metadata."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise HarnessError(f"{path}: reading safetensors needs the safetensors package") from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            sd = {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise HarnessError(f"{path}: not a readable safetensors file ({_reason(exc)})") from None
    if config.is_file():
        name, overrides = read_config(config)
    else:
        name, overrides = _header_arch(meta)
    return {"model": _as_state_dict(sd, path), "model_name": name, "model_overrides": overrides}


def read_config(path: Path) -> tuple[str, dict[str, Any]]:
    """(architecture, overrides) from an export's config.json; one HarnessError naming the file."""
    try:
        config = json.loads(path.read_text())
    except OSError as exc:
        raise HarnessError(f"{path}: unreadable ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise HarnessError(f"{path}: not valid JSON ({_reason(exc)})") from None
    if not isinstance(config, dict):
        raise HarnessError(f"{path}: expected a JSON object with 'architecture' and 'overrides'")
    name = config.get("architecture")
    if name not in MODEL_NAMES:
        raise HarnessError(f"{path}: 'architecture' must be one of {', '.join(MODEL_NAMES)}, got {name!r}")
    overrides = config.get("overrides", {})
    if not isinstance(overrides, dict):
        raise HarnessError(f"{path}: 'overrides' must be an object (e.g. {{\"num_res\": 20}}), got {overrides!r}")
    try:
        return name, _check_overrides(name, overrides)
    except HarnessError as exc:
        raise HarnessError(f"{path}: {exc}") from None


def _header_arch(meta: dict[str, str]) -> tuple[str | None, dict[str, Any]]:
    """Architecture from the header metadata `mimo export` writes; (None, {}) for other files."""
    name = meta.get("architecture")
    try:
        overrides = json.loads(meta.get("overrides", "{}"))
    except ValueError:
        overrides = None
    if name not in MODEL_NAMES or not isinstance(overrides, dict):
        return None, {}
    return name, overrides


def weights_file(path: Path) -> Path:
    """The file that holds the tensors: model.safetensors inside an export directory."""
    return path / WEIGHTS_FILE if path.is_dir() else path


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
    try:
        model = create_model(arch_name, **{**base, **overrides})
    except HarnessError as exc:  # e.g. an unknown override recorded in config.json: name the file
        raise HarnessError(f"{path}: {exc}") from None
    return _load_state(model, ckpt["model"], weights_file(path)).eval()


def save_weights(model: nn.Module, path: str | os.PathLike, **extra: Any) -> Path:
    """Write `{"model": fp32 CPU state_dict, "model_name", "model_overrides", **extra}` atomically.

    `extra` values must be plain data (numbers, strings, lists, dicts, tensors) so the file
    stays loadable with `weights_only=True`.
    """
    clash = sorted(set(extra) & set(RESERVED_KEYS))
    if clash:
        raise HarnessError(f"save_weights: extra keys {clash} are reserved")
    model = unwrap_model(model)
    arch = getattr(model, "arch", None) or {}
    payload = {
        "model": export_state_dict(model),
        "model_name": arch.get("name"),
        "model_overrides": dict(arch.get("overrides", {})),
        **extra,
    }
    path = Path(path)
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)
    return path


def export_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The (unwrapped) model's state dict as fp32 contiguous CPU copies: what every export writes."""
    return {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous().clone()
        for k, v in unwrap_model(model).state_dict().items()
    }
