"""Vanilla's own config fields: none (it is the common model section: one scale, the Llama layout)."""

from __future__ import annotations

from dataclasses import dataclass

from msllm.config import ArchConfig


@dataclass
class VanillaConfig(ArchConfig):
    arch = "vanilla"
    llama = True  # with full attention it is a Hugging Face Llama (msllm.checkpoint.llama)
    baseline = True
