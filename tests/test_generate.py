"""Sampling: top-k / top-p / temperature, and generation for all four architectures."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from msllm.config import DataConfig, ModelConfig, Recipe, ScaleConfig

ARCHS = {
    "vanilla": dict(scales=[ScaleConfig(layers=1, attention="full")]),
    "bottom_up": dict(scales=[ScaleConfig(layers=1, attention="local", window=8), ScaleConfig(factor=2, layers=1)]),
    "top_down": dict(scales=[ScaleConfig(layers=1, attention="local", window=8), ScaleConfig(factor=2, layers=1)]),
    "retina": dict(scales=[ScaleConfig(layers=1, attention="local", window=8)], retina_levels=2, retina_factor=2),
}


def test_sampling_filters():
    from msllm.use.generate import sample_next

    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 1.0])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, 0.0, 0, 1.0, g) == 1  # greedy
    assert {sample_next(logits, 1.0, 1, 1.0, g) for _ in range(20)} == {1}  # top-k 1
    assert {sample_next(logits, 1.0, 2, 1.0, g) for _ in range(50)} == {1, 2}
    # top-p 0.5: token 1 alone holds less than half the mass, tokens 1 and 2 more than half.
    assert {sample_next(logits, 1.0, 0, 0.5, g) for _ in range(50)} == {1, 2}
    assert {sample_next(logits, 1.0, 0, 1e-6, g) for _ in range(20)} == {1}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_generate_every_architecture(tmp_path, tiny_data, arch, capsys):
    """A randomly initialised model of each architecture, written as an export, generates text."""
    from safetensors.torch import save_file

    from msllm.models import build_model
    from msllm.use.generate import generate_cli

    _, shards = tiny_data
    cfg = ModelConfig(arch=arch, vocab_size=320, d_model=32, n_heads=2, final_layers=1, **ARCHS[arch])
    torch.manual_seed(0)
    model = build_model(cfg)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(asdict(cfg)))
    (tmp_path / "recipe.yaml").write_text(Recipe(model=cfg, data=DataConfig(seq_len=16)).to_yaml())
    (tmp_path / "export.json").write_text(json.dumps({"seq_len": 16}))
    (tmp_path / "tokenizer.model").write_bytes((shards / "tokenizer.model").read_bytes())
    args = dict(source=str(tmp_path), prompt="The cat", max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.95, seed=1)
    text = generate_cli(**args)
    assert text.startswith("The cat") and len(text) > len("The cat")
    assert generate_cli(**args) == text  # same seed, same text
    capsys.readouterr()
