"""`msllm bench NAME`: run a benchmark on this machine and append its result to OUT/NAME.md.

BENCHMARKS maps a name to a function `run(args) -> str` that measures and returns its figures as
markdown. `run_benchmark` adds the command, the date and the machine, and appends the section to
`<args.out>/<name>.md`, so that the file keeps every measurement with what produced it. These are
the measurements a user runs on their own hardware; the experiments (the paper's comparison, bytes
against BPE, scaling with L, the quickstart's timing) are in the repository's lab/ folder, beside
the package, and go through run_benchmark with their own registry (`python -m lab`).

    data.py               data-prep, data-loader: `msllm prep` and the loader at the quickstart size
    sequence_parallel.py  sequence-parallel: per-rank memory, time and traffic at sp = 1, 2, 4
    models.py             models: the paper-comparison recipes through msllm.inspect
    throughput.py         throughput: msllm train and a bare loop, speed and memory against L, eager and compiled
    attention.py          attention: one layer's sliding-window attention per kernel (time, memory, agreement)
    loss.py               loss: the loss kernels' speed on the quickstart (alternating) and memory at BookCorpus sizes
    startup.py            startup: eval, generate, export, inspect and a finished train against importing torch
    model_startup.py      model-startup: per-rank memory and time from building the model to step 1, ZeRO-3 x4 vs whole
    generate.py           generate: cached decoding against the uncached loop, per arch and HF Llama; prefill
    gpu.py                gpu: the CUDA-only tests, the kernels' start-up checks, attention and throughput (GPU only)
    ops.py                ops: operations dispatched per training step at BookCorpus sizes, eager and compiled (counted)

To add a benchmark: a module here with a function `bench_NAME(args) -> str` (heavy imports inside
it), and an entry in BENCHMARKS.

Paths: the results go to `--out` (default: benchmarks/ of the current folder, said in the help and
printed after each run); the recipes the benchmarks measure (recipes/models, recipes/quickstart.yaml,
recipes/long_context, ...) are read from `--recipes DIR` (default: recipes/ of the current folder,
that is the repository's when run from a checkout's root) through `shipped_recipe`, which names the
missing file and the option in one line when they are not there (an installed package ships no
recipes).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

from msllm.errors import MsllmError


def lazy(module: str, function: str, doc: str, package: str = "msllm.bench") -> Callable[[argparse.Namespace], str]:
    """The benchmark `package.module.function`, imported only when it runs (torch, streaming are slow
    to import). The lab's experiments (lab/__init__.py) are made the same way, from package "lab"."""

    def run(args: argparse.Namespace) -> str:
        return getattr(importlib.import_module(f"{package}.{module}"), function)(args)

    run.__doc__ = doc
    return run


