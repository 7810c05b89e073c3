"""Measures of a running training: MFU's peak FLOP/s (a table of known accelerators, or a measured
matmul, with the CPU's cached per machine), peak memory, and durations as the logs print them.

The trainer's SpeedMonitor (msllm.train.callbacks) and the benchmarks (msllm.bench) both use them.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s of known accelerators, from their vendors'
# data sheets, matched as a case-insensitive substring of the device name, first match wins (so
# the more specific names come first: "H100 PCIe" before "H100", "L40S" before "L40" before "L4").
ACCELERATOR_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
)


def known_peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a known accelerator by its name (torch's get_device_name), else None."""
    name = device_name.lower()
    for key, flops in ACCELERATOR_PEAK_FLOPS:
        if key.lower() in name:
            return flops
    return None


def measure_matmul_flops(n: int = 1024, reps: int = 8, device: torch.device | str = "cpu",
                         dtype: torch.dtype = torch.float32) -> float:
    """Dense matmul FLOP/s of this process on `device` (on the CPU: with its current thread count);
    the best of three timed rounds after a warm-up."""
    from deepspeed.accelerator import get_accelerator

    device = torch.device(device)
    sync = (lambda: None) if device.type == "cpu" else get_accelerator().synchronize
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = math.inf
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 * reps / best


def peak_flops(device: torch.device, configured: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s per device for MFU, where it comes from). Never unknown: train.peak_flops if set;
    on an accelerator the table of known devices, else a measured bf16 matmul; on the CPU the best
    measured fp32 matmul (what CPU training runs in)."""
    if configured:
        return configured, "train.peak_flops"
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return cpu_peak_flops(), f"best measured fp32 matmul, {threads} thread{'s' if threads != 1 else ''}"
    module = getattr(torch, device.type, None)
    name = module.get_device_name(device) if hasattr(module, "get_device_name") else device.type
    known = known_peak_flops(name)
    if known:
        return known, f"{name}: dense bf16 peak from the table of known devices"
    return measure_matmul_flops(n=8192, reps=10, device=device, dtype=torch.bfloat16), f"{name}: measured bf16 matmul"


def cpu_peak_flops() -> float:
    """The CPU's dense fp32 matmul rate for this thread count: the best of this measurement and of
    earlier ones on this machine (cached in ~/.cache/msllm), so that a measurement taken while other
    processes share the cores does not pass for the peak."""
    import os
    import platform

    key = f"{platform.node()}|{platform.processor() or platform.machine()}|{os.cpu_count()}|{torch.get_num_threads()}"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "msllm" / "cpu_matmul_flops.json"
    measured = measure_matmul_flops()
    try:
        known = json.loads(cache.read_text()) if cache.is_file() else {}
    except (OSError, ValueError):
        known = {}
    best = max(measured, float(known.get(key, 0.0)))
    if best > float(known.get(key, 0.0)):
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            known[key] = best
            tmp = cache.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(known, indent=1))
            os.replace(tmp, cache)
        except OSError:
            pass
    return best


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def accelerator_max_allocated() -> int | None:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return None
    try:
        return int(acc.max_memory_allocated())
    except Exception:  # not every accelerator reports it
        return None


def fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
