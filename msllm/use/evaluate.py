"""`msllm eval RECIPE --checkpoint SOURCE`: validation loss, perplexity and bits per byte of a
trained model (a checkpoint, a run's output_dir or an export) on the recipe's validation split.

The recipe gives the data; the model comes from SOURCE (msllm.use.load) and must be the recipe's
model, trained with the tokenizer of the recipe's shards. Under torchrun every rank evaluates its
share of whole samples (the model is consolidated, not sequence-parallel).
"""

from __future__ import annotations

import dataclasses

import torch

from msllm.distributed.env import read_env


def inference_device(local_rank: int = 0) -> torch.device:
    """The device to run a loaded model on: this rank's GPU where CUDA has one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def evaluate_checkpoint(recipe, source: str) -> dict:
    from msllm.checkpoint.files import check_same_model, check_same_tokenizer
    from msllm.config import with_vocab_size
    from msllm.data import build_dataloader, check_shards
    from msllm.distributed import collectives
    from msllm.train.evaluate import evaluate
    from msllm.train.loss import choose_kernel
    from msllm.use.load import load_model

    denv = read_env()
    loaded = load_model(source)
    shards = check_shards(recipe.data)
    check_same_tokenizer(loaded.path, loaded.meta, shards.tokenizer_sha256, recipe.data.shards_dir)
    recipe = with_vocab_size(recipe, shards.vocab_size)
    check_same_model(loaded.path, dataclasses.asdict(loaded.recipe.model), dataclasses.asdict(recipe.model))
    if denv.world_size > 1:
        collectives.init_distributed(denv)
    device = inference_device(denv.local_rank)
    model = loaded.model.to(device)
    batch = recipe.eval.micro_batch_size or recipe.train.micro_batch_size
    loader = build_dataloader(recipe.data, "validation", batch, recipe.run.seed, shuffle=False)
    row = evaluate(model, loader, shards.manifest, batch, recipe.eval.max_batches, device, dp_size=denv.world_size,
                   loss_kernel=choose_kernel(recipe.train.loss_kernel, device.type),
                   loss_chunk_size=recipe.train.loss_chunk_size)
    row["step"] = loaded.step
    row["checkpoint"] = str(loaded.path)
    if denv.is_main:
        from msllm.run_record import describe

        record = loaded.meta.get("run_record")
        print(f"trained with: {describe(record)}" if record else "trained with: (no run record: a checkpoint from before msllm recorded runs)")
        print(
            f"eval {loaded.path} (step {row['step']}): loss {row['loss']:.4f} | ppl {row['perplexity']:.2f} | "
            f"bpb {row['bits_per_byte']:.4f} | {row['eval_tokens']:,} tokens"
        )
    return row
