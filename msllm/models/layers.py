"""Building blocks shared by every architecture: norms, RoPE, SwiGLU, the attention kinds,
causal pooling and upsampling. Plain PyTorch; nothing here knows about distribution.

Shapes: B batch, L positions, d width, H heads, D = d / H head width.

The attention cores and their kernels are in msllm/models/attention/ (retina's in retina/model.py). Cached
decoding (decoding.py) passes each block its layer's cache; without one, forward is training's.

Sequence parallelism (msllm/distributed/sequence.py) swaps a few small modules for their distributed forms:
the attention cores (`FullCausalAttention`, `LocalCausalAttention`, `RetinaAttention`), the shift
of causal pooling (`ShiftRight`) and RoPE (`Rotary`, whose forward takes the slice's first
position). Everything that talks to other positions of the sequence goes through one of those.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from msllm.models.attention import FullCausalAttention, LocalCausalAttention


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

    Positions are first_position .. first_position + L - 1 (first_position is non-zero for a
    slice of a sequence split over a sequence-parallel group).
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, first_position: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(q.shape[-2], device=q.device, dtype=torch.float32) + first_position
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

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        """x [B, L, d] at positions 0 .. L-1; with a `cache` (the core's LayerCache), x holds the L
        positions after those the cache has seen, which then attend to them too."""
        B, L, d = x.shape
        q, k, v = (w(x).view(B, L, self.n_heads, -1).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        if cache is None:
            out = self.core(*self.rotary(q, k), v)
        else:
            out = self.core.decode(*self.rotary(q, k, cache.position), v, cache)
        return self.wo(out.transpose(1, 2).reshape(B, L, d))


class Block(nn.Module):
    """Pre-norm transformer block (Llama layout): x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, d: int, n_heads: int, hidden: int, core: nn.Module, rope_theta: float, eps: float):
        super().__init__()
        self.attn_norm = RMSNorm(d, eps)
        self.attn = Attention(d, n_heads, core, rope_theta)
        self.mlp_norm = RMSNorm(d, eps)
        self.mlp = SwiGLU(d, hidden)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cache)
        return x + self.mlp(self.mlp_norm(x))

    def new_cache(self):
        """This block's attention cache for decoding (attention.LayerCache)."""
        return self.attn.core.new_cache()


