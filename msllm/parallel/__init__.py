"""Parallelism applied to plain models from outside.

    dims.py          ParallelDims: the dp x sp layout, the one place that decides each rank's
                     data replica, sequence slice, sequence-parallel group and resume mapping
    parallelize.py   parallelize(model, dims, recipe): sequence parallelism, activation
                     checkpointing, DeepSpeed, in that order; returns the engine
    sequence.py      the sequence-parallel forms of the cross-position modules
"""

from msllm.parallel.dims import ParallelDims

__all__ = ["ParallelDims"]
