"""Bottom-up: local token layers, pooled up, scales combined (model.py; its fields: config.py)."""

from __future__ import annotations

from msllm.models.bottom_up.config import BottomUpConfig
from msllm.models.bottom_up.model import METRICS, BottomUpLM, ScaleAttention  # noqa: F401  (METRICS: callbacks)
from msllm.models.spec import LOCAL, ArchSpec

BOTTOM_UP = ArchSpec(
    name="bottom_up",
    summary="local token layers, pooled up, scales combined",
    config=BottomUpConfig,
    model=BottomUpLM,
    modules={BottomUpLM: LOCAL, ScaleAttention: LOCAL},  # ScaleAttention mixes the scales of one position
    tiny={
        "scales": [
            {"factor": 1, "layers": 1, "attention": "local", "window": 8},
            {"factor": 4, "layers": 1, "attention": "full"},
        ],
        "final_layers": 1,
    },
    tiny_variants=({"aggregation": "attention", "residual_proj": True, "stage_norms": True},),
)
