"""`msllm bench NAME`: run a benchmark and append its result to benchmarks/NAME.md.

BENCHMARKS maps a name to a function `run(args) -> str` that measures and returns its figures as
markdown. `run_benchmark` adds the command, the date and the machine, and appends the section to
`<args.out>/<name>.md`, so that the file keeps every measurement with what produced it.

    data.py               data-prep, data-loader: `msllm prep` and the loader at the quickstart size
    sequence_parallel.py  sequence-parallel: per-rank memory, time and traffic at sp = 1, 2, 4
    quickstart.py         train-quickstart: both quickstart recipes end to end
    models.py             models: the paper-comparison recipes through msllm.inspect
    throughput.py         throughput: msllm train and a bare loop, speed and memory against L, eager and compiled
    paper.py              paper: the paper's comparison trained on the built-in corpus, with seeds
    scaling.py            scaling: step time and step memory against the sequence length
    attention.py          attention: one layer's sliding-window attention per kernel (time, memory, agreement)
    loss.py               loss: the loss kernels' speed on the quickstart (alternating) and memory at BookCorpus sizes
    startup.py            startup: eval, generate, export, inspect and a finished train against importing torch
    model_startup.py      model-startup: per-rank memory and time from building the model to step 1, ZeRO-3 x4 vs whole
    generate.py           generate: cached decoding against the uncached loop, per arch and HF Llama; prefill
    bytes.py              bytes: BPE vs byte-level models, fixed pooling vs learned chunking, with seeds
    gpu.py                gpu: the CUDA-only tests, the kernels' start-up checks, attention and throughput (GPU only)

To add a benchmark: a module here with a function `bench_NAME(args) -> str` (heavy imports inside
it), and an entry in BENCHMARKS.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path
from typing import Callable

from msllm.errors import MsllmError


def _lazy(module: str, function: str, doc: str) -> Callable[[argparse.Namespace], str]:
    """The benchmark `module.function`, imported only when it runs (torch, streaming are slow to import)."""

    def run(args: argparse.Namespace) -> str:
        import importlib

        return getattr(importlib.import_module(f"msllm.bench.{module}"), function)(args)

    run.__doc__ = doc
    return run


BENCHMARKS: dict[str, Callable[[argparse.Namespace], str]] = {
    "data-prep": _lazy("data", "bench_data_prep", "msllm prep throughput (tokenize + write, tokens/s) at the quickstart size."),
    "data-loader": _lazy("data", "bench_data_loader", "Train/validation loader throughput (tokens/s) against what training consumes."),
    "sequence-parallel": _lazy(
        "sequence_parallel", "bench_sequence_parallel",
        "Per-rank training-step memory, step time and bytes sent at 16k tokens, sp = 1, 2, 4, per multi-scale arch.",
    ),
    "models": _lazy(
        "models", "bench_models",
        "Parameters, FLOPs/token and training-step memory of the paper-comparison recipes (vanilla-14 vs 30-layer).",
    ),
    "paper": _lazy(
        "paper", "bench_paper",
        "The paper's comparison trained on the built-in corpus: bits per byte over seeds, memory split, verdict, plots.",
    ),
    "scaling": _lazy(
        "scaling", "bench_scaling", "Step time and training-step memory against L (1k-16k) per architecture, fitted exponents."
    ),
    "throughput": _lazy(
        "throughput", "bench_throughput",
        "msllm train against a bare loop: tokens/s, MFU, peak memory per arch and HF Llama, eager and compiled, against L.",
    ),
    "attention": _lazy(
        "attention", "bench_attention",
        "One layer's sliding-window attention per kernel: forward + backward time, saved bytes, agreement with dense.",
    ),
    "loss": _lazy(
        "loss", "bench_loss",
        "The loss kernels: quickstart tokens/s with dense and chunked alternating; the loss's memory at BookCorpus sizes.",
    ),
    "startup": _lazy(
        "startup", "bench_startup",
        "Start-up cost of eval, generate, export, inspect and a finished train against `import torch, msllm`.",
    ),
    "model-startup": _lazy(
        "model_startup", "bench_model_startup",
        "Per-rank memory and time from building a 300M model to its first step: ZeRO-3 on 4 CPU ranks vs whole on 1.",
    ),
    "generate": _lazy(
        "generate", "bench_generate",
        "Cached decoding tokens/s per arch against the uncached loop, vanilla and HF Llama generate; prefill; plot.",
    ),
    "bytes": _lazy(
        "bytes", "bench_bytes",
        "BPE vanilla vs byte-level vanilla, fixed-pooling and dynamic-chunking bottom-up at equal FLOPs/byte, seeds, verdict.",
    ),
    "gpu": _lazy(
        "gpu", "bench_gpu",
        "GPU only: the CUDA-only tests, the kernels' start-up checks (doctor), attention and throughput, one file.",
    ),
    "train-quickstart": _lazy(
        "quickstart", "bench_quickstart", "Both quickstart recipes end to end: wall time, tokens/s, validation bits per byte."
    ),
}


def run_benchmark(args: argparse.Namespace) -> None:
    """Run the benchmark `args.name` (or list them with --list) and append its result."""
    if getattr(args, "list", False) or not args.name:
        for name, run in BENCHMARKS.items():
            doc = (run.__doc__ or "").strip().splitlines()
            print(f"{name}" + (f"  {doc[0]}" if doc else ""))
        return
    run = BENCHMARKS.get(args.name)
    if run is None:
        raise MsllmError(f"unknown benchmark {args.name!r}; choose from: {', '.join(BENCHMARKS)}")
    machine = machine_description()  # before the run, so the load average is the others' load
    figures = run(args).strip()
    section = "\n".join(
        [
            f"## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            "",
            f"Command: `{_command(args.name)}`",
            "",
            f"Machine: {machine}",
            "",
            figures,
            "",
        ]
    )
    out = Path(args.out) / f"{args.name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    new_file = not out.exists()
    with out.open("a", encoding="utf-8") as f:
        if new_file:
            f.write(f"# Benchmark: {args.name}\n\nEach section is one run of the command it names.\n\n")
        f.write(section + "\n")
    print(section)
    print(f"(appended to {out})")


def _command(name: str) -> str:
    if sys.argv[1:2] == ["bench"]:
        return " ".join(["msllm", *sys.argv[1:]])
    return f"msllm bench {name}"


def machine_description() -> str:
    """nproc, CPU model, torch and python versions: what the figures depend on."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = "not installed"
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # The load average tells whether other work shared the CPU during the measurement.
    load = f", load average {os.getloadavg()[0]:.1f} at start" if hasattr(os, "getloadavg") else ""
    return f"{nproc} cores ({cpu}), torch {torch_version}, python {platform.python_version()}{load}"
