"""Retina's sequence-parallel form, applied from outside the model (msllm.distributed.sequence
swaps every RetinaAttention for it when sp > 1, as retina's spec declares): the fine keys' halo
comes from the previous rank, and each level's pooled keys are gathered from the whole group."""

from __future__ import annotations

import torch
import torch.distributed as dist

from msllm.distributed.sequence import GroupMember, gather_sequence, previous_rank_keys
from msllm.models.retina.model import RetinaAttention, pool_levels, retina_attention


class SequenceParallelRetina(RetinaAttention, GroupMember):
    """Retina attention over a split sequence: the fine keys' halo from the previous rank, and
    each level's pooled keys gathered from the whole group (blocks never straddle ranks)."""

    def __init__(self, pattern, group: dist.ProcessGroup):
        super().__init__(pattern.window, pattern.factor, pattern.levels)
        self._join(group)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p = self.pattern
        past = previous_rank_keys(k, v, p.block, self.group)
        pooled = []
        for k_level, v_level in pool_levels(k, v, p.factor, p.levels):
            both = gather_sequence(torch.stack((k_level, v_level)), 3, self.group)
            pooled.append((both[0], both[1]))  # [B, H, sp * L_local / k^level, D] each, ranks in order
        return retina_attention(q, k, v, p, pooled, past, first_position=self.first_position(q, dim=2))


def sequence_parallel(attention: RetinaAttention, group: dist.ProcessGroup) -> SequenceParallelRetina:
    """The swap retina's spec declares for its attention core."""
    return SequenceParallelRetina(attention.pattern, group)
