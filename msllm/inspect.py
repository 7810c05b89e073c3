"""`msllm inspect`: what a recipe's model costs before you train it.

Parameters per scale, training FLOPs per token (the figure MFU is computed from), the estimated
start-up peak per rank (building the model and DeepSpeed's engine, before the first step:
msllm.train.memory.startup_peak_bytes), and the memory of one training step on one rank, split into
parameters, gradients, optimizer state and activations with the loss (msllm.train.memory): the
activations are measured on a real forward pass at the recipe's sequence length and precision, so the
figure compares architectures on a CPU as it would on a GPU.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict

import torch
from torch import nn

from msllm.config import MAX_SEQ_LEN, load_recipe
from msllm.distributed.parallelize import apply_activation_checkpointing
from msllm.errors import RecipeError
from msllm.models import build_model, flops_per_token
from msllm.train.memory import (
    DTYPES,
    activation_bytes,
    available_bytes,
    check_fits,
    largest_module_parameters,
    loss_activation_bytes,
    sample_tokens,
    startup_peak_bytes,
    step_memory,
)


def parameters_by_part(model: nn.Module) -> dict[str, int]:
    """Parameter counts grouped by where they sit: embeddings, head, and each scale's stack."""
    counts: dict[str, int] = defaultdict(int)
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:  # tied embeddings count once
            continue
        seen.add(id(p))
        parts = name.split(".")
        if parts[0] in ("scales", "scale_norms", "pools", "upsamples"):
            index = int(parts[1]) + (1 if parts[0] in ("pools", "upsamples") else 0)
            key = f"scale {index}" + ("" if parts[0] in ("scales", "scale_norms") else f" ({parts[0][:-1]})")
        elif parts[0] == "layers":
            key = "scale 0"
        else:
            key = parts[0]
        counts[key] += p.numel()
    return dict(sorted(counts.items()))


def inspect_recipe(
    recipe, seq_len: int = 0, measure: bool = True, vocab_size: int = 0, world_size: int = 0, measure_len: int = 0
) -> dict:
    """Print (and return) the figures for a recipe's model at `seq_len` (default data.seq_len).

    The memory is one rank's in a job of `world_size` ranks (default parallel.sp: one data-parallel
    replica): under sequence parallelism each rank holds seq_len / sp positions of every scale,
    measured as the unsplit model on that many tokens (per rank, Ulysses' full attention over
    H / sp heads saves what L / sp positions of H heads do; the halos add w positions per local
    layer, not counted); ZeRO shards over dp = world_size / sp. `measure_len` measures on shorter
    samples and extends linearly (msllm.train.memory.step_memory)."""
    seq_len = seq_len or recipe.data.seq_len
    if not 1 <= seq_len <= MAX_SEQ_LEN:
        raise RecipeError(f"--seq-len: must be between 1 and {MAX_SEQ_LEN:,} (2**24), got {seq_len:,}")
    sp = recipe.parallel.sp
    world_size = world_size or sp
    if world_size % sp:
        raise RecipeError(f"--world-size {world_size} is not a multiple of parallel.sp {sp}")
    per_rank = seq_len // sp
    model_cfg = recipe.model
    if model_cfg.vocab_size == 0:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=vocab_size or recipe.data.tokenizer.data_vocab_size())
    check_fits(model_cfg, torch.device("cpu"), what="inspect")  # inspect builds the model on this CPU, in fp32
    torch.manual_seed(recipe.run.seed)
    model = build_model(model_cfg)
    parts = parameters_by_part(model)
    total = sum(parts.values())
    flops = flops_per_token(model_cfg, seq_len)
    report = {
        "arch": model_cfg.arch,
        "parameters": total,
        "parameters_by_part": parts,
        "seq_len": seq_len,
        "train_flops_per_token": flops,
    }
    print(f"architecture   {model_cfg.arch}  (vocab {model_cfg.vocab_size}, d_model {model_cfg.d_model})")
    print(f"parameters     {total:,}")
    for key, count in parts.items():
        print(f"  {key:<22} {count:>12,}")
    print(f"train FLOPs/token at L={seq_len}: {flops / 1e6:,.1f} M  (forward + backward)")
    # msllm.train.memory.startup_peak_bytes: what building the model and DeepSpeed's engine add, per rank
    dp = world_size // sp
    startup = startup_peak_bytes(
        total, largest_module_parameters(model), recipe.train.precision, recipe.parallel.zero_stage, dp
    )
    report["startup_peak"] = startup
    print(
        f"start-up peak per rank (model + ZeRO partitions before the first step): {startup.total / 2**20:,.1f} MiB  "
        f"(ZeRO {recipe.parallel.zero_stage}, dp {dp}, {recipe.train.precision}: held {startup.held / 2**20:,.1f} MiB "
        f"+ {startup.transient / 2**20:,.1f} MiB for a moment in {startup.phase})"
    )
    if measure:
        if recipe.parallel.activation_checkpointing:
            apply_activation_checkpointing(model, offload=recipe.parallel.offload_activations)
        start = time.perf_counter()
        kernel = inspected_kernel(recipe.train.loss_kernel)
        measured = min(measure_len or per_rank, per_rank)
        _check_measurement_fits(model, model_cfg, measured, recipe.train.precision, kernel)
        memory = step_memory(
            model,
            model_cfg.vocab_size,
            recipe.train.micro_batch_size,
            per_rank,
            recipe.train.precision,
            recipe.parallel.zero_stage,
            dp=world_size // sp,
            loss_kernel=kernel,
            loss_chunk_size=recipe.train.loss_chunk_size,
            measure_len=measured,
        )
        report["memory"] = memory
        layout = (
            "one rank"
            if world_size == 1
            else (
                f"one rank of {world_size} (sp {sp}: {per_rank:,} of the {seq_len:,} positions; dp {world_size // sp})"
            )
        )
        how = f"measured at {measured:,} tokens and extended linearly" if measured != per_rank else "measured"
        print(
            f"training step  {recipe.train.micro_batch_size} x {seq_len} tokens, {recipe.train.precision}, "
            f"ZeRO {recipe.parallel.zero_stage}, {layout}, loss {kernel} "
            f"({how} in {time.perf_counter() - start:.1f} s):"
        )
        for part, nbytes in memory.as_dict().items():
            print(f"  {part:<22} {nbytes / 2**20:>12,.1f} MiB")
        if kernel != "dense":  # what the loss would cost with every logit materialised
            # measured on short samples and extended (exact for the loss): two long samples' dense
            # logits could take more memory than this machine has
            tokens = sample_tokens(model, model_cfg.vocab_size, min(measured, 2048))
            dense = loss_activation_bytes(model, tokens, recipe.train.micro_batch_size * per_rank, "dense")
            report["dense_loss_activations"] = dense
            print(f"  {'(loss_activations, dense)':<22} {dense / 2**20:>12,.1f} MiB  (train.loss_kernel: dense)")
    return report


