"""Synthetic GoPro-style blur: a textured scene moving across K sub-frames, averaged.

GoPro's blurred frames are the mean of 7-13 consecutive 240 fps frames of a hand-held camera;
the sharp frame is the middle one. We do the same with a procedural scene: each sub-frame
samples a large texture canvas through a small camera motion (translation along a direction,
optional rotation and hand shake), the blur is the float mean of the sub-frames quantized
once, and the sharp frame is the middle sub-frame, which sits exactly on the pixel grid.

Layout written by `synthesize`: `<out>/<split>/<scene>/{blur,sharp}/NNNNNN.png`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from harness.errors import HarnessError
from harness.files import write_png

DIRECTIONS = ("horizontal", "random")


@dataclasses.dataclass(frozen=True)
class Motion:
    """Camera motion during one exposure.

    displacement: (min, max) total travel in px from the first to the last sub-frame.
    direction: "horizontal" (fixed) or "random" (uniform angle per frame).
    rotation: max |total rotation| in degrees across the exposure.
    shake: std in px of the per-sub-frame random-walk jitter (hand shake).
    gamma: 1.0 averages the frames as stored (GoPro `blur`); 2.2 averages in linear light
    (GoPro `blur_gamma`).
    """

    subframes: int = 7
    displacement: tuple[float, float] = (4.0, 8.0)
    direction: str = "horizontal"
    rotation: float = 0.0
    shake: float = 0.0
    gamma: float = 1.0


PRESETS: dict[str, Motion] = {
    # Learnable in minutes on a CPU: one blur direction, moderate length.
    "easy": Motion(subframes=7, displacement=(4.0, 8.0), direction="horizontal"),
    # Closer to GoPro: any direction, longer blur, slight rotation and hand shake.
    "gopro": Motion(subframes=9, displacement=(3.0, 12.0), direction="random", rotation=1.0, shake=0.4),
}


def make_motion(preset: str = "easy", **overrides) -> Motion:
    """The preset's motion with non-None overrides applied, validated (HarnessError on bad values)."""
    if preset not in PRESETS:
        raise HarnessError(f"preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
    fields = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(fields) - {f.name for f in dataclasses.fields(Motion)}
    if unknown:
        raise HarnessError(f"unknown motion option(s): {', '.join(sorted(unknown))}")
    motion = dataclasses.replace(PRESETS[preset], **fields)
    _validate_motion(motion)
    return motion


def _validate_motion(m: Motion) -> None:
    if not isinstance(m.subframes, int) or m.subframes < 3 or m.subframes % 2 == 0:
        raise HarnessError(
            f"subframes: expected an odd integer >= 3 (the middle one is sharp), got {m.subframes}"
        )
    lo, hi = m.displacement
    if not (0 <= lo <= hi <= 256):
        raise HarnessError(f"displacement: expected 0 <= min <= max <= 256 px, got {lo}-{hi}")
    if m.direction not in DIRECTIONS:
        raise HarnessError(f"direction: expected one of {', '.join(DIRECTIONS)}, got {m.direction!r}")
    if not (0 <= m.rotation <= 20):
        raise HarnessError(f"rotation: expected 0-20 degrees, got {m.rotation}")
    if not (0 <= m.shake <= 10):
        raise HarnessError(f"shake: expected 0-10 px, got {m.shake}")
    if not (0.1 <= m.gamma <= 5):
        raise HarnessError(f"gamma: expected 0.1-5, got {m.gamma}")


# ---------------------------------------------------------------- texture


def make_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A float32 HxWx3 scene in [0,1] with structure at every scale.

    Smooth gradients and colour blobs (coarse), filled shapes with anti-aliased edges at three
    sizes (edges in every orientation: what blur destroys and a deblurrer must restore),
    striped patches (periodic detail), and fine grain (so flat areas are not perfectly flat).
    """
    base = 0.55 * _gradient(rng, h, w) + 0.45 * _value_noise(rng, h, w, cells=int(rng.integers(2, 6)))
    tex = _draw_shapes(rng, base, h, w)
    _add_stripes(rng, tex)
    tex += 0.10 * (_value_noise(rng, h, w, cells=max(2, min(h, w) // 6)) - 0.5)
    tex += rng.normal(0.0, 0.012, size=tex.shape).astype(np.float32)
    return np.clip(tex, 0.0, 1.0, out=tex)


def _gradient(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    c0, c1 = rng.random(3, dtype=np.float32), rng.random(3, dtype=np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    t = x * math.cos(theta) + y * math.sin(theta)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return c0 + (c1 - c0) * t[..., None]


def _value_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Random colour grid upsampled bicubically: smooth noise with feature size ~ size/cells."""
    gh, gw = max(2, round(cells * h / max(h, w))) + 1, max(2, round(cells * w / max(h, w))) + 1
    grid = rng.random((3, gh, gw), dtype=np.float32)
    chans = [np.asarray(Image.fromarray(g, mode="F").resize((w, h), Image.BICUBIC)) for g in grid]
    return np.stack(chans, axis=-1)


def _draw_shapes(rng: np.random.Generator, base: np.ndarray, h: int, w: int) -> np.ndarray:
    ss = 2  # draw at 2x and box-downsample: anti-aliased edges at sub-pixel positions
    img = Image.fromarray(_quantize(base)).resize((w * ss, h * ss), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    # Scale space: each level 2.5x smaller than the last, down to ~3 px; coarse levels cover
    # more of the area, so big objects stay visible under the small ones at any image size.
    size, coverage = 0.3 * min(h, w), 0.6
    while size >= 3.0:
        for _ in range(max(1, round(coverage * h * w / size**2))):
            _draw_one(draw, rng, w * ss, h * ss, ss * size * rng.uniform(0.5, 1.5))
        size, coverage = size / 2.5, coverage / 2
    small = img.resize((w, h), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _draw_one(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, size: float) -> None:
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    cx, cy = rng.uniform(-0.1 * w, 1.1 * w), rng.uniform(-0.1 * h, 1.1 * h)
    kind = rng.integers(0, 5)
    if kind == 0:  # ellipse
        rx, ry = size * rng.uniform(0.3, 1.0), size * rng.uniform(0.3, 1.0)
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=colour)
    elif kind == 1:  # ring
        r = size * rng.uniform(0.4, 1.0)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=max(1, int(r * 0.2)))
    elif kind == 2:  # thick line
        theta = rng.uniform(0, math.pi)
        dx, dy = size * math.cos(theta), size * math.sin(theta)
        draw.line(
            (cx - dx, cy - dy, cx + dx, cy + dy),
            fill=colour,
            width=max(1, int(size * rng.uniform(0.05, 0.25))),
        )
    else:  # rotated square, or a random triangle/quad
        n = 4 if kind == 3 else int(rng.integers(3, 5))
        angles = (
            np.sort(rng.uniform(0, 2 * math.pi, n))
            if kind == 4
            else rng.uniform(0, 2 * math.pi) + np.arange(4) * math.pi / 2
        )
        radii = size * (rng.uniform(0.4, 1.0, n) if kind == 4 else np.full(n, rng.uniform(0.4, 1.0)))
        draw.polygon(
            [(cx + r * math.cos(a), cy + r * math.sin(a)) for r, a in zip(radii, angles)], fill=colour
        )


def _add_stripes(rng: np.random.Generator, tex: np.ndarray) -> None:
    """Blend a few sinusoidal gratings into elliptical patches, in place."""
    h, w, _ = tex.shape
    mean_r = 0.16 * min(h, w)
    for _ in range(max(1, round(0.25 * h * w / (math.pi * mean_r**2)))):
        r = rng.uniform(0.5, 1.5) * mean_r
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        y0, y1 = max(0, int(cy - r)), min(h, int(cy + r) + 1)
        x0, x1 = max(0, int(cx - r)), min(w, int(cx + r) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        y, x = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        inside = np.clip(r - np.hypot(y - cy, x - cx), 0.0, 1.0)[..., None]  # 1 px soft rim
        theta, period = rng.uniform(0, math.pi), rng.uniform(3.0, 12.0)
        wave = 0.5 + 0.5 * np.sin(2 * math.pi * (x * math.cos(theta) + y * math.sin(theta)) / period)
        c0, c1 = rng.random(3, dtype=np.float32), rng.random(3, dtype=np.float32)
        stripes = c0 + (c1 - c0) * wave[..., None]
        patch = tex[y0:y1, x0:x1]
        patch += inside * (stripes - patch)


# ---------------------------------------------------------------- motion & rendering


def margin_for(motion: Motion, h: int, w: int) -> int:
    """Pixels a sub-frame can move away from the sharp frame's footprint."""
    travel = motion.displacement[1] / 2
    shake = 4 * motion.shake * math.sqrt(motion.subframes / 2)
    spin = math.hypot(h, w) / 2 * math.sin(math.radians(motion.rotation) / 2)
    return int(math.ceil(travel + shake + spin)) + 2


def render_pair(
    canvas: np.ndarray, rng: np.random.Generator, size: tuple[int, int], motion: Motion
) -> tuple[np.ndarray, np.ndarray]:
    """One (blur, sharp) uint8 HxWx3 pair: a camera exposure at a random place on `canvas`."""
    h, w = size
    m = margin_for(motion, h, w)
    ch, cw, _ = canvas.shape
    if ch < h + 2 * m or cw < w + 2 * m:
        raise HarnessError(f"canvas {ch}x{cw} too small for {h}x{w} frames with a {m}px motion margin")
    top, left = int(rng.integers(m, ch - h - m + 1)), int(rng.integers(m, cw - w - m + 1))
    offsets, angles = _trajectory(rng, motion)
    frames = _sample(canvas, top, left, h, w, offsets, angles)
    k_mid = motion.subframes // 2
    if motion.gamma == 1.0:
        blur = frames.mean(axis=0)
    else:
        blur = np.power(np.power(frames, motion.gamma).mean(axis=0), 1.0 / motion.gamma)
    return _quantize(blur), _quantize(frames[k_mid])


def _trajectory(rng: np.random.Generator, motion: Motion) -> tuple[np.ndarray, np.ndarray]:
    """Per-sub-frame (dy, dx) offsets and rotation angles (rad); the middle one is exactly 0."""
    k = motion.subframes
    t = np.arange(k) / (k - 1) - 0.5  # -0.5 .. 0.5, middle 0
    dist = rng.uniform(*motion.displacement)
    phi = 0.0 if motion.direction == "horizontal" else rng.uniform(0, math.pi)
    offsets = np.stack([t * dist * math.sin(phi), t * dist * math.cos(phi)], axis=1)
    if motion.shake > 0:
        # a random walk outwards from the middle sub-frame in both directions
        steps = rng.normal(0.0, motion.shake, size=(k, 2))
        mid = k // 2
        walk = np.zeros((k, 2))
        walk[mid + 1 :] = np.cumsum(steps[mid + 1 :], axis=0)
        walk[:mid] = np.cumsum(steps[:mid][::-1], axis=0)[::-1]
        offsets = offsets + walk
    spin = math.radians(rng.uniform(-motion.rotation, motion.rotation)) if motion.rotation > 0 else 0.0
    return offsets, t * spin


def _sample(
    canvas: np.ndarray, top: int, left: int, h: int, w: int, offsets: np.ndarray, angles: np.ndarray
) -> np.ndarray:
    """Bilinear samples of every sub-frame: float32 (K, h, w, 3)."""
    out = np.empty((len(angles), h, w, 3), dtype=np.float32)
    for k, ((dy, dx), angle) in enumerate(zip(offsets, angles)):
        if angle == 0.0:
            out[k] = _shifted(canvas, top + dy, left + dx, h, w)
        else:
            out[k] = _rotated(canvas, top + dy, left + dx, h, w, angle)
    return out


def _shifted(canvas: np.ndarray, y: float, x: float, h: int, w: int) -> np.ndarray:
    """A pure translation is four shifted crops: much faster than a gather."""
    y0, x0 = math.floor(y), math.floor(x)
    fy, fx = np.float32(y - y0), np.float32(x - x0)
    c = canvas[y0 : y0 + h + 1, x0 : x0 + w + 1]
    top_row = c[:-1, :-1] * (1 - fx) + c[:-1, 1:] * fx
    bottom_row = c[1:, :-1] * (1 - fx) + c[1:, 1:] * fx
    return top_row * (1 - fy) + bottom_row * fy


def _rotated(canvas: np.ndarray, top: float, left: float, h: int, w: int, angle: float) -> np.ndarray:
    """Rotation by `angle` about the frame centre, bilinear, via a flat-index gather."""
    cy, cx = top + (h - 1) / 2, left + (w - 1) / 2
    gy = (np.arange(h, dtype=np.float32) - (h - 1) / 2)[:, None]
    gx = (np.arange(w, dtype=np.float32) - (w - 1) / 2)[None, :]
    cos, sin = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    ys = np.float32(cy) + sin * gx + cos * gy
    xs = np.float32(cx) + cos * gx - sin * gy
    y0, x0 = np.floor(ys), np.floor(xs)
    fy, fx = (ys - y0)[..., None], (xs - x0)[..., None]
    cw = canvas.shape[1]
    idx = y0.astype(np.intp) * cw + x0.astype(np.intp)
    flat = canvas.reshape(-1, 3)
    top_row = flat[idx] * (1 - fx) + flat[idx + 1] * fx
    bottom_row = flat[idx + cw] * (1 - fx) + flat[idx + cw + 1] * fx
    return top_row * (1 - fy) + bottom_row * fy


def _quantize(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def scene_rng(seed: int, split: str, scene: int) -> np.random.Generator:
    """Independent stream per (seed, split, scene): train and test never share content."""
    return np.random.default_rng([int(seed), zlib.crc32(split.encode()), int(scene)])


def make_canvas(rng: np.random.Generator, size: tuple[int, int], motion: Motion) -> np.ndarray:
    """A scene canvas: room for the motion margin plus half a frame of travel between frames."""
    h, w = size
    m = margin_for(motion, h, w)
    return make_texture(rng, h + 2 * m + h // 2, w + 2 * m + w // 2)


def synth_pair(
    seed: int, size: tuple[int, int] = (128, 128), *, preset: str = "easy", **motion
) -> tuple[np.ndarray, np.ndarray]:
    """One in-memory (blur, sharp) uint8 HxWx3 pair, deterministic by seed."""
    h, w = _check_size(size)
    mo = make_motion(preset, **motion)
    rng = np.random.default_rng([int(seed), 0x5EED])
    return render_pair(make_canvas(rng, (h, w), mo), rng, (h, w), mo)


# ---------------------------------------------------------------- writer


def synthesize(
    out: str | os.PathLike,
    *,
    scenes: int,
    frames: int,
    size: tuple[int, int] = (128, 128),
    seed: int,
    split: str = "train",
    preset: str = "easy",
    subframes: int | None = None,
    displacement: tuple[float, float] | None = None,
    direction: str | None = None,
    rotation: float | None = None,
    shake: float | None = None,
    gamma: float | None = None,
    progress: bool = False,
) -> Path:
    """Write `<out>/<split>/scene_NNN/{blur,sharp}/NNNNNN.png`; returns `<out>/<split>`.

    Motion options left as None come from `preset`. Same arguments -> byte-identical files.
    """
    h, w = _check_size(size)
    if scenes < 1 or frames < 1:
        raise HarnessError(f"scenes and frames: expected >= 1, got {scenes} scenes, {frames} frames")
    if not split or "/" in split or split.startswith("."):
        raise HarnessError(f"split: expected a plain directory name such as train or test, got {split!r}")
    motion = make_motion(
        preset,
        subframes=subframes,
        displacement=displacement,
        direction=direction,
        rotation=rotation,
        shake=shake,
        gamma=gamma,
    )
    root = Path(out) / split
    bar = _progress(scenes * frames, progress)
    for s in range(scenes):
        rng = scene_rng(seed, split, s)
        canvas = make_canvas(rng, (h, w), motion)
        scene_dir = root / f"scene_{s:03d}"
        for f in range(frames):
            blur, sharp = render_pair(canvas, rng, (h, w), motion)
            write_png(blur, scene_dir / "blur" / f"{f:06d}.png", compress_level=3)
            write_png(sharp, scene_dir / "sharp" / f"{f:06d}.png", compress_level=3)
            bar.update(1)
    bar.close()
    return root


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise HarnessError(f"size: expected (height, width), got {size!r}") from None
    if h < 8 or w < 8 or h > 8192 or w > 8192:
        raise HarnessError(f"size: expected height and width in 8-8192 px, got {h}x{w}")
    return h, w


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="pair", desc="synth", disable=not enabled)
