"""Cached (incremental) decoding for every architecture: each new token costs one pass of the model
over that token, not over the whole sequence.

    cache = model.new_cache()                       # empty; takes its batch size from the first call
    logits = model.decode(prompt_ids, cache)        # [B, n, vocab]: prefill, in one call or in chunks
    logits = model.decode(next_ids, cache)          # [B, 1, vocab]: then one token per step

`decode(new_ids, cache)` returns what `model(all tokens so far)[:, -n:]` returns (tested to 1e-5
in fp32 for every architecture, at lengths that cross every block boundary), and `last_only=True`
returns the last position's logits only. Every row of a batch is at the same position: a batch
of prompts of different lengths is decoded by msllm.use.generate, which prefills the shortest
length and feeds each longer prompt's remaining tokens in place of sampled ones (nothing is
padded, so nothing can leak). Positions keep counting past the training length (RoPE
extrapolates); the models accept any length.

What the cache keeps (`DecodeCache`, its parts named by each model's new_cache):
- attention layers: an attention.LayerCache each, the keys and values (after RoPE) that later
  queries may see: every position for full attention, the last window - 1 for local attention,
  for retina what its pattern still shows at each level (a window's worth each; retina/model.py);
- bottom-up and top-down: a `PoolStream` per pooling (the last k - 1 positions it pools from) and
  an `UpsampleStream` per upsampling (the latest coarse position's upsampled vectors). A coarse
  position j of a scale with cumulative factor f is computed when token j * f arrives: causal
  pooling (layers.CausalPool) makes it summarise tokens j*f - f + 1 .. j*f, so it is complete
  then, and it serves tokens j*f .. j*f + f - 1 (through the upsampling), the first of which is
  the one that completed it. The coarse layers run once per f tokens, on that position alone, each
  with its own cache at its scale.
"""

from __future__ import annotations

import torch

from msllm.models.layers import CausalPool, Upsample


class DecodeCache:
    """What a model keeps between decode calls. `position`: the tokens seen so far; `batch_size`:
    the rows (set by the first call); the other attributes are the model's parts (per-layer
    attention caches, pooling and upsampling streams), named by its new_cache."""

    def __init__(self, **parts):
        self.position = 0
        self.batch_size: int | None = None
        vars(self).update(parts)


class PoolStream:
    """A CausalPool over a sequence that arrives in pieces: each call takes the next fine positions
    [B, n, d] and returns the coarse positions [B, m, d] they complete (those j with j*k among
    them), exactly as CausalPool over the whole sequence. It keeps the last k - 1 fine positions
    (zeros before the sequence starts, as CausalPool's shift)."""

    def __init__(self, pool: CausalPool):
        self.pool = pool
        self.position = 0  # fine positions seen
        self.recent: torch.Tensor | None = None  # [B, k - 1, d]: fine positions position-k+1 .. position-1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k, p, n = self.pool.k, self.position, x.shape[1]
        if self.recent is None:
            self.recent = x.new_zeros(x.shape[0], k - 1, x.shape[2])
        stream = torch.cat((self.recent, x), dim=1)  # fine positions p-k+1 .. p+n-1
        first = -(-p // k)  # the first coarse position completed here: the first j with j*k >= p
        count = -(-(p + n) // k) - first
        start = first * k - p  # where fine position first*k - k + 1 (its group's first) is in the stream
        coarse = self.pool.pool_groups(stream[:, start : start + count * k])
        self.recent = stream[:, stream.shape[1] - (k - 1) :]
        self.position += n
        return coarse


class UpsampleStream:
    """An Upsample by k from a coarse sequence computed in pieces onto fine positions that arrive in
    pieces: fine position i takes the (i mod k)-th vector of coarse position i // k. Each call gets
    the coarse positions computed since the last call (one per multiple of k among the new fine
    positions) and the number n of new fine positions, and returns their vectors [B, n, d]. It keeps
    the latest coarse position's k vectors, which the fine positions after it still read."""

    def __init__(self, upsample: Upsample):
        self.upsample = upsample
        self.position = 0  # fine positions served
        self.latest: torch.Tensor | None = None  # [B, k, d]

    def __call__(self, coarse: torch.Tensor, n: int) -> torch.Tensor:
        k, p = self.upsample.k, self.position
        fine = self.upsample(coarse)  # from fine position ceil(p / k) * k on
        if p % k:  # the first new fine positions still belong to the latest coarse position so far
            fine = torch.cat((self.latest, fine), dim=1)
        if coarse.shape[1]:
            self.latest = fine[:, -k:]
        self.position += n
        return fine[:, p % k : p % k + n]
