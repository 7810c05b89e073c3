"""Vanilla: the baseline every claim is measured against. The Llama layout (pre-norm RMSNorm,
RoPE, SwiGLU, no biases), so that it exports to a Hugging Face Llama checkpoint.

    tokens -> embed -> N x Block -> norm -> hidden states -> lm_head -> logits

Cached decoding (decoding.py): each block keeps its attention's cache (every position for full
attention, the window for local attention).
"""

from __future__ import annotations

import torch
from torch import nn

from msllm.models.decoding import DecodeCache
from msllm.models.layers import CausalLM, RMSNorm, decode_blocks, make_blocks, make_core


class VanillaLM(CausalLM):
    def __init__(self, cfg, core_factory=None):
        """`core_factory` makes each layer's attention core; by default the one scales[0] names
        (retina/model.py passes its own)."""
        super().__init__()
        scale = cfg.scales[0]
        core_factory = core_factory or (lambda: make_core(scale.attention, scale.window))
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = make_blocks(cfg, scale.layers, core_factory)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.init_std, self.residual_layers = cfg.init_std, scale.layers  # msllm.models.init
        self.embed_init_std = cfg.embedding_init_std()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)

    def new_cache(self) -> DecodeCache:
        return DecodeCache(layers=[layer.new_cache() for layer in self.layers])

    def decode_hidden_states(self, new_ids: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
        return self.norm(decode_blocks(self.layers, self.embed(new_ids), cache.layers))