BENCHMARKS: dict[str, Callable[[argparse.Namespace], str]] = {
    "data-prep": lazy(
        "data", "bench_data_prep", "msllm prep throughput (tokenize + write, tokens/s) at the quickstart size."
    ),
    "data-loader": lazy(
        "data", "bench_data_loader", "Train/validation loader throughput (tokens/s) against what training consumes."
    ),
    "sequence-parallel": lazy(
        "sequence_parallel",
        "bench_sequence_parallel",
        "Per-rank training-step memory, step time and bytes sent at 16k tokens, sp = 1, 2, 4, per multi-scale arch.",
    ),
    "models": lazy(
        "models",
        "bench_models",
        "Parameters, FLOPs/token and training-step memory of the paper-comparison recipes (vanilla-14 vs 30-layer).",
    ),
    "throughput": lazy(
        "throughput",
        "bench_throughput",
        "msllm train against a bare loop: tokens/s, MFU, peak memory per arch and HF Llama, eager and compiled, "
        "against L.",
    ),
    "attention": lazy(
        "attention",
        "bench_attention",
        "One layer's sliding-window attention per kernel: forward + backward time, saved bytes, agreement with dense.",
    ),
    "loss": lazy(
        "loss",
        "bench_loss",
        "The loss kernels: quickstart tokens/s with dense and chunked alternating; the loss's memory at BookCorpus "
        "sizes.",
    ),
    "startup": lazy(
        "startup",
        "bench_startup",
        "Start-up cost of eval, generate, export, inspect and a finished train against `import torch, msllm`.",
    ),
    "model-startup": lazy(
        "model_startup",
        "bench_model_startup",
        "Per-rank memory and time from building a 300M model to its first step: ZeRO-3 on 4 CPU ranks vs whole on 1.",
    ),
    "generate": lazy(
        "generate",
        "bench_generate",
        "Cached decoding tokens/s per arch against the uncached loop, vanilla and HF Llama generate; prefill; plot.",
    ),
    "ops": lazy(
        "ops",
        "bench_ops",
        "Operations dispatched per training step of each arch at BookCorpus sizes, eager and compiled (no timing).",
    ),
    "gpu": lazy(
        "gpu",
        "bench_gpu",
        "GPU only: the CUDA-only tests, the kernels' start-up checks (doctor), attention and throughput, one file.",
    ),
}


MOVED_TO_LAB = ("paper", "bytes", "scaling", "train-quickstart")  # now `python -m lab NAME`, in a checkout's lab/

RECIPES = Path("recipes")  # where shipped_recipe looks: run_benchmark sets it from --recipes


def shipped_recipe(relative: str) -> str:
    """The path of `relative` (e.g. "models/vanilla-tiny.yaml") under the recipes folder of this
    run (--recipes), or one line saying it is missing and how to point at it."""
    path = RECIPES / relative
    if not path.exists():
        raise MsllmError(
            f"no recipe {path}: this benchmark measures the recipes shipped in the msllm repository; "
            "pass --recipes DIR (the recipes/ folder of a checkout)"
        )
    return str(path)


def run_benchmark(
    args: argparse.Namespace,
    benchmarks: dict[str, Callable[[argparse.Namespace], str]] | None = None,
    command: str | None = None,
) -> None:
    """Run the benchmark `args.name` of `benchmarks` (default: BENCHMARKS; --list lists them) and
    append its result to `args.out`/NAME.md; `command`: what to record as the command (default:
    this `msllm bench` command line)."""
    benchmarks = BENCHMARKS if benchmarks is None else benchmarks
    if getattr(args, "list", False) or not args.name:
        for name, run in benchmarks.items():
            doc = (run.__doc__ or "").strip().splitlines()
            print(f"{name}" + (f"  {doc[0]}" if doc else ""))
        return
    run = benchmarks.get(args.name)
    if run is None and benchmarks is BENCHMARKS and args.name in MOVED_TO_LAB:
        raise MsllmError(
            f"{args.name} is an experiment of the msllm repository, no longer a benchmark of the package: "
            f"from a checkout, run python -m lab {args.name}"
        )
    if run is None:
        raise MsllmError(f"unknown benchmark {args.name!r}; choose from: {', '.join(benchmarks)}")
    global RECIPES
    if benchmarks is BENCHMARKS:
        RECIPES = Path(getattr(args, "recipes", None) or "recipes")
    machine = machine_description()  # before the run, so the load average is the others' load
    figures = run(args).strip()
    section = "\n".join(
        [
            f"## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            "",
            f"Command: `{command or _command(args.name)}`",
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
        import torch  # noqa: PLC0415 (start-up: msllm bench --list imports no torch)

        torch_version = torch.__version__
    except ImportError:
        torch_version = "not installed"
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # The load average tells whether other work shared the CPU during the measurement.
    load = f", load average {os.getloadavg()[0]:.1f} at start" if hasattr(os, "getloadavg") else ""
    return f"{nproc} cores ({cpu}), torch {torch_version}, python {platform.python_version()}{load}"
