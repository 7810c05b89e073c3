"""`msllm bench gpu`: everything in msllm that only a GPU can check or measure, in one command and
one results file (benchmarks/gpu.md), for whoever has a GPU:

    1. the tests that skip without CUDA, every test under tests/ marked `needs_cuda` (FlexAttention
       forward and backward against the dense reference, a model on FlexAttention compiled as one
       graph, the fused loss kernels against chunked, mamba-ssm's scan against PyTorch's), in a
       fresh pytest process, with its summary and any failure;
    2. the start-up checks of the kernels each GPU would train with (`msllm doctor --json`'s
       report: versions, devices, kernels and their checks, matmul rate against the peak);
    3. `msllm bench attention` (one layer's sliding-window attention per kernel at L = 64k);
    4. `msllm bench throughput` (every architecture, eager and compiled, L = 1k..128k, the trainer
       against the bare loop, operations dispatched per step, the loss kernels against each other).

Each part that fails is written as its error and the next one runs. Run it from the repository
root (the tests and the recipes are read from there); it takes as long as the throughput benchmark
(tens of minutes on one H100). On a machine without CUDA it stops with one line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from msllm import bench
from msllm.bench.attention import bench_attention
from msllm.bench.throughput import bench_throughput
from msllm.doctor import collect, format_report
from msllm.errors import MsllmError

CUDA_TESTS = "tests"  # the test folder of a checkout: pytest -m CUDA_MARKER selects in all of it
CUDA_MARKER = "needs_cuda"  # tests/conftest.py skips the tests it marks where torch sees no CUDA device


def cuda_tests(root: Path = Path(".")) -> dict:
    """The CUDA-only tests (marked `needs_cuda`) of the checkout at `root` in a fresh pytest
    process: its exit code and the end of its report."""
    if not (root / CUDA_TESTS / "conftest.py").is_file():
        raise MsllmError(
            f"no {CUDA_TESTS}/conftest.py under {root}: the CUDA tests are in an msllm checkout; pass --recipes "
            "DIR, the recipes/ folder of one (its parent holds tests/)"
        )
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-n",
        "0",
        "-q",
        "-rfEs",
        "-p",
        "no:cacheprovider",
        "-m",
        CUDA_MARKER,
        CUDA_TESTS,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    return {
        "command": " ".join(["python", *cmd[1:]]),
        "exit_code": proc.returncode,
        "summary": lines[-1] if lines else proc.stderr.strip()[-300:],
        "report": "\n".join(lines[-40:]),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _part(name: str, run, results: dict, out: Path) -> None:
    """Run one part; its result, or its error, goes into `results` (saved after every part, so that
    a crash keeps what was measured)."""
    t0 = time.perf_counter()
    try:
        results[name] = run()
    except Exception as exc:  # the next part still runs; the file says what failed
        results[name] = {"error": f"{type(exc).__name__}: {str(exc).strip()[:300]}"}
    print(f"bench gpu: {name} done in {time.perf_counter() - t0:.0f} s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-results.json").write_text(json.dumps(results, indent=2, default=str))


def bench_gpu(args) -> str:
    if not torch.cuda.is_available():
        raise MsllmError(
            "msllm bench gpu needs a CUDA GPU and this machine has none; run it on a GPU node "
            "(from the repository root), or run the CPU benchmarks (msllm bench --list)"
        )

    out = Path(args.out)
    results: dict = {}

    checkout = bench.RECIPES.resolve().parent  # --recipes names the checkout's recipes/; its tests are beside them
    _part("cuda tests", lambda: cuda_tests(checkout), results, out)
    _part("doctor", lambda: collect(out), results, out)
    _part("attention", lambda: bench_attention(args), results, out)
    _part("throughput", lambda: bench_throughput(args), results, out)

    def text(name: str, body) -> str:
        if isinstance(body, dict) and set(body) == {"error"}:
            return f"### {name}\n\nfailed: {body['error']}\n"
        return f"### {name}\n\n{body}\n"

    tests = results["cuda tests"]
    tests_text = (
        tests
        if "error" in tests
        else (
            f"`{tests['command']}`: exit {tests['exit_code']}, {tests['summary']} ({tests['seconds']} s)\n\n"
            "```\n" + tests["report"] + "\n```"
        )
    )
    doctor = results["doctor"]
    doctor_text = doctor if "error" in doctor else "```\n" + format_report(doctor) + "\n```"
    return "\n".join(
        [
            "Every GPU-only check and measurement of msllm (msllm/bench/gpu.py); the raw results are in "
            "gpu-results.json beside this file.",
            "",
            text("The CUDA-only tests", tests_text),
            text("The kernels' start-up checks and the machine (msllm doctor)", doctor_text),
            text("Attention (msllm bench attention)", results["attention"]),
            text("Throughput (msllm bench throughput)", results["throughput"]),
        ]
    )
