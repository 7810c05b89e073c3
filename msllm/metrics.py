"""Measures of a running training: MFU's peak FLOP/s (a table of known accelerators, or a measured
matmul, with the CPU's cached per machine), peak memory, and durations as the logs print them.

    Throughput   tokens/s, seconds per step and the ETA over the steps since the last row
    MfuMeter     MFU from a tokens/s rate, and the peak measured again when the rate exceeds it

The trainer builds its metrics rows with them (msllm.train.trainer.Trainer.step_metrics); the
benchmarks (msllm.bench) use the peak and the memory measures too.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from msllm.distributed import collectives
from msllm.distributed.env import say
from msllm.models import flops_per_token

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


def measure_matmul_flops(
    n: int = 1024, reps: int = 8, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> float:
    """Dense matmul FLOP/s of this process on `device` (on the CPU: with its current thread count);
    the best of three timed rounds after a warm-up."""
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415 (heavy: DeepSpeed)

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


class Throughput:
    """Tokens/s and seconds per step since the last row, from the seconds spent inside the training
    steps (eval and checkpoints excluded); the ETA from the wall-clock time per step since the start."""

    def __init__(self, tokens_per_step: int, max_steps: int, step: int, train_time: float = 0.0):
        self.tokens_per_step, self.max_steps = tokens_per_step, max_steps
        self.t_start = time.perf_counter()
        self.step_start = self.step_last = step
        self.train_time_last = train_time

    def at(self, step: int, train_time: float) -> dict:
        """{"tokens_per_s", "step_time_s", "eta_s"} at `step`, `train_time` seconds of training in."""
        dt = max(train_time - self.train_time_last, 1e-9)
        steps = max(step - self.step_last, 1)
        per_step = (time.perf_counter() - self.t_start) / max(step - self.step_start, 1)
        self.train_time_last, self.step_last = train_time, step
        return {
            "tokens_per_s": steps * self.tokens_per_step / dt,
            "step_time_s": dt / steps,
            "eta_s": per_step * (self.max_steps - step),
        }


class MfuMeter:
    """Model FLOPs utilisation: the achieved over the peak FLOP/s of the devices, never above 1."""

    def __init__(self, flops_per_token: float | None, peak_flops: float | None, world_size: int, remeasure=None):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops  # per device; None: unknown (n/a)
        self.world_size = world_size
        self.remeasure = remeasure  # () -> peak FLOP/s again, or None when the peak was given (train.peak_flops)
        self.peak_unreliable = False

    @classmethod
    def for_run(cls, recipe, device: torch.device, world_size: int) -> MfuMeter:
        """With the run's training FLOPs per token and the peak FLOP/s per device MFU is computed
        against (rank 0 measures or looks it up; every rank uses the same; the log says which)."""
        try:
            fpt = float(flops_per_token(recipe.model, recipe.data.seq_len))
        except Exception as exc:  # MFU is informative; never stop a run for it
            say(f"(MFU unavailable: flops_per_token failed: {exc})")
            fpt = None
        peak, source = collectives.on_rank0(peak_flops, device, recipe.train.peak_flops)
        say(f"peak for MFU: {peak / 1e12:.3g} TFLOP/s per device ({source})")
        remeasure = None if recipe.train.peak_flops else (lambda: peak_flops(device)[0])
        return cls(fpt, peak, world_size, remeasure)

    def at(self, tokens_per_s: float) -> dict:
        """{"mfu", "peak_unreliable"} at this rate (mfu None: not given)."""
        mfu = self.mfu(tokens_per_s)
        return {"mfu": mfu, "peak_unreliable": self.peak_unreliable}

    def mfu(self, tokens_per_s: float) -> float | None:
        """Achieved over peak FLOP/s; never above 1. A rate above the peak means the peak was
        measured while other work shared the device (a busy CPU at start): measure it again (the
        CPU's best measurement is kept per machine); if the rate is still above it, the peak is
        unreliable and MFU is not given (the row says so)."""
        if not (self.flops_per_token and self.peak_flops):
            return None
        if self.peak_unreliable:
            return None
        mfu = self.flops_per_token * tokens_per_s / (self.peak_flops * self.world_size)
        if mfu > 1.0 and self.remeasure is not None:
            self.peak_flops = max(self.peak_flops, self.remeasure())
            mfu = self.flops_per_token * tokens_per_s / (self.peak_flops * self.world_size)
        if mfu > 1.0:
            self.peak_unreliable = True
            say(
                f"msllm: the peak ({self.peak_flops / 1e12:.3g} TFLOP/s per device) is below the achieved rate: MFU is "
                "not given from now on (set train.peak_flops to the device's real peak)"
            )
            return None
        return mfu


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def accelerator_max_allocated() -> int | None:
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415 (heavy: DeepSpeed)

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
