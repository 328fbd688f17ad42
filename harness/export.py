"""Model exports for the field: the public .pkl, safetensors + config.json, ONNX and torch.export.

Formats (`mimo export --format`, default from --out's suffix):
  pkl           `{"model": fp32 state_dict, "model_name", "model_overrides", ...}` (torch.save)
  safetensors   Hugging Face layout: DIR/model.safetensors + DIR/config.json, or
                NAME.safetensors + NAME.config.json; loaded back by `harness.models.read_checkpoint`
  onnx          one self-contained graph (no external data file)
  torch-export  an ExportedProgram archive (.pt2, `torch.export.load`)

The two graph formats take the padded input and return the full-scale image: NCHW RGB float32
in [0, 1], batch/height/width dynamic, H and W multiples of 4 and at least 8 -- the caller pads
(bottom/right, reflect; `harness.infer.pad_to_multiple`) and crops back (`crop_to`). The output is
the last of MIMO-UNet's three scales, clamped to [0, 1], as `mimo deblur` computes it.

torch is imported inside the functions so `mimo --help` stays fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import HarnessError
from harness.files import atomic_write

if TYPE_CHECKING:
    from torch import nn

FORMATS = ("pkl", "safetensors", "onnx", "torch-export")
_SUFFIX_FORMATS = {".safetensors": "safetensors", ".onnx": "onnx", ".pt2": "torch-export"}
_FORMAT_SUFFIXES = {"pkl": ".pkl", **{fmt: suffix for suffix, fmt in _SUFFIX_FORMATS.items()}}
VERIFY_TOLERANCE = 1e-4  # fp32 max abs difference; graph rewrites reorder float sums
MULTIPLE = 4  # the encoder halves H and W twice
MIN_SIDE = 8  # torch.export specialises a 1-pixel quarter-scale image, so the graphs start at 8
# An example batch of 1 would be specialised (0/1 specialisation) and the batch axis lost.
_EXAMPLE_SHAPE = (2, 3, 32, 32)
INPUT_CONVENTION = {
    "layout": "NCHW",
    "channels": "RGB",
    "dtype": "float32",
    "range": [0.0, 1.0],
    "multiple_of": MULTIPLE,
    "padding": "pad H and W bottom/right to multiples of 4 with reflect padding (replicate when the "
    "image is smaller than the pad), crop the output back",
}
OUTPUT_CONVENTION = {
    "scales": ["1/4", "1/2", "1"],
    "use": "the last output (full scale), clamped to [0, 1]",
}


def infer_format(out: str | os.PathLike) -> str:
    """.safetensors / .onnx / .pt2 by suffix; an existing directory or a trailing slash ->
    safetensors (the Hugging Face directory layout); anything else -> pkl."""
    text = os.fspath(out)
    path = Path(text)
    if path.suffix in _SUFFIX_FORMATS:
        return _SUFFIX_FORMATS[path.suffix]
    if path.is_dir() or text.endswith(("/", os.sep)):
        return "safetensors"
    return "pkl"


@dataclasses.dataclass(frozen=True)
class Exported:
    """What `export` wrote (the main file first) and, with verify, onnxruntime's max abs error."""

    files: list[Path]
    max_abs_diff: float | None = None


def export(out: str | os.PathLike, fmt: str | None = None, *, run_dir: str | os.PathLike | None = None,
           weights: str | os.PathLike | None = None, model_name: str | None = None, ema: bool = False,
           tag: str = "latest", opset: int | None = None, verify: bool = False) -> Exported:
    """Export a run's checkpoint (`run_dir`, `ema`, `tag`) or a weights file/directory (`weights`,
    `model_name` for files that do not record it) to `out` as `fmt` (default: `infer_format(out)`).

    `verify` (onnx): run the graph in onnxruntime; HarnessError when it differs from PyTorch by
    more than VERIFY_TOLERANCE.
    """
    if (run_dir is None) == (weights is None):
        raise HarnessError("export: give either a run directory or --weights")
    fmt = fmt or infer_format(out)
    if fmt not in FORMATS:
        raise HarnessError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt != "onnx" and (opset is not None or verify):
        raise HarnessError(f"--opset/--verify apply to --format onnx only, not {fmt}")
    if fmt != "safetensors" and Path(out).is_dir():
        raise HarnessError(f"{out}: is a directory; --format {fmt} writes one file (name it, e.g. {Path(out) / 'model'}"
                           f"{_FORMAT_SUFFIXES[fmt]})")
    if run_dir is not None and fmt == "pkl":
        from harness import checkpoint

        return Exported([checkpoint.export(run_dir, out, ema=ema, tag=tag)])  # the EMA file is copied as is
    if run_dir is not None:
        model, source = model_from_run(run_dir, ema=ema, tag=tag)
    else:
        model, source = model_from_weights(weights, model_name)
    files = export_model(model, out, fmt, opset=opset, source=source)
    if not verify:
        return Exported(files)
    diff = verify_onnx(files[0], model)
    if diff > VERIFY_TOLERANCE:
        raise HarnessError(f"{files[0]}: onnxruntime differs from PyTorch by {diff:.2e} (> {VERIFY_TOLERANCE:g})")
    return Exported(files, diff)


