"""Shared plumbing of the benchmarks: machine description, result path, table and JSON report.

Every benchmark writes `benchmarks/results/<host-or-gpu>-<name>.json` with
`host`, `device`, `config`, `results` (a list of `{variant, metric, value}`) and `speedup`
(variant -> ratio of its speed metric to the baseline's), and prints the same numbers as a table.
"""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
if str(REPO) not in sys.path:  # benchmarks run as scripts from anywhere
    sys.path.insert(0, str(REPO))

from harness.files import atomic_write  # noqa: E402


# The 1-minute load average when the benchmark started: other work sharing the machine shows here
# (the end value includes the benchmark itself). Written into every report's config.
def load_avg() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


LOAD_AT_START = load_avg()


def device_name(device: str = "cpu") -> str:
    """Human description of the machine the numbers come from (CPU model or GPU name)."""
    if device.startswith("cuda"):
        import torch

        props = torch.cuda.get_device_properties(torch.device(device))
        return f"cuda: {props.name}, {props.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} GPU(s)"
    model = platform.processor() or "cpu"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), model)
    return f"cpu: {model}, {os.cpu_count()} cores"


def machine_tag(device: str = "cpu") -> str:
    """File-name prefix: the host name on CPU, the GPU model on CUDA (results compare across hosts)."""
    if device.startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name(torch.device(device))
        return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")
    return socket.gethostname()


def result_path(name: str, device: str = "cpu") -> Path:
    return RESULTS / f"{machine_tag(device)}-{name}.json"


def speedups(rows: list[dict], metric: str, baseline: str, *, lower_is_better: bool = False) -> dict[str, float]:
    """variant -> speed ratio against `baseline` for `metric` (>1 means faster than the baseline)."""
    values = {r["variant"]: r["value"] for r in rows if r["metric"] == metric and r["value"] is not None}
    base = values.get(baseline)
    if not base:
        return {}
    return {v: round((base / x) if lower_is_better else (x / base), 3) for v, x in values.items() if x}


def format_table(rows: list[dict], speedup: dict[str, float]) -> str:
    """One line per variant, one column per metric, then the speedup."""
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    cell = {(r["variant"], r["metric"]): r["value"] for r in rows}
    width = max(len("variant"), *(len(v) for v in variants)) + 2
    heads = [m.replace("_per_s", "/s") for m in metrics]  # crops_per_s -> crops/s
    cols = [max(12, len(h) + 2) for h in heads]
    lines = ["variant".ljust(width) + "".join(h.rjust(c) for h, c in zip(heads, cols)) + "speedup".rjust(10)]
    for v in variants:
        values = [_fmt(cell.get((v, m))).rjust(c) for m, c in zip(metrics, cols)]
        ratio = f"{speedup[v]:.2f}x" if v in speedup else "-"
        lines.append(v.ljust(width) + "".join(values) + ratio.rjust(10))
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def write_report(name: str, *, device: str, config: dict, rows: list[dict], speedup: dict[str, float],
                 out: str | os.PathLike | None = None) -> Path:
    """Print the table and write the JSON report atomically; returns its path."""
    load = {"load_avg_start": LOAD_AT_START, "load_avg_end": load_avg(), "cpu_count": os.cpu_count()}
    report = {"host": socket.gethostname(), "device": device_name(device), "config": {**config, **load},
              "results": rows, "speedup": speedup}
    path = Path(out) if out else result_path(name, device)
    print(format_table(rows, speedup))
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    return path


def row(variant: str, metric: str, value: float | int | None, digits: int = 4) -> dict:
    """One `{variant, metric, value}` result (floats rounded to keep the JSON readable)."""
    if isinstance(value, float):
        value = float(f"{value:.{digits}g}")
    return {"variant": variant, "metric": metric, "value": value}


class PeakMemory:
    """Peak memory (MiB) of the block: allocator peak on CUDA; sampled process RSS on CPU
    (getrusage's maxrss never goes down, so it cannot tell variants of one process apart)."""

    def __init__(self, device: str, interval: float = 0.02):
        self.device, self.interval, self.peak_mb = device, interval, 0.0

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        import threading

        import psutil

        proc, self._stop = psutil.Process(), threading.Event()

        def sample() -> None:
            while not self._stop.wait(self.interval):
                self.peak_mb = max(self.peak_mb, proc.memory_info().rss / 2**20)

        self.peak_mb = proc.memory_info().rss / 2**20
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()


def sync(device: str) -> None:
    """Wait for queued GPU work so wall-clock timings are honest (no-op on CPU)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched
# against torch.cuda.get_device_name(); first match wins, so the specific names come first.
GPU_BF16_PEAKS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
                  ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0))


def matmul_tflops(device: str, dtype, n: int = 2048, reps: int = 5) -> float:
    """The best TFLOP/s of an n x n x n matrix product: what this device sustains in `dtype`."""
    import time

    import torch

    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    best = float("inf")
    for _ in range(reps + 1):  # the first is a warm-up
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def peak_tflops(device: str, given: float | None, *, n: int = 2048) -> tuple[dict[str, float], str]:
    """The peak MFU is measured against, per precision ("fp32", "bf16"), and where it comes from.

    GPUs: the card's dense bf16 data-sheet peak for every variant (the usual MFU convention, which
    the >= 35 % target is stated in). CPUs have no such figure: the best matrix product this process
    runs in each precision (same threads as the benchmark), so CPU MFU reads as "share of what
    this CPU's GEMM reaches", not of a guessed clock x width.
    """
    import torch

    if given:
        return {"fp32": given, "bf16": given}, "--peak-tflops"
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        for key, tflops in GPU_BF16_PEAKS:
            if key in name:
                return {"fp32": tflops, "bf16": tflops}, f"{name}: {tflops:g} TFLOP/s bf16 dense (data sheet)"
        measured = matmul_tflops(device, torch.bfloat16, n=8192)
        return {"fp32": measured, "bf16": measured}, f"{name}: not in the table; measured bf16 8192^3 matmul"
    fp32 = matmul_tflops(device, torch.float32, n)
    # A CPU without native bf16 (no AVX512-BF16/AMX) converts to fp32 and computes there, where its
    # bf16 GEMM is slower than its convolutions: its fp32 GEMM is then the bf16 peak too.
    peaks = {"fp32": fp32, "bf16": max(fp32, matmul_tflops(device, torch.bfloat16, n))}
    return peaks, (f"measured: best {n}^3 matmul per precision (bf16: at least the fp32 one), "
                   f"{torch.get_num_threads()} torch threads")
