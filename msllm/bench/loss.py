"""`msllm bench loss`: what the loss kernels (msllm.train.loss) cost in speed and memory.

1. Speed of the quickstart: `msllm train recipes/quickstart.yaml` (its model, micro-batch and
   sequence length; eager, ZeRO 0, as the README's main command runs) with the dense loss and
   with the chunked one, alternately, `ROUNDS` pairs in one run of the benchmark (a shared CPU's
   speed drifts over minutes, more than the difference being measured): tokens/s of each run's
   last `STEPS` steps, the chunked / dense ratio of each pair and their median. On a GPU the
   fused kernels (liger, cce) that are installed join the rotation.
2. Memory at the BookCorpus sizes (16 x 1024 positions, d_model 512, vocabulary 32,000, bf16): what
   the loss alone holds per micro-batch under each kernel (msllm.train.memory.loss_activation_bytes:
   saved for backward plus workspace; the fused kernels are not measured on the CPU).
"""

from __future__ import annotations

import dataclasses
import statistics

import torch

from msllm.bench import shipped_recipe
from msllm.bench.throughput import loss_kernels, measure_trainer, model_config
from msllm.config import load_recipe
from msllm.models import build_model
from msllm.train.memory import DTYPES, loss_activation_bytes, sample_tokens

ROUNDS = 4
STEPS = 25  # timed steps per run, after as many warm-up steps


def speed_rows(
    kernels: tuple[str, ...], rounds: int = ROUNDS, steps: int = STEPS, recipe: str | None = None
) -> list[dict]:
    """One `msllm train` per (round, kernel), the kernels alternating within each round; `recipe`:
    the quickstart's (recipes/quickstart.yaml under --recipes) unless given."""
    recipe = recipe or shipped_recipe("quickstart.yaml")
    r = load_recipe(recipe)
    vocab = model_config(recipe, 0).vocab_size
    rows = []
    for round_ in range(1, rounds + 1):
        for kernel in kernels:
            row = measure_trainer(
                "quickstart",
                recipe,
                vocab,
                r.data.seq_len,
                r.train.micro_batch_size * r.data.seq_len,
                steps,
                compiled=False,
                loss_kernel=kernel,
            )
            rows.append({**row, "round": round_})
            print(row, flush=True)
    return rows


def memory_rows(kernels: tuple[str, ...] = ("dense", "chunked"), sample_len: int = 0) -> list[dict]:
    """The loss's bytes per micro-batch at the BookCorpus sizes, per kernel, measured on samples of
    `sample_len` positions (0: the recipe's seq_len) and extended linearly to the micro-batch
    (loss_activation_bytes). A shorter sample gives the same figure to a few KiB in much less
    time: bf16 matmuls are slow on CPUs."""
    r = load_recipe(shipped_recipe("models/vanilla-bookcorpus.yaml"))
    # The loss depends on the head and the hidden states only: a one-layer body gives the same bytes.
    cfg = dataclasses.replace(
        r.model, vocab_size=r.data.tokenizer.vocab_size, scales=[dataclasses.replace(r.model.scales[0], layers=1)]
    )
    torch.manual_seed(0)
    model = build_model(cfg).to(DTYPES[r.train.precision])
    tokens = sample_tokens(model, cfg.vocab_size, sample_len or r.data.seq_len)
    return [
        {
            "kernel": k,
            "bytes": loss_activation_bytes(model, tokens, r.train.micro_batch_size * r.data.seq_len, k),
            "positions": r.train.micro_batch_size * r.data.seq_len,
            "vocab": cfg.vocab_size,
            "d_model": cfg.d_model,
            "precision": r.train.precision,
        }
        for k in kernels
    ]


def to_markdown(speed: list[dict], memory: list[dict]) -> str:
    kernels = list(dict.fromkeys(r["loss"] for r in speed))
    lines = [
        f"Speed: `msllm train recipes/quickstart.yaml` (eager, ZeRO 0), tokens/s over each run's last {STEPS} "
        f"steps; the kernels alternate within each round.",
        "",
        "| round | "
        + " | ".join(f"{k} tokens/s" for k in kernels)
        + " | "
        + " | ".join(f"{k} / dense" for k in kernels[1:])
        + " |",
        "|---|" + "---|" * (2 * len(kernels) - 1),
    ]
    ratios: dict[str, list[float]] = {k: [] for k in kernels[1:]}
    for round_ in sorted({r["round"] for r in speed}):
        by = {r["loss"]: r for r in speed if r["round"] == round_}
        cells = [
            f"{by[k]['tokens_per_s']:,.0f}" if "tokens_per_s" in by[k] else by[k].get("error", "failed")
            for k in kernels
        ]
        pair = []
        for k in kernels[1:]:
            if "tokens_per_s" in by[k] and "tokens_per_s" in by["dense"]:
                ratios[k].append(by[k]["tokens_per_s"] / by["dense"]["tokens_per_s"])
                pair.append(f"{ratios[k][-1]:.3f}x")
            else:
                pair.append("")
        lines.append(f"| {round_} | " + " | ".join(cells + pair) + " |")
    lines += [
        "",
        *(
            f"Median {k} / dense over the rounds: **{statistics.median(v):.3f}x** (min {min(v):.3f}x, max "
            f"{max(v):.3f}x)."
            for k, v in ratios.items()
            if v
        ),
    ]
    m = memory[0]
    lines += [
        "",
        f"Memory: what the loss holds per micro-batch ({m['positions']:,} positions, d_model {m['d_model']}, "
        f"vocabulary {m['vocab']:,}, {m['precision']}; msllm.train.memory.loss_activation_bytes: saved for backward "
        "plus workspace):",
        "",
        "| kernel | loss MiB per micro-batch |",
        "|---|---|",
        *(f"| {r['kernel']} | {r['bytes'] / 2**20:,.1f} |" for r in memory),
    ]
    return "\n".join(lines)


def bench_loss(args) -> str:
    kernels = loss_kernels(torch.cuda.is_available())
    return to_markdown(speed_rows(kernels), memory_rows())
