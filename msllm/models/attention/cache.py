"""The decoding cache of one attention layer (`LayerCache`: a `CachedSegment` per key segment) and
`decode_attention`, a pattern's attention for new queries through it."""

from __future__ import annotations

from collections.abc import Callable

import torch

from msllm.models.attention.kernels import attend
from msllm.models.attention.patterns import Segment


class CachedSegment:
    """The keys and values [B, H, n, D] of one key segment kept between decode calls: indices
    `first` .. `end` - 1 (positions for segment 0, block indices for pooled levels).

    They live in rows [start, stop) of a preallocated storage, so that appending one position
    costs O(1) (amortised) rather than a copy of everything kept: the storage is reallocated to
    twice what is live when new rows do not fit, or when it is over four times what is live (after
    a long prompt into a window that keeps a few dozen positions)."""

    def __init__(self):
        self._keys = self._values = None  # storage [B, H, capacity, D]
        self._start = self._stop = 0
        self.first = 0

    @property
    def length(self) -> int:
        return self._stop - self._start

    @property
    def end(self) -> int:
        """One past the last index kept: the positions (or blocks) seen so far."""
        return self.first + self.length

    @property
    def nbytes(self) -> int:
        """Bytes of the storage (keys and values), live rows or not."""
        return 0 if self._keys is None else 2 * self._keys.numel() * self._keys.element_size()

    def segment(self) -> Segment:
        rows = slice(self._start, self._stop)
        return Segment(self._keys[:, :, rows], self._values[:, :, rows], self.first)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep k, v [B, H, n, D] (n >= 0) as indices end .. end + n - 1."""
        n, live = k.shape[2], self.length
        capacity = -1 if self._keys is None else self._keys.shape[2]
        if self._stop + n > capacity or capacity > 4 * (live + n) + 64:
            new_capacity = 2 * (live + n) + 16
            storage = [k.new_empty(*k.shape[:2], new_capacity, k.shape[3]) for _ in range(2)]
            if live:
                for new, old in zip(storage, (self._keys, self._values)):
                    new[:, :, :live] = old[:, :, self._start : self._stop]
            self._keys, self._values = storage
            self._start, self._stop = 0, live
        self._keys[:, :, self._stop : self._stop + n] = k
        self._values[:, :, self._stop : self._stop + n] = v
        self._stop += n

    def drop_before(self, index: int) -> None:
        """Forget the indices below `index`."""
        drop = min(max(index - self.first, 0), self.length)
        self._start += drop
        self.first += drop


class LayerCache:
    """What one attention layer keeps between decode calls: a `CachedSegment` per key segment
    (segment 0 the positions; retina adds its pooled levels)."""

    def __init__(self, segments: int = 1):
        self.segments = [CachedSegment() for _ in range(segments)]

    @property
    def position(self) -> int:
        """The positions this layer has seen: the position of its next query."""
        return self.segments[0].end


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: LayerCache,
    pattern,
    complete: Callable[[list[CachedSegment]], None] | None = None,
) -> torch.Tensor:
    """A pattern's attention for new queries q [B, H, n, D] at positions cache.position ..
    cache.position + n - 1, with their keys and values k, v: the new keys join segment 0,
    `complete(segments)` appends what they complete (retina's pooled blocks), the queries attend
    to what the cache holds, and each segment then forgets the indices below the pattern's lower
    bound for the next position (ranges only grow with t: no later query sees them)."""
    first_position, n = cache.position, q.shape[2]
    cache.segments[0].append(k, v)
    if complete is not None:
        complete(cache.segments)
    out = attend(q, [s.segment() for s in cache.segments], pattern, first_position, "slices" if n == 1 else "blocks")
    for segment, (lo, _) in zip(cache.segments, pattern.ranges(first_position + n)):
        segment.drop_before(lo)
    return out
