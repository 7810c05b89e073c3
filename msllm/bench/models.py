"""`msllm bench models`: parameters, FLOPs per token and training-step memory of the
paper-comparison recipes (recipes/models/*-bookcorpus.yaml: vanilla-14 against the 30-layer
multi-scale models), through msllm.inspect, with the loss chunked and dense."""

from __future__ import annotations

from pathlib import Path

from msllm.bench import shipped_recipe
from msllm.inspect import compare_recipes


def bench_models(args) -> str:
    """The comparison table of every recipes/models/*-bookcorpus.yaml, at the recipes' own 32k
    vocabulary and at 8000 (where the loss weighs less)."""
    paths = sorted(str(p) for p in Path(shipped_recipe("models")).glob("*-bookcorpus.yaml"))
    sections = []
    for vocab in (0, 8000):
        title = "the recipes' own vocabulary (32,000)" if vocab == 0 else f"a {vocab:,}-token vocabulary"
        sections += [f"### At {title}", "", compare_recipes(paths, vocab_size=vocab), ""]
    return "\n".join(
        [
            "Memory of one training step on one rank at the recipes' micro-batch (16 x 1024 tokens, bf16, ZeRO 1 "
            "counted on one rank): activations split into the body's and the loss's; the loss with the chunked "
            "kernel (the default; never more than one chunk of logits) and, for comparison, with every logit "
            "materialised (dense).",
            "",
            *sections,
        ]
    )
