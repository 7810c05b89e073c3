"""Attention kernels: which keys each query sees is defined once, by a *pattern*, and computed by
one of the kernels that all read that definition.

    patterns.py   SlidingWindow, Segment, visible: the definition
    kernels.py    attend and the kernels (dense, blocks, flex, slices), kernel_for / use_kernel, the
                  plan caches
    cache.py      the decoding cache (LayerCache, CachedSegment) and decode_attention
    modules.py    the attention cores (FullCausalAttention, LocalCausalAttention, local_attention)

This package exports the names of all four.

A pattern (`SlidingWindow`, `retina.RetinaPattern`) lists, for a query at position t, one
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

from msllm.models.attention.cache import CachedSegment, LayerCache, decode_attention  # noqa: F401
from msllm.models.attention.kernels import (  # noqa: F401
    FLEX_BLOCK,
    TRAINING_KERNELS,
    attend,
    blocks_plan,
    dense_mask,
    flex_block_mask,
    flex_mask_mod,
    flex_offsets,
    kernel_for,
    slab_length,
    use_kernel,
)
from msllm.models.attention.modules import (  # noqa: F401
    FullCausalAttention,
    LocalCausalAttention,
    fine_segment,
    local_attention,
)
from msllm.models.attention.patterns import Segment, SlidingWindow, visible  # noqa: F401