# ---------------------------------------------------------------- sources


def model_from_run(run_dir: str | os.PathLike, *, ema: bool = False, tag: str = "latest") -> tuple[nn.Module, dict]:
    """(model in eval mode, provenance for config.json) from a run's checkpoint.

    Goes through `harness.checkpoint.export` (a temporary .pkl), so every format holds exactly the
    weights the public checkpoint would.
    """
    from harness import checkpoint
    from harness.models import model_from_checkpoint

    ckpt_dir = checkpoint.checkpoint_dir(run_dir)
    if not ckpt_dir.is_dir():
        raise HarnessError(f"{run_dir}: not a run directory (no checkpoints/)")
    name = checkpoint.resolve_tag(ckpt_dir, tag)  # once: `latest` may move while we export
    with tempfile.TemporaryDirectory(prefix="mimo-export-") as tmp:
        weights = checkpoint.export(run_dir, Path(tmp) / "weights.pkl", ema=ema, tag=name)
        model = model_from_checkpoint(weights)
    source = {"run_dir": str(run_dir), "tag": name, "step": checkpoint.marker(ckpt_dir / name)["step"], "ema": ema}
    return model, source


def model_from_weights(path: str | os.PathLike, name: str | None = None) -> tuple[nn.Module, dict]:
    """(model in eval mode, provenance) from an exported weights file or safetensors directory."""
    from harness.models import model_from_checkpoint

    return model_from_checkpoint(Path(path), name), {"weights": str(path)}


# ---------------------------------------------------------------- writers


def export_model(model: nn.Module, out: str | os.PathLike, fmt: str, *, opset: int | None = None,
                 source: dict | None = None) -> list[Path]:
    """Write `model` as `fmt` to `out` -> the files written (the main one first)."""
    if fmt not in FORMATS:
        raise HarnessError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if opset is not None and fmt != "onnx":
        raise HarnessError(f"--opset applies to --format onnx only, not {fmt}")
    out = Path(out)
    if fmt == "pkl":
        from harness.models import save_weights

        return [save_weights(model, out, **({"step": source["step"]} if source and "step" in source else {}))]
    if fmt == "safetensors":
        return list(save_safetensors(model, out, source=source))
    if fmt == "onnx":
        return [export_onnx(model, out, opset=opset)]
    return [export_torch(model, out)]


def safetensors_paths(out: Path) -> tuple[Path, Path]:
    """(weights, config) for --out: NAME.safetensors -> NAME.safetensors + its config (see
    `config_path_for`); anything else is a directory -> DIR/model.safetensors + DIR/config.json."""
    from harness.models.weights import CONFIG_FILE, WEIGHTS_FILE, config_path_for

    if out.suffix == ".safetensors":
        return out, config_path_for(out)
    if out.exists() and not out.is_dir():
        raise HarnessError(f"{out}: exists and is not a directory (safetensors --out: a directory or NAME.safetensors)")
    return out / WEIGHTS_FILE, out / CONFIG_FILE


def save_safetensors(model: nn.Module, out: Path, *, source: dict | None = None) -> tuple[Path, Path]:
    """Weights (fp32) + config.json, each written atomically -> (weights, config)."""
    from safetensors.torch import save_file

    from harness.models.weights import export_state_dict

    weights, config_path = safetensors_paths(out)
    config = model_config(model, weights.name, source)
    # The header repeats the architecture so a renamed lone .safetensors file still rebuilds.
    meta = {"format": "pt", "architecture": config["architecture"], "overrides": json.dumps(config["overrides"])}
    with atomic_write(weights) as tmp:
        save_file(export_state_dict(model), str(tmp), metadata=meta)
    with atomic_write(config_path) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return weights, config_path


