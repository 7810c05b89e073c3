"""`msllm doctor`: what this machine offers msllm, in one report (text, or JSON with --json), for
bug reports and for a first look at a new cluster node.

    versions     python, msllm, torch (and the CUDA it was built with), triton, deepspeed,
                 mosaicml-streaming (or streaming-community), sentencepiece, liger-kernel,
                 cut-cross-entropy (None: not installed); read from the installed metadata
    devices      the CPU (cores, threads, memory) and each CUDA device (name, capability, memory
                 total and free)
    distributed  the torch.distributed backends this build has (gloo, nccl, mpi, ucc), and
                 DeepSpeed's ops that could be built here (each op builder's is_compatible(): no
                 build, no compile; how long asking took is reported)
    kernels      per device, the attention kernel local and retina attention train with and the
                 loss kernel train.loss_kernel: auto picks, and the start-up check of each
                 non-reference one (msllm.train.kernel_check, in the dtype training uses there:
                 fp32 on a CPU, bf16 on CUDA); a reference kernel needs no check
    matmul       a measured dense matmul rate per device against its known peak (CUDA: the
                 table of known devices, bf16; CPU: the best fp32 rate measured on this machine)
    disk         free space in the output folder and in the cache folders msllm's libraries
                 write to (torch extensions, Triton, inductor, ~/.cache)

Nothing here writes anything but the caches that the checks fill (inductor, Triton, msllm's CPU
matmul record). Each part that fails is reported as its error and the rest goes on.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path

import torch
import torch.distributed as dist

from msllm.metrics import cpu_peak_flops, known_peak_flops, measure_matmul_flops
from msllm.models.attention import SlidingWindow, kernel_for
from msllm.models.retina import RetinaPattern
from msllm.train import kernel_check
from msllm.train.loss import choose_kernel

PACKAGES = (
    "msllm",
    "torch",
    "triton",
    "deepspeed",
    "mosaicml-streaming",
    "streaming-community",
    "sentencepiece",
    "liger-kernel",
    "cut-cross-entropy",
)


def _guarded(part):
    """Run one part of the report; its exception becomes {"error": ...} so that the rest goes on."""
    try:
        return part()
    except Exception as exc:  # a doctor reports what is broken, it does not stop at it
        return {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"}


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    found["torch.version.cuda"] = torch.version.cuda
    return found


def _meminfo() -> dict:
    info = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, value = line.split(":", 1)
            if key in ("MemTotal", "MemAvailable"):
                info[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return {"memory_total_bytes": info.get("MemTotal"), "memory_available_bytes": info.get("MemAvailable")}


def devices() -> list[dict]:
    found = [
        {
            "device": "cpu",
            "name": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            **_meminfo(),
        }
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            found.append(
                {
                    "device": f"cuda:{i}",
                    "name": props.name,
                    "capability": f"{props.major}.{props.minor}",
                    "memory_total_bytes": total,
                    "memory_free_bytes": free,
                    "multiprocessors": props.multi_processor_count,
                }
            )
    return found


def distributed() -> dict:
    backends = {}
    if dist.is_available():
        for name in ("gloo", "nccl", "mpi", "ucc", "xccl"):
            probe = getattr(dist, f"is_{name}_available", None)
            backends[name] = bool(probe()) if probe else None
    return {"torch.distributed": dist.is_available(), "backends": backends, "deepspeed_ops": _guarded(deepspeed_ops)}


def deepspeed_ops() -> dict:
    """Which of DeepSpeed's ops its builders say could be built here (nothing is built)."""
    t0 = time.perf_counter()
    from deepspeed.ops.op_builder.all_ops import ALL_OPS  # noqa: PLC0415 (heavy: DeepSpeed)

    compatible = {}
    for name, builder in sorted(ALL_OPS.items()):
        try:
            compatible[name] = bool(builder.is_compatible(verbose=False))
        except Exception as exc:  # one op's probe failing says nothing of the others
            compatible[name] = f"{type(exc).__name__}"
    return {"compatible": compatible, "seconds": round(time.perf_counter() - t0, 2)}


