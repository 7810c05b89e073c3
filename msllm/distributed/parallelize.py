"""`parallelize(model, dims, recipe)`: the one function that turns a plain model into the parallel
model that trains (the trainer then wraps it in the DeepSpeed engine: msllm.train.engine).

It applies, in this order (each step works on what the previous one left):

1. sequence parallelism (`parallel.sp` > 1): the modules that look across positions are swapped
   for forms that talk to the other ranks of this rank's group (msllm.distributed.sequence).
   First, because activation checkpointing must recompute the distributed forms, exchanges
   included.
2. activation checkpointing (`parallel.activation_checkpointing`): every transformer block
   recomputes its activations in backward, optionally keeping its saved inputs in CPU memory.
3. compilation (`train.compile`): torch.compile of each transformer block in place
   (`Module.compile()`), after the swaps above so that it compiles what will run. With
   checkpointing, the block's parts are compiled instead of the block: fairscale's checkpoint is an
   autograd Function that dynamo cannot trace, so it stays outside the compiled code.

None of the steps renames a parameter, so a checkpoint loads whatever the parallel settings of
the run that wrote it.
"""

from __future__ import annotations

from fairscale.nn.checkpoint import checkpoint_wrapper
from torch import nn

from msllm.distributed.dims import ParallelDims
from msllm.distributed.sequence import apply_sequence_parallel
from msllm.models.layers import Block
from msllm.models.mamba2 import MambaBlock

BLOCKS = (Block, MambaBlock)  # what activation checkpointing and compilation wrap, one layer each


def apply_activation_checkpointing(model: nn.Module, offload: bool = False) -> nn.Module:
    """Recompute every transformer block in backward instead of keeping its activations; with
    `offload`, the block inputs that are kept go to CPU memory (fairscale's checkpoint_wrapper,
    which patches the block's forward in place: parameter names do not change). Returns the model."""
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for i, child in enumerate(module):
                if isinstance(child, BLOCKS):
                    module[i] = checkpoint_wrapper(child, offload_to_cpu=offload)
    return model


def compile_blocks(model: nn.Module, checkpointed: bool = False, **options) -> nn.Module:
    """torch.compile every transformer block in place (or, for `checkpointed` blocks, each of its
    child modules). `Module.compile()` keeps the module and its parameter names: a state dict
    saved with or without compilation loads into either. `options` go to torch.compile (the tests
    pass a cheaper backend). Returns the model.

    Shapes: torch's automatic dynamic shapes (dynamic=None) compile a block for the first shape it
    sees and, once a size changes, once more with that size symbolic; tests/unit/test_recompile.py counts
    what varying lengths, batch sizes and dynamic chunking's chunk counts cost."""
    for block in [m for m in model.modules() if isinstance(m, BLOCKS)]:
        for module in block.children() if checkpointed else (block,):
            module.compile(**options)
    return model


def parallelize(model: nn.Module, dims: ParallelDims, recipe) -> nn.Module:
    """Apply sequence parallelism, activation checkpointing and compilation to a built model (in
    place, in that order) and return it. Collective: every rank calls it."""
    model = apply_sequence_parallel(model, dims.sequence_parallel_group())
    if recipe.parallel.activation_checkpointing:
        model = apply_activation_checkpointing(model, offload=recipe.parallel.offload_activations)
    if recipe.train.compile:
        model = compile_blocks(model, checkpointed=recipe.parallel.activation_checkpointing)
    return model
