"""The one tiny model of each architecture that the model-level tests build (test_models.py,
test_memory.py, test_loss.py, test_generate.py). Nothing is tested here."""

from __future__ import annotations

import dataclasses

import torch

from msllm.config import ModelConfig, ScaleConfig

ARCHS = ("vanilla", "bottom_up", "top_down", "retina")


def tiny_config(arch: str, **overrides) -> ModelConfig:
    """A small model of `arch` (vocabulary 97, d_model 32, 2 heads, one final layer): vanilla has 2
    full-attention layers, retina 2 local ones (window 8) over 3 levels of factor 2, bottom_up and
    top_down one local layer (window 8) then one full layer 4 times coarser. Any field can be
    overridden (`scales=...`, `d_model=64`, ...)."""
    if arch in ("bottom_up", "top_down"):
        scales = [ScaleConfig(1, 1, "local", 8), ScaleConfig(4, 1, "full")]
    else:
        scales = [ScaleConfig(1, 2, "full" if arch == "vanilla" else "local", 8)]
    cfg = ModelConfig(arch=arch, vocab_size=97, d_model=32, n_heads=2, scales=scales, retina_levels=3,
                      retina_factor=2, final_layers=1)
    return dataclasses.replace(cfg, **overrides)


def tiny_model(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """`build_model(tiny_config(arch, **overrides))`, its weights drawn after torch.manual_seed(seed)."""
    from msllm.models import build_model

    torch.manual_seed(seed)
    return build_model(tiny_config(arch, **overrides))
