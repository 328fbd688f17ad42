"""Inference and evaluation shared by `mimo deblur`, `mimo eval`, the trainer's validation and serving.

- `deblur` runs a MIMO-UNet on any image size: pads to a multiple of 4 and crops back (the
  reference code crashes instead), optionally in overlapping tiles blended with a raised-cosine
  window (images too large for memory), optionally with a geometric self-ensemble: `rot4`
  (MIMO-UNet+ -> MIMO-UNet++ as published: 0/90/180/270 degree rotations, no flips, averaged,
  in two batched forwards) or `d8` (the 8 flips x rotations, one forward each), under bf16/fp16
  autocast on request. Output: fp32 in [0, 1] on the model's device.
- `evaluate` scores restored and blurred frames against sharp ones (PSNR/SSIM as in
  harness.metrics: RGB, data range 1, no border crop), overall, per scene and per image, on the
  model's device, batching equal-size frames on request, and times the restoration.
- `folder_pairs` finds blur/sharp pairs in a GoPro-layout tree or a plain blur/ + sharp/ pair.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import HarnessError
from harness.files import atomic_write, read_image
from harness.metrics import psnr, ssim
from harness.precision import dtype_of

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm"})
METRICS = ("psnr", "ssim", "blurred_psnr", "blurred_ssim")


# ---------------------------------------------------------------- padding


def pad_to_multiple(x: torch.Tensor, multiple: int = 4) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad H and W (bottom/right) up to a multiple; returns (padded, (h, w)) for `crop_to`.

    Reflect padding keeps image statistics at the border; it needs the image to be larger than
    the pad, so tiny images fall back to replicate.
    """
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return x, (h, w)
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode), (h, w)


def crop_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Undo `pad_to_multiple`: keep the top-left (h, w)."""
    h, w = size
    return x[..., :h, :w]


# ---------------------------------------------------------------- forward, tiles, ensemble


def resolve_device(choice: str | None, what: str = "device") -> torch.device:
    """"auto"/None (cuda when there is one), "cpu", "cuda" or "cuda:N" -> a device; one
    HarnessError naming `what` when CUDA is asked for and absent, or the name is not a device."""
    if choice in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(choice)
    except (RuntimeError, TypeError):
        raise HarnessError(f"{what} {choice}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise HarnessError(f"{what} {choice}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HarnessError(f"{what} {choice}: no CUDA device is available (use cpu or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise HarnessError(f"{what} {choice}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _autocast(device: torch.device, precision: str):
    dtype = dtype_of(precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Full-scale output for any H/W: pad to /4, run, keep the finest scale, crop back."""
    xp, size = pad_to_multiple(x, 4)
    out = model(xp)
    if isinstance(out, (list, tuple)):
        out = out[-1]  # MIMO-UNet returns coarse first: [1/4, 1/2, full]
    return crop_to(out.float(), size)


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile - overlap))
    return starts + [length - tile]  # the last tile is flush with the border


def _blend_window(length: int, overlap: int, first: bool, last: bool, device: torch.device) -> torch.Tensor:
    """1-D weights: 1 inside, raised-cosine ramps (never 0) on sides shared with another tile."""
    win = torch.ones(length, device=device)
    ramp_len = min(overlap, length // 2)
    if ramp_len > 0:
        ramp = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(ramp_len, device=device) + 0.5) / ramp_len)
        if not first:
            win[:ramp_len] = ramp
        if not last:
            win[length - ramp_len :] = ramp.flip(0)
    return win


def _tiled(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int
) -> torch.Tensor:
    """Run `fn` on overlapping tiles and blend: memory bounded by the tile, not the image.

    The image is padded to /4 once, as untiled inference does, and tiles are /4 sized: tiles
    at the image border then see the same padding as the whole image would, and only the seams
    (down-weighted by the window) differ from untiled output.
    """
    x, size = pad_to_multiple(x, 4)
    tile -= tile % 4
    h, w = x.shape[-2:]
    if h <= tile and w <= tile:
        return crop_to(fn(x), size)
    out = weight = None
    th, tw = min(tile, h), min(tile, w)
    wins_y = {
        y0: _blend_window(th, overlap, y0 == 0, y0 + th == h, x.device)
        for y0 in _tile_starts(h, tile, overlap)
    }
    wins_x = {
        x0: _blend_window(tw, overlap, x0 == 0, x0 + tw == w, x.device)
        for x0 in _tile_starts(w, tile, overlap)
    }
    for y0, wy in wins_y.items():
        for x0, wx in wins_x.items():
            y = fn(x[..., y0 : y0 + th, x0 : x0 + tw])
            if out is None:
                out = y.new_zeros(*y.shape[:-2], h, w)
                weight = y.new_zeros(h, w)
            win = wy[:, None] * wx[None, :]
            out[..., y0 : y0 + th, x0 : x0 + tw] += y * win
            weight[y0 : y0 + th, x0 : x0 + tw] += win
    return crop_to(out / weight, size)


