"""What a training run prints: the project's own lines, with library noise quiet by default.

By default rank 0 shows the harness's log lines (tracking, registry), one line per validation or
test score, the progress bar and an end-of-run block; DeepSpeed's INFO lines, its JIT-build
"built successfully" prints, MLflow's INFO lines and the known deprecation warnings of the
libraries are hidden. `train.log_level: verbose` (or `--verbose`) shows everything.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator

# Warnings the libraries emit on every run that say nothing about the user's run.
_NOISE = [
    (FutureWarning, r".*all_gather_into_tensor.*|.*reduce_scatter_tensor.*|.*_all_gather_base.*"),
    (UserWarning, r".*[Aa]dd type hints to the `predict` method.*"),
    (UserWarning, r".*[Cc]loud[Pp]ickle.*"),
    (UserWarning, r".*TypedStorage is deprecated.*"),
]
_QUIET_LOGGERS = ("DeepSpeed", "deepspeed", "mlflow", "torch.distributed", "urllib3", "alembic")


def setup(*, verbose: bool, is_main: bool) -> None:
    """Send the harness's log lines to stderr (rank 0: INFO, others: WARNING); quiet the libraries
    unless `verbose`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("harness")
    root.handlers[:] = [handler]
    root.propagate = False
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    if verbose:
        return
    # MLflow sets its own logger's level when it is imported (later, lazily): tell it by its variables
    # (ERROR: its WARNINGs on every model log are advice about serialization, not about the run).
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for category, message in _NOISE:
        warnings.filterwarnings("ignore", category=category, message=message)


@contextlib.contextmanager
def quiet_prints(enabled: bool) -> Iterator[None]:
    """Swallow what a library prints to stdout meanwhile (DeepSpeed's op-build lines); shown
    again when the block fails, so nothing needed for a diagnosis is lost."""
    if not enabled:
        yield
        return
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    except BaseException:
        sys.stdout.write(buf.getvalue())
        raise


def score_line(kind: str, step: int, total: int, m: dict) -> str:
    """`val  step 30/30  PSNR 22.22 dB (blurred 22.46, -0.24)  SSIM 0.7120 (blurred 0.7000)  | ...`."""
    psnr, blurred = m.get("psnr"), m.get("blurred_psnr")
    line = f"{kind:<4} step {step}/{total}  PSNR {_db(psnr)}"
    if blurred is not None and psnr is not None:
        line += f" (blurred {blurred:.2f}, {psnr - blurred:+.2f})"
    if m.get("ssim") is not None:
        line += f"  SSIM {m['ssim']:.4f}"
        if m.get("blurred_ssim") is not None:
            line += f" (blurred {m['blurred_ssim']:.4f})"
    return line + f"  | {measured_on(m)}"


def measured_on(m: dict) -> str:
    """How a score was made: images, protocol, precision, ensemble, device, speed."""
    parts = [f"{m['images']} images" if m.get("images") is not None else None,
             f"protocol {m.get('protocol', 'default')}", m.get("precision"),
             f"ensemble {m['ensemble']}" if m.get("ensemble") not in (None, "none") else None,
             f"on {m['device']}" if m.get("device") else None,
             f"{m['seconds_per_image']:.3f} s/image" if m.get("seconds_per_image") is not None else None]
    return ", ".join(p for p in parts if p)


def _db(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} dB"


def summary_block(s: dict, *, scores: dict[str, dict]) -> str:
    """The end-of-run block of summary.json `s`: what was trained, the final and best numbers and
    where they were measured, the files, and the MLflow run page."""
    weights, mlflow = s.get("checkpoint"), s.get("mlflow_run_url")
    done = "stopped by signal at" if s["stopped"] else "finished"
    speed = f", {s['images_per_sec']:.1f} images/s" if s.get("images_per_sec") else ""
    lines = [f"train: {done} step {s['final_step']}/{s['total_steps']} on {s['world_size']} rank(s){speed}"]
    for kind, m in scores.items():
        lines.append("  " + score_line(kind, m["step"], s["total_steps"], m))
    if s.get("best_step") is not None:
        lines.append(f"  best val PSNR {s['best_psnr']:.2f} dB at step {s['best_step']} (checkpoints/best)")
    for kind, m in scores.items():
        if m.get("psnr") is not None and m.get("blurred_psnr") is not None and m["psnr"] <= m["blurred_psnr"]:
            lines.append(f"  warning: {kind} PSNR {m['psnr']:.2f} dB is not above the blurred input's "
                         f"{m['blurred_psnr']:.2f} dB: the model does not deblur yet (train longer?)")
    lines.append(f"  weights  {weights or 'not exported (the run stopped early; resume it to finish)'}")
    lines.append(f"  run dir  {s['run_dir']}")
    if mlflow:
        lines.append(f"  MLflow   {mlflow}")
    return "\n".join(lines)
