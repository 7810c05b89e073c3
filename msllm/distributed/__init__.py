"""The distributed layer: who each rank is, how the ranks agree, and parallelism applied to plain
models from outside (torchtitan's split of model code and parallelize).

    env.py           DistEnv / read_env: rank, world and local rank from any launcher (torchrun,
                     the deepspeed launcher, srun, one process); `say` prints on rank 0
    collectives.py   init_distributed and the few collectives; first_failure and on_rank0, the
                     two primitives of "rank 0 decides, every rank agrees"
    dims.py          ParallelDims: the dp x sp layout, the one place that decides each rank's data
                     replica, sequence slice, sequence-parallel group and resume mapping
    sequence.py      the sequence-parallel forms of the cross-position modules
    parallelize.py   parallelize(model, dims, recipe): sequence parallelism, activation
                     checkpointing, compilation, in that order; returns the parallel model (the
                     trainer builds the optimizer and the DeepSpeed engine: msllm.train.engine)
"""

from msllm.distributed.dims import ParallelDims

__all__ = ["ParallelDims"]
