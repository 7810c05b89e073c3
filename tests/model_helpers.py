"""The one tiny model of each architecture that the model-level tests build (test_models.py,
test_memory.py, test_loss.py, test_generate.py). Nothing is tested here."""

from __future__ import annotations

import dataclasses

import torch

from msllm.config import ModelConfig, ScaleConfig

from msllm.models.registry import ARCHS, spec  # noqa: F401  (ARCHS: every registered architecture)


def tiny_config(arch: str, **overrides) -> ModelConfig:
    """A small model of `arch` (vocabulary 97, d_model 32, 2 heads), as its spec's `tiny` has it
    (msllm.models.spec.ArchSpec.tiny): vanilla has 2 full-attention layers, retina 2 local ones
    (window 8) over 3 levels of factor 2, bottom_up and top_down one local layer (window 8) then
    one full layer 4 times coarser (bottom_up: one final layer). Any field can be overridden
    (`scales=...`, `d_model=64`, ...)."""
    cfg = ModelConfig(vocab_size=97, d_model=32, n_heads=2, **tiny_fields(arch))
    return dataclasses.replace(cfg, **overrides)


def tiny_fields(arch: str) -> dict:
    """The model-section fields of `arch`'s spec's tiny model (arch, scales as ScaleConfig, its own
    fields): what the tests that list models by hand add for an architecture they do not name."""
    fields = dict(spec(arch).tiny)
    return {"arch": arch, **fields, "scales": [ScaleConfig(**scale) for scale in fields["scales"]]}


def tiny_model(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """`build_model(tiny_config(arch, **overrides))`, its weights drawn after torch.manual_seed(seed)."""
    from msllm.models import build_model

    torch.manual_seed(seed)
    return build_model(tiny_config(arch, **overrides))
