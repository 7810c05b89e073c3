"""The attention cores: (q, k, v) of shape [B, H, L, D] -> [B, H, L, D], query t sees keys <= t only;
each has `new_cache()` and `decode(q, k, v, cache)` for cached decoding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from msllm.models.attention.cache import LayerCache, decode_attention
from msllm.models.attention.kernels import attend
from msllm.models.attention.patterns import Segment, SlidingWindow


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
