"""Retina: one stack whose attention sees the distant past ever more coarsely (model.py; its
fields: config.py)."""

from __future__ import annotations

from msllm.models.retina.config import RetinaConfig
from msllm.models.retina.model import RetinaAttention, RetinaLM, RetinaPattern, pool_levels, retina_attention  # noqa: F401
from msllm.models.spec import LOCAL, ArchSpec

RETINA = ArchSpec(
    name="retina",
    summary="one stack, attention ever coarser with distance",
    config=RetinaConfig,
    model=RetinaLM,
    # Its attention core's sequence-parallel form lives beside it (parallelize.py), named here rather
    # than imported: this file is inlined into Hugging Face exports, which cannot import msllm.distributed.
    modules={RetinaLM: LOCAL, RetinaAttention: "msllm.models.retina.parallelize.sequence_parallel"},
    tiny={
        "scales": [{"factor": 1, "layers": 2, "attention": "local", "window": 8}],
        "retina_levels": 3,
        "retina_factor": 2,
    },
)
