"""The lab: the experiments run on msllm, with their recipes and results, beside the package (not
part of it: `pip install msllm` does not ship them). Run from a checkout:

    python -m lab --list
    python -m lab paper [--seeds 1 2 3] [--jobs N] [--runs DIR] [--set SECTION.KEY=VALUE] [--out DIR]

Each experiment appends its result, with the command, date and machine, to lab/results/NAME.md
(plots beside it) through msllm.bench.run_benchmark, as `msllm bench` does for the measurements a
user runs on their own hardware.

    paper.py       paper: the paper's comparison trained on the built-in corpus, with seeds
    bytes.py       bytes: learned chunking against fixed boundaries and pooling, controlled, and against BPE
    scaling.py     scaling: step time and step memory against the sequence length
    quickstart.py  train-quickstart: both quickstart recipes end to end
    recipes/       the experiments' own recipes (recipes/paper, recipes/bytes)
    results/       their committed results: NAME.md and the plots

Every path is relative to this folder or to the repository above it (LAB, REPO), never to the
current folder: `python -m lab` runs the same from anywhere in the checkout.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from msllm.bench import lazy

LAB = Path(__file__).resolve().parent
REPO = LAB.parent
RECIPES = LAB / "recipes"
RESULTS = LAB / "results"

EXPERIMENTS: dict[str, Callable[[argparse.Namespace], str]] = {
    "paper": lazy(
        "paper",
        "bench_paper",
        "The paper's comparison trained on the built-in corpus: bits per byte over seeds, memory split, verdict, "
        "plots.",
        package="lab",
    ),
    "bytes": lazy(
        "bytes",
        "bench_bytes",
        "Learned chunking controlled: fixed pooling, fixed and learned boundaries, H-Net's ingredients, Mamba-2 "
        "outer stages and BPE vanilla at equal FLOPs/byte, seeds, router diagnostics, verdicts.",
        package="lab",
    ),
    "scaling": lazy(
        "scaling",
        "bench_scaling",
        "Step time and training-step memory against L (1k-16k) per architecture, fitted exponents.",
        package="lab",
    ),
    "train-quickstart": lazy(
        "quickstart",
        "bench_quickstart",
        "Both quickstart recipes end to end: wall time, tokens/s, validation bits per byte.",
        package="lab",
    ),
}
