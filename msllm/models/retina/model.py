"""Retina: one stack at token resolution in which every layer sees the recent past sharply and the
distant past ever more coarsely, as a retina sees.

    tokens -> embed -> N x Block(retina attention) -> norm -> lm_head -> logits

It is the vanilla stack with another attention core. With window w, factor k and S levels, query t
sees, without gaps and each earlier position exactly once:

    level 0: the tokens   [a_0, t]    a_0 = t - w + 1        rounded down to a multiple of k
    level 1: blocks of k  [a_1, a_0)  a_1 = a_0 - w * k      rounded down to a multiple of k^2
    level 2: blocks of k^2 [a_2, a_1) a_2 = a_1 - w * k^2    rounded down to a multiple of k^3
    ...      up to level S-1, nothing before a_{S-1}

(w to w+k-1 keys per level; a block's key is the mean of its tokens' keys, after RoPE.) Each
layer reaches back about w * (1 + k + ... + k^(S-1)) tokens at a cost of O(L * w * S). With one
level there is nothing to align with, and the window is the plain (t - w, t].

`RetinaPattern` is that definition; the kernels in attention.py compute it (one attention over
[fine keys ++ pooled keys of each level]).

Cached decoding (decoding.py): each layer keeps, per level, the keys and values its pattern may
still show a later query: the fine positions from a_0 on (w - 1 to w + k - 2 of them) and at level
l the blocks from a_l / k^l on (about w * k / (k - 1) of them). A block of k^l tokens is pooled
when its last token arrives, from the k blocks of level l - 1 that make it up, which are still
kept then: a_{l-1} is a multiple of k^l at most the next position, so the blocks kept from it on
include the incomplete group of the next block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from msllm.models.attention import CachedSegment, LayerCache, Segment, attend, decode_attention, fine_segment
from msllm.models.vanilla.model import VanillaLM


@dataclass(frozen=True)
class RetinaPattern:
    """Which keys query t sees: segment 0 the tokens (by position), segment l the blocks of k^l
    tokens (by block index, block b covering tokens b*k^l .. (b+1)*k^l - 1)."""

    window: int
    factor: int
    levels: int

    @property
    def block(self) -> int:
        """Query block of the blocks kernel: the window rounded up to a multiple of k, so that each
        query's tokens [a_0, t] lie in its own block of queries and the one before."""
        k = self.factor if self.levels > 1 else 1
        return -(-self.window // k) * k

    @property
    def period(self) -> int:
        """ranges(t + period) is ranges(t) shifted by whole blocks at every level."""
        return self.factor**self.levels

    def ranges(self, t):
        w, k = self.window, self.factor
        if self.levels == 1:
            return [(t - w + 1, t + 1)]
        start = (t - w + 1) // k * k  # a_0
        ranges = [(start, t + 1)]
        for level in range(1, self.levels):
            size = k**level
            next_start = (start - w * size) // (size * k) * (size * k)  # a_level
            ranges.append((next_start // size, start // size))
            start = next_start
        return ranges


def pool_blocks(x: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, H, n, D] -> [B, H, n // factor, D]: the mean of each complete group of `factor`."""
    B, H, n, D = x.shape
    return x[:, :, : n // factor * factor].view(B, H, n // factor, factor, D).mean(dim=3)


def pool_levels(k: torch.Tensor, v: torch.Tensor, factor: int, levels: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values of levels 1 .. levels-1: means over complete blocks of factor^level tokens,
    [B, H, L, D] -> [B, H, L // factor^level, D], each level pooled from the one below."""
    pooled = []
    for _ in range(1, levels):
        k, v = pool_blocks(k, factor), pool_blocks(v, factor)
        pooled.append((k, v))
    return pooled


def retina_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: RetinaPattern,
    pooled: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    past: tuple[torch.Tensor, torch.Tensor] | None = None,
    first_position: int = 0,
    kernel: str | None = None,
) -> torch.Tensor:
    """Retina attention of q [B, H, L, D] at positions first_position .. first_position + L - 1.

    `pooled`: each level's block keys and values over the whole sequence (default: pooled from k, v);
    `past`: keys and values of the `pattern.block` positions before this sequence (the previous
    rank's, under sequence parallelism)."""
    if pooled is None:
        pooled = pool_levels(k, v, pattern.factor, pattern.levels)
    segments = [fine_segment(k, v, past, first_position)] + [Segment(kp, vp, 0) for kp, vp in pooled]
    return attend(q, segments, pattern, first_position, kernel)


class RetinaAttention(nn.Module):
    def __init__(self, window: int, factor: int, levels: int):
        super().__init__()
        self.pattern = RetinaPattern(window, factor, levels)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return retina_attention(q, k, v, self.pattern)

    def new_cache(self) -> LayerCache:
        return LayerCache(segments=self.pattern.levels)

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        return decode_attention(q, k, v, cache, self.pattern, complete=self.pool_completed_blocks)

    def pool_completed_blocks(self, segments: list[CachedSegment]) -> None:
        """Append to each level the blocks whose last token has arrived, pooled (as pool_levels
        does) from the blocks of the level below."""
        factor = self.pattern.factor
        for below, level in zip(segments, segments[1:]):
            keys, values, first = below.segment()
            start, stop = level.end * factor - first, below.end // factor * factor - first
            level.append(pool_blocks(keys[:, :, start:stop], factor), pool_blocks(values[:, :, start:stop], factor))


class RetinaLM(VanillaLM):
    def __init__(self, cfg):
        window = cfg.scales[0].window
        super().__init__(
            cfg,
            core_factory=lambda: RetinaAttention(window, cfg.arch_config.retina_factor, cfg.arch_config.retina_levels),
        )
