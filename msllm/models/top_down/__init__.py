"""Top-down: the coarsest scale first, refined down to the tokens (model.py; its fields: config.py)."""

from __future__ import annotations

from msllm.models.spec import LOCAL, ArchSpec
from msllm.models.top_down.config import TopDownConfig
from msllm.models.top_down.model import TopDownLM

TOP_DOWN = ArchSpec(
    name="top_down",
    summary="coarsest scale first, refined down to tokens",
    config=TopDownConfig,
    model=TopDownLM,
    modules={TopDownLM: LOCAL},
    tiny={
        "scales": [
            {"factor": 1, "layers": 1, "attention": "local", "window": 8},
            {"factor": 4, "layers": 1, "attention": "full"},
        ]
    },
)