class CausalLM(nn.Module):
    """What every architecture shares at its ends: `hidden_states(input_ids) -> [B, L, d]` (the final
    hidden states, after the last norm; each model file defines it) and the output head `lm_head`
    (its weight tied to the embeddings or not).

    forward(input_ids)        -> logits [B, L, vocab] (tests, the uncached reference)
    forward(input_ids, loss)  -> loss(hidden states, lm_head.weight): training and eval pass the
                                 loss of msllm.train.loss, which never materialises all the logits.
                                 It runs inside forward so that wrappers which gather parameters
                                 around forward (ZeRO-3) have the head's weight in place.

    Cached decoding (decoding.py): `new_cache()` and `decode(new_ids, cache)`, through each model's
    `decode_hidden_states(new_ids, cache)`, its hidden_states for tokens that continue the ones the
    cache has seen.
    """

    lm_head: nn.Linear
    # What msllm.models.init needs: the std of the normal init, and the layers whose residual
    # projections share the 1/sqrt(2 * residual_layers) scaling.
    init_std: float
    residual_layers: int

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, loss=None, auxiliary: bool = True) -> torch.Tensor:
        hidden = self.hidden_states(input_ids)
        if loss is None:
            return self.lm_head(hidden)
        total = loss(hidden, self.lm_head.weight)
        extra = self.auxiliary_loss() if auxiliary else None
        # The LM loss is a sum over positions: a per-position auxiliary loss joins it as a sum too.
        return total if extra is None else total + extra * input_ids.numel()

    def auxiliary_loss(self) -> torch.Tensor | None:
        """A loss beside the LM loss from the last forward, per position (dynamic chunking's ratio
        loss, weighted), or None. forward(ids, loss) adds it (times the positions) unless
        `auxiliary` is False, as eval asks: its bits per byte are the LM loss's alone."""
        return None

    def parameter_scale(self, name: str) -> int:
        """The scale the parameter `name` belongs to, for per-scale learning rates
        (train.lr_multipliers, msllm.train.engine.param_groups): 0 for a single-stack model."""
        return 0

    def log_metrics(self) -> dict[str, torch.Tensor]:
        """Scalars of the last forward for the step log (dynamic chunking's realised compression
        per scale, `compression_s<scale>`, and its ratio loss), as detached tensors."""
        return {}

    def new_cache(self):
        """An empty decoding.DecodeCache for this model (its parts named by the model)."""
        raise NotImplementedError

    def decode_hidden_states(self, new_ids: torch.Tensor, cache) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def decode(self, new_ids: torch.Tensor, cache, last_only: bool = False) -> torch.Tensor:
        """Logits [B, n, vocab] of the tokens new_ids [B, n] (n >= 1), which continue the cache's
        sequence (the prompt, whole or a chunk, then one token per step); the cache advances by n.
        They equal forward(all tokens so far)[:, -n:]. `last_only`: the last position's logits
        only ([B, 1, vocab]), all that sampling needs after a prompt."""
        B, n = new_ids.shape
        if n < 1:
            raise ValueError("decode needs at least one new token")
        if cache.batch_size not in (None, B):
            raise ValueError(f"this cache decodes a batch of {cache.batch_size}, got {B} rows")
        cache.batch_size = B
        hidden = self.decode_hidden_states(new_ids, cache)
        cache.position += n
        return self.lm_head(hidden[:, -1:] if last_only else hidden)


def make_core(attention: str, window: int) -> nn.Module:
    return LocalCausalAttention(window) if attention == "local" else FullCausalAttention()


def make_blocks(cfg, n_layers: int, core_factory) -> nn.ModuleList:
    """`n_layers` blocks of the model's width, each with its own attention core from `core_factory()`."""
    return nn.ModuleList(
        Block(cfg.d_model, cfg.n_heads, cfg.hidden_dim, core_factory(), cfg.rope_theta, cfg.norm_eps)
        for _ in range(n_layers)
    )


def decode_blocks(blocks: nn.ModuleList, x: torch.Tensor, caches: list) -> torch.Tensor:
    """The blocks applied to x [B, n, d], the positions after those their caches have seen; nothing
    to do when n is 0 (a coarse scale that the new tokens complete no position of)."""
    if x.shape[1] == 0:
        return x
    for block, cache in zip(blocks, caches):
        x = block(x, cache)
    return x


# ----------------------------------------------------------------------------------------------
# Moving between scales
# ----------------------------------------------------------------------------------------------


def shift_right(x: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """[B, L, d] shifted right by fill's length, `fill` ([B, s, d]) entering at the start."""
    return torch.cat((fill, x[:, : x.shape[1] - fill.shape[1]]), dim=1)


class ShiftRight(nn.Module):
    """Shift a sequence [B, L, d] right by `shift` positions, filling the start with zeros (nothing
    comes before the sequence; under sequence parallelism the previous rank's last positions do)."""

    def __init__(self, shift: int):
        super().__init__()
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shift == 0:
            return x
        return shift_right(x, x.new_zeros(x.shape[0], self.shift, x.shape[2]))


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
        return self.pool_groups(self.shift(x))

    def pool_groups(self, x: torch.Tensor) -> torch.Tensor:
        """[B, n*k, d] -> [B, n, d]: each group of k consecutive positions pooled, as they come
        (the shift is the caller's: forward's, or decoding.PoolStream's)."""
        B, L, d = x.shape
        groups = x.reshape(B, L // self.k, self.k, d)
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
