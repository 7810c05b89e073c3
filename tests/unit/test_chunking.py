"""Learned chunking (pool: dynamic, msllm.models.chunking): the routing, the chunks, the smoothing
upsampler and the ratio loss against their definitions, the loss plumbing, and the config refusals.
Causality is in tests/unit/test_models.py with every other architecture."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from msllm.config import ModelConfig, ScaleConfig, from_dict, validate
from msllm.errors import MsllmError, RecipeError
from msllm.models import build_model, flops_per_token
from msllm.models.chunking import DynamicChunking, ema
from msllm.train.loss import lm_loss, model_loss

VOCAB = 97


def dynamic_cfg(**overrides) -> ModelConfig:
    scales = [ScaleConfig(1, 1, "local", 8), ScaleConfig(1, 1, "full", pool="dynamic", target_ratio=3.0)]
    cfg = ModelConfig(arch="bottom_up", vocab_size=VOCAB, d_model=32, n_heads=2, scales=scales, final_layers=1)
    return dataclasses.replace(cfg, **overrides)


def test_routing_and_chunks_follow_their_definition():
    torch.manual_seed(0)
    chunking = DynamicChunking(8, target_ratio=3.0, ratio_loss_weight=0.03).double()
    torch.nn.init.normal_(chunking.wq.weight)
    h = torch.randn(2, 20, 8, dtype=torch.float64)
    coarse, chunks = chunking(h)
    q, k = chunking.wq(h), chunking.wk(h)
    for b in range(2):
        expected_p = [1.0] + [
            0.5 * (1 - torch.cosine_similarity(q[b, t], k[b, t - 1], dim=0).item()) for t in range(1, 20)
        ]
        torch.testing.assert_close(chunks.p[b], torch.tensor(expected_p, dtype=torch.float64))
        starts = [t for t in range(20) if expected_p[t] >= 0.5]
        assert chunks.boundaries[b].nonzero()[:, 0].tolist() == starts
        torch.testing.assert_close(coarse[b, : len(starts)], h[b, starts])  # the states at the boundaries, in order
        assert chunks.chunk_of[b].tolist() == [sum(1 for s in starts if s <= t) - 1 for t in range(20)]
    assert coarse.shape[1] == int(chunks.boundaries.sum(dim=1).max())  # padded to the most chunks of a row


def test_the_ema_dechunking_matches_its_recurrence_and_serves_each_chunk_from_its_boundary_on():
    torch.manual_seed(1)
    y = torch.randn(2, 7, 4, dtype=torch.float64)
    p = torch.rand(2, 7, dtype=torch.float64) * 0.9 + 0.05
    z, expected = ema(y, p), []
    previous = torch.zeros(2, 4, dtype=torch.float64)
    for j in range(7):
        previous = p[:, j : j + 1] * y[:, j] + (1 - p[:, j : j + 1]) * previous
        expected.append(previous)
    torch.testing.assert_close(z, torch.stack(expected, dim=1))

    chunking = DynamicChunking(4, 3.0, 0.03).double()
    h = torch.randn(2, 12, 4, dtype=torch.float64)
    coarse, chunks = chunking(h)
    fine = chunking.upsample(coarse, chunks)
    p_chunk = torch.gather(chunks.p, 1, chunks.selected).clamp(1e-4, 1 - 1e-4)
    z = ema(coarse, p_chunk)
    for b in range(2):
        for t in range(12):  # the straight-through confidence is 1 in value
            torch.testing.assert_close(fine[b, t], z[b, chunks.chunk_of[b, t]])


def test_fixed_boundaries_cut_where_fixed_pooling_cuts_and_the_router_still_learns():
    """boundaries: fixed (fixed_every 4): chunks end at 0, 4, 8, ... whatever p says, as fixed pooling
    by 4 cuts; p is still the router's, and the router gets a gradient through the EMA and the
    straight-through confidence. The ratio loss is constant (F = 1/N over 20 positions): no gradient."""
    torch.manual_seed(2)
    chunking = DynamicChunking(8, target_ratio=4.0, ratio_loss_weight=0.03, fixed_every=4).double()
    torch.nn.init.normal_(chunking.wq.weight)
    h = torch.randn(2, 20, 8, dtype=torch.float64)
    coarse, chunks = chunking(h)
    starts = [0, 4, 8, 12, 16]
    for b in range(2):
        assert chunks.boundaries[b].nonzero()[:, 0].tolist() == starts
        assert chunks.chunk_of[b].tolist() == [t // 4 for t in range(20)]
    torch.testing.assert_close(coarse, h[:, starts])
    torch.testing.assert_close(chunks.p, chunking.boundary_probabilities(h))
    (ratio_grad,) = torch.autograd.grad(chunking.ratio_loss, chunking.wq.weight, retain_graph=True)
    assert ratio_grad.abs().max() < 1e-12
    chunking.upsample(coarse * 2, chunks).square().sum().backward()
    assert chunking.wq.weight.grad.abs().max() > 1e-6


@pytest.mark.parametrize("precision", ["bf16", "autocast"])
def test_routing_and_dechunking_compute_in_fp32_under_bf16(precision):
    """Regression (issue 35): in bf16 the EMA clamp 1 - 1e-4 rounded to 1 (p_0 is always 1), log(1 - p)
    was -inf and the output NaN. Routing and dechunking now run in fp32 whatever the model's dtype:
    the same boundaries as fp64 from the same (bf16-representable) inputs, and the output in the
    input's dtype within bf16's rounding of fp64's (2^-8 relative, plus the matmuls' bf16 inputs)."""
    torch.manual_seed(4)
    chunking = DynamicChunking(16, 3.0, 0.03)
    torch.nn.init.normal_(chunking.wq.weight, std=0.3)
    chunking.wk.weight.data = chunking.wq.weight.data.clone() + 0.1 * torch.randn(16, 16)
    chunking = chunking.bfloat16().double()  # weights that bf16 holds exactly
    h = torch.randn(2, 40, 16).bfloat16().double()
    y = torch.randn(2, 40, 16).bfloat16().double()
    coarse64, chunks64 = chunking(h)
    expected = chunking.upsample(y[:, : coarse64.shape[1]], chunks64)
    model_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    chunking = chunking.to(model_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
        coarse, chunks = chunking(h.to(model_dtype))
        out = chunking.upsample(y[:, : coarse.shape[1]].to(model_dtype), chunks)
    assert chunks.p.dtype == torch.float32 and out.dtype == model_dtype
    assert torch.equal(chunks.boundaries, chunks64.boundaries)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=2**-7, atol=1e-2)


def test_the_ratio_loss_is_h_nets_and_is_lowest_at_the_target():
    chunking = DynamicChunking(4, target_ratio=4.0, ratio_loss_weight=0.5)
    chunking._ratio_loss(torch.full((1, 8), 0.25), torch.tensor([[1, 0, 0, 0, 1, 0, 0, 0]], dtype=torch.bool))
    assert chunking.stats["ratio_loss"].item() == pytest.approx(1.0)  # F = G = 1/N
    assert chunking.ratio_loss.item() == pytest.approx(0.5)
    assert chunking.stats["compression"].item() == pytest.approx(4.0)
    N, F, G = 4.0, 0.5, 0.6
    chunking._ratio_loss(torch.full((1, 4), G), torch.tensor([[1, 1, 0, 0]], dtype=torch.bool))
    assert chunking.stats["ratio_loss"].item() == pytest.approx(N / (N - 1) * ((N - 1) * F * G + (1 - F) * (1 - G)))


def test_the_ratio_loss_joins_the_training_loss_summed_over_positions_and_eval_leaves_it_out():
    torch.manual_seed(2)
    model = build_model(dynamic_cfg()).double()
    ids = torch.randint(0, VOCAB, (2, 30))
    labels = ids.roll(-1, dims=1)
    train = model_loss(model, ids, labels, "dense")
    lm = lm_loss(model.hidden_states(ids), model.lm_head.weight, labels, "dense")
    weighted = model.pools[-1].ratio_loss
    assert weighted.item() > 0
    torch.testing.assert_close(train, lm + weighted * ids.numel())
    torch.testing.assert_close(model_loss(model, ids, labels, "dense", auxiliary=False), lm)
    train.backward()
    assert model.pools[-1].wq.weight.grad.abs().sum() > 0  # the router learns (EMA, confidence, ratio loss)
    # vocabulary 97 is no byte tokenizer's: no word-start diagnostics
    assert set(model.log_metrics()) == {"compression_s1", "ratio_loss_s1", "p_std_s1", "p_near_threshold_s1"}


def test_flops_count_the_coarse_scale_at_the_target_ratio():
    """On the meta device there are no boundaries: the coarse scale counts ceil(n / target_ratio)."""
    low, high = (
        flops_per_token(
            dynamic_cfg(
                scales=[ScaleConfig(1, 1, "local", 8), ScaleConfig(1, 2, "full", pool="dynamic", target_ratio=r)]
            ),
            64,
        )
        for r in (8.0, 2.0)
    )
    assert high > low


def test_a_dynamic_model_has_no_cached_decoding_but_generates_by_recomputing():
    from msllm.use.generate import generate

    torch.manual_seed(3)
    model = build_model(dynamic_cfg()).eval()
    with pytest.raises(MsllmError, match="dynamic"):
        model.new_cache()
    prompt = [5, 6, 7]
    new = generate(model, [prompt], max_new_tokens=4, temperature=0)
    ids = list(prompt)
    for _ in range(4):  # greedy by hand over whole sequences
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert new[0] == ids[3:]


def recipe_with(scales: list[dict], arch: str = "bottom_up", sp: int = 1):
    return from_dict({"model": {"arch": arch, "scales": scales}, "data": {"seq_len": 64}, "parallel": {"sp": sp}})


@pytest.mark.parametrize(
    "scales,arch,sp,message",
    [
        ([{"attention": "local"}, {"pool": "dynamic"}], "top_down", 1, "bottom_up only"),
        ([{"attention": "local"}, {"pool": "dynamic"}, {"factor": 2}], "bottom_up", 1, "only the coarsest"),
        ([{"attention": "local"}, {"pool": "dynamic", "factor": 4}], "bottom_up", 1, "leave it at 1"),
        ([{"attention": "local"}, {"pool": "dynamic", "target_ratio": 1.0}], "bottom_up", 1, "above 1"),
        ([{"attention": "local"}, {"pool": "dynamic", "ratio_loss_weight": -1}], "bottom_up", 1, "negative"),
        ([{"attention": "local", "window": 8}, {"pool": "dynamic"}], "bottom_up", 2, "sequence parallelism"),
        (
            [{"attention": "local"}, {"pool": "dynamic", "boundaries": "fixed", "target_ratio": 3.5}],
            "bottom_up",
            1,
            "whole number",
        ),
        ([{"attention": "local"}, {"factor": 4, "boundaries": "fixed"}], "bottom_up", 1, "dynamic scales only"),
    ],
)
def test_bad_dynamic_settings_fail_with_one_line(scales, arch, sp, message):
    with pytest.raises(RecipeError, match=message) as info:
        validate(recipe_with(scales, arch, sp))
    assert "\n" not in str(info.value)


def test_a_good_dynamic_recipe_validates():
    validate(recipe_with([{"attention": "local"}, {"pool": "dynamic", "target_ratio": 4.0}]))
    assert math.isfinite(flops_per_token(dataclasses.replace(dynamic_cfg()), 64))


def test_the_router_diagnostics_on_a_crafted_input():
    """b"ab cd  ef": word starts (a byte after whitespace that is not whitespace) at 3 and 7, of the 8
    positions after the first: random boundaries would land on one 2/8 of the time. Boundaries at
    3, 5, 7 (and 0, which always is one and is not counted): 2 of 3 at word starts. p within 0.05 of
    0.5 at 5 and 6: 2 of 8."""
    import statistics

    from msllm.data.tokenizer import ByteTokenizer
    from msllm.models.chunking import byte_whitespace_ids

    ids = torch.tensor(ByteTokenizer().encode(["ab cd  ef"]))
    p = torch.tensor([[1.0, 0.1, 0.3, 0.9, 0.2, 0.54, 0.46, 0.8, 0.3]])
    chunking = DynamicChunking(4, 3.0, 0.03, byte_whitespace_ids(ByteTokenizer.vocab_size))
    chunking._diagnostics(p, p >= 0.5, ids)
    stats = {k: v.item() for k, v in chunking.stats.items()}
    assert stats["word_start_boundaries"] == pytest.approx(2 / 3)
    assert stats["word_start_rate"] == pytest.approx(2 / 8)
    assert stats["p_near_threshold"] == pytest.approx(2 / 8)
    assert stats["p_std"] == pytest.approx(statistics.stdev(p[0, 1:].tolist()), rel=1e-6)
    # no boundary after position 0: a fraction of 0, not a division by zero
    chunking._diagnostics(torch.tensor([[1.0] + [0.2] * 8]), torch.tensor([[True] + [False] * 8]), ids)
    assert chunking.stats["word_start_boundaries"].item() == 0.0 and chunking.stats["p_near_threshold"].item() == 0.0


def test_a_byte_model_logs_the_word_start_diagnostics_of_its_batch():
    from msllm.data.tokenizer import ByteTokenizer

    torch.manual_seed(5)
    model = build_model(dynamic_cfg(vocab_size=260))
    ids = torch.tensor(ByteTokenizer().encode(["the cat sat on the mat and then it ran off"]))
    model(ids)
    metrics = {k: v.item() for k, v in model.log_metrics().items()}
    assert set(metrics) == {
        f"{k}_s1"
        for k in ("compression", "ratio_loss", "p_std", "p_near_threshold", "word_start_boundaries", "word_start_rate")
    }
    assert metrics["word_start_rate_s1"] == pytest.approx(10 / (ids.shape[1] - 1))  # 10 words after the first
    boundaries = model.pools[-1].last_chunks.boundaries[0, 1:]
    starts = {t for t in range(1, ids.shape[1]) if ids[0, t - 1] == 4 + 32 and ids[0, t] != 4 + 32}
    expected = sum(1 for t in starts if boundaries[t - 1]) / max(int(boundaries.sum()), 1)
    assert metrics["word_start_boundaries_s1"] == pytest.approx(expected)
    assert 0 <= metrics["p_near_threshold_s1"] <= 1 and metrics["p_std_s1"] > 0


def test_tensorboard_logs_every_chunking_metric():
    from msllm.models.bottom_up import METRICS
    from msllm.train.callbacks import CHUNKING_METRICS

    assert CHUNKING_METRICS == tuple(f"{key}_s" for key in METRICS)
