"""Sampling: top-k / top-p / temperature per row of a batch; generation with cached decoding for all
four architectures: a batch of prompts of different lengths gives each row what it gives alone and
what the uncached loop gives, each row stops at its own EOS, and the CLI samples reproducibly."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from fixtures.models import ARCHS, tiny_config, tiny_model
from msllm.config import DataConfig, Recipe


def test_sampling_filters():
    from msllm.use.generate import sample_next

    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]])
    g = torch.Generator().manual_seed(0)

    def draws(n, *filters):
        return {int(sample_next(logits, *filters, g)[0]) for _ in range(n)}

    assert draws(1, 0.0, 0, 1.0) == {1}  # greedy
    assert draws(20, 1.0, 1, 1.0) == {1}  # top-k 1
    assert draws(50, 1.0, 2, 1.0) == {1, 2}
    # top-p 0.5: token 1 alone holds less than half the mass, tokens 1 and 2 more than half.
    assert draws(50, 1.0, 0, 0.5) == {1, 2}
    assert draws(20, 1.0, 0, 1e-6) == {1}
    assert draws(200, 1.0, 0, 1.0) == {0, 1, 2, 3, 4}


def test_sampling_filters_each_row_of_a_batch_on_its_own():
    from msllm.use.generate import sample_next

    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0], [3.0, -2.0, 0.0, 2.9, 0.0]])  # row 1: 0.497 on token 0
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, 0.0, 0, 1.0, g).tolist() == [1, 0]
    assert sample_next(logits, 1.0, 1, 1.0, g).tolist() == [1, 0]
    pairs = {tuple(sample_next(logits, 1.0, 2, 1.0, g).tolist()) for _ in range(100)}
    assert {a for a, _ in pairs} == {1, 2} and {b for _, b in pairs} == {0, 3}
    pairs = {tuple(sample_next(logits, 1.0, 0, 0.5, g).tolist()) for _ in range(100)}
    assert {a for a, _ in pairs} == {1, 2} and {b for _, b in pairs} == {0, 3}


@pytest.mark.parametrize("arch", ARCHS)
def test_a_batch_of_prompts_of_different_lengths_decodes_each_row_as_alone(arch):
    """Greedy: each row's tokens are the uncached loop's (a forward pass over the whole sequence per
    token) and those of the row decoded alone; max_new_tokens counts each row's own new tokens."""
    from msllm.bench.generate import uncached_generate
    from msllm.use.generate import generate

    model = tiny_model(arch, vocab_size=320, init_std=0.2).eval()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (3, 11, 6)]
    batch = generate(model, prompts, 14, temperature=0.0)
    assert batch == [uncached_generate(model, p, 14) for p in prompts]
    assert batch == [generate(model, [p], 14, temperature=0.0)[0] for p in prompts]
    assert all(len(row) == 14 for row in batch) and len({tuple(row) for row in batch}) == 3
    assert generate(model, prompts, 0) == [[], [], []]


def test_each_row_stops_at_its_own_stop_token():
    from msllm.use.generate import generate

    model = tiny_model("bottom_up", vocab_size=320, init_std=0.2).eval()
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11]]
    free = generate(model, prompts, 12, temperature=0.0)
    # The stop token: the first new token of row 0 from its fifth on that it had not sampled before.
    first_seen = [i for i in range(4, len(free[0])) if free[0][i] not in free[0][:i]]
    assert first_seen, f"row 0 samples no new token after its fourth: {free[0]}"
    k = first_seen[0]
    stop = free[0][k]
    stopped = generate(model, prompts, 12, temperature=0.0, stop_id=stop)
    for row, tokens in zip(free, stopped):
        expected = row[: row.index(stop)] if stop in row else row
        assert tokens == expected
    assert stopped[0] == free[0][:k]


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_every_architecture(tmp_path, tiny_data, arch, capsys):
    """A randomly initialised model of each architecture, written as an export, generates text."""
    from safetensors.torch import save_file

    from msllm.use.generate import generate_cli

    _, shards = tiny_data
    cfg = tiny_config(arch, vocab_size=320)
    model = tiny_model(arch, vocab_size=320)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(asdict(cfg)))
    (tmp_path / "recipe.yaml").write_text(Recipe(model=cfg, data=DataConfig(seq_len=16)).to_yaml())
    (tmp_path / "export.json").write_text(json.dumps({"seq_len": 16}))
    (tmp_path / "tokenizer.model").write_bytes((shards / "tokenizer.model").read_bytes())
    args = dict(
        source=str(tmp_path), prompts=["The cat"], max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.95, seed=1
    )
    [text] = generate_cli(**args)
    assert text.startswith("The cat") and len(text) > len("The cat")
    assert generate_cli(**args) == [text]  # same seed, same text
    out, err = capsys.readouterr()
    assert out == f"{text}\n{text}\n"
    # 1 EOS + 2 or more prompt tokens + 20 new ones: past the export's seq_len of 16, said once per call
    assert err.count("beyond the 16 the model was trained on") == 2
    # Greedy, a batch of two prompts gives each what it gives alone, printed blank-line separated.
    greedy = dict(args, temperature=0.0, prompts=["The cat", "A dog sat on"])
    texts = generate_cli(**greedy)
    alone = [generate_cli(**dict(greedy, prompts=[p]))[0] for p in greedy["prompts"]]
    assert texts == alone and texts[1].startswith("A dog sat on")
    assert capsys.readouterr().out.startswith(f"{texts[0]}\n\n{texts[1]}\n")