def model_config(model: nn.Module, weights_name: str, source: dict | None = None) -> dict[str, Any]:
    """config.json: what `read_checkpoint` needs (architecture, overrides) plus, for the reader,
    the resolved hyperparameters, the size and the input/output convention."""
    from harness import __version__
    from harness.models import ARCHITECTURES, unwrap_model

    bare = unwrap_model(model)
    arch = getattr(bare, "arch", None)
    if not arch:
        raise HarnessError("export: the model does not record its architecture (build it with create_model)")
    config = {
        "architecture": arch["name"],
        "overrides": dict(arch["overrides"]),
        "hyperparameters": {**ARCHITECTURES[arch["name"]], **arch["overrides"]},
        "num_parameters": sum(p.numel() for p in bare.parameters()),
        "weights": weights_name,
        "dtype": "float32",
        "input": INPUT_CONVENTION,
        "output": OUTPUT_CONVENTION,
        "exported_by": f"mimo-harness {__version__}",
    }
    if source:
        config["source"] = source
    return config


def full_scale(model: nn.Module) -> nn.Module:
    """fp32 CPU eval copy of `model` whose forward returns only the clamped full-scale image."""
    import copy

    from torch import nn

    from harness.models import unwrap_model

    class FullScale(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.model = inner

        def forward(self, x):
            return self.model(x)[-1].clamp(0.0, 1.0)

    # A copy: the caller's model keeps its device and dtype.
    return FullScale(copy.deepcopy(unwrap_model(model)).float().cpu().eval()).eval()


def _dynamic_shapes() -> dict:
    from torch.export import Dim

    # H = 4 * height: the multiple-of-4 rule is part of the graph's input spec, not a guard.
    return {"x": {0: Dim("batch", min=1), 2: MULTIPLE * Dim("height", min=MIN_SIDE // MULTIPLE),
                  3: MULTIPLE * Dim("width", min=MIN_SIDE // MULTIPLE)}}


def _example():
    import torch

    return torch.rand(*_EXAMPLE_SHAPE, generator=torch.Generator().manual_seed(0))


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide the exporter's noise that says nothing about this model: a warning per torchvision op
    it cannot register (torchvision is not a dependency) and torch's own deprecation warnings."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def export_onnx(model: nn.Module, out: Path, *, opset: int | None = None) -> Path:
    """ONNX graph `input` (N, 3, H, W) -> `output` (N, 3, H, W), via the dynamo exporter."""
    import torch

    if opset is not None and not 7 <= opset <= 30:
        raise HarnessError(f"--opset: expected an ONNX opset number (18 is torch's default), got {opset}")
    with _quiet_exporter():
        program = torch.onnx.export(
            full_scale(model), (_example(),), None, dynamo=True, input_names=["input"], output_names=["output"],
            dynamic_shapes=_dynamic_shapes(), opset_version=opset, external_data=False, verbose=False,
        )
    written = {op.domain: op.version for op in program.model_proto.opset_import}.get("", None)
    if opset is not None and written != opset:  # the exporter keeps 18 when it cannot convert
        raise HarnessError(f"--opset {opset}: the graph could not be converted to that opset (it has {written})")
    with atomic_write(out) as tmp:
        program.save(str(tmp), external_data=False)  # one file: 64 MB for MIMO-UNet+, far below protobuf's 2 GB
    return out


def export_torch(model: nn.Module, out: Path) -> Path:
    """torch.export ExportedProgram with the same dynamic input as the ONNX graph (.pt2)."""
    import torch

    program = torch.export.export(full_scale(model), (_example(),), dynamic_shapes=_dynamic_shapes())
    buf = io.BytesIO()  # torch.export.save insists on a .pt2 name; atomic_write's temp file has none
    torch.export.save(program, buf)
    with atomic_write(out) as tmp:
        tmp.write_bytes(buf.getvalue())
    return out


# ---------------------------------------------------------------- checks


def verify_onnx(path: str | os.PathLike, model: nn.Module, shapes: list[tuple[int, int, int, int]] | None = None) -> float:
    """Max abs difference between the ONNX graph in onnxruntime (CPU) and `full_scale(model)` over
    random inputs of `shapes` (default: two batch sizes, two sizes)."""
    import numpy as np
    import torch

    try:
        import onnxruntime as ort
    except ImportError:
        raise HarnessError("--verify needs onnxruntime (pip install onnxruntime)") from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = full_scale(model)
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for shape in shapes or [(1, 3, 40, 56), (2, 3, 32, 24)]:
        x = torch.rand(*shape, generator=generator)
        with torch.inference_mode():
            expected = reference(x).numpy()
        got = session.run(["output"], {"input": x.numpy()})[0]
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst
