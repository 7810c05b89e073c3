"""Cached decoding (msllm.models.decoding): for every architecture, `decode` through a cache gives
the logits of a full forward pass at every step, whether the prompt comes whole, in chunks or token
by token, and greedy decoding picks the same tokens as the uncached loop; local layers keep only
their window, retina only what its pattern still shows."""

from __future__ import annotations

import pytest
import torch

from fixtures.models import tiny_fields
from msllm.config import MambaConfig, ModelConfig, ScaleConfig
from msllm.models import build_model
from msllm.models.attention import FullCausalAttention, LocalCausalAttention
from msllm.models.registry import ARCHS
from msllm.models.retina import RetinaAttention, RetinaPattern

VOCAB = 61
LENGTH = 44  # crosses every block boundary of the configurations below (coarsest cumulative factor 8) 5 times

local = lambda layers, window: ScaleConfig(layers=layers, attention="local", window=window)  # noqa: E731
full = lambda factor, layers: ScaleConfig(factor=factor, layers=layers, attention="full")  # noqa: E731
MAMBA = MambaConfig(d_state=8, head_dim=16, chunk_size=8)

CONFIGS = {
    "vanilla-full": dict(arch="vanilla", scales=[full(1, 2)]),
    "vanilla-local": dict(arch="vanilla", scales=[local(2, 5)]),
    # bottom-up: two scales by 4 (window 3 < block 4); three scales by 2 then 4 (f = 2, 8; window 11 > 8),
    # linear pooling and upsampling, attention aggregation; a local coarse scale
    "bottom_up-2": dict(arch="bottom_up", scales=[local(1, 3), full(4, 1)], final_layers=1),
    "bottom_up-3": dict(
        arch="bottom_up",
        scales=[local(1, 11), full(2, 1), full(4, 1)],
        final_layers=2,
        pooling="linear",
        upsampling="linear",
        aggregation="attention",
    ),
    "bottom_up-local-coarse": dict(
        arch="bottom_up",
        scales=[local(1, 2), full(2, 1), ScaleConfig(factor=2, layers=1, attention="local", window=3)],
        final_layers=1,
    ),
    # Mamba-2 layers (a recurrent state and a convolution stream per layer; chunks of 8 in the
    # full pass, so that prefills cross chunk boundaries), with H-Net's stage norms and residual
    # projection (given random weights by make: it starts at zero)
    "bottom_up-mamba2": dict(
        arch="bottom_up",
        scales=[ScaleConfig(layers=1, mixer="mamba2"), full(4, 1)],
        final_layers=1,
        mamba=MAMBA,
        residual_proj=True,
        stage_norms=True,
    ),
    "bottom_up-mamba2-3": dict(
        arch="bottom_up",
        scales=[ScaleConfig(layers=1, mixer="mamba2"), full(2, 1), ScaleConfig(factor=2, layers=1, mixer="mamba2")],
        final_layers=1,
        mamba=MAMBA,
        residual_proj=True,
        aggregation="attention",
    ),
    "top_down-mamba2": dict(arch="top_down", scales=[ScaleConfig(layers=2, mixer="mamba2"), full(2, 1)], mamba=MAMBA),
    # top-down: two scales by 2 (window 3); three scales by 4 then 2 (f = 4, 8; window 9), linear
    "top_down-2": dict(arch="top_down", scales=[local(1, 3), full(2, 1)]),
    "top_down-3": dict(
        arch="top_down", scales=[local(2, 9), full(4, 1), full(2, 1)], pooling="linear", upsampling="linear"
    ),
    # retina: 3 levels by 2 (window 3 < k^2 = 4), 3 levels by 4 (window 5), 2 levels by 3, 1 level
    "retina-3x2": dict(arch="retina", scales=[local(2, 3)], retina_levels=3, retina_factor=2),
    "retina-3x4": dict(arch="retina", scales=[local(1, 5)], retina_levels=3, retina_factor=4),
    "retina-2x3": dict(arch="retina", scales=[local(1, 2)], retina_levels=2, retina_factor=3),
    "retina-1": dict(arch="retina", scales=[local(1, 4)], retina_levels=1, retina_factor=2),
}
# Every registered architecture (msllm.models.registry) is covered: one not named above with its spec's tiny model.
CONFIGS.update(
    {f"{arch}-tiny": tiny_fields(arch) for arch in ARCHS if arch not in {c["arch"] for c in CONFIGS.values()}}
)

# How the tokens reach decode: token by token; a prompt of 13 then steps; chunks of several sizes
# (smaller and larger than windows and blocks, boundaries inside blocks); the whole sequence at once.
SPLITS = {
    "steps": [1] * LENGTH,
    "prefill+steps": [13] + [1] * (LENGTH - 13),
    "chunks": [5, 11, 1, 9, 3, 15],
    "whole": [LENGTH],
}


def make(name: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_heads=2, init_std=0.2, **CONFIGS[name])
    model = build_model(cfg).eval()
    if getattr(model, "residual_proj", None) is not None:  # zero-initialised: make it count
        with torch.no_grad():
            model.residual_proj.weight.normal_(0.0, 0.2)
            model.residual_proj.bias.normal_(0.0, 0.2)
    return model


def decode_in(model, ids: torch.Tensor, split: list[int]):
    """Logits of every position, decoded through one cache in pieces of the sizes in `split`."""
    assert sum(split) == ids.shape[1]
    cache, out, at = model.new_cache(), [], 0
    for n in split:
        out.append(model.decode(ids[:, at : at + n], cache))
        at += n
    assert cache.position == ids.shape[1]
    return torch.cat(out, dim=1), cache


