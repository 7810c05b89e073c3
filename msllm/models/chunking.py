"""Learned chunking (`pool: dynamic`), after H-Net's dynamic chunking (Hwang, Wang, Gu, 2025,
arXiv 2507.07955; the authors' code is goombalab/hnet).

    h [B, n, d]  (the finer scale's output)
      -> Router:   p_t = (1 - cos(Wq h_t, Wk h_(t-1))) / 2,  p_0 = 1;  boundary b_t = p_t >= 0.5
      -> chunk:    the coarse sequence is h at the boundaries, s_0 = 0 < s_1 < ... (variable count per
                   sample, padded at the end to the batch's largest count)
      -> the coarse scale's layers (causal over chunks)
      -> dechunk:  EMA over chunks, z_j = p_(s_j) y_j + (1 - p_(s_j)) z_(j-1); fine position t takes
                   z of its chunk c(t) = (boundaries <= t) - 1, times the straight-through confidence
                   (p_t where b_t, else 1 - p_t; its value is 1, its gradient that of the confidence)
      ratio loss:  N/(N-1) * ((N-1) F G + (1-F)(1-G)), F = fraction of boundaries, G = mean p,
                   N = target_ratio; the model adds ratio_loss_weight times it to the LM loss

Causality, in msllm's convention (layers.CausalPool): coarse position j reads h at s_j alone, and h
at s_j summarises positions <= s_j (the fine layers are causal). It is served to positions s_j ..
s_(j+1) - 1, the first of which is s_j itself, exactly as fixed pooling serves coarse position j
(positions <= j*f) to j*f .. j*f + f - 1. So coarse position j stands for the chunk of positions
s_(j-1) + 1 .. s_j, which has ended by s_j: a position t only ever reads chunks that ended at or
before t. Whether t is a boundary is decided from h_t and h_(t-1) only, so changing position t can
move boundaries at t and later, never before: the chunks that positions < t read stay the same.
(H-Net calls s_j the *start* of its chunk s_j .. s_(j+1) - 1; the computation is the same.)

With `fixed_every` k (ScaleConfig.boundaries: fixed), the boundaries are the positions 0, k, 2k, ...,
where fixed pooling by k cuts, whatever p says; p is still the router's, for the EMA and the
confidence. It isolates where chunks end: selection, dechunking and the straight-through path stay
those of learned chunking. (Its ratio loss, F = 1/k = 1/N, is a constant: no gradient.)

On the meta device (msllm.models.flops_per_token) there are no values to place boundaries by: the
coarse sequence then has ceil(n / target_ratio) positions, the count training aims at.

Precision: the router (p, hence the boundaries) and the dechunking (the EMA and the confidence)
compute in fp32 at least, whatever the model's dtype and under autocast too, and the dechunked
states go back to the coarse output's dtype. In bf16, 1 - 1e-4 rounds to 1 (bf16 has 8 significant
bits), so the clamped p of every chunk start at 1 made log(1 - p) = -inf and the EMA NaN from the
first step; and p >= 0.5 decided on bf16 cosines would move boundaries by rounding alone.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

# H-Net clamps p into [1e-4, 1 - 1e-4] before its EMA, so that no chunk forgets or keeps all of the past.
EMA_CLAMP = 1e-4
# The router's diagnostics (DynamicChunking.stats): p within this of the 0.5 threshold counts as undecided.
NEAR_THRESHOLD = 0.05
# msllm's byte tokenizer (msllm/data/tokenizer.py ByteTokenizer): byte b is id 4 + b, after the 4
# special ids, 260 ids in all. Its whitespace bytes (space, tab, newline, carriage return, vertical
# tab, form feed) mark where words start: the byte after one.
BYTE_OFFSET, BYTE_VOCAB_SIZE = 4, 260
WHITESPACE_BYTES = b" \t\n\r\x0b\x0c"


def byte_whitespace_ids(vocab_size: int) -> tuple[int, ...]:
    """The ids of the whitespace bytes if `vocab_size` is that of msllm's byte tokenizer (260), else
    () (a sentencepiece vocabulary has no fixed layout: no word-start diagnostics)."""
    return tuple(BYTE_OFFSET + b for b in WHITESPACE_BYTES) if vocab_size == BYTE_VOCAB_SIZE else ()


def _at_least_fp32(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # fp64 stays fp64 (the exact tests)


def _no_autocast(x: torch.Tensor):
    """Autocast off on x's device (where autocast exists: not on the meta device)."""
    kind = x.device.type
    return torch.autocast(kind, enabled=False) if torch.amp.is_autocast_available(kind) else contextlib.nullcontext()


