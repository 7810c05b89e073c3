"""Attention patterns: which keys each query sees, defined once and read by every kernel.

A pattern (`SlidingWindow` here, msllm.models.retina.RetinaPattern) lists, for a query at position
t, one half-open range [lo, hi) per key segment (`Segment`: segment 0 the keys at token resolution,
retina's pooled levels after it); `visible` is the definition the kernels evaluate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class SlidingWindow:
    """Causal sliding window: query t sees positions (t - window, t]."""

    window: int

    @property
    def block(self) -> int:
        """Query block of the blocks kernel; every query of block n sees only blocks n-1 and n."""
        return self.window

    period = 1  # ranges(t + period) = ranges(t) shifted: the slab bound needs one block to look at

    def ranges(self, t):
        return [(t - self.window + 1, t + 1)]


class Segment(NamedTuple):
    """Keys and values [B, H, n, D] of one segment; `first` is the index of element 0 (the
    position of the first key, negative for a halo before the sequence; 0 for pooled levels)."""

    keys: torch.Tensor
    values: torch.Tensor
    first: int


def visible(pattern, t, segment: int, index):
    """Whether the key `index` of `segment` is visible to the query at position t (broadcasting)."""
    lo, hi = pattern.ranges(t)[segment]
    return (index >= lo) & (index < hi) & (index >= 0)
