"""`msllm eval RECIPE --checkpoint SOURCE`: validation loss, perplexity and bits per byte of a
trained model (a checkpoint, a run's output_dir or an export) on the recipe's validation split.
`continuation_loglikelihoods`: what lm-evaluation-harness asks of a model (its loglikelihood
requests), answered by msllm's model directly.

The recipe gives the data; the model comes from SOURCE (msllm.use.load) and must be the recipe's
model, trained with the tokenizer of the recipe's shards. Under torchrun every rank evaluates its
share of whole samples (the model is consolidated, not sequence-parallel).
"""

from __future__ import annotations

import os

import torch

from msllm.checkpoint.files import check_same_model, check_same_tokenizer
from msllm.config import with_vocab_size
from msllm.data import build_dataloader, check_shards
from msllm.distributed import collectives
from msllm.distributed.env import read_env
from msllm.run_record import describe
from msllm.train.evaluate import evaluate
from msllm.train.loss import choose_kernel
from msllm.train.memory import check_micro_batch_fits
from msllm.use.load import load_model


def inference_device(local_rank: int = 0) -> torch.device:
    """The device to run a loaded model on: this rank's GPU where CUDA has one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def evaluate_checkpoint(recipe, source: str) -> dict:
    denv = read_env()
    loaded = load_model(source)
    shards = check_shards(recipe.data)
    check_same_tokenizer(loaded.path, loaded.meta, shards.tokenizer_sha256, recipe.data.shards_dir)
    recipe = with_vocab_size(recipe, shards.vocab_size)
    check_same_model(loaded.path, loaded.recipe.model.to_dict(), recipe.model.to_dict())
    if denv.world_size > 1:
        collectives.init_distributed(denv)
    device = inference_device(denv.local_rank)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    check_micro_batch_fits(recipe, device, processes=local_ranks, what="eval")  # before a batch is drawn
    model = loaded.model.to(device)
    batch = recipe.eval.micro_batch_size or recipe.train.micro_batch_size
    loader = build_dataloader(recipe.data, "validation", batch, recipe.run.seed, shuffle=False)
    row = evaluate(
        model,
        loader,
        shards.manifest,
        batch,
        recipe.eval.max_batches,
        device,
        dp_size=denv.world_size,
        loss_kernel=choose_kernel(recipe.train.loss_kernel, device.type),
        loss_chunk_size=recipe.train.loss_chunk_size,
    )
    row["step"] = loaded.step
    row["checkpoint"] = str(loaded.path)
    if denv.is_main:
        record = loaded.meta.get("run_record")
        print(
            f"trained with: {describe(record)}"
            if record
            else "trained with: (no run record: a checkpoint from before msllm recorded runs)"
        )
        print(
            f"eval {loaded.path} (step {row['step']}): loss {row['loss']:.4f} | ppl {row['perplexity']:.2f} | "
            f"bpb {row['bits_per_byte']:.4f} | {row['eval_tokens']:,} tokens"
        )
    return row


@torch.no_grad()
def continuation_loglikelihoods(model, tokenizer, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
    """For each (context, continuation) text: the sum of the log-probabilities of the
    continuation's tokens after the context's, and whether every one of them is the most likely
    next token (greedy). These are lm-evaluation-harness's loglikelihood requests, tokenized as it
    tokenizes them for a causal model (lm_eval.api.model's _encode_pair, no BOS added): spaces that
    end the context move to the continuation, context + continuation is encoded whole, and the
    continuation's tokens are those after the context's token count; an empty context is the
    tokenizer's BOS (EOS if it has none). Nothing is truncated (lm-eval cuts the context's start
    beyond max_position_embeddings, the trained context)."""
    results = []
    for context, continuation in requests:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if context:
            whole = tokenizer.encode(context + continuation)
            split = len(tokenizer.encode(context))
            context_ids, continuation_ids = whole[:split], whole[split:]
        else:
            prefix = tokenizer.bos_id() if tokenizer.bos_id() >= 0 else tokenizer.eos_id()
            context_ids, continuation_ids = [prefix], tokenizer.encode(continuation)
        if not continuation_ids:
            raise ValueError(f"the continuation {continuation!r} of {context!r} has no tokens of its own")
        ids = torch.tensor([context_ids + continuation_ids])
        log_probs = torch.log_softmax(model(ids[:, :-1]).float(), dim=-1)[0, len(context_ids) - 1 :]
        target = torch.tensor(continuation_ids)
        total = log_probs.gather(1, target.view(-1, 1)).sum().item()
        results.append((total, bool((log_probs.argmax(dim=-1) == target).all())))
    return results
