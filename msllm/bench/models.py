"""`msllm bench models`: parameters, FLOPs per token and training-step memory of the
paper-comparison recipes (recipes/models/*-bookcorpus.yaml: vanilla-14 against the 30-layer
multi-scale models), through msllm.inspect."""

from __future__ import annotations


def bench_models(args) -> str:
    """The comparison table of every recipes/models/*-bookcorpus.yaml."""
    import glob

    from msllm.inspect import compare_recipes

    return compare_recipes(sorted(glob.glob("recipes/models/*-bookcorpus.yaml")))