# What a measurement on long samples needs is extrapolated from a forward at this length first:
# activations grow linearly with the length (msllm.train.memory.step_memory's measure_len relies on it).
PROBE_LEN = 1024


def _check_measurement_fits(model: nn.Module, model_cfg, measured: int, precision: str, kernel: str) -> None:
    """A one-line RecipeError, before anything large is allocated, if measuring on samples of
    `measured` tokens needs more memory than this machine has available: one sample's body
    activations and two samples' loss, extrapolated from about PROBE_LEN tokens."""
    multiple = model_cfg.length_multiple()
    probe = max(PROBE_LEN // multiple, 1) * multiple
    available = available_bytes(torch.device("cpu"))
    if measured <= 2 * probe or available is None:
        return
    model.to(DTYPES[precision])
    tokens = sample_tokens(model, model_cfg.vocab_size, probe)
    per_probe = activation_bytes(model, tokens[:, :-1]) + loss_activation_bytes(model, tokens, 2 * probe, kernel)
    needed = per_probe * measured // probe
    if needed > available:
        fits = max(available // 2 * probe // per_probe // multiple * multiple, multiple)  # half of what fits
        raise RecipeError(
            f"measuring on samples of {measured:,} tokens needs about {needed / 2**30:,.1f} GiB (extrapolated from "
            f"{probe:,} tokens) but this machine has {available / 2**30:,.1f} GiB available: pass --measure-len "
            f"{fits} (measures shorter samples and extends linearly) or --no-measure"
        )


def inspected_kernel(requested: str) -> str:
    """The loss kernel whose memory inspect measures: the recipe's, "auto" read as chunked (what runs
    on a CPU, and where no fused CUDA kernel is installed); the fused kernels' own workspaces are
    their libraries' and are not measured here, so they are shown as chunked too."""
    return requested if requested in ("dense", "chunked") else "chunked"


def compare_recipes(paths: list[str], seq_len: int = 0, vocab_size: int = 0) -> str:
    """A markdown table of parameters, train FLOPs per token and the memory of one training step
    (per rank, the recipe's micro-batch and precision: parameters + gradients + optimizer state +
    the body's activations + the loss's, chunked) for several recipes' models, each at its own
    data.seq_len unless `seq_len` is given and at its tokenizer's vocabulary unless `vocab_size` is;
    then the loss and the total with every logit materialised (dense). The "vs" columns compare each
    total with the first vanilla recipe's (the paper's comparison), or the first recipe's."""
    recipes = [(path, load_recipe(path)) for path in paths]
    recipes.sort(key=lambda item: not item[1].model.arch_config.baseline)  # stable: the reference first
    reference = recipes[0][1].model.arch if recipes and recipes[0][1].model.arch_config.baseline else "the first"
    rows = [
        f"| recipe | arch | layers | parameters | train GFLOP/token | parameters MiB | gradients MiB | optimizer MiB "
        f"| body activations MiB | loss MiB (chunked) | total MiB | total vs {reference} | loss MiB (dense) "
        f"| total MiB (dense) | total vs {reference} (dense) |",
        "|" + "---|" * 15,
    ]
    first = first_dense = None
    for path, recipe in recipes:
        recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, loss_kernel="chunked"))
        report = inspect_recipe(recipe, seq_len=seq_len, vocab_size=vocab_size)
        m, mem, dense_loss = recipe.model, report["memory"], report["dense_loss_activations"]
        dense_total = mem.total - mem.loss_activations + dense_loss
        first, first_dense = first or mem.total, first_dense or dense_total
        layers = m.layer_count()
        mib = lambda *ns: " | ".join(f"{n / 2**20:,.0f}" for n in ns)  # noqa: E731
        parts = mib(mem.parameters, mem.gradients, mem.optimizer, mem.body_activations, mem.loss_activations, mem.total)
        rows.append(
            f"| {path} | {m.arch} | {layers} | {report['parameters'] / 1e6:.1f} M | "
            f"{report['train_flops_per_token'] / 1e9:.2f} | "
            f"{parts} | "
            f"{mem.total / first:.2f}x | {mib(dense_loss, dense_total)} | {dense_total / first_dense:.2f}x |"
        )
    return "\n".join(rows)
