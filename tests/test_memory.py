"""The memory of a training step (msllm.train.memory): the computed split against a measurement."""

import dataclasses

import pytest
import torch

from msllm.train.memory import BYTES_PER_PARAMETER, measure_step_peak, step_memory
from msllm.models import build_model
from model_helpers import tiny_config

VOCAB = 512
SIZE = dict(d_model=64, n_heads=4, vocab_size=VOCAB)  # the tiny models of model_helpers, at this size


@pytest.mark.parametrize("kernel", ["chunked", "dense"])
@pytest.mark.parametrize("arch", ["vanilla", "bottom_up", "top_down", "retina"])
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
    memory = {(v, k): step_memory(build_model(c), v, 1, L, loss_kernel=k)
              for v, c in ((256, small), (4096, large)) for k in ("dense", "chunked")}
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
    expected = {0: (w * n, g * n, o * n), 1: (w * n, g * n, o * n // 4), 2: (w * n, g * n // 4, o * n // 4),
                3: (w * n // 4, g * n // 4, o * n // 4)}
    for stage, (params, grads, optim) in expected.items():
        m = step_memory(build_model(tiny_config("vanilla", **SIZE)), VOCAB, 1, 64, "bf16", zero_stage=stage, dp=4)
        assert (m.parameters, m.gradients, m.optimizer) == (params, grads, optim), stage
        assert m.total == params + grads + optim + m.activations
