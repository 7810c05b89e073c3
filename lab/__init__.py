"""The lab: the experiments run on msllm, with their recipes and results, beside the package (not
part of it: `pip install msllm` does not ship them). Run from a checkout:

    python -m lab --list
    python -m lab paper [--seeds 1 2 3] [--jobs N] [--runs DIR] [--set SECTION.KEY=VALUE] [--out DIR]

Each experiment appends its result, with the command, date and machine, to lab/results/NAME.md
(plots beside it) through msllm.bench.run_benchmark, as `msllm bench` does for the measurements a
user runs on their own hardware.

    paper.py       paper: the paper's comparison trained on the built-in corpus, with seeds
    bytes.py       bytes: BPE vs byte-level models, fixed pooling vs learned chunking, with seeds
    scaling.py     scaling: step time and step memory against the sequence length
    quickstart.py  train-quickstart: both quickstart recipes end to end
    recipes/       the experiments' own recipes (recipes/paper, recipes/bytes)
    results/       their committed results: NAME.md and the plots

Every path is relative to this folder or to the repository above it (LAB, REPO), never to the
current folder: `python -m lab` runs the same from anywhere in the checkout.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from pathlib import Path

LAB = Path(__file__).resolve().parent
REPO = LAB.parent
RECIPES = LAB / "recipes"
RESULTS = LAB / "results"


def _lazy(module: str, function: str, doc: str) -> Callable[[argparse.Namespace], str]:
    """The experiment `lab.module.function`, imported only when it runs."""

    def run(args: argparse.Namespace) -> str:
        return getattr(importlib.import_module(f"lab.{module}"), function)(args)

    run.__doc__ = doc
    return run


EXPERIMENTS: dict[str, Callable[[argparse.Namespace], str]] = {
    "paper": _lazy(
        "paper",
        "bench_paper",
        "The paper's comparison trained on the built-in corpus: bits per byte over seeds, memory split, verdict, "
        "plots.",
    ),
    "bytes": _lazy(
        "bytes",
        "bench_bytes",
        "BPE vanilla vs byte-level vanilla, fixed-pooling and dynamic-chunking bottom-up at equal FLOPs/byte, "
        "seeds, verdict.",
    ),
    "scaling": _lazy(
        "scaling",
        "bench_scaling",
        "Step time and training-step memory against L (1k-16k) per architecture, fitted exponents.",
    ),
    "train-quickstart": _lazy(
        "quickstart",
        "bench_quickstart",
        "Both quickstart recipes end to end: wall time, tokens/s, validation bits per byte.",
    ),
}
