"""The parallel layout of a job: the one place that decides who holds what.

A job of `world_size` ranks is a grid of dp data-parallel replicas x sp sequence-parallel ranks:

    rank = dp_rank * sp + sp_rank

- a sequence-parallel group is sp contiguous ranks (ranks 0..sp-1 are group 0), so that a group
  stays inside a node, where its all-to-alls are cheap;
- every rank of a group reads the same samples (streaming's `replication = sp` makes the group
  act as one data-parallel rank) and keeps slice `sp_rank` of each: positions
  [sp_rank * L/sp, (sp_rank + 1) * L/sp);
- gradients are averaged over all dp * sp ranks (DeepSpeed's data-parallel group is the world).

Every part of the trainer asks a `ParallelDims` rather than working it out: the data loader (its
slice and replication), `parallelize` (the sequence-parallel group), and the logs (dp x sp).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from msllm.errors import RecipeError


@dataclass(frozen=True)
class ParallelDims:
    """The dp x sp grid and this rank's place in it; validated when built."""

    world_size: int
    rank: int
    sp: int

    def __post_init__(self) -> None:
        if self.sp < 1:
            raise RecipeError(f"parallel.sp: must be at least 1, got {self.sp}")
        if not 0 <= self.rank < self.world_size:  # read_env has already told the user
            raise ValueError(f"rank {self.rank} is not within world size {self.world_size}")
        if self.world_size % self.sp:
            raise RecipeError(
                f"recipe: parallel.sp: {self.sp} does not divide the world size {self.world_size} "
                f"(launch a multiple of {self.sp} ranks, or change parallel.sp)"
            )

    @classmethod
    def from_recipe(cls, recipe, world_size: int, rank: int) -> ParallelDims:
        return cls(world_size=world_size, rank=rank, sp=recipe.parallel.sp)

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different samples the job reads at once."""
        return self.world_size // self.sp

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel replica (its sequence-parallel group's index)."""
        return self.rank // self.sp

    @property
    def sp_rank(self) -> int:
        """This rank's place in its sequence-parallel group: which slice of each sample it holds."""
        return self.rank % self.sp

    def sp_group_ranks(self, dp_rank: int | None = None) -> list[int]:
        """The global ranks of sequence-parallel group `dp_rank` (default: this rank's)."""
        first = (self.dp_rank if dp_rank is None else dp_rank) * self.sp
        return list(range(first, first + self.sp))

    @property
    def replication(self) -> int | None:
        """streaming's `replication`: the ranks that read the same samples (None: every rank its own).
        In one process there is no group to replicate over, and a slice is read on its own."""
        return self.sp if self.sp > 1 and self.world_size > 1 else None

    def sequence_parallel_group(self):
        """Create the sequence-parallel process groups and return this rank's (None for sp = 1).

        Collective: every rank takes part in creating every group, as torch.distributed requires.
        """
        if self.sp == 1:
            return None

        mine = None
        for dp_rank in range(self.dp):
            ranks = self.sp_group_ranks(dp_rank)
            group = dist.new_group(ranks)
            if self.rank in ranks:
                mine = group
        return mine

    def describe(self) -> str:
        return f"dp {self.dp} x sp {self.sp}"
