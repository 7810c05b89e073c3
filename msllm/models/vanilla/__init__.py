"""Vanilla: the Llama-layout baseline (model.py), exported as a Hugging Face Llama with full
attention (msllm.checkpoint.llama) and as an msllm model otherwise (msllm.use.hf)."""

from __future__ import annotations

from msllm.models.spec import LOCAL, ArchSpec
from msllm.models.vanilla.config import VanillaConfig
from msllm.models.vanilla.model import VanillaLM

VANILLA = ArchSpec(
    name="vanilla",
    summary="the Llama-layout baseline",
    config=VanillaConfig,
    model=VanillaLM,
    modules={VanillaLM: LOCAL},
    tiny={"scales": [{"factor": 1, "layers": 2, "attention": "full", "window": 8}]},
)
