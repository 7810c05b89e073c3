"""`python -m lab scaling`: step time and training-step memory against the sequence length.

For the four architectures at one small size (recipes/models/*-tiny.yaml, with a small vocabulary so
that the head does not hide how attention scales), one sample of L tokens for L = 1k, 2k, 4k, 8k,
16k on the CPU: the median time of a training step (forward, loss, backward, AdamW) and the memory
of the step (msllm.train.memory: parameters, gradients, optimizer state, activations with the loss).
Then, per architecture, the exponent b of a least-squares fit of time ~ L^b and of memory ~ L^b
over the lengths, and of time over the last doubling alone: full attention makes vanilla's time
grow towards L^2 as L grows (at short L its linear layers still dominate), local and coarse
attention keep the multi-scale models near L^1. Writes a table and lab/results/scaling.png (log-log axes).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import statistics
import time
from pathlib import Path

import torch

from lab import REPO, RESULTS
from msllm.bench import plotting
from msllm.config import load_recipe
from msllm.models import build_model
from msllm.models.registry import ARCHS  # every registered architecture
from msllm.train.bare import bare_step
from msllm.train.memory import step_memory

LENGTHS = (1024, 2048, 4096, 8192, 16384)
VOCAB = 256


def bench_scaling(args: argparse.Namespace) -> str:
    lengths = tuple(getattr(args, "lengths", None) or LENGTHS)
    archs = tuple(getattr(args, "models", None) or ARCHS)
    results = {arch: [measure(arch, L) for L in lengths] for arch in archs}
    out = Path(getattr(args, "out", None) or RESULTS)
    plot(results, out)
    return to_markdown(results)


def model_config(arch: str):
    recipe = load_recipe(REPO / "recipes" / "models" / f"{arch}-tiny.yaml")
    return dataclasses.replace(recipe.model, vocab_size=VOCAB)


def measure(arch: str, L: int, repeats: int = 3) -> dict:
    """Median step time of `repeats` steps after a warm-up step, and the memory split."""
    cfg = model_config(arch)
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, VOCAB, (1, L + 1))
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        bare_step(model, optimizer, tokens[:, :-1], tokens[:, 1:])
        if i:  # the first step allocates the optimizer state and warms the kernels up
            times.append(time.perf_counter() - start)
    memory = step_memory(build_model(cfg), VOCAB, 1, L)
    return {"L": L, "step_s": statistics.median(times), "memory": memory.total, "loss_memory": memory.loss_activations}


def exponent(points: list[tuple[float, float]]) -> float:
    """Slope of the least-squares line through (log x, log y)."""
    xs = [math.log(x) for x, _ in points]
    ys = [math.log(y) for _, y in points]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def figure(results: dict):
    """Step time and step memory against L, one line per architecture, log-log (the slopes are
    the fitted exponents of the table)."""
    fig, axes = plotting.new_figure(10, 4.6, ncols=2)
    time_ax, memory_ax = axes[0]
    for arch, rows in results.items():
        Ls = [r["L"] for r in rows]
        time_ax.plot(Ls, [r["step_s"] for r in rows], marker="o", label=arch)
        memory_ax.plot(Ls, [r["memory"] / 2**20 for r in rows], marker="o", label=arch)
    lengths = [r["L"] for rows in results.values() for r in rows]
    for ax, label in ((time_ax, "training step time (s)"), (memory_ax, "training step memory (MiB)")):
        plotting.length_axis(ax, lengths)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(lambda y, _: f"{y:g}")  # 0.1, 1, 100: not 10^-1
        ax.set_xlabel("sequence length L (tokens, one sample)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("Scaling with L on the CPU (tiny models, log-log)")
    plotting.legend_outside(fig, ncols=len(results))
    return fig


def plot(results: dict, out: Path) -> Path:
    return plotting.save(figure(results), out / "scaling.png")


def replot(out: Path) -> Path:
    """lab/results/scaling.png again from the newest table in out/scaling.md (no measuring)."""
    results = {}
    for row in plotting.table_rows(plotting.last_section((out / "scaling.md").read_text())):
        cells = {int(m[1]): v for k, v in row.items() if (m := re.match(r"L=(\d+) ", k))}
        results[row["arch"]] = [
            {"L": L, "step_s": float(v.split("/")[0]), "memory": plotting.number(v.split("/")[1].split("(")[0]) * 2**20}
            for L, v in cells.items()
        ]
    return plot(results, out)


def to_markdown(results: dict) -> str:
    lengths = [r["L"] for r in next(iter(results.values()))]
    head = (
        "| arch | "
        + " | ".join(f"L={L} s / MiB (loss)" for L in lengths)
        + " | time exponent | time exponent, last doubling | memory exponent |"
    )
    rows = [
        "Models: recipes/models/*-tiny.yaml with a 256-token vocabulary; one sample per step, fp32, one process. "
        "Memory: the whole training step (msllm.train.memory), of which the loss's activations (chunked) in brackets.",
        "",
        head,
        "|---|" + "---|" * (len(lengths) + 3),
    ]
    for arch, rs in results.items():
        cells = " | ".join(
            f"{r['step_s']:.3f} / {r['memory'] / 2**20:,.0f} ({r['loss_memory'] / 2**20:,.1f})" for r in rs
        )
        t = exponent([(r["L"], r["step_s"]) for r in rs])
        last = exponent([(r["L"], r["step_s"]) for r in rs[-2:]])
        m = exponent([(r["L"], r["memory"]) for r in rs])
        rows.append(f"| {arch} | {cells} | {t:.2f} | {last:.2f} | {m:.2f} |")
    rows += ["", "![scaling](scaling.png)"]
    return "\n".join(rows)
