"""Validation loss, token perplexity and bits per byte; `msllm eval RECIPE --checkpoint PATH`.

Bits per byte = (mean loss in nats per token) * (tokens / bytes of the validation split) / ln 2,
with the token and byte counts from the shards' manifest, so it does not depend on the tokenizer.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from msllm.train import dist


def eval_batches(manifest: dict, batch_size: int, dp_size: int, max_batches: int) -> int:
    """Batches per rank that cover the validation split once (capped by eval.max_batches)."""
    samples = int(manifest["splits"]["validation"]["samples"])
    n = max(1, math.ceil(samples / (batch_size * dp_size)))
    return min(n, max_batches) if max_batches else n


@torch.no_grad()
def evaluate(model, loader, manifest: dict, batch_size: int, max_batches: int, device, dp_size: int = 1,
             loss_kernel: str = "chunked", loss_chunk_size: int = 0) -> dict:
    """The summed loss of `model` (msllm.train.loss) over one pass of the validation `loader` (at
    most eval.max_batches batches); every rank calls this and gets the same result."""
    from msllm.train.loss import model_loss

    t0 = time.perf_counter()
    n_batches = eval_batches(manifest, batch_size, dp_size, max_batches)
    total = torch.zeros(2, dtype=torch.float64)
    for i, batch in enumerate(loader):
        if i >= n_batches:
            break
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        total[0] += model_loss(model, ids, labels, loss_kernel, loss_chunk_size).double().cpu()
        total[1] += (labels != -100).sum().item()
    dist.all_reduce_sum(total)
    loss = (total[0] / total[1].clamp(min=1)).item()
    split = manifest["splits"]["validation"]
    tokens_per_byte = float(split["tokens"]) / float(split["bytes"])
    return {
        "kind": "eval",
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": loss * tokens_per_byte / math.log(2),
        "eval_tokens": int(total[1].item()),
        "eval_time_s": time.perf_counter() - t0,
    }


def evaluate_checkpoint(recipe, path: str) -> dict:
    """`msllm eval`: the recipe gives the data; the checkpoint gives the model (checked to match)."""
    from deepspeed.accelerator import get_accelerator

    from msllm.data import check_shards
    from msllm.models import build_model
    from msllm.train.checkpoint import (
        check_same_model,
        check_same_tokenizer,
        consolidated_state_dict,
        read_meta,
        read_recipe,
        resolve_checkpoint,
    )

    denv = dist.read_env()
    ckpt = resolve_checkpoint(path)
    saved = read_recipe(ckpt)
    shards = check_shards(recipe.data)
    manifest = shards.manifest
    check_same_tokenizer(ckpt, read_meta(ckpt), shards.tokenizer_sha256, recipe.data.shards_dir)
    model_cfg = recipe.model
    if model_cfg.vocab_size == 0:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=int(manifest["vocab_size"]))
    check_same_model(ckpt, dataclasses.asdict(saved.model), dataclasses.asdict(model_cfg))
    if denv.world_size > 1:
        dist.init_distributed(denv)
    device = torch.device(get_accelerator().device_name(denv.local_rank))
    model = build_model(model_cfg)
    model.load_state_dict(consolidated_state_dict(ckpt))
    model.to(device).eval()
    batch = recipe.eval.micro_batch_size or recipe.train.micro_batch_size
    # The consolidated model is not sequence-parallel: every rank reads whole samples.
    from msllm.data import build_dataloader

    loader = build_dataloader(recipe.data, "validation", batch, recipe.run.seed, shuffle=False)
    from msllm.train.loss import choose_kernel

    kernel = choose_kernel(recipe.train.loss_kernel, device.type)
    row = evaluate(model, loader, manifest, batch, recipe.eval.max_batches, device, dp_size=denv.world_size,
                   loss_kernel=kernel, loss_chunk_size=recipe.train.loss_chunk_size)
    row["step"] = int(saved_step(ckpt))
    row["checkpoint"] = str(ckpt)
    if denv.is_main:
        from msllm.run_record import describe
        from msllm.train.checkpoint import read_meta

        record = read_meta(ckpt).get("run_record")
        print(f"trained with: {describe(record)}" if record else "trained with: (no run record: a checkpoint from before msllm recorded runs)")
        print(
            f"eval {ckpt} (step {row['step']}): loss {row['loss']:.4f} | ppl {row['perplexity']:.2f} | "
            f"bpb {row['bits_per_byte']:.4f} | {row['eval_tokens']:,} tokens"
        )
    return row


def saved_step(ckpt) -> int:
    from msllm.train.checkpoint import read_meta

    return int(read_meta(ckpt).get("step", 0))