def kernels(device_names: list[str], check: bool = True) -> list[dict]:
    """Per device: the attention and loss kernels a training there would use, and the start-up
    check of each non-reference one (the loss at d=1024, a 32k vocabulary; attention on a window
    of 128 and a retina pattern of window 32, factor 4, 3 levels, head dim 64)."""
    found = []
    for name in device_names:
        device = torch.device(name)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        row = {"device": name, "dtype": str(dtype).removeprefix("torch.")}
        for what in ("attention", "loss"):
            try:
                kernel = kernel_for(device) if what == "attention" else choose_kernel("auto", device.type)
            except Exception as exc:
                row[what] = {"kernel": None, "check": f"{type(exc).__name__}: {exc}"}
                continue
            entry = {"kernel": kernel, "reference": kernel_check.REFERENCES.get(kernel, kernel)}
            if kernel not in kernel_check.REFERENCES:
                entry["check"] = "the reference: nothing to check"
            elif not check:
                entry["check"] = "not run (--no-check)"
            else:
                t0 = time.perf_counter()
                if what == "loss":
                    result = kernel_check.check_loss(kernel, device, dtype, d_model=1024, vocab_size=32000)
                else:
                    result = kernel_check.check_attention(
                        kernel, device, dtype, [SlidingWindow(128), RetinaPattern(32, 4, 3)], head_dim=64
                    )
                entry["check"] = {
                    "passed": result.passed,
                    "backward": result.backward,
                    "detail": result.detail,
                    "seconds": round(time.perf_counter() - t0, 2),
                }
            row[what] = entry
        found.append(row)
    return found


def matmul(device_names: list[str]) -> list[dict]:
    """A dense matmul rate per device against its known peak (CPU: fp32, 1024^2, this process's
    threads, against the best rate measured on this machine; CUDA: bf16, 4096^2, against the table
    of known devices, or none)."""
    found = []
    for name in device_names:
        device = torch.device(name)
        if device.type == "cpu":
            rate = measure_matmul_flops()
            peak, source = max(rate, cpu_peak_flops()), "best fp32 matmul measured on this machine (~/.cache/msllm)"
            row = {"dtype": "float32", "n": 1024}
        else:
            rate = measure_matmul_flops(n=4096, reps=20, device=device, dtype=torch.bfloat16)
            peak = known_peak_flops(torch.cuda.get_device_name(device))
            source = "dense bf16 peak of the table of known devices" if peak else "unknown device: no peak"
            row = {"dtype": "bfloat16", "n": 4096}
        found.append(
            {
                "device": name,
                **row,
                "flops": rate,
                "peak_flops": peak,
                "peak_source": source,
                "fraction_of_peak": rate / peak if peak else None,
            }
        )
    return found


