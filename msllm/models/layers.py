"""Building blocks shared by every architecture: norms, RoPE, SwiGLU, the attention kinds,
causal pooling and upsampling. Plain PyTorch; nothing here knows about distribution.

Shapes: B batch, L positions, d width, H heads, D = d / H head width.

Sequence parallelism (msllm/parallel/) swaps a few small modules for their distributed forms:
the attention cores (`FullCausalAttention`, `LocalCausalAttention`, `RetinaAttention`), the shift
of causal pooling (`ShiftRight`) and the positions of RoPE (`Rotary.sp_rank`). Everything that
talks to other positions of the sequence goes through one of those.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 as in the Llama reference (and Hugging Face)."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Rotary(nn.Module):
    """Rotary position embedding in the rotate-half convention (so Llama exports need no permutation).

    Positions are 0..L-1 of the tensor it sees, plus `sp_rank * L` when the sequence is split
    evenly over a sequence-parallel group (every scale's slice is contiguous and equal-sized).
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.sp_rank = 0

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        L = q.shape[-2]
        pos = torch.arange(L, device=q.device, dtype=torch.float32) + self.sp_rank * L
        freqs = torch.outer(pos, self.inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos().to(q.dtype), angles.sin().to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(d, hidden, bias=False)
        self.w_up = nn.Linear(d, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


# ----------------------------------------------------------------------------------------------
# Attention cores: (q, k, v) of shape [B, H, L, D] -> [B, H, L, D], query t sees keys <= t only.
# ----------------------------------------------------------------------------------------------


class FullCausalAttention(nn.Module):
    """Full causal attention. SDPA picks a memory-efficient kernel: no L x L tensor is kept."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _pad_to_multiple(x: torch.Tensor, multiple: int, dim: int) -> torch.Tensor:
    extra = -x.shape[dim] % multiple
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat((x, x.new_zeros(shape)), dim=dim)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, H, n*block, D] -> [B, H, n, block, D]."""
    B, H, L, D = x.shape
    return x.view(B, H, L // block, block, D)


def _with_previous_block(x: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """For blocks [B, H, n, w, D], keys of each block preceded by those of the block before it:
    [B, H, n, 2w, D]. `previous` ([B, H, w, D]) stands before the first block."""
    before = torch.cat((previous.unsqueeze(2), x[:, :, :-1]), dim=2)
    return torch.cat((before, x), dim=3)


def local_window_mask(n_blocks: int, window: int, first_block_has_past: bool, device) -> torch.Tensor:
    """[n, w, 2w] bool: query i of a block sees key j of (previous block ++ own block) iff
    i < j <= i + w, i.e. keys in (t - w, t]. Without a real past, block 0's previous keys are off."""
    i = torch.arange(window, device=device).view(window, 1)
    j = torch.arange(2 * window, device=device).view(1, 2 * window)
    band = (j > i) & (j <= i + window)
    mask = band.expand(n_blocks, window, 2 * window).clone()
    if not first_block_has_past:
        mask[0, :, :window] = False
    return mask


def _sliding_window_blocks(q, k, v, window, k_past, v_past, past_visible):
    """Queries in blocks of `window` ([B, H, n, w, D]), the keys and values each block may see (its
    own and the previous block's, [B, H, n, 2w, D]), and the mask of keys (t - window, t] ([n, w, 2w]).
    `k_past`/`v_past` ([B, H, window, D]) stand before the first block; without them (or when
    `past_visible` is False) the sequence starts here. Sequences are padded at the end."""
    q, k, v = (_pad_to_multiple(t, window, dim=2) for t in (q, k, v))
    n = q.shape[2] // window
    if k_past is None:
        k_past = v_past = k.new_zeros(k.shape[0], k.shape[1], window, k.shape[3])
        past_visible = False
    kb = _with_previous_block(_blocks(k, window), k_past)
    vb = _with_previous_block(_blocks(v, window), v_past)
    return _blocks(q, window), kb, vb, local_window_mask(n, window, past_visible, q.device)


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    k_past: torch.Tensor | None = None,
    v_past: torch.Tensor | None = None,
    past_visible: bool = True,
) -> torch.Tensor:
    """Causal sliding-window attention over keys (t - window, t], in O(L * window) time and memory.

    Queries go in blocks of `window`; each block attends to its own keys and the previous block's,
    under one [n, w, 2w] mask. `k_past`/`v_past` ([B, H, window, D]) are the keys just before this
    sequence (the previous rank's, under sequence parallelism); without them, or when
    `past_visible` is False, the sequence starts here.
    """
    qb, kb, vb, mask = _sliding_window_blocks(q, k, v, window, k_past, v_past, past_visible)
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)
    return out.flatten(2, 3)[:, :, : q.shape[2]]


class LocalCausalAttention(nn.Module):
    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def past(self, k: torch.Tensor, v: torch.Tensor):
        """Keys and values of the `window` positions before this sequence, and whether they exist."""
        return None, None, False

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_past, v_past, visible = self.past(k, v)
        return local_attention(q, k, v, self.window, k_past, v_past, visible)


class RetinaAttention(LocalCausalAttention):
    """Query t sees fine keys in (t - w, t], then the mean-pooled keys of the w blocks of k tokens
    lying wholly before that window, then the w blocks of k^2 tokens wholly before those, and so on
    for `levels` levels: ever coarser with distance. Cost O(L * w * levels).

    Computed per block of w queries: each block gathers one slab of pooled keys per level (about
    w + w/k^l of them) and masks what each query may not see; no L x L tensor is made.
    """

    def __init__(self, window: int, factor: int, levels: int):
        super().__init__(window)
        self.factor, self.levels = factor, levels

    def pooled(self, k: torch.Tensor, v: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Means of each complete block of `size` positions: [B, H, L, D] -> [B, H, L // size, D]."""
        B, H, L, D = k.shape
        n = L // size
        return tuple(x[:, :, : n * size].view(B, H, n, size, D).mean(dim=3) for x in (k, v))

    def first_position(self, L: int) -> int:
        """Position of this sequence's first query in the whole sequence (non-zero when split)."""
        return 0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        w, L = self.window, q.shape[2]
        k_past, v_past, visible = self.past(k, v)
        pooled = [self.pooled(k, v, self.factor**level) for level in range(1, self.levels)]
        qb, kb, vb, mask = _sliding_window_blocks(q, k, v, w, k_past, v_past, visible)
        keys, values, masks = [kb], [vb], [mask]
        for k_level, v_level, mask in self._pooled_levels(pooled, qb.shape[2], self.first_position(L)):
            keys.append(k_level)
            values.append(v_level)
            masks.append(mask)
        out = F.scaled_dot_product_attention(
            qb, torch.cat(keys, dim=3), torch.cat(values, dim=3), attn_mask=torch.cat(masks, dim=2)
        )
        return out.flatten(2, 3)[:, :, :L]

    def _pooled_levels(self, pooled: list, n_blocks: int, first: int):
        """For each coarse level: gathered keys and values [B, H, n, slab, D] and the mask [n, w, slab].

        `pooled[l-1]` holds level l's block means over the whole sequence; queries are at positions
        first .. first + n*w - 1 of it. The index arithmetic is small (O(L) integers) and done on the
        CPU, then moved to the keys' device.
        """
        w = self.window
        region_start = first + torch.arange(n_blocks * w) - w + 1  # first token of query t's fine window
        for level, (k_pool, v_pool) in enumerate(pooled, start=1):
            size = self.factor**level
            n_pooled = k_pool.shape[2]
            # Blocks of `size` tokens lying wholly before region_start: indices < end; keep the last w.
            end = torch.div(region_start, size, rounding_mode="floor")
            start = end - w
            region_start = start * size
            start_q, end_q = start.view(n_blocks, w, 1), end.view(n_blocks, w, 1)
            slab_start = start_q[:, 0, 0]  # start and end grow with t: a block's first query starts lowest
            slab_len = max(int((end_q[:, -1, 0] - slab_start).max()), 1)
            index = slab_start.view(n_blocks, 1, 1) + torch.arange(slab_len).view(1, 1, slab_len)
            mask = (index >= 0) & (index < n_pooled) & (index >= start_q) & (index < end_q)
            safe = index.view(n_blocks, slab_len).clamp(0, max(n_pooled - 1, 0)).reshape(-1).to(k_pool.device)
            yield (
                self._gather(k_pool, safe, n_blocks, slab_len),
                self._gather(v_pool, safe, n_blocks, slab_len),
                mask.to(k_pool.device),
            )

    @staticmethod
    def _gather(pool: torch.Tensor, index: torch.Tensor, n_blocks: int, slab: int) -> torch.Tensor:
        B, H, _, D = pool.shape
        if pool.shape[2] == 0:  # sequence shorter than one block: everything is masked anyway
            return pool.new_zeros(B, H, n_blocks, slab, D)
        return pool.index_select(2, index).view(B, H, n_blocks, slab, D)


class Attention(nn.Module):
    """Multi-head self-attention with RoPE; `core` decides which keys each query sees."""

    def __init__(self, d: int, n_heads: int, core: nn.Module, rope_theta: float):
        super().__init__()
        self.n_heads = n_heads
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)
        self.rotary = Rotary(d // n_heads, rope_theta)
        self.core = core

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, d = x.shape
        q, k, v = (w(x).view(B, L, self.n_heads, -1).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        q, k = self.rotary(q, k)
        out = self.core(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(B, L, d))


class Block(nn.Module):
    """Pre-norm transformer block (Llama layout): x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, d: int, n_heads: int, hidden: int, core: nn.Module, rope_theta: float, eps: float):
        super().__init__()
        self.attn_norm = RMSNorm(d, eps)
        self.attn = Attention(d, n_heads, core, rope_theta)
        self.mlp_norm = RMSNorm(d, eps)
        self.mlp = SwiGLU(d, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


def make_core(attention: str, window: int) -> nn.Module:
    return LocalCausalAttention(window) if attention == "local" else FullCausalAttention()


def make_blocks(cfg, n_layers: int, core_factory) -> nn.ModuleList:
    """`n_layers` blocks of the model's width, each with its own attention core from `core_factory()`."""
    return nn.ModuleList(
        Block(cfg.d_model, cfg.n_heads, cfg.hidden_dim, core_factory(), cfg.rope_theta, cfg.norm_eps)
        for _ in range(n_layers)
    )


# ----------------------------------------------------------------------------------------------
# Moving between scales
# ----------------------------------------------------------------------------------------------


class ShiftRight(nn.Module):
    """Shift a sequence [B, L, d] right by `shift` positions, filling the start with zeros.

    Under sequence parallelism the fill comes from the previous rank's last positions instead.
    """

    def __init__(self, shift: int):
        super().__init__()
        self.shift = shift

    def fill(self, x: torch.Tensor) -> torch.Tensor:
        """What enters at the start: zeros, as nothing comes before the sequence."""
        return x.new_zeros(x.shape[0], self.shift, x.shape[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shift == 0:
            return x
        return torch.cat((self.fill(x), x[:, : x.shape[1] - self.shift]), dim=1)


class CausalPool(nn.Module):
    """Pool groups of k positions into one, causally: [B, L, d] -> [B, L/k, d] (L a multiple of k).

    The input is first shifted right by k - 1, so coarse position j summarises fine positions
    j*k - k + 1 .. j*k: at most j*k, the first fine position it is repeated onto when upsampled.
    A smaller shift would let fine position j*k see j*k + 1 .. (j+1)*k - 1 through it.
    """

    def __init__(self, d: int, k: int, mode: str):
        super().__init__()
        self.k = k
        self.shift = ShiftRight(k - 1)
        self.proj = nn.Linear(k * d, d, bias=False) if mode == "linear" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, d = x.shape
        groups = self.shift(x).view(B, L // self.k, self.k, d)
        if self.proj is None:
            return groups.mean(dim=2)
        return self.proj(groups.reshape(B, L // self.k, self.k * d))


class Upsample(nn.Module):
    """[B, n, d] -> [B, n*k, d]: repeat each vector k times, or a linear map d -> k*d."""

    def __init__(self, d: int, k: int, mode: str):
        super().__init__()
        self.k = k
        self.proj = nn.Linear(d, k * d, bias=False) if mode == "linear" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.proj is None:
            return x.repeat_interleave(self.k, dim=1)
        B, n, d = x.shape
        return self.proj(x).view(B, n * self.k, d)


def init_weights(model: nn.Module, std: float, n_layers: int) -> None:
    """Llama-style init: normal(0, std) for linear and embedding weights; the projections that write
    into the residual stream (attention output, MLP down) scaled by 1/sqrt(2 * n_layers)."""
    residual_std = std / math.sqrt(2 * max(n_layers, 1))
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            last = name.rsplit(".", 1)[-1]
            nn.init.normal_(module.weight, mean=0.0, std=residual_std if last in ("wo", "w_down") else std)
