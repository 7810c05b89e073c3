"""`msllm inspect`: what a recipe's model costs before you train it.

Parameters per scale, training FLOPs per token (the figure MFU is computed from), and the memory
of one training step on one rank, split into parameters, gradients, optimizer state and
activations with the loss (msllm.memory): the activations are measured on a real forward pass at
the recipe's sequence length and precision, so the figure compares architectures on a CPU as it
would on a GPU.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict

import torch
from torch import nn

from msllm.memory import step_memory
from msllm.models import build_model, flops_per_token
from msllm.parallel.parallelize import apply_activation_checkpointing


def parameters_by_part(model: nn.Module) -> dict[str, int]:
    """Parameter counts grouped by where they sit: embeddings, head, and each scale's stack."""
    counts: dict[str, int] = defaultdict(int)
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:  # tied embeddings count once
            continue
        seen.add(id(p))
        parts = name.split(".")
        if parts[0] in ("scales", "pools", "upsamples"):
            index = int(parts[1]) + (1 if parts[0] != "scales" else 0)
            key = f"scale {index}" + ("" if parts[0] == "scales" else f" ({parts[0][:-1]})")
        elif parts[0] == "layers":
            key = "scale 0"
        else:
            key = parts[0]
        counts[key] += p.numel()
    return dict(sorted(counts.items()))


def inspect_recipe(recipe, seq_len: int = 0, measure: bool = True, vocab_size: int = 0) -> dict:
    """Print (and return) the figures for a recipe's model at `seq_len` (default data.seq_len)."""
    seq_len = seq_len or recipe.data.seq_len
    model_cfg = recipe.model
    if model_cfg.vocab_size == 0:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=vocab_size or recipe.data.tokenizer.vocab_size)
    torch.manual_seed(recipe.run.seed)
    model = build_model(model_cfg)
    parts = parameters_by_part(model)
    total = sum(parts.values())
    flops = flops_per_token(model_cfg, seq_len)
    report = {"arch": model_cfg.arch, "parameters": total, "parameters_by_part": parts, "seq_len": seq_len,
              "train_flops_per_token": flops}
    print(f"architecture   {model_cfg.arch}  (vocab {model_cfg.vocab_size}, d_model {model_cfg.d_model})")
    print(f"parameters     {total:,}")
    for key, count in parts.items():
        print(f"  {key:<22} {count:>12,}")
    print(f"train FLOPs/token at L={seq_len}: {flops / 1e6:,.1f} M  (forward + backward)")
    if measure:
        if recipe.parallel.activation_checkpointing:
            apply_activation_checkpointing(model, offload=recipe.parallel.offload_activations)
        start = time.perf_counter()
        memory = step_memory(model, model_cfg.vocab_size, recipe.train.micro_batch_size, seq_len,
                             recipe.train.precision, recipe.parallel.zero_stage, dp=1)
        report["memory"] = memory
        print(
            f"training step  {recipe.train.micro_batch_size} x {seq_len} tokens, {recipe.train.precision}, "
            f"ZeRO {recipe.parallel.zero_stage}, one rank (measured in {time.perf_counter() - start:.1f} s):"
        )
        for part, nbytes in memory.as_dict().items():
            print(f"  {part:<22} {nbytes / 2**20:>12,.1f} MiB")
    return report


def compare_recipes(paths: list[str], seq_len: int = 0) -> str:
    """A markdown table of parameters, train FLOPs per token and the memory of one training step
    (per rank, the recipe's micro-batch and precision, parameters + gradients + optimizer state +
    activations with the loss) for several recipes' models, each at its own data.seq_len unless
    `seq_len` is given; the last column compares each total with the first vanilla recipe's (the
    paper's comparison), or the first recipe's if there is no vanilla one."""
    from msllm.config import load_recipe

    rows = ["| recipe | arch | layers | parameters | train GFLOP/token | parameters MiB | gradients MiB | "
            "optimizer MiB | activations MiB | total MiB | total vs {reference} |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    recipes = [(path, load_recipe(path)) for path in paths]
    recipes.sort(key=lambda item: item[1].model.arch != "vanilla")  # stable: the reference first
    rows[0] = rows[0].format(reference="vanilla" if recipes and recipes[0][1].model.arch == "vanilla" else "the first")
    first = None
    for path, recipe in recipes:
        report = inspect_recipe(recipe, seq_len=seq_len)
        m, mem = recipe.model, report["memory"]
        first = first or mem.total
        layers = sum(s.layers for s in m.scales) + (m.final_layers if m.arch == "bottom_up" else 0)
        mib = [f"{n / 2**20:,.0f}" for n in (mem.parameters, mem.gradients, mem.optimizer, mem.activations, mem.total)]
        rows.append(
            f"| {path} | {m.arch} | {layers} | {report['parameters'] / 1e6:.1f} M | "
            f"{report['train_flops_per_token'] / 1e9:.2f} | {' | '.join(mib)} | {mem.total / first - 1:+.0%} |"
        )
    return "\n".join(rows)