@pytest.fixture(scope="module")
def references():
    """Per configuration: the model, two rows of tokens, and the logits of a full forward pass over
    them (position t's are those of the forward pass over tokens 0 .. t: every model is causal,
    tests/unit/test_models.py checks it, and test_greedy_tokens_are_those_of_the_uncached_loop runs
    the forward pass over each prefix)."""
    out = {}
    for name in CONFIGS:
        model = make(name)
        ids = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            out[name] = model, ids, model(ids)
    return out


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_logits_match_a_full_forward_pass_at_every_step(references, name, split):
    model, ids, expected = references[name]
    logits, _ = decode_in(model, ids, SPLITS[split])
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert logits.abs().max() > 1  # a model whose logits differ from token to token (init_std 0.2)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_tokens_are_those_of_the_uncached_loop(name):
    from msllm.bench.generate import uncached_generate

    model = make(name, seed=2)
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    expected = uncached_generate(model, prompt[0].tolist(), 20)  # positions 6 .. 25: block ends at 7, 15, 23
    cache = model.new_cache()
    logits = model.decode(prompt, cache, last_only=True)
    assert logits.shape == (1, 1, VOCAB)
    tokens = []
    for _ in range(20):
        tokens.append(int(logits[0, -1].argmax()))
        logits = model.decode(torch.tensor([[tokens[-1]]]), cache)
    assert tokens == expected
    assert len(set(tokens)) > 3  # not one token repeated


def layer_caches(model, cache):
    """(attention core, its LayerCache) of every block of the model."""
    pairs = []
    for blocks_name, caches_name in (("layers", "layers"), ("scales", "scales"), ("final", "final")):
        blocks, caches = getattr(model, blocks_name, None), getattr(cache, caches_name, None)
        if blocks is None or caches is None:
            continue
        if blocks_name == "scales":
            blocks = [b for scale in blocks for b in scale]
            caches = [c for scale in caches for c in scale]
        pairs += [(block.attn.core, c) for block, c in zip(blocks, caches)]
    return pairs


@pytest.mark.parametrize(
    "name", ["vanilla-local", "bottom_up-3", "bottom_up-local-coarse", "top_down-3", "retina-3x2", "retina-3x4"]
)
def test_local_and_retina_layers_keep_a_bounded_window(name):
    """After a long prompt and at every step after it: local layers keep window - 1 positions (and
    storage for a few dozen), retina's fine level w - 1 to w + k - 2 positions and each pooled level
    the blocks its pattern still shows; full attention keeps every position of its scale. What they
    forget no later position needed: the last logits are still the full forward pass's."""
    model = make(name)
    ids = torch.randint(0, VOCAB, (1, 340), generator=torch.Generator().manual_seed(4))
    cache = model.new_cache()
    model.decode(ids[:, :300], cache)
    pairs = layer_caches(model, cache)
    assert len(pairs) == sum(
        1 for m in model.modules() if isinstance(m, (FullCausalAttention, LocalCausalAttention, RetinaAttention))
    )
    row_bytes = 2 * 2 * 16 * 4  # keys and values of one position: 2 heads of 16, fp32
    for step in range(300, 340):
        logits = model.decode(ids[:, step : step + 1], cache)
        for core, layer in pairs:
            kept = [s.length for s in layer.segments]
            if isinstance(core, RetinaAttention):
                w, k, P = core.pattern.window, core.pattern.factor, layer.position
                assert w - 1 <= kept[0] <= w + k - 2
                for level, (lo, _) in enumerate(core.pattern.ranges(P)[1:], start=1):
                    assert layer.segments[level].first == lo and layer.segments[level].end == P // k**level
                    assert kept[level] <= w + k + w / (k - 1) + 2  # bounded, independent of P
            elif isinstance(core, LocalCausalAttention):
                assert kept == [core.window - 1]
            else:
                assert kept == [layer.position] and layer.position > 300 // 8
                continue
            # the storage, allocated for the 300-token prompt, shrank to the window
            assert all(s.nbytes <= row_bytes * (4 * (n + 1) + 64 + 16) for s, n in zip(layer.segments, kept))
    with torch.no_grad():
        torch.testing.assert_close(logits[:, -1], model(ids)[:, -1], atol=1e-5, rtol=0)


def test_retina_pooled_levels_hold_the_means_the_full_pass_uses():
    """The blocks a retina layer's cache holds are the means pool_levels computes over the whole
    sequence (after RoPE), at the indices they are kept under."""
    from msllm.models.retina import pool_levels

    torch.manual_seed(0)
    core = RetinaAttention(window=3, factor=2, levels=3)
    k, v = torch.randn(2, 1, 2, 37, 4)
    cache = core.new_cache()
    for at, n in ((0, 10), (10, 1), (11, 7), (18, 19)):
        core.decode(torch.randn(1, 2, n, 4), k[:, :, at : at + n], v[:, :, at : at + n], cache)
    for level, (pk, pv) in enumerate(pool_levels(k, v, 2, 3), start=1):
        keys, values, first = cache.segments[level].segment()
        torch.testing.assert_close(keys, pk[:, :, first : first + keys.shape[2]], rtol=0, atol=1e-6)
        torch.testing.assert_close(values, pv[:, :, first : first + keys.shape[2]], rtol=0, atol=1e-6)
        assert first + keys.shape[2] == pk.shape[2]  # every complete block, and no incomplete one
    assert RetinaPattern(3, 2, 3).ranges(37)[2][0] == cache.segments[2].first


def test_decode_rejects_an_empty_step_and_another_batch_size():
    model = make("bottom_up-2")
    cache = model.new_cache()
    model.decode(torch.zeros(2, 3, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="at least one new token"):
        model.decode(torch.zeros(2, 0, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="a batch of 2, got 3 rows"):
        model.decode(torch.zeros(3, 1, dtype=torch.long), cache)
