"""The memory of a training step (msllm.train.memory): the computed split against a measurement."""

import dataclasses

import pytest
import torch

from fixtures.models import ARCHS, tiny_config
from msllm.models import build_model
from msllm.train.memory import (
    BYTES_PER_PARAMETER,
    largest_module_parameters,
    measure_step_peak,
    startup_peak_bytes,
    step_memory,
)

VOCAB = 512
SIZE = dict(d_model=64, n_heads=4, vocab_size=VOCAB)  # the tiny models of fixtures.models, at this size


@pytest.mark.parametrize("kernel", ["chunked", "dense"])
@pytest.mark.parametrize("arch", ARCHS)
def test_the_computed_split_matches_the_measured_peak_of_real_steps(arch, kernel):
    cfg, batch, L = tiny_config(arch, **SIZE), 2, 256
    torch.manual_seed(0)
    computed = step_memory(build_model(cfg), VOCAB, batch, L, loss_kernel=kernel)
    measured = measure_step_peak(cfg, batch, L, loss_kernel=kernel)
    # The total is an upper bound (gradients grow while activations are freed), and close to the
    # peak: a split that left out the loss or the optimizer state would miss by far more than 10%.
    assert 0.90 * computed.total <= measured <= 1.01 * computed.total, (computed.format(), measured)
    n = sum(p.numel() for p in build_model(cfg).parameters())
    assert (computed.parameters, computed.gradients, computed.optimizer) == (4 * n, 4 * n, 8 * n)
    assert computed.activations == computed.body_activations + computed.loss_activations


def test_the_loss_is_counted_in_the_activations_and_chunking_removes_its_vocabulary_term():
    cfg, L, d = tiny_config("vanilla", **SIZE), 128, SIZE["d_model"]
    small, large = (dataclasses.replace(cfg, vocab_size=v) for v in (256, 4096))
    memory = {
        (v, k): step_memory(build_model(c), v, 1, L, loss_kernel=k)
        for v, c in ((256, small), (4096, large))
        for k in ("dense", "chunked")
    }
    # The body does not depend on the vocabulary or on how the loss is computed.
    assert len({m.body_activations for m in memory.values()}) == 1
    # dense: the saved log-probabilities and the two gradients of the loss, 3 fp32 L x vocab buffers.
    dense_growth = memory[4096, "dense"].loss_activations - memory[256, "dense"].loss_activations
    assert dense_growth >= 3 * L * (4096 - 256) * 4
    # chunked: the weight's gradient (vocab x d) and one chunk of logits (here all L rows), once.
    chunked_growth = memory[4096, "chunked"].loss_activations - memory[256, "chunked"].loss_activations
    assert chunked_growth <= (4096 - 256) * (d + L) * 4 * 1.01
    # and what the chunked loss holds grows with the micro-batch by the hidden states' gradient alone
    one, eight = (step_memory(build_model(large), 4096, b, L, loss_chunk_size=64).loss_activations for b in (1, 8))
    assert eight - one == 7 * L * d * 4


def test_zero_stages_shard_states_over_data_parallel_ranks():
    model = build_model(tiny_config("vanilla", **SIZE))
    n = sum(p.numel() for p in model.parameters())
    w, g, o = BYTES_PER_PARAMETER["bf16"]
    expected = {
        0: (w * n, g * n, o * n),
        1: (w * n, g * n, o * n // 4),
        2: (w * n, g * n // 4, o * n // 4),
        3: (w * n // 4, g * n // 4, o * n // 4),
    }
    for stage, (params, grads, optim) in expected.items():
        m = step_memory(build_model(tiny_config("vanilla", **SIZE)), VOCAB, 1, 64, "bf16", zero_stage=stage, dp=4)
        assert (m.parameters, m.gradients, m.optimizer) == (params, grads, optim), stage
        assert m.total == params + grads + optim + m.activations


def test_the_startup_peak_estimate_follows_its_formula_per_zero_stage():
    """msllm.train.memory.startup_peak_bytes on a tiny vanilla model (vocabulary 512 x d_model 64:
    the embedding and the head are its largest modules), against the formula of its docstring."""
    model = build_model(tiny_config("vanilla", **SIZE))
    n = sum(p.numel() for p in model.parameters())
    module = largest_module_parameters(model)
    assert module == VOCAB * SIZE["d_model"]  # the embedding (or the head), one module's own parameters
    # ZeRO 0, fp32, one rank (the whole model): the weights and one parameter's init value
    whole = startup_peak_bytes(n, module, "fp32", 0, 1)
    assert (whole.held, whole.total, whole.phase) == (4 * n, 4 * n + 4 * module, "construction")
    # ZeRO 3, fp32, 4 ranks: the weights' partition, DeepSpeed's fp32 master copy of it and the
    # fp32 gradient partitions, all kept; or construction, if the embedding built whole (zero.Init)
    # and its init value weigh more
    z3 = startup_peak_bytes(n, module, "fp32", 3, 4)
    construction = 4 * n // 4 + 2 * 4 * module
    assert z3.held == 3 * (4 * n // 4)
    assert z3.total == max(z3.held, construction)
    assert z3.phase == ("construction" if construction >= z3.held else "deepspeed.initialize")
    # with a vocabulary 16 times larger, construction does peak
    wide = startup_peak_bytes(n, 16 * module, "fp32", 3, 4)
    assert (wide.total, wide.phase) == (4 * n // 4 + 2 * 4 * 16 * module, "construction")
    # ... and where no module is large (a 304M model's largest is 1% of it), the three partitions
    big = startup_peak_bytes(304_000_000, 2_818_048, "fp32", 3, 4)
    assert (big.total, big.phase) == (3 * 304_000_000, "deepspeed.initialize")
    assert 0.74 < big.total / startup_peak_bytes(304_000_000, 2_818_048, "fp32", 0, 1).total < 0.76  # 3/dp
    # ZeRO 3, bf16, 4 ranks: 16-bit partitions, the fp32 master partition, fp32 gradient partitions
    z3_bf16 = startup_peak_bytes(n, module, "bf16", 3, 4)
    assert z3_bf16.held == 2 * n // 4 + 4 * n // 4 + 4 * n // 4
    # ZeRO 2, fp32, 2 ranks: the whole weights flattened (two copies for a moment)
    z2 = startup_peak_bytes(n, module, "fp32", 2, 2)
    assert (z2.held, z2.total) == (4 * n + 4 * n // 2, 8 * n)
    # ZeRO 0, bf16: built in fp32, then 16-bit weights and DeepSpeed's fp32 master copy
    assert startup_peak_bytes(n, module, "bf16", 0, 1).held == 2 * n + 4 * n
    for peak in (whole, z3, z3_bf16, z2):
        assert peak.total == peak.held + peak.transient and peak.transient >= 0


def test_inspect_prints_the_startup_peak_per_rank_for_the_recipes_zero_stage_and_dp(capsys):
    from msllm.config import load_recipe
    from msllm.inspect import inspect_recipe

    recipe = load_recipe("recipes/models/vanilla-tiny.yaml", ["parallel.zero_stage=3"])
    report = inspect_recipe(recipe, measure=False, vocab_size=VOCAB, world_size=4)
    model = build_model(dataclasses.replace(recipe.model, vocab_size=VOCAB))
    expected = startup_peak_bytes(report["parameters"], largest_module_parameters(model), "fp32", 3, 4)
    assert report["startup_peak"] == expected
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("start-up peak per rank"))
    assert f"{expected.total / 2**20:,.1f} MiB  (ZeRO 3, dp 4, fp32:" in line and expected.phase in line
