"""Attention kernels: which keys each query sees is defined once, by a *pattern*, and computed by
one of three kernels that all read that definition.

A pattern (`SlidingWindow` here, `retina.RetinaPattern`) lists, for a query at position t, one
half-open range [lo, hi) per *key segment*. Segment 0 holds the keys at token resolution, indexed
by position; retina adds one segment per pooled level, indexed by block. A key is visible to query t
iff its index lies in its segment's range and is >= 0 (nothing exists before position 0; under
sequence parallelism the halo from the previous rank sits at negative positions on the first rank,
so it is masked there without a flag). `ranges(t)` is written with integer arithmetic only, so the
same code runs on Python ints, on index tensors, and inside a FlexAttention mask_mod.

Kernels (`attend(..., kernel=)`):
- "dense":  SDPA under the explicit [L, keys] mask. O(L^2): the reference the tests compare with.
- "blocks": queries in blocks of `pattern.block`; each block gathers the slab of every segment its
            queries may see (a static length, from the pattern) and SDPA runs on 4-D tensors
            [B*n, H, block, slab] under one [n, block, slab] mask. O(L * window). Trains on any device.
- "flex":   FlexAttention (compiled) over all segments laid end to end, with a BlockMask built from
            the same ranges: only key blocks some query of the block may see are computed, and
            blocks every query sees skip the mask. O(L * window). FlexAttention has no CPU backward.
- "slices": one query (a decode step): each segment cut to the range the query sees, SDPA with no
            mask. O(window).
`kernel_for(device)` is the one place that picks for training: "flex" on CUDA, "blocks" elsewhere,
unless `use_kernel` fixed one for the process (the start-up check, msllm.train.kernel_check, falls
back to "blocks" that way when FlexAttention fails or disagrees on the training device).
Cached decoding (`decode_attention`) uses "slices" for one new position and "blocks" for more, on
every device: prompts come in any length, and FlexAttention would recompile for each.

Plans (the blocks kernel's gather indices and masks, the flex BlockMask) depend only on shapes and
the pattern, so they are built once per (pattern, first position, shapes, device) and cached;
inside torch.compile they are traced instead (integer arithmetic on shapes, no graph break).

Cached decoding (msllm/models/decoding.py has the model-level API): every attention core has
`new_cache() -> LayerCache` and `decode(q, k, v, cache)`, which attends the new queries to the
cached keys and their own, then updates the cache. A `LayerCache` holds one `CachedSegment` per key
segment: the keys and values (after RoPE) that later queries may still see. Full attention keeps
every position; local and retina attention forget whatever their pattern lets no later query see
(below the pattern's lower bound at the next position), so they keep a window's worth per segment.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

FLEX_BLOCK = 128  # FlexAttention's block of queries and of keys


TRAINING_KERNELS = ("blocks", "flex")  # the reference first
_forced_kernel: str | None = None  # use_kernel's choice, for every device


def kernel_for(device: torch.device) -> str:
    """The kernel that runs local and retina attention on `device`: FlexAttention's fused kernel
    where it trains (CUDA), blocked SDPA elsewhere (FlexAttention has no CPU backward); or the one
    `use_kernel` fixed."""
    if _forced_kernel is not None:
        return _forced_kernel
    return "flex" if device.type == "cuda" else "blocks"


def use_kernel(kernel: str | None) -> None:
    """Make every later `kernel_for` (so every local and retina attention called without a kernel)
    return `kernel` (one of TRAINING_KERNELS) in this process; None: back to the choice by device."""
    global _forced_kernel
    if kernel is not None and kernel not in TRAINING_KERNELS:
        raise ValueError(f"unknown training attention kernel {kernel!r} (one of {', '.join(TRAINING_KERNELS)})")
    _forced_kernel = kernel


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


def attend(
    q: torch.Tensor,
    segments: list[Segment],
    pattern,
    first_position: int = 0,
    kernel: str | None = None,
) -> torch.Tensor:
    """Attention of queries q [B, H, L, D] at positions first_position .. first_position + L - 1
    over `segments`, each query seeing the keys `pattern.ranges` allows. Returns [B, H, L, D]."""
    kernel = kernel or kernel_for(q.device)
    layout = tuple((s.keys.shape[2], s.first) for s in segments)
    if kernel == "dense":
        return _dense(q, segments, pattern, first_position, layout)
    if kernel == "blocks":
        return _blocks(q, segments, pattern, first_position, layout)
    if kernel == "flex":
        return _flex(q, segments, pattern, first_position, layout)
    if kernel == "slices":
        return _slices(q, segments, pattern, first_position)
    raise ValueError(f"unknown attention kernel {kernel!r}")


def visible(pattern, t, segment: int, index):
    """Whether the key `index` of `segment` is visible to the query at position t (broadcasting)."""
    lo, hi = pattern.ranges(t)[segment]
    return (index >= lo) & (index < hi) & (index >= 0)


def _cached(build: Callable) -> Callable:
    """Cache a plan builder in eager mode; under torch.compile, trace the builder itself."""
    cached = functools.lru_cache(maxsize=64)(build)

    @functools.wraps(build)
    def plan(*args):
        return build(*args) if torch.compiler.is_compiling() else cached(*args)

    return plan


# ----------------------------------------------------------------------------------------------
# dense: the reference
# ----------------------------------------------------------------------------------------------


def dense_mask(pattern, first_position: int, q_len: int, layout, device) -> torch.Tensor:
    """[L, total keys] bool: the whole definition, evaluated for every (query, key) pair."""
    t = first_position + torch.arange(q_len, device=device).view(-1, 1)
    return torch.cat(
        [visible(pattern, t, s, first + torch.arange(n, device=device).view(1, -1)) for s, (n, first) in enumerate(layout)],
        dim=1,
    )


def _dense(q, segments, pattern, first_position, layout):
    mask = dense_mask(pattern, first_position, q.shape[2], layout, q.device)
    keys = torch.cat([s.keys for s in segments], dim=2)
    values = torch.cat([s.values for s in segments], dim=2)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


# ----------------------------------------------------------------------------------------------
# blocks: SDPA over gathered slabs, 4-D
# ----------------------------------------------------------------------------------------------


def slab_length(pattern, segment: int, first_position: int) -> int:
    """Keys of `segment` that one block of queries may see, at most: hi(last query) - lo(first query),
    maximised over a whole period of block starts (beyond it the pattern repeats, shifted)."""
    c = pattern.block
    longest = 1
    for n in range(pattern.period):
        t0 = first_position + n * c
        lo, _ = pattern.ranges(t0)[segment]
        _, hi = pattern.ranges(t0 + c - 1)[segment]
        longest = max(longest, hi - lo)
    return longest


@_cached
def blocks_plan(pattern, first_position: int, q_len: int, layout, device):
    """Per segment: the gather index [n * slab] into the segment (clamped to real keys) and the
    mask [n, block, slab] of what each query sees."""
    c = pattern.block
    n = -(-q_len // c)
    t = first_position + torch.arange(n * c, device=device).view(n, c, 1)
    padding = t >= first_position + q_len  # queries past the end see every gathered key: no empty softmax row
    plan = []
    for s, (length, first) in enumerate(layout):
        slab = slab_length(pattern, s, first_position)
        lo, _ = pattern.ranges(t[:, :1])[s]  # [n, 1, 1]: the lowest index the block's first query sees
        index = lo + torch.arange(slab, device=device).view(1, 1, slab)  # [n, 1, slab]
        mask = visible(pattern, t, s, index) & (index >= first) & (index < first + length) | padding
        gather = (index - first).clamp(0, max(length - 1, 0)).reshape(-1)
        plan.append((gather, mask))
    return plan


def _blocks(q, segments, pattern, first_position, layout):
    B, H, L, D = q.shape
    c = pattern.block
    n = -(-L // c)
    plan = blocks_plan(pattern, first_position, L, layout, q.device)
    keys, values, masks = [], [], []
    for segment, (gather, mask) in zip(segments, plan):
        slab = mask.shape[-1]
        for gathered, source in ((keys, segment.keys), (values, segment.values)):
            if source.shape[2] == 0:  # a pooled level longer than the sequence: all masked anyway
                source = source.new_zeros(B, H, 1, D)
            gathered.append(_to_batch_of_blocks(source.index_select(2, gather).view(B, H, n, slab, D)))
        masks.append(mask)
    q = _to_batch_of_blocks(F.pad(q, (0, 0, 0, n * c - L)).view(B, H, n, c, D))
    mask = torch.cat(masks, dim=2).unsqueeze(0).expand(B, n, c, -1).reshape(B * n, 1, c, -1)
    out = F.scaled_dot_product_attention(q, torch.cat(keys, dim=2), torch.cat(values, dim=2), attn_mask=mask)
    return out.view(B, n, H, c, D).transpose(1, 2).reshape(B, H, n * c, D)[:, :, :L]


def _to_batch_of_blocks(x: torch.Tensor) -> torch.Tensor:
    """[B, H, n, m, D] -> [B*n, H, m, D], so that SDPA sees 4-D tensors (its fused kernels need them)."""
    B, H, n, m, D = x.shape
    return x.transpose(1, 2).reshape(B * n, H, m, D)


# ----------------------------------------------------------------------------------------------
# flex: FlexAttention with a BlockMask built from the ranges
# ----------------------------------------------------------------------------------------------


def _padded(length: int) -> int:
    return -(-max(length, 1) // FLEX_BLOCK) * FLEX_BLOCK


def flex_offsets(layout) -> list[int]:
    """Where each segment starts when the segments are laid end to end, each padded to whole key
    blocks (so that no key block mixes two segments)."""
    offsets, at = [], 0
    for length, _ in layout:
        offsets.append(at)
        at += _padded(length)
    return offsets + [at]


def flex_mask_mod(pattern, first_position: int, layout):
    """FlexAttention's mask_mod: the pattern's ranges over the segments laid end to end."""
    offsets = flex_offsets(layout)

    def mask_mod(b, h, q_idx, kv_idx):
        t = first_position + q_idx
        seen = kv_idx < 0  # all False
        for s, (length, first) in enumerate(layout):
            local = kv_idx - offsets[s]
            inside = (local >= 0) & (local < length)
            seen = seen | (inside & visible(pattern, t, s, first + local))
        return seen

    return mask_mod


@_cached
def flex_block_mask(pattern, first_position: int, q_len: int, layout, device):
    """The BlockMask of `pattern`: per block of 128 queries, the key blocks that some query may see
    (mask_mod applied) and those that every query sees (no mask). Built from each segment's range
    at the block's first and last query (ranges only grow with t): O(blocks^2) integers, never the
    O(L^2) mask that create_block_mask evaluates."""
    from torch.nn.attention.flex_attention import BlockMask

    offsets = flex_offsets(layout)
    n_q, n_kv = _padded(q_len) // FLEX_BLOCK, offsets[-1] // FLEX_BLOCK
    t0 = first_position + torch.arange(n_q, device=device).view(-1, 1) * FLEX_BLOCK
    t1 = t0 + FLEX_BLOCK - 1
    kv_block = torch.arange(n_kv, device=device).view(1, -1)
    some = torch.zeros(n_q, n_kv, dtype=torch.bool, device=device)
    every = torch.zeros_like(some)
    for s, (length, first) in enumerate(layout):
        start = kv_block * FLEX_BLOCK - offsets[s]  # segment-local index of each key block's first key
        in_segment = (start >= 0) & (start < length)
        lo0, hi0 = pattern.ranges(t0)[s]
        lo1, hi1 = pattern.ranges(t1)[s]
        first_key, last_key = first + start, first + (start + FLEX_BLOCK).clamp(max=length) - 1
        some |= in_segment & (last_key >= lo0) & (first_key < hi1) & (last_key >= 0)
        every |= in_segment & (start + FLEX_BLOCK <= length) & (first_key >= lo1) & (last_key < hi0) & (first_key >= 0)
    partial = some & ~every

    def table(chosen):
        order = torch.argsort((~chosen).to(torch.int8), dim=1, stable=True)  # chosen blocks first
        return chosen.sum(1).to(torch.int32)[None, None], order.to(torch.int32)[None, None]

    return BlockMask.from_kv_blocks(
        *table(partial), *table(every), BLOCK_SIZE=FLEX_BLOCK,
        mask_mod=flex_mask_mod(pattern, first_position, layout), seq_lengths=(n_q * FLEX_BLOCK, n_kv * FLEX_BLOCK),
    )


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(q, segments, pattern, first_position, layout):
    L = q.shape[2]

    def laid_out(tensors):
        return torch.cat([F.pad(x, (0, 0, 0, _padded(x.shape[2]) - x.shape[2])) for x in tensors], dim=2)

    keys, values = laid_out([s.keys for s in segments]), laid_out([s.values for s in segments])
    block_mask = flex_block_mask(pattern, first_position, L, layout, q.device)
    q = F.pad(q, (0, 0, 0, _padded(L) - L))
    if torch.compiler.is_compiling():  # the enclosing compile fuses it
        from torch.nn.attention.flex_attention import flex_attention
    else:
        flex_attention = _compiled_flex_attention()
    return flex_attention(q, keys, values, block_mask=block_mask)[:, :, :L]


# ----------------------------------------------------------------------------------------------
# slices: one query, each segment cut to its range
# ----------------------------------------------------------------------------------------------


def _slices(q, segments, pattern, first_position):
    if q.shape[2] != 1:
        raise ValueError(f"the slices kernel takes one query (a decode step), got {q.shape[2]}")
    keys, values = [], []
    for (lo, hi), segment in zip(pattern.ranges(first_position), segments):
        end = segment.first + segment.keys.shape[2]
        lo, hi = max(lo, 0, segment.first) - segment.first, min(hi, end) - segment.first
        keys.append(segment.keys[:, :, lo:max(lo, hi)])
        values.append(segment.values[:, :, lo:max(lo, hi)])
    return F.scaled_dot_product_attention(q, torch.cat(keys, dim=2), torch.cat(values, dim=2))


# ----------------------------------------------------------------------------------------------
# Caches for decoding
# ----------------------------------------------------------------------------------------------


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
                    new[:, :, :live] = old[:, :, self._start:self._stop]
            self._keys, self._values = storage
            self._start, self._stop = 0, live
        self._keys[:, :, self._stop:self._stop + n] = k
        self._values[:, :, self._stop:self._stop + n] = v
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


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache, pattern,
                     complete: Callable[[list[CachedSegment]], None] | None = None) -> torch.Tensor:
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


# ----------------------------------------------------------------------------------------------
# The attention cores: (q, k, v) of shape [B, H, L, D] -> [B, H, L, D], query t sees keys <= t only.
# ----------------------------------------------------------------------------------------------


class FullCausalAttention(nn.Module):
    """Full causal attention. SDPA picks a memory-efficient kernel: no L x L tensor is kept."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def new_cache(self) -> LayerCache:
        return LayerCache()

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """New queries q [B, H, n, D] against every position so far (the cache keeps them all)."""
        first_position, n = cache.position, q.shape[2]
        past = cache.segments[0]
        past.append(k, v)
        keys, values, _ = past.segment()
        if n == 1 or first_position == 0:  # one query sees every key; a first chunk is the plain causal case
            return F.scaled_dot_product_attention(q, keys, values, is_causal=n > 1)
        # A later chunk: query i (at first_position + i) sees keys 0 .. first_position + i.
        positions = torch.arange(first_position + n, device=q.device)
        mask = positions <= positions[first_position:].view(-1, 1)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def fine_segment(k: torch.Tensor, v: torch.Tensor, past, first_position: int) -> Segment:
    """The keys at token resolution, preceded by `past` (keys, values [B, H, p, D] of the p positions
    before this sequence, e.g. the previous rank's) when given."""
    if past is None:
        return Segment(k, v, first_position)
    k_past, v_past = past
    return Segment(torch.cat((k_past, k), dim=2), torch.cat((v_past, v), dim=2), first_position - k_past.shape[2])


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    past: tuple[torch.Tensor, torch.Tensor] | None = None,
    first_position: int = 0,
    kernel: str | None = None,
) -> torch.Tensor:
    """Causal sliding-window attention over keys (t - window, t], in O(L * window).

    `past`: keys and values of the positions just before this sequence (the previous rank's last
    `window`, under sequence parallelism); `first_position`: the position of q's first query in
    the whole sequence (past keys at negative positions are masked)."""
    return attend(q, [fine_segment(k, v, past, first_position)], SlidingWindow(window), first_position, kernel)


class LocalCausalAttention(nn.Module):
    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return local_attention(q, k, v, self.window)

    def new_cache(self) -> LayerCache:
        return LayerCache()

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """New queries through the cache, which keeps the last window - 1 positions."""
        return decode_attention(q, k, v, cache, SlidingWindow(self.window))