def cache_folders() -> dict[str, Path]:
    """The folders msllm's libraries write caches to (whether or not they exist yet)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir  # noqa: PLC0415 (heavy: torch._inductor, 1 s)

    home_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return {
        "cache (~/.cache)": home_cache,
        "torch extensions (DeepSpeed's ops)": Path(
            os.environ.get("TORCH_EXTENSIONS_DIR", home_cache / "torch_extensions")
        ),
        "triton": Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache")),
        "inductor": Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())),
    }


def disk(output_dir: Path) -> list[dict]:
    """Free space where the output folder and each cache folder are (or will be: the nearest
    existing folder above one that does not exist yet)."""
    found = []
    for what, folder in {"output": Path(output_dir), **cache_folders()}.items():
        existing = folder.resolve()
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        usage = shutil.disk_usage(existing)
        found.append(
            {
                "what": what,
                "path": str(folder),
                "exists": folder.exists(),
                "free_bytes": usage.free,
                "total_bytes": usage.total,
            }
        )
    return found


def collect(output_dir: Path = Path("."), check: bool = True) -> dict:
    """The whole report as a dict (what --json prints)."""
    t0 = time.perf_counter()
    report = {"versions": _guarded(versions), "devices": _guarded(devices), "distributed": _guarded(distributed)}
    names = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else ["cpu"]
    report["kernels"] = _guarded(lambda: kernels(names, check))
    report["matmul"] = _guarded(lambda: matmul(names))
    report["disk"] = _guarded(lambda: disk(output_dir))
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def _size(n) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB"


def format_report(report: dict) -> str:
    """The report as text: one line per fact."""
    lines = []

    def part(title, body):
        if isinstance(body, dict) and set(body) == {"error"}:
            lines.append(f"{title}: could not be read: {body['error']}")
            return False
        lines.append(f"{title}:")
        return True

    if part("versions", report["versions"]):
        lines.append("  " + " | ".join(f"{k} {v if v is not None else '-'}" for k, v in report["versions"].items()))
    if part("devices", report["devices"]):
        for d in report["devices"]:
            if d["device"] == "cpu":
                lines.append(
                    f"  cpu: {d['name']}, {d['cores']} cores, torch uses {d['torch_threads']} threads, "
                    f"memory {_size(d['memory_available_bytes'])} available of {_size(d['memory_total_bytes'])}"
                )
            else:
                lines.append(
                    f"  {d['device']}: {d['name']} (capability {d['capability']}), memory "
                    f"{_size(d['memory_free_bytes'])} free of {_size(d['memory_total_bytes'])}"
                )
    if part("distributed", report["distributed"]):
        dist = report["distributed"]
        lines.append(
            "  torch.distributed backends: "
            + (", ".join(f"{k} {'yes' if v else 'no'}" for k, v in dist["backends"].items() if v is not None) or "none")
        )
        ops = dist["deepspeed_ops"]
        if "error" in ops:
            lines.append(f"  DeepSpeed ops: could not be read: {ops['error']}")
        else:
            yes = [k for k, v in ops["compatible"].items() if v is True]
            no = [k for k, v in ops["compatible"].items() if v is not True]
            lines.append(
                f"  DeepSpeed ops buildable here: {', '.join(yes) or 'none'}; not: {', '.join(no) or 'none'} "
                f"(asked in {ops['seconds']} s)"
            )
    if part("kernels (what training would use, and the start-up check of each non-reference one)", report["kernels"]):
        for row in report["kernels"]:
            for what in ("attention", "loss"):
                entry = row[what]
                check = entry.get("check")
                if isinstance(check, dict):
                    verdict = (
                        "PASSES" if check["passed"] else "FAILS"
                    ) + f" its check against {entry['reference']}: {check['detail']} ({check['seconds']} s)"
                else:
                    verdict = check
                lines.append(f"  {row['device']} {what}: {entry['kernel']} ({row['dtype']}): {verdict}")
    if part("matmul", report["matmul"]):
        for m in report["matmul"]:
            against = (
                f"{m['fraction_of_peak']:.0%} of {m['peak_flops'] / 1e12:.3g} TFLOP/s ({m['peak_source']})"
                if m["peak_flops"]
                else m["peak_source"]
            )
            lines.append(f"  {m['device']}: {m['flops'] / 1e12:.3g} TFLOP/s ({m['dtype']}, {m['n']}^2): {against}")
    if part("disk", report["disk"]):
        for d in report["disk"]:
            lines.append(
                f"  {d['what']}: {_size(d['free_bytes'])} free of {_size(d['total_bytes'])} at {d['path']}"
                + ("" if d["exists"] else " (not created yet)")
            )
    lines.append(f"(doctor took {report['seconds']} s)")
    return "\n".join(lines)


def doctor(output_dir: str = ".", as_json: bool = False, check: bool = True) -> None:
    """`msllm doctor`: print the report."""
    with contextlib.redirect_stdout(
        sys.stderr
    ):  # what the libraries print (DeepSpeed logs to stdout) stays off the report
        report = collect(Path(output_dir), check)
    print(json.dumps(report, indent=2, default=str) if as_json else format_report(report))
    sys.stdout.flush()
