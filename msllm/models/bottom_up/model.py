"""Bottom-up: read the tokens locally, then summarise upwards.

    tokens -> embed -> scale 0 blocks (local attention)      -> h0 --------------------------------+
                         pool k1 -> scale 1 blocks (full)     -> h1 -> upsample f1 ----------------+
                                      pool k2 -> scale 2 ...  -> h2 -> upsample f2 ----------------+
                                                                                                   |
    hidden states <- norm <- final blocks (local) <- aggregate (sum | attention) <-----------------+
    logits <- lm_head <- hidden states

Every pooling is causal (layers.CausalPool): coarse position j of scale s only summarises tokens
<= j * f_s, and upsampling repeats it onto tokens j * f_s .. j * f_s + f_s - 1, so no token sees
its future. Sequences of any length are padded at the end to a multiple of the coarsest factor;
padding after the last real token cannot change any real position's output.

The coarsest scale may instead be cut into learned chunks (`pool: dynamic`, chunking.py, after
H-Net): its positions are the finer scale's states at the boundaries a router places, and a
smoothing upsampler brings them back to the finer positions (then repeated by the finer scale's
f onto the tokens, as a fixed scale's). Its ratio loss is added to the LM loss in forward
(layers.CausalLM.auxiliary_loss). Such a model has no cached decoding (generate recomputes).
With a dynamic scale, H-Net's training ingredients are on by default (BottomUpConfig.stage_norms,
residual_proj, ModelConfig.embed_init_std; train.lr_multipliers): an RMSNorm ends each scale's layers, and the
coarsest scale's finer scale (H-Net's encoder) joins the sum through a zero-initialised projection
computed in fp32 (`combine`). Any scale's layers may be Mamba-2 blocks (`mixer: mamba2`,
mamba2.py); the final layers take scale 0's mixer.

Cached decoding (decoding.py) follows the same path for the new tokens only: a coarse position of
scale s is computed when token j * f_s arrives (its pooling stream has the k_s positions below it
then), its layers attend to their cache at that scale, and its upsampling stream serves it to
tokens j * f_s .. j * f_s + f_s - 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from msllm.errors import MsllmError
from msllm.models.chunking import DynamicChunking, _at_least_fp32, _no_autocast, byte_whitespace_ids
from msllm.models.decoding import DecodeCache, PoolStream, UpsampleStream
from msllm.models.layers import CausalLM, CausalPool, RMSNorm, Upsample, decode_blocks, make_core
from msllm.models.mamba2 import make_layers

# What log_metrics reports of each dynamic scale (msllm.train.callbacks.CHUNKING_METRICS lists the same prefixes).
METRICS = ("compression", "ratio_loss", "p_std", "p_near_threshold", "word_start_boundaries", "word_start_rate")


class ScaleAttention(nn.Module):
    """Combine the S scale vectors of one position by a single-head attention, queried by the
    token scale: each position chooses how much to take from each scale."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.query_norm = RMSNorm(d, eps)
        self.key_norm = RMSNorm(d, eps)
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)

    def forward(self, per_scale: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(per_scale, dim=2)  # [B, L, S, d]
        q = self.wq(self.query_norm(per_scale[0])).unsqueeze(2)  # [B, L, 1, d]
        k = self.wk(self.key_norm(stacked))
        weights = torch.softmax((q * k).sum(-1) / math.sqrt(q.shape[-1]), dim=-1)  # [B, L, S]
        return (weights.unsqueeze(-1) * stacked).sum(dim=2)


class BottomUpLM(CausalLM):
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
        # H-Net's training ingredients (BottomUpConfig.stage_norms, residual_proj; on with a dynamic scale):
        # a norm at the end of each scale's layers, and a zero-initialised projection of the coarsest
        # scale's finer scale (H-Net's encoder output) where it joins the sum.
        self.scale_norms = (
            nn.ModuleList(RMSNorm(d, cfg.norm_eps) for _ in cfg.scales)
            if cfg.arch_config.uses_stage_norms(cfg)
            else None
        )
        self.residual_proj = nn.Linear(d, d, bias=True) if cfg.arch_config.uses_residual_proj(cfg) else None
        if self.residual_proj is not None:
            self.residual_proj.init = "zeros"  # msllm.models.init
        # pools[i] takes scale i to scale i+1; upsamples[i] takes scale i+1 straight to the tokens
        # (a dynamic scale: from the finer scale's positions, after its own dechunking).
        self.pools = nn.ModuleList(
            DynamicChunking(
                d,
                scale.target_ratio,
                scale.ratio_loss_weight,
                byte_whitespace_ids(cfg.vocab_size),
                fixed_every=int(scale.target_ratio) if scale.boundaries == "fixed" else 0,
            )
            if scale.pool == "dynamic"
            else CausalPool(d, scale.factor, cfg.pooling)
            for scale in cfg.scales[1:]
        )
        self.upsamples = nn.ModuleList(Upsample(d, f, cfg.upsampling) for f in factors[1:])
        self.aggregate = ScaleAttention(d, cfg.norm_eps) if cfg.arch_config.aggregation == "attention" else None
        fine = cfg.scales[0]
        self.final = make_layers(
            cfg, cfg.arch_config.final_layers, fine.mixer, lambda: make_core(fine.attention, fine.window)
        )
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        # msllm.models.init initialises the weights (build_model)
        self.init_std, self.residual_layers = (
            cfg.init_std,
            sum(s.layers for s in cfg.scales) + cfg.arch_config.final_layers,
        )
        self.embed_init_std = cfg.embedding_init_std()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        L = input_ids.shape[1]
        input_ids = nn.functional.pad(input_ids, (0, -L % self.multiple))
        h = self.embed(input_ids)
        outputs, chunks = [], None
        for s, blocks in enumerate(self.scales):
            if s > 0:
                pool = self.pools[s - 1]
                if isinstance(pool, DynamicChunking):
                    f = self.upsamples[s - 1].k  # tokens per position of the scale it cuts
                    h, chunks = pool(h, n_real=-(-L // f), ids=input_ids if f == 1 else None)
                else:
                    h = pool(h)
            for block in blocks:
                h = block(h)
            if self.scale_norms is not None:
                h = self.scale_norms[s](h)
            outputs.append(h)
        if chunks is not None:  # the dynamic (coarsest) scale back at its finer scale's positions
            outputs[-1] = self.pools[-1].upsample(outputs[-1], chunks)
        per_scale = [outputs[0]] + [up(out) for up, out in zip(self.upsamples, outputs[1:])]
        h = self.combine(per_scale)
        for block in self.final:
            h = block(h)
        return self.norm(h)[:, :L]

    def combine(self, per_scale: list[torch.Tensor]) -> torch.Tensor:
        """The scales, each at token resolution, combined (sum or attention), in their dtype. With
        residual_proj, the coarsest scale's finer scale passes through it first, in fp32 at least
        (autocast off), and the sum is taken in that precision, as H-Net adds its residual."""
        dtype = per_scale[0].dtype
        if self.residual_proj is not None:
            per_scale = list(per_scale)
            skip = len(per_scale) - 2
            x = per_scale[skip]
            precise = _at_least_fp32(x)
            with _no_autocast(x):
                per_scale[skip] = F.linear(
                    x.to(precise), self.residual_proj.weight.to(precise), self.residual_proj.bias.to(precise)
                )
        if self.aggregate is not None:
            return self.aggregate([x.to(dtype) for x in per_scale])
        return sum(per_scale).to(dtype)

    def parameter_scale(self, name: str) -> int:
        """The scale a parameter belongs to (train.lr_multipliers): a scale's layers and norm, and the
        upsampling of its output, go with it; a pooling or router with the scale it reads (H-Net's
        router and residual projection belong to the outer stage, whose encoder they read); the
        embeddings, the aggregation, the final layers, the norm and the head with the tokens."""
        parts = name.split(".")
        if parts[0] in ("scales", "scale_norms", "pools"):
            return int(parts[1])
        if parts[0] == "upsamples":
            return int(parts[1]) + 1
        if parts[0] == "residual_proj":
            return len(self.scales) - 2
        return 0

    def dynamic_scales(self) -> dict[int, DynamicChunking]:
        """The dynamic scales by index (at most one: the coarsest)."""
        return {s + 1: pool for s, pool in enumerate(self.pools) if isinstance(pool, DynamicChunking)}

    def auxiliary_loss(self) -> torch.Tensor | None:
        losses = [pool.ratio_loss for pool in self.dynamic_scales().values() if pool.ratio_loss is not None]
        return sum(losses) if losses else None

    def log_metrics(self) -> dict[str, torch.Tensor]:
        """Per dynamic scale s: compression_s<s> and ratio_loss_s<s>; the router's diagnostics
        p_std_s<s> and p_near_threshold_s<s>; on bytes, when the scale cuts the bytes themselves,
        word_start_boundaries_s<s> against word_start_rate_s<s> (DynamicChunking._diagnostics)."""
        out = {}
        for s, pool in self.dynamic_scales().items():
            for key in METRICS:
                if key in pool.stats:
                    out[f"{key}_s{s}"] = pool.stats[key]
        return out

    def new_cache(self) -> DecodeCache:
        if self.dynamic_scales():
            raise MsllmError("cached decoding does not support a dynamic-chunking scale (pool: dynamic) yet")
        return DecodeCache(
            scales=[[block.new_cache() for block in blocks] for blocks in self.scales],
            pools=[PoolStream(pool) for pool in self.pools],
            upsamples=[UpsampleStream(up) for up in self.upsamples],
            final=[block.new_cache() for block in self.final],
        )

    def decode_hidden_states(self, new_ids: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
        norms = self.scale_norms if self.scale_norms is not None else [nn.Identity()] * len(self.scales)
        h = norms[0](decode_blocks(self.scales[0], self.embed(new_ids), cache.scales[0]))
        per_scale = [h]
        for s in range(1, len(self.scales)):
            h = norms[s](
                decode_blocks(self.scales[s], cache.pools[s - 1](h), cache.scales[s])
            )  # the positions completed
            per_scale.append(cache.upsamples[s - 1](h, new_ids.shape[1]))
        return self.norm(decode_blocks(self.final, self.combine(per_scale), cache.final))
