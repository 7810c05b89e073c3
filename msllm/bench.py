"""`msllm bench NAME`: run a benchmark and append its result to benchmarks/NAME.md.

BENCHMARKS maps a name to a function `run(args) -> str` that measures and returns its figures as
markdown. `run_benchmark` adds the command, the date and the machine, and appends the section to
`<args.out>/<name>.md`, so that the file keeps every measurement with what produced it.
To add a benchmark: write the function (import heavy modules inside it) and add it to BENCHMARKS.
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


def _data_prep(args: argparse.Namespace) -> str:
    """msllm prep throughput (tokenize + write, tokens/s) at the quickstart size."""
    from msllm.data.bench import bench_data_prep

    return bench_data_prep(args)


def _data_loader(args: argparse.Namespace) -> str:
    """Train/validation loader throughput (tokens/s) against what training consumes."""
    from msllm.data.bench import bench_data_loader

    return bench_data_loader(args)


def _sequence_parallel(args: argparse.Namespace) -> str:
    """Per-rank activation bytes, step time and bytes sent at 16k tokens, sp = 1, 2, 4, per multi-scale arch."""
    from msllm.parallel.benchmark import run, to_markdown

    return to_markdown(run())


def _models(args: argparse.Namespace) -> str:
    """Parameters, FLOPs/token and activation memory of the paper-comparison recipes (vanilla-14 vs 30-layer)."""
    import glob

    from msllm.inspect import compare_recipes

    return compare_recipes(sorted(glob.glob("recipes/models/*-bookcorpus.yaml")))


def _quickstart(args: argparse.Namespace) -> str:
    """Both quickstart recipes end to end: wall time, tokens/s, validation bits per byte."""
    from msllm.train.bench import bench_quickstart

    return bench_quickstart(args)


BENCHMARKS: dict[str, Callable[[argparse.Namespace], str]] = {
    "data-prep": _data_prep,
    "data-loader": _data_loader,
    "sequence-parallel": _sequence_parallel,
    "models": _models,
    "train-quickstart": _quickstart,
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
