"""The Hugging Face configuration of an msllm model (bottom-up, top-down, retina, or vanilla with
local attention), loaded with `AutoConfig.from_pretrained(folder, trust_remote_code=True)`.

`msllm` holds the model section of the recipe the model was trained with, exactly as msllm's
`ModelConfig` has it; the model is built from it. The usual Hugging Face fields (vocab_size,
hidden_size, num_attention_heads, tie_word_embeddings) are derived from it for the tools that
read them, `max_position_embeddings` is the context the model was trained on, and `use_cache`
(default true) makes forward use and return msllm's decoding cache.

This file is a template of `msllm export` (msllm/use/hf/assemble.py): the export inlines
msllm.config's ScaleConfig, ModelConfig and ArchConfig, and msllm.models.registry (every
architecture, whose own config fields `msllm` holds flat beside the common ones), in place of the
imports below.
"""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from msllm.config import ArchConfig, MambaConfig, ModelConfig, ScaleConfig, doc  # noqa: F401  (doc: what ModelConfig's fields are made with)
from msllm.models.registry import ARCH_CONFIGS


def _arch_configs() -> dict[str, type]:
    """What ArchConfig.of reads: the architectures' own configs (msllm.config has its own, which
    imports the registry that this file holds inlined)."""
    return ARCH_CONFIGS


class MsllmConfig(PretrainedConfig):
    model_type = "msllm"
    # Fields derived from `msllm` on every load; the values saved in config.json are not read back.
    DERIVED = ("vocab_size", "hidden_size", "num_attention_heads", "tie_word_embeddings")

    def __init__(
        self, msllm: dict | None = None, max_position_embeddings: int = 1024, use_cache: bool = True, **kwargs
    ):
        for key in self.DERIVED:
            kwargs.pop(key, None)
        self.msllm = ModelConfig().to_dict() if msllm is None else dict(msllm)
        model = self.model_config()
        self.vocab_size = model.vocab_size
        self.hidden_size = model.d_model
        self.num_attention_heads = model.n_heads
        self.max_position_embeddings = max_position_embeddings
        self.use_cache = use_cache  # forward keeps msllm's decoding cache by default (modeling_msllm.py)
        super().__init__(tie_word_embeddings=model.tie_embeddings, **kwargs)

    def model_config(self) -> ModelConfig:
        """msllm's ModelConfig of this model; an unknown or missing key is a ValueError naming it."""
        fields = dict(self.msllm)
        arch = fields.get("arch", ModelConfig.__dataclass_fields__["arch"].default)
        if arch not in ARCH_CONFIGS:
            raise ValueError(f"config.json: msllm: unknown arch {arch!r} (known: {sorted(ARCH_CONFIGS)})")
        known = {f.name for f in dataclasses.fields(ModelConfig) if f.name != "arch_config"}
        own = {f.name for f in dataclasses.fields(ARCH_CONFIGS[arch])}
        for other in ARCH_CONFIGS.values():  # exports of before held every architecture's fields
            for f in dataclasses.fields(other):
                if f.name not in own and f.name not in known:
                    fields.pop(f.name, None)
        unknown = sorted(set(fields) - known - own)
        if unknown:
            raise ValueError(
                f"config.json: msllm: unknown keys {unknown} for arch {arch} (known: {sorted(known | own)})"
            )
        scale_keys = {f.name for f in dataclasses.fields(ScaleConfig)}
        scales = []
        for i, scale in enumerate(fields.get("scales", [{}])):
            if not isinstance(scale, dict) or set(scale) - scale_keys:
                raise ValueError(
                    f"config.json: msllm.scales[{i}]: expected keys among {sorted(scale_keys)}, got {scale!r}"
                )
            scales.append(ScaleConfig(**scale))
        fields["scales"] = scales
        if isinstance(fields.get("mamba"), dict):
            mamba_keys = {f.name for f in dataclasses.fields(MambaConfig)}
            if set(fields["mamba"]) - mamba_keys:
                raise ValueError(
                    f"config.json: msllm.mamba: expected keys among {sorted(mamba_keys)}, got {fields['mamba']!r}"
                )
            fields["mamba"] = MambaConfig(**fields["mamba"])
        return ModelConfig(**fields)
