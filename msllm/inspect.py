"""`msllm inspect`: what a recipe's model costs before you train it.

Parameters per scale, training FLOPs per token (the figure MFU is computed from), and the bytes
of activations that autograd keeps for backward per token, measured at the recipe's sequence
length with torch.autograd.graph.saved_tensors_hooks. That last figure counts the same on any
device, so it compares architectures on a CPU as it would on a GPU.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict

import torch
from torch import nn

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


def saved_activation_bytes(model: nn.Module, input_ids: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward in one forward pass (each storage counted
    once; parameters are not activations and are left out)."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids)
    del logits
    return sum(storages.values())


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
        input_ids = torch.randint(0, model_cfg.vocab_size, (1, seq_len))
        start = time.perf_counter()
        saved = saved_activation_bytes(model, input_ids)
        elapsed = time.perf_counter() - start
        report["activation_bytes_per_token"] = saved / seq_len
        print(
            f"activations    {saved / seq_len / 1024:,.1f} KiB per token saved for backward at L={seq_len} "
            f"(fp32, {saved / 2**20:,.1f} MiB per sample; forward took {elapsed:.1f} s)"
        )
    return report


def compare_recipes(paths: list[str], seq_len: int = 0) -> str:
    """A markdown table of parameters, train FLOPs per token and activation bytes per sample for
    several recipes' models (each at its own data.seq_len unless `seq_len` is given): the memory
    comparison the paper makes, measured rather than estimated."""
    from msllm.config import load_recipe

    rows = ["| recipe | arch | layers | parameters | train GFLOP/token | activation MiB per sample | "
            "KiB per token |", "|---|---|---|---|---|---|---|"]
    for path in paths:
        recipe = load_recipe(path)
        report = inspect_recipe(recipe, seq_len=seq_len)
        m = recipe.model
        layers = sum(s.layers for s in m.scales) + (m.final_layers if m.arch == "bottom_up" else 0)
        per_token = report["activation_bytes_per_token"]
        rows.append(
            f"| {path} | {m.arch} | {layers} | {report['parameters'] / 1e6:.1f} M | "
            f"{report['train_flops_per_token'] / 1e9:.2f} | {per_token * report['seq_len'] / 2**20:.1f} | "
            f"{per_token / 1024:.1f} |"
        )
    return "\n".join(rows)
