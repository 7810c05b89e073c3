"""Top-down: decide the gist at the coarsest scale first, then refine towards the tokens.

    tokens -> embed = x
    scale S-1:  pool(x, f_{S-1})                        -> blocks (full) -> h_{S-1}
    scale s:    norm(pool(x, f_s)) + upsample(norm(h_{s+1}), k_{s+1}) -> blocks        -> h_s
    scale 0:    norm(x)            + upsample(norm(h_1), k_1)         -> blocks (local) -> norm -> hidden states

Long range flows through the coarse path; the token scale stays local. Each pooling goes straight
from the embeddings to its scale with a causal shift of f_s - 1 (layers.CausalPool), so coarse
position j of scale s summarises tokens <= j * f_s, and upsampling by k_s places it on positions of
scale s-1 that already cover token j * f_s. Sequences of any length are padded at the end to a
multiple of the coarsest factor.

Cached decoding (decoding.py) follows the same path for the new tokens only: position j of scale s
is computed when token j * f_s arrives (its pooling stream from the embeddings has tokens
j*f_s - f_s + 1 .. j*f_s then, and the coarser position it reads was computed at a token <= j*f_s),
its layers attend to their cache at that scale.

The two parts of a scale's input are RMS-normalised (each with its own gain) before they are
added. Added raw, the coarser output, whose norm grows with every block, outweighs the embeddings
about 100 to 1 within a few dozen steps, and the token layers no longer see which token they are
at: such a model stalls near the unigram loss (recipes/paper/top_down-6.yaml did, at 2.57 bits per
byte against vanilla's 2.22).
"""

from __future__ import annotations

import torch
from torch import nn

from msllm.models.decoding import DecodeCache, PoolStream, UpsampleStream
from msllm.models.layers import CausalLM, CausalPool, RMSNorm, Upsample, decode_blocks, make_core
from msllm.models.mamba2 import make_layers


class TopDownLM(CausalLM):
    def __init__(self, cfg):
        super().__init__()
        factors = cfg.cumulative_factors()
        self.multiple = factors[-1]
        d = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.scales = nn.ModuleList(
            make_layers(cfg, scale.layers, scale.mixer, lambda s=scale: make_core(s.attention, s.window))
            for scale in cfg.scales
        )
        # pools[i] takes the embeddings to scale i+1; upsamples[i] takes scale i+1 to scale i.
        self.pools = nn.ModuleList(CausalPool(d, f, cfg.pooling) for f in factors[1:])
        self.upsamples = nn.ModuleList(Upsample(d, scale.factor, cfg.upsampling) for scale in cfg.scales[1:])
        # input_norms[i] and context_norms[i]: the two parts of scale i's input (i < S-1).
        self.input_norms = nn.ModuleList(RMSNorm(d, cfg.norm_eps) for _ in cfg.scales[1:])
        self.context_norms = nn.ModuleList(RMSNorm(d, cfg.norm_eps) for _ in cfg.scales[1:])
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.init_std, self.residual_layers = cfg.init_std, sum(s.layers for s in cfg.scales)  # msllm.models.init
        self.embed_init_std = cfg.embedding_init_std()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        L = input_ids.shape[1]
        input_ids = nn.functional.pad(input_ids, (0, -L % self.multiple))
        x = self.embed(input_ids)
        h = None  # output of the next coarser scale
        for s in reversed(range(len(self.scales))):
            inputs = x if s == 0 else self.pools[s - 1](x)
            if h is not None:
                inputs = self.input_norms[s](inputs) + self.upsamples[s](self.context_norms[s](h))
            h = inputs
            for block in self.scales[s]:
                h = block(h)
        return self.norm(h)[:, :L]

    def parameter_scale(self, name: str) -> int:
        """The scale a parameter belongs to (train.lr_multipliers): a scale's layers, its pooling from
        the embeddings, the upsampling of its output and the norms of its input go with it; the
        embeddings, the final norm and the head with the tokens."""
        parts = name.split(".")
        if parts[0] == "scales" or parts[0] in ("input_norms", "context_norms"):
            return int(parts[1])
        if parts[0] in ("pools", "upsamples"):  # pools[i] makes scale i + 1, upsamples[i] brings it back
            return int(parts[1]) + 1
        return 0

    def new_cache(self) -> DecodeCache:
        return DecodeCache(
            scales=[[block.new_cache() for block in blocks] for blocks in self.scales],
            pools=[PoolStream(pool) for pool in self.pools],
            upsamples=[UpsampleStream(up) for up in self.upsamples],
        )

    def decode_hidden_states(self, new_ids: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
        x = self.embed(new_ids)
        h = None  # the positions of the next coarser scale completed by the new tokens
        for s in reversed(range(len(self.scales))):
            inputs = x if s == 0 else cache.pools[s - 1](x)
            if h is not None:
                inputs = self.input_norms[s](inputs) + cache.upsamples[s](self.context_norms[s](h), inputs.shape[1])
            h = decode_blocks(self.scales[s], inputs, cache.scales[s])
        return self.norm(h)
