"""Retina: one stack at token resolution in which every layer sees the recent past sharply and the
distant past ever more coarsely, as a retina sees.

    tokens -> embed -> N x Block(retina attention) -> norm -> lm_head -> logits

It is the vanilla stack with another attention core. For query t, a layer attends to the fine keys
in (t - w, t], then to the mean-pooled keys of the w blocks of k tokens lying wholly before that
window, then to w blocks of k^2 tokens before those, and so on over `retina_levels` levels (see
layers.RetinaAttention). Each layer reaches back w * (1 + k + ... + k^(S-1)) tokens at a cost of
O(L * w * S).
"""

from __future__ import annotations

from msllm.models.layers import RetinaAttention
from msllm.models.vanilla import VanillaLM


class RetinaLM(VanillaLM):
    def __init__(self, cfg):
        window = cfg.scales[0].window
        super().__init__(cfg, core_factory=lambda: RetinaAttention(window, cfg.retina_factor, cfg.retina_levels))
