"""msllm: pretraining multi-scale transformer language models with long context."""

__version__ = "0.1.0"
