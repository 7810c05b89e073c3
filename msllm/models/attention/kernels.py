"""The attention kernels (dense, blocks, flex, slices) and their plan caches: `attend` runs the
one `kernel_for` picks (or the one asked for) over a pattern's segments; the blocks kernel's
gather indices and masks and the flex BlockMask are built once per (pattern, first position,
shapes, device) and cached (traced inside torch.compile).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from msllm.models.attention.patterns import Segment, visible

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
        [
            visible(pattern, t, s, first + torch.arange(n, device=device).view(1, -1))
            for s, (n, first) in enumerate(layout)
        ],
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


def flex_mask_mod(pattern, first_position: int, layout, device=None):
    """FlexAttention's mask_mod: the pattern's ranges over the segments laid end to end.

    What varies with the length (the first position; each segment's length, first index and
    offset) is read from 0-d tensors that the mask_mod captures, not from Python ints:
    torch.compile makes a captured tensor an input of the graph, guarded on its shape only, but
    bakes a captured int into the graph as a constant, so that every new length compiled flex
    again. 0-d, so that their shapes are the same for every pattern (inductor's CPU flex kernel
    fails to compile with a captured tensor of symbolic size)."""
    offsets = flex_offsets(layout)

    def numbers(values):
        return [torch.tensor(value, device=device) for value in values]

    (start,) = numbers([first_position])
    lengths, firsts, laid_at = numbers(n for n, _ in layout), numbers(f for _, f in layout), numbers(offsets[:-1])

    def mask_mod(b, h, q_idx, kv_idx):
        t = start + q_idx
        seen = kv_idx < 0  # all False
        for s in range(len(layout)):
            local = kv_idx - laid_at[s]
            inside = (local >= 0) & (local < lengths[s])
            seen = seen | (inside & visible(pattern, t, s, firsts[s] + local))
        return seen

    return mask_mod


@_cached
def flex_block_mask(pattern, first_position: int, q_len: int, layout, device):
    """The BlockMask of `pattern`: per block of 128 queries, the key blocks that some query may see
    (mask_mod applied) and those that every query sees (no mask). Built from each segment's range
    at the block's first and last query (ranges only grow with t): O(blocks^2) integers, never the
    O(L^2) mask that create_block_mask evaluates."""
    from torch.nn.attention.flex_attention import BlockMask  # noqa: PLC0415 (heavy and optional: flex_attention imports torch._dynamo, 0.25 s; torch 2.4 has none)

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
        *table(partial),
        *table(every),
        BLOCK_SIZE=FLEX_BLOCK,
        mask_mod=flex_mask_mod(pattern, first_position, layout, device),
        seq_lengths=(q_len, n_kv * FLEX_BLOCK),
    )


@functools.cache
def _compiled_flex_attention(backend: str = "inductor"):
    """flex_attention compiled with torch's automatic dynamic shapes: the first lengths compile a
    graph for their shapes, the next ones a graph with the lengths symbolic, which torch
    specialises on whether there is one block of queries and one block of keys (it specialises
    sizes of 1): 4 graphs at most, whatever the lengths (tests/unit/test_recompile.py counts them;
    `backend`: the tests pass a cheaper one). With static shapes every length compiled again, and
    after torch's recompile limit (8) flex_attention ran unfused, its memory quadratic in L."""
    from torch.nn.attention.flex_attention import flex_attention  # noqa: PLC0415 (heavy and optional: flex_attention imports torch._dynamo, 0.25 s; torch 2.4 has none)

    return torch.compile(flex_attention, backend=backend, dynamic=None)


def _flex(q, segments, pattern, first_position, layout):
    L = q.shape[2]

    def laid_out(tensors):
        return torch.cat([F.pad(x, (0, 0, 0, _padded(x.shape[2]) - x.shape[2])) for x in tensors], dim=2)

    keys, values = laid_out([s.keys for s in segments]), laid_out([s.values for s in segments])
    if torch.compiler.is_compiling():  # the enclosing compile fuses it
        from torch.nn.attention.flex_attention import flex_attention  # noqa: PLC0415 (heavy and optional: flex_attention imports torch._dynamo, 0.25 s; torch 2.4 has none)

        # The queries as they are: padding them and slicing the output would add a guard on
        # whether L is a multiple of 128, and so one more graph for the lengths on each side.
        block_mask = flex_block_mask(pattern, first_position, L, layout, q.device)
        return flex_attention(q, keys, values, block_mask=block_mask)
    # Padded to whole blocks here, outside the compiled kernel: its graph sees multiples of 128 only,
    # so the lengths that pad alike share one graph (and one cached BlockMask), and the kernel
    # needs no bounds checks.
    padded = _padded(L)
    block_mask = flex_block_mask(pattern, first_position, padded, layout, q.device)
    q = F.pad(q, (0, 0, 0, padded - L))
    return _compiled_flex_attention()(q, keys, values, block_mask=block_mask)[:, :, :L]


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
        keys.append(segment.keys[:, :, lo : max(lo, hi)])
        values.append(segment.values[:, :, lo : max(lo, hi)])
    return F.scaled_dot_product_attention(q, torch.cat(keys, dim=2), torch.cat(values, dim=2))