ENSEMBLES = ("rot4", "d8")


def ensemble_mode(value: bool | str | None) -> str | None:
    """The self-ensemble a setting names: None (plain forward), "rot4" (True: MIMO-UNet++ as its
    authors ran it) or "d8"."""
    if value is None or value is False or value in ("", "none"):
        return None
    if value is True:
        return "rot4"
    if value not in ENSEMBLES:
        raise HarnessError(f"ensemble: expected true/false, rot4 or d8, got {value!r}")
    return value


def rot4_ensemble(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Average of `fn` over the input rotated by 0, 90, 180 and 270 degrees, each rotated back.

    Two batched calls: 0 and 180 degrees share the input's shape, 90 and 270 the transposed one.
    """
    n, dims = x.shape[0], (-2, -1)
    upright = fn(torch.cat([x, torch.rot90(x, 2, dims)])).float()
    turned = fn(torch.cat([torch.rot90(x, 1, dims), torch.rot90(x, 3, dims)])).float()
    total = upright[:n] + torch.rot90(upright[n:], -2, dims)
    total = total + torch.rot90(turned[:n], -1, dims) + torch.rot90(turned[n:], -3, dims)
    return total / 4


def d8_ensemble(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Average of `fn` over the 8 dihedral transforms (4 rotations x optional flip), each undone."""
    total = None
    for k in range(4):
        for flip in (False, True):
            t = torch.rot90(x, k, dims=(-2, -1))
            if flip:
                t = t.flip(-1)
            y = fn(t)
            if flip:
                y = y.flip(-1)
            y = torch.rot90(y, -k, dims=(-2, -1)).float()
            total = y if total is None else total + y
    return total / 8


_ENSEMBLE_FNS = {"rot4": rot4_ensemble, "d8": d8_ensemble}


def deblur(
    model: nn.Module,
    x: torch.Tensor,
    *,
    tile: int | None = None,
    overlap: int = 32,
    ensemble: bool | str | None = False,
    precision: str = "fp32",
) -> torch.Tensor:
    """Restore NCHW (or CHW) images in [0,1] of any size; returns fp32 in [0,1] on the model's device.

    `ensemble`: False/None, True or "rot4" (4 rotations, 2 batched forwards), "d8" (8 forwards).
    The model runs in eval mode under `torch.inference_mode`; its previous train/eval mode is
    restored afterwards so the trainer can call this mid-training.
    """
    squeeze = x.dim() == 3
    xb = x.unsqueeze(0) if squeeze else x
    if xb.dim() != 4 or xb.shape[1] != 3:
        raise HarnessError(
            f"deblur: expected RGB images NCHW or CHW with 3 channels, got shape {tuple(x.shape)}"
        )
    if tile is not None and not (8 <= tile and 0 <= overlap < tile - tile % 4):
        raise HarnessError(f"tile/overlap: expected tile >= 8 and 0 <= overlap < tile, got {tile}/{overlap}")
    device = _device_of(model)
    xb = xb.to(device=device, dtype=torch.float32, non_blocking=True)
    _autocast(device, precision)  # validate before any work
    mode = ensemble_mode(ensemble)

    def run(t: torch.Tensor) -> torch.Tensor:
        with _autocast(device, precision):
            return _forward(model, t)

    step = run if tile is None else (lambda t: _tiled(run, t, tile, overlap))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            y = (_ENSEMBLE_FNS[mode](step, xb) if mode else step(xb)).float().clamp_(0.0, 1.0)
    finally:
        model.train(was_training)
    y = y.clone()  # a normal tensor: callers may modify it in place or use it with autograd
    return y[0] if squeeze else y


# ---------------------------------------------------------------- pairs


class Pair(NamedTuple):
    """One evaluation sample: CHW float tensors in [0,1]; `key` is unique, `scene` groups keys."""

    key: str
    scene: str
    blur: torch.Tensor
    sharp: torch.Tensor


@dataclasses.dataclass(frozen=True)
class FramePair:
    """A blur/sharp pair on disk; calling it loads the images (so listings stay cheap)."""

    key: str
    scene: str
    blur_path: Path
    sharp_path: Path

    def __call__(self) -> Pair:
        blur, sharp = read_image(self.blur_path), read_image(self.sharp_path)
        if blur.shape != sharp.shape:
            raise HarnessError(
                f"{self.blur_path}: size {blur.shape[2]}x{blur.shape[1]} differs from its sharp twin "
                f"{self.sharp_path} ({sharp.shape[2]}x{sharp.shape[1]})"
            )
        return Pair(self.key, self.scene, blur, sharp)


def list_images(directory: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Image files (by suffix) in `directory`, sorted; hidden files (e.g. temp files) skipped."""
    directory = Path(directory)
    found = directory.rglob("*") if recursive else directory.iterdir()
    return sorted(
        p
        for p in found
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def folder_pairs(
    root: str | os.PathLike, *, blur_dir: str = "blur", sharp_dir: str = "sharp"
) -> list[FramePair]:
    """Blur/sharp pairs under `root`: `<scene>/blur/*.png` + `<scene>/sharp/*.png` (GoPro), or
    `root/blur` + `root/sharp` (one scene named after `root`). Images load lazily."""
    root = Path(root)
    if not root.is_dir():
        raise HarnessError(f"{root}: no such directory")
    if (root / blur_dir).is_dir():
        scenes = [(root.name or str(root), root, "")]
    else:
        scenes = [
            (d.name, d, f"{d.name}/")
            for d in sorted(root.iterdir())
            if d.is_dir() and not d.name.startswith(".") and (d / blur_dir).is_dir()
        ]
    if not scenes:
        raise HarnessError(
            f"{root}: no {blur_dir}/ folder (expected <scene>/{blur_dir}/*.png with <scene>/{sharp_dir}/*.png, "
            f"or {blur_dir}/ and {sharp_dir}/ directly under it; HIDE and RealBlur roots: see --layout)"
        )
    pairs: list[FramePair] = []
    for scene, directory, prefix in scenes:
        pairs += _scene_pairs(scene, directory, prefix, blur_dir, sharp_dir)
    if not pairs:
        raise HarnessError(f"{root}: no images in any {blur_dir}/ folder")
    return pairs


def _scene_pairs(scene: str, directory: Path, prefix: str, blur_dir: str, sharp_dir: str) -> list[FramePair]:
    if not (directory / sharp_dir).is_dir():
        raise HarnessError(f"{directory / blur_dir}: has no matching {directory / sharp_dir} folder")
    pairs = []
    for blur in list_images(directory / blur_dir):
        sharp = directory / sharp_dir / blur.name
        if not sharp.is_file():
            raise HarnessError(f"{blur}: no sharp twin (expected {sharp})")
        pairs.append(FramePair(f"{prefix}{blur.name}", scene, blur, sharp))
    return pairs


LAYOUTS = ("auto", "folders", "hide", "realblur-j", "realblur-r")


def dataset_pairs(
    root: str | os.PathLike,
    *,
    layout: str = "auto",
    split: str = "test",
    list_file: str | os.PathLike | None = None,
    blur_dir: str = "blur",
) -> list[FramePair]:
    """Pairs of a test-set tree for `mimo eval --data`: `folders` is `folder_pairs` (GoPro layout
    or blur/ + sharp/), `hide` and `realblur-j/-r` read those datasets as `mimo pack` does (same
    keys and scenes, sorted by key like packed shards); `auto` tells them apart by their layout.
    `list_file` is a RealBlur-format list (gt path first) with paths relative to `root`."""
    from harness.data import sources

    if layout not in LAYOUTS:
        raise HarnessError(f"--layout {layout}: expected one of {', '.join(LAYOUTS)}")
    if list_file is not None and layout not in ("auto", "realblur-j", "realblur-r"):
        raise HarnessError(f"--list {list_file}: a RealBlur list; --layout {layout} takes none")
    if layout == "auto":
        layout = detect_layout(root, split=split, list_file=list_file, blur_dir=blur_dir)
    if layout == "folders":
        return folder_pairs(root, blur_dir=blur_dir)
    if layout == "hide":
        found, unmatched = sources.list_hide(Path(root), split)
    else:
        listed = Path(list_file) if list_file else sources.realblur_list(Path(root), layout, split)
        found, unmatched = sources.list_realblur(Path(root), listed)
    if unmatched:
        more = f" (and {len(unmatched) - 1} more)" if len(unmatched) > 1 else ""
        raise HarnessError(f"{unmatched[0]['file']}: {unmatched[0]['reason']}{more}")
    sources.check_unique_keys(found)
    return [FramePair(p.key, p.scene, p.blur, p.sharp) for p in sorted(found, key=lambda p: p.key)]


def detect_layout(
    root: str | os.PathLike, *, split: str = "test", list_file: str | os.PathLike | None = None,
    blur_dir: str = "blur",
) -> str:
    """Which layout `root` has: folders (a blur/ folder at the top or one level down), hide (GT/
    beside train/ or test/), realblur-j/-r (its list file for `split` at the top). A tree that is
    none of them gets `folders`, whose error names what was expected."""
    root = Path(root)
    if list_file is not None:
        return "realblur-r" if "_R_" in Path(list_file).name else "realblur-j"
    if not root.is_dir() or (root / blur_dir).is_dir() or any((d / blur_dir).is_dir() for d in _subdirs(root)):
        return "folders"
    if (root / "GT").is_dir() and ((root / "test").is_dir() or (root / "train").is_dir()):
        return "hide"
    from harness.data import sources

    found = [v for v in sources.REALBLUR_VARIANTS if split in ("train", "test")
             and sources.realblur_list(root, v, split).is_file()]
    if len(found) > 1:
        raise HarnessError(f"{root}: has both RealBlur-J and -R lists for '{split}': pass --layout realblur-j "
                           "or --layout realblur-r")
    return found[0] if found else "folders"


def _subdirs(root: Path) -> list[Path]:
    return [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]


# ---------------------------------------------------------------- evaluation


@dataclasses.dataclass
class EvalResult:
    """Means over images (not over scenes), per-scene means and one row per image, with the
    settings that produced them (ensemble None/"rot4"/"d8", precision, device, the scoring protocol
    of harness.protocols) and the restoration time per image (model forwards, ensemble and padding;
    data loading and scoring excluded)."""

    psnr: float
    ssim: float
    blurred_psnr: float
    blurred_ssim: float
    count: int
    per_scene: dict[str, dict[str, float]]
    rows: list[dict[str, Any]]
    ensemble: str | None = None
    precision: str = "fp32"
    device: str = "cpu"
    seconds_per_image: float = 0.0
    protocol: str = "default"  # harness.protocols: how PSNR/SSIM were computed
    crop_border: int = 0

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]], **settings: Any) -> EvalResult:
        scenes: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            scenes.setdefault(row["scene"], []).append(row)
        per_scene = {scene: {**_means(rs), "count": len(rs)} for scene, rs in scenes.items()}
        return cls(**_means(rows), count=len(rows), per_scene=per_scene, rows=rows, **settings)

    def settings(self) -> dict[str, Any]:
        """How the numbers were made: ensemble ("none"/"rot4"/"d8"), precision, device, s/image, and
        the scoring protocol ("default", "realblur", "basicsr-y", "basicsr-y:cropN")."""
        from harness import protocols

        return {"ensemble": self.ensemble or "none", "precision": self.precision, "device": self.device,
                "seconds_per_image": self.seconds_per_image,
                "protocol": protocols.label(self.protocol, self.crop_border)}

    def to_dict(self) -> dict[str, Any]:
        """Summary, settings and per-scene means (the per-image rows go to `write_csv`)."""
        return {**{m: getattr(self, m) for m in METRICS}, "count": self.count, **self.settings(),
                "per_scene": self.per_scene}

    def write_csv(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        tags = {"ensemble": self.ensemble or "none", "precision": self.precision,
                "protocol": self.settings()["protocol"]}
        with atomic_write(path) as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["key", "scene", *METRICS, *tags])
            writer.writeheader()
            writer.writerows({**row, **tags} for row in self.rows)
        return path

    def format(self) -> str:
        """A small text table: overall, then each scene, under a line naming the settings."""
        from harness import protocols

        s = self.settings()
        lines = [f"ensemble {s['ensemble']}, {self.precision} on {self.device}, "
                 f"{self.seconds_per_image:.3f} s/image, protocol {s['protocol']} "
                 f"({protocols.describe(self.protocol, self.crop_border)})",
                 f"{'':<24} {'count':>6} {'PSNR':>8} {'SSIM':>7} {'blur PSNR':>10} {'blur SSIM':>10}"]
        entries = [("all", self.to_dict())] + sorted(self.per_scene.items())
        for name, m in entries:
            lines.append(
                f"{name[:24]:<24} {m['count']:>6} {m['psnr']:>8.3f} {m['ssim']:>7.4f} "
                f"{m['blurred_psnr']:>10.3f} {m['blurred_ssim']:>10.4f}"
            )
        return "\n".join(lines)


def _means(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {m: sum(r[m] for r in rows) / len(rows) for m in METRICS}


def evaluate(
    model: nn.Module,
    pairs: Iterable[Pair | Callable[[], Pair]],
    *,
    ensemble: bool | str | None = False,
    precision: str = "fp32",
    tile: int | None = None,
    overlap: int = 32,
    batch: int = 1,
    progress: bool = False,
    protocol: str = "default",
    crop_border: int = 0,
) -> EvalResult:
    """Deblur every pair's blurred frame (full frame, clamped) and score it and the blurred
    frame against the sharp one under `protocol` (harness.protocols; `crop_border` for
    basicsr-y), on the model's device (RealBlur's alignment on the CPU). `pairs` holds `Pair`s
    or zero-argument loaders returning one; up to `batch` consecutive frames of one size share
    a forward."""
    from tqdm import tqdm

    from harness import protocols

    if batch < 1:
        raise HarnessError(f"evaluate: batch: expected a positive number, got {batch}")
    protocols.check(protocol, crop_border)
    mode, device = ensemble_mode(ensemble), _device_of(model)
    loaded = (item() if callable(item) else item for item in tqdm(pairs, desc="eval", unit="img",
                                                                  disable=not progress))
    rows: list[dict[str, Any]] = []
    seconds = 0.0
    for group in _same_size_groups(loaded, batch):
        checked = [_check_pair(pair) for pair in group]
        # Pinned host memory lets the copies overlap with the previous group's work on CUDA.
        blur, sharp = (_to_device(torch.stack(ts), device) for ts in zip(*checked))
        t0 = time.perf_counter()
        restored = deblur(model, blur, tile=tile, overlap=overlap, ensemble=mode, precision=precision)
        _synchronize(device)
        seconds += time.perf_counter() - t0
        keys = [pair.key for pair in group]
        scores = _score_group(restored, blur, sharp, protocol, crop_border, keys)
        for pair, values in zip(group, scores.T.tolist()):
            rows.append({"key": pair.key, "scene": pair.scene, **dict(zip(METRICS, values))})
    if not rows:
        raise HarnessError("evaluate: no image pairs to evaluate")
    return EvalResult.from_rows(rows, ensemble=mode, precision=precision, device=str(device),
                                seconds_per_image=seconds / len(rows), protocol=protocol, crop_border=crop_border)


def _score_group(restored: torch.Tensor, blur: torch.Tensor, sharp: torch.Tensor, protocol: str,
                 crop_border: int, keys: list[str]) -> torch.Tensor:
    """(4, N): PSNR, SSIM of the restored and of the blurred frames, in METRICS order."""
    if protocol == "default":
        # Scored where the images are (float64, as harness.metrics does); one host sync per group.
        return torch.stack([psnr(restored, sharp), ssim(restored, sharp), psnr(blur, sharp), ssim(blur, sharp)])
    from harness import protocols

    values = [*protocols.score(restored, sharp, protocol, crop_border=crop_border, keys=keys),
              *protocols.score(blur, sharp, protocol, crop_border=crop_border, baseline=True)]
    return torch.stack([v.to(values[0].device) for v in values])


def _same_size_groups(pairs: Iterable[Pair], size: int):
    """Consecutive pairs in groups of at most `size` whose frames share one shape."""
    group: list[Pair] = []
    for pair in pairs:
        if group and (len(group) == size or pair.blur.shape != group[0].blur.shape):
            yield group
            group = []
        group.append(pair)
    if group:
        yield group


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall time measures it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_pair(pair: Pair) -> tuple[torch.Tensor, torch.Tensor]:
    blur, sharp = pair.blur.detach().float().cpu(), pair.sharp.detach().float().cpu()
    if blur.dim() != 3 or blur.shape[0] != 3 or blur.shape != sharp.shape:
        raise HarnessError(
            f"{pair.key}: expected blur and sharp CHW RGB images of one size, "
            f"got {tuple(blur.shape)} and {tuple(sharp.shape)}"
        )
    return blur, sharp
