"""Validation loss, token perplexity and bits per byte of a model over the validation split: what
the trainer's eval runs, and `msllm eval` (msllm.use.evaluate).

Bits per byte = (mean loss in nats per token) * (tokens / bytes of the validation split) / ln 2,
with the token and byte counts from the shards' manifest, so it does not depend on the tokenizer.
"""

from __future__ import annotations

import math
import time

import torch

from msllm.distributed import collectives as dist
from msllm.train.loss import IGNORE_INDEX, model_loss


def eval_batches(manifest: dict, batch_size: int, dp_size: int, max_batches: int) -> int:
    """Batches per rank that cover the validation split once (capped by eval.max_batches)."""
    samples = int(manifest["splits"]["validation"]["samples"])
    n = max(1, math.ceil(samples / (batch_size * dp_size)))
    return min(n, max_batches) if max_batches else n


def pad_batch(ids: torch.Tensor, labels: torch.Tensor, rows: int, length: int | None = None):
    """`ids`, `labels` [B, L] right-padded to at least `rows` rows and `length` positions (default:
    L): token 0 and IGNORE_INDEX labels. Exact for the loss: the padding has no loss, and a causal
    model's real positions never see the positions after them, nor another row."""
    extra_rows, extra_positions = max(rows - ids.shape[0], 0), max((length or 0) - ids.shape[1], 0)
    if not (extra_rows or extra_positions):
        return ids, labels
    pad = (0, extra_positions, 0, extra_rows)
    return (torch.nn.functional.pad(ids, pad, value=0), torch.nn.functional.pad(labels, pad, value=IGNORE_INDEX))


@torch.no_grad()
def evaluate(
    model,
    loader,
    manifest: dict,
    batch_size: int,
    max_batches: int,
    device,
    dp_size: int = 1,
    loss_kernel: str = "chunked",
    loss_chunk_size: int = 0,
) -> dict:
    """The summed loss of `model` (msllm.train.loss) over one pass of the validation `loader` (at
    most eval.max_batches batches); every rank calls this and gets the same result."""
    t0 = time.perf_counter()
    n_batches = eval_batches(manifest, batch_size, dp_size, max_batches)
    total = torch.zeros(2, dtype=torch.float64)
    for i, batch in enumerate(loader):
        if i >= n_batches:
            break
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        # The last batch of the split is short: padded to the batch size, so that a compiled model
        # (train.compile) sees the shape of every other batch and does not compile again.
        ids, labels = pad_batch(ids, labels, batch_size)
        total[0] += model_loss(model, ids, labels, loss_kernel, loss_chunk_size, auxiliary=False).double().cpu()
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
