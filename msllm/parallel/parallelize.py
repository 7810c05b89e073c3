"""`parallelize(model, dims, recipe)`: the one function that turns a plain model into the engine
that trains.

It applies, in this order (each step works on what the previous one left):

1. sequence parallelism (`parallel.sp` > 1): the modules that look across positions are swapped
   for forms that talk to the other ranks of this rank's group (msllm.parallel.sequence). First,
   because activation checkpointing must recompute the distributed forms, exchanges included.
2. activation checkpointing (`parallel.activation_checkpointing`): every transformer block
   recomputes its activations in backward, optionally keeping its saved inputs in CPU memory.
3. compilation (`train.compile`): torch.compile of each transformer block in place
   (`Module.compile()`), after the swaps above so that it compiles what will run. With
   checkpointing, the block's parts are compiled instead of the block: fairscale's checkpoint is an
   autograd Function that dynamo cannot trace, so it stays outside the compiled code.
4. DeepSpeed (`parallel.zero_stage`, `train.precision`): ZeRO stage 0-3 over all ranks, with
   AdamW and the learning-rate schedule; gradients are averaged over all dp * sp ranks (on a
   single rank at ZeRO 0 there is nothing to average, and the all-reduce is switched off).

None of the steps renames a parameter, so a checkpoint loads whatever the parallel settings of
the run that wrote it.
"""

from __future__ import annotations

from torch import nn

from msllm.models.layers import Block
from msllm.parallel.dims import ParallelDims


def apply_activation_checkpointing(model: nn.Module, offload: bool = False) -> nn.Module:
    """Recompute every transformer block in backward instead of keeping its activations; with
    `offload`, the block inputs that are kept go to CPU memory (fairscale's checkpoint_wrapper,
    which patches the block's forward in place: parameter names do not change). Returns the model."""
    from fairscale.nn.checkpoint import checkpoint_wrapper

    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for i, child in enumerate(module):
                if isinstance(child, Block):
                    module[i] = checkpoint_wrapper(child, offload_to_cpu=offload)
    return model


def compile_blocks(model: nn.Module, checkpointed: bool = False) -> nn.Module:
    """torch.compile every transformer block in place (or, for `checkpointed` blocks, each of its
    child modules). `Module.compile()` keeps the module and its parameter names: a state dict
    saved with or without compilation loads into either. Returns the model."""
    for block in [m for m in model.modules() if isinstance(m, Block)]:
        for module in block.children() if checkpointed else (block,):
            module.compile()
    return model


def parallelize(model: nn.Module, dims: ParallelDims, recipe):
    """Apply sequence parallelism, activation checkpointing, compilation and DeepSpeed to a built
    model (in place, in that order) and return the DeepSpeed engine. Collective: every rank calls it."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from msllm.parallel.sequence import apply_sequence_parallel
    from msllm.train.optim import build_optimizer, build_scheduler, deepspeed_config

    model = apply_sequence_parallel(model, dims.sequence_parallel_group())
    if recipe.parallel.activation_checkpointing:
        model = apply_activation_checkpointing(model, offload=recipe.parallel.offload_activations)
    if recipe.train.compile:
        model = compile_blocks(model, checkpointed=recipe.parallel.activation_checkpointing)
    if recipe.parallel.zero_stage == 3:
        # The loss reads the head's weight in the model's own forward, outside lm_head.forward
        # (msllm.train.loss never computes all the logits): ZeRO-3 must gather it there too.
        deepspeed.zero.register_external_parameter(model, model.lm_head.weight)
    optimizer = build_optimizer(model, recipe, get_accelerator().device_name())
    scheduler = build_scheduler(optimizer, recipe.train)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(recipe)
    )
    if dims.world_size == 1 and recipe.parallel.zero_stage == 0:
        # One rank has nothing to average, but DeepSpeed would still copy every gradient through
        # flat buffers and an all-reduce after each backward (2% of a step, measured on the CPU).
        engine.enable_backward_allreduce = False
    return engine