class Chunks:
    """Where one batch was cut: the boundary probabilities p [B, n], boundaries b [B, n] (bool),
    the fine position of each coarse position [B, M] and each fine position's chunk [B, n]."""

    def __init__(self, p: torch.Tensor, boundaries: torch.Tensor, selected: torch.Tensor, chunk_of: torch.Tensor):
        self.p, self.boundaries, self.selected, self.chunk_of = p, boundaries, selected, chunk_of


class DynamicChunking(nn.Module):
    """Router, chunking and dechunking of one dynamic scale. forward(h) -> (coarse [B, M, d], Chunks);
    upsample(y, chunks) -> [B, n, d]. After each forward, `ratio_loss` (weighted, a scalar tensor)
    and `stats` (detached: boundary fraction, mean p, compression) describe the last batch."""

    def __init__(
        self,
        d: int,
        target_ratio: float,
        ratio_loss_weight: float,
        whitespace_ids: tuple[int, ...] = (),
        fixed_every: int = 0,
    ):
        super().__init__()
        self.target_ratio = target_ratio
        self.fixed_every = fixed_every  # > 0: a boundary every fixed_every positions (module docstring)
        self.whitespace_ids = tuple(whitespace_ids)  # byte_whitespace_ids: the word-start diagnostics
        self.ratio_loss_weight = ratio_loss_weight
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        # H-Net's init (msllm.models.init): Wq = Wk = identity, so that p starts as the plain cosine
        # distance of neighbouring states.
        self.wq.init = self.wk.init = "identity"
        self.ratio_loss: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}
        self.last_chunks: Chunks | None = None

    def boundary_probabilities(self, h: torch.Tensor) -> torch.Tensor:
        """p [B, n] in fp32 at least (module docstring: Precision), from h of any dtype."""
        dtype = _at_least_fp32(h)
        with _no_autocast(h):
            h = h.to(dtype)
            q = F.normalize(F.linear(h[:, 1:], self.wq.weight.to(dtype)), dim=-1)
            k = F.normalize(F.linear(h[:, :-1], self.wk.weight.to(dtype)), dim=-1)
            p = ((1 - (q * k).sum(-1)) / 2).clamp(0.0, 1.0)
        return torch.cat((p.new_ones(p.shape[0], 1), p), dim=1)  # position 0 always starts (ends) a chunk

    def forward(
        self, h: torch.Tensor, n_real: int | None = None, ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Chunks]:
        """h [B, n, d] -> the states at the boundaries [B, M, d] (M: the most boundaries of any row;
        a row with fewer is padded at the end with states that no real position reads). `n_real`:
        the positions before the model's end padding, the only ones the ratio loss and the stats
        count. `ids` [B, >= n]: the tokens at these positions (when they are the tokens), for the
        word-start diagnostics."""
        B, n, d = h.shape
        p = self.boundary_probabilities(h)
        positions = torch.arange(n, device=h.device)
        if self.fixed_every:
            boundaries = (positions % self.fixed_every == 0).expand(B, n)
        else:
            boundaries = p >= 0.5
        if h.is_meta:
            M = math.ceil(n / self.target_ratio)
        else:
            M = int(boundaries.sum(dim=1).max())
        # Boundaries first, each group in order (H-Net's ChunkLayer): the first M are row b's chunks.
        order = torch.argsort(positions + (~boundaries).long() * n, dim=1, stable=True)
        selected = order[:, :M]  # [B, M]
        coarse = torch.gather(h, 1, selected.unsqueeze(-1).expand(B, M, d))
        chunk_of = torch.cumsum(boundaries.long(), dim=1) - 1  # [B, n]
        chunks = Chunks(p, boundaries, selected, chunk_of)
        self._ratio_loss(p[:, :n_real], boundaries[:, :n_real])
        if not h.is_meta:
            self._diagnostics(p[:, :n_real], boundaries[:, :n_real], None if ids is None else ids[:, :n][:, :n_real])
        self.last_chunks = chunks
        return coarse, chunks

    def _ratio_loss(self, p: torch.Tensor, boundaries: torch.Tensor) -> None:
        N = self.target_ratio
        fraction = boundaries.float().mean()  # F: not differentiable (H-Net's too)
        mean_p = p.float().mean()  # G: carries the gradient
        loss = N / (N - 1) * ((N - 1) * fraction * mean_p + (1 - fraction) * (1 - mean_p))
        self.ratio_loss = self.ratio_loss_weight * loss
        self.stats = {
            "compression": (1.0 / fraction.clamp(min=1e-9)).detach(),
            "boundary_fraction": fraction.detach(),
            "ratio_loss": loss.detach(),
        }

    @torch.no_grad()
    def _diagnostics(self, p: torch.Tensor, boundaries: torch.Tensor, ids: torch.Tensor | None) -> None:
        """stats of the router, over positions 1 .. n_real - 1 (position 0 always starts a chunk):
        `p_std`, the spread of p; `p_near_threshold`, the fraction of p within NEAR_THRESHOLD of 0.5
        (undecided: a small change of the states moves those boundaries). With byte ids and the byte
        tokenizer's whitespace ids: `word_start_boundaries`, the fraction of boundaries at a word start
        (a non-whitespace byte right after a whitespace byte), and `word_start_rate`, the fraction of
        positions that are word starts, which is what boundaries placed at random would give."""
        p, boundaries = p[:, 1:].float(), boundaries[:, 1:]
        self.stats["p_std"] = p.std() if p.numel() > 1 else p.new_zeros(())
        self.stats["p_near_threshold"] = (
            ((p - 0.5).abs() < NEAR_THRESHOLD).float().mean() if p.numel() else p.new_zeros(())
        )
        if ids is None or not self.whitespace_ids:
            return
        space = torch.zeros_like(ids, dtype=torch.bool)
        for i in self.whitespace_ids:
            space |= ids == i
        word_start = space[:, :-1] & ~space[:, 1:]  # positions 1 ..: after whitespace, not whitespace
        at_word_start = (boundaries & word_start).sum().float()
        self.stats["word_start_boundaries"] = at_word_start / boundaries.sum().clamp(min=1).float()
        self.stats["word_start_rate"] = word_start.float().mean() if word_start.numel() else p.new_zeros(())

    def upsample(self, y: torch.Tensor, chunks: Chunks) -> torch.Tensor:
        """y [B, M, d] (the coarse layers' output) -> [B, n, d] at the fine positions, in y's dtype
        (computed in fp32 at least: module docstring, Precision)."""
        B, M, d = y.shape
        dtype = _at_least_fp32(y)
        with _no_autocast(y):
            p = chunks.p.to(dtype)
            p_chunk = torch.gather(p, 1, chunks.selected).clamp(EMA_CLAMP, 1 - EMA_CLAMP)  # [B, M]
            z = ema(y.to(dtype), p_chunk).to(y.dtype)
            confidence = torch.where(chunks.boundaries, p, 1 - p)
            straight_through = confidence + (1 - confidence).detach()  # 1 in value, confidence's gradient
        fine = torch.gather(z, 1, chunks.chunk_of.unsqueeze(-1).expand(B, -1, d))
        return fine * straight_through.unsqueeze(-1).to(fine.dtype)  # (1 in any dtype: bf16 rounds 1 +- 6e-8 to 1)


def ema(y: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """z_j = p_j y_j + (1 - p_j) z_(j-1) (z_(-1) = 0) over dim 1 of y [B, M, d], p [B, M], in closed
    form: z_j = sum_(i <= j) p_i prod_(i < l <= j) (1 - p_l) y_i, one [M, M] weight matrix per row
    (the same cost as one attention head over the chunks; H-Net uses a Mamba-2 scan kernel).
    Computed in fp32 at least, autocast off, and returned in y's dtype; p must be below 1 in that
    precision (1 - p = 0 makes log(1 - p) = -inf and the weights NaN)."""
    dtype = _at_least_fp32(y)
    with _no_autocast(y):
        p = p.to(dtype)
        log_keep = torch.log1p(-p).cumsum(dim=1)  # [B, M]: sum of log(1 - p_l) for l <= j
        M = y.shape[1]
        causal = torch.ones(M, M, dtype=torch.bool, device=y.device).tril()
        exponent = (log_keep.unsqueeze(2) - log_keep.unsqueeze(1)).masked_fill(~causal, float("-inf"))  # [B, j, i]
        weights = torch.exp(exponent) * p.unsqueeze(1)
        return (weights @ y.to(dtype)).to(y.dtype)
