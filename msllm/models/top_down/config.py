"""Top-down's own config fields: none beyond the common section (two or more scales)."""

from __future__ import annotations

from dataclasses import dataclass

from msllm.config import ArchConfig


@dataclass
class TopDownConfig(ArchConfig):
    arch = "top_down"
    multi_scale = True
    mixers = ("attention", "mamba2")
