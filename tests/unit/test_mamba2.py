"""Mamba-2 layers (mixer: mamba2, msllm.models.mamba2): the chunked SSD scan against the sequential
recurrence, the mixer's decoding forms, its init, bf16, FLOPs, the fused CUDA kernel against the
PyTorch scan (skipped without a GPU and mamba-ssm), and the config refusals. Causality and cached
decoding of whole models are in tests/unit/test_models.py and tests/unit/test_decoding.py with the others."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from msllm.config import MambaConfig, ModelConfig, ScaleConfig, from_dict, validate
from msllm.errors import RecipeError
from msllm.models import build_model, flops_per_token
from msllm.models.mamba2 import Mamba2State, recurrent_scan, ssd_scan, use_scan_kernel

# fp64: the chunked scan and the recurrence add the same terms in another order; 1e-12 is ~1e4
# times fp64's rounding at these magnitudes (outputs up to ~10) and far below any real difference.
SCAN_TOLERANCE = dict(rtol=0, atol=1e-12)


def scan_inputs(b=2, L=37, H=3, P=4, N=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, H, P, generator=g, dtype=torch.float64)
    dt = torch.rand(b, L, H, generator=g, dtype=torch.float64) * 0.5 + 0.01
    A = -(torch.rand(H, generator=g, dtype=torch.float64) * 3 + 0.1)
    B = torch.randn(b, L, N, generator=g, dtype=torch.float64)
    C = torch.randn(b, L, N, generator=g, dtype=torch.float64)
    return x, dt, A, B, C


@pytest.mark.parametrize("L,chunk", [(37, 8), (32, 8), (5, 8), (1, 4), (40, 1), (64, 64)])
@pytest.mark.parametrize("initial", [False, True])
def test_the_chunked_scan_is_the_sequential_recurrence(L, chunk, initial):
    """Lengths inside one chunk, across several, ending inside one and on a boundary, chunks of 1;
    from zeros or from a given state: the same outputs and the same final state."""
    x, dt, A, B, C = scan_inputs(L=L)
    state = (
        torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) if initial else None
    )
    y, final = ssd_scan(x, dt, A, B, C, chunk, state)
    y_ref, final_ref = recurrent_scan(x, dt, A, B, C, state)
    torch.testing.assert_close(y, y_ref, **SCAN_TOLERANCE)
    torch.testing.assert_close(final, final_ref, **SCAN_TOLERANCE)
    assert y.abs().max() > 0.1


def test_the_recurrence_is_the_definition_written_out():
    """One head by hand: S_t = exp(dt_t a) S_(t-1) + dt_t x_t B_t^T, y_t = S_t C_t."""
    x, dt, A, B, C = scan_inputs(b=1, L=6, H=1, P=2, N=3)
    y, _ = recurrent_scan(x, dt, A, B, C)
    S = torch.zeros(2, 3, dtype=torch.float64)
    for t in range(6):
        S = math.exp(dt[0, t, 0] * A[0]) * S + dt[0, t, 0] * torch.outer(x[0, t, 0], B[0, t])
        torch.testing.assert_close(y[0, t, 0], S @ C[0, t], rtol=0, atol=1e-14)


def mixer(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        arch="bottom_up",
        vocab_size=11,
        d_model=16,
        init_std=0.2,
        mamba=MambaConfig(d_state=6, head_dim=8, chunk_size=8, d_conv=4),
        scales=[ScaleConfig(1, 1, mixer="mamba2"), ScaleConfig(4, 1)],
    )
    model = build_model(cfg)
    return model.scales[0][0].mixer.to(dtype), cfg


def test_mixer_decoding_by_steps_and_pieces_gives_the_full_pass():
    m, _ = mixer()
    u = torch.randn(2, 29, 16, dtype=torch.float64)
    full = m(u)
    for pieces in ([1] * 29, [3, 1, 10, 2, 13], [29]):
        cache, out, at = Mamba2State(), [], 0
        for n in pieces:
            out.append(m(u[:, at : at + n], cache))
            at += n
        torch.testing.assert_close(torch.cat(out, dim=1), full, rtol=0, atol=1e-12)
        assert cache.position == 29 and cache.conv.shape == (2, m.channels, 3)


def test_mamba2_parameters_follow_mamba_ssm_init():
    m, _ = mixer()
    A = torch.exp(m.A_log)
    assert ((A >= 1) & (A <= 16)).all() and torch.equal(m.D, torch.ones_like(m.D))
    dt = torch.nn.functional.softplus(m.dt_bias)
    assert ((dt >= 1e-3 - 1e-9) & (dt <= 0.1 + 1e-9)).all()
    bound = 1 / math.sqrt(4)
    assert m.conv.weight.abs().max() <= bound and m.conv.bias.abs().max() <= bound and m.conv.weight.std() > bound / 4
    assert torch.equal(m.norm.weight, torch.ones_like(m.norm.weight))
    again, _ = mixer(seed=5)  # the seed of build_model is drawn from torch's; another seed, other values
    assert not torch.equal(again.A_log, m.A_log)


def test_the_mixer_in_bf16_follows_fp64():
    m, _ = mixer()
    u = torch.randn(2, 40, 16, dtype=torch.float64).bfloat16().double()
    want = m(u)
    got = m.to(torch.bfloat16)(u.bfloat16())
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=0.05, atol=0.05 * want.abs().max().item())


def test_flops_count_the_mamba2_layers():
    """FlopCounterMode counts the projections, the convolution and the scan's einsums: more layers,
    more FLOPs; the scan's share grows with the chunk size (its [Q, Q] products)."""
    base = dict(
        arch="bottom_up",
        vocab_size=260,
        d_model=64,
        n_heads=2,
        mamba=MambaConfig(d_state=16, head_dim=16, chunk_size=16),
    )
    one, two = (
        flops_per_token(ModelConfig(**base, scales=[ScaleConfig(1, n, mixer="mamba2"), ScaleConfig(4, 1)]), 256)
        for n in (1, 2)
    )
    per_layer = two - one
    projections = 3 * 2 * (64 * (2 * 128 + 2 * 16 + 8) + 128 * 64)  # w_in and wo, forward + backward
    assert projections < per_layer < 2 * projections
    longer = dict(base, mamba=MambaConfig(d_state=16, head_dim=16, chunk_size=64))
    assert (
        flops_per_token(ModelConfig(**longer, scales=[ScaleConfig(1, 1, mixer="mamba2"), ScaleConfig(4, 1)]), 256) > one
    )


@pytest.mark.needs_cuda("mamba-ssm's fused kernel")
def test_the_mamba_ssm_kernel_matches_the_pytorch_scan_on_cuda():
    pytest.importorskip("mamba_ssm")
    m, _ = mixer(dtype=torch.float32)
    m = m.cuda()
    u = torch.randn(2, 100, 16, device="cuda", requires_grad=True)
    outputs, grads = [], []
    for kernel in ("torch", "mamba_ssm"):
        use_scan_kernel(kernel)
        try:
            out = m(u)
            (g,) = torch.autograd.grad(out.square().sum(), u)
        finally:
            use_scan_kernel(None)
        outputs.append(out)
        grads.append(g)
    scale = outputs[0].abs().max()
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-3 * scale)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-3 * grads[0].abs().max())


def recipe(scales, arch="bottom_up", sp=1, **model):
    return from_dict(
        {"model": {"arch": arch, "scales": scales, **model}, "data": {"seq_len": 64}, "parallel": {"sp": sp}}
    )


@pytest.mark.parametrize(
    "scales,arch,sp,model,message",
    [
        ([{"mixer": "mamba2"}, {"factor": 4}], "bottom_up", 2, {}, "sequence parallelism"),
        ([{"mixer": "mamba2"}], "vanilla", 1, {}, "bottom_up and top_down"),
        ([{"mixer": "mamba2", "attention": "local"}], "retina", 1, {}, "bottom_up and top_down"),
        ([{"mixer": "mamba2"}, {"factor": 4}], "bottom_up", 1, {"mamba": {"head_dim": 48}}, "does not divide"),
        ([{"mixer": "mamba2"}, {"factor": 4}], "bottom_up", 1, {"mamba": {"chunk_size": 0}}, "at least 1"),
    ],
)
def test_bad_mamba2_settings_fail_with_one_line(scales, arch, sp, model, message):
    with pytest.raises(RecipeError, match=message) as info:
        validate(recipe(scales, arch, sp, **model))
    assert "\n" not in str(info.value)


def test_a_mamba2_recipe_shows_and_reloads_without_the_keys_it_does_not_read(tmp_path):
    from msllm.config import load_recipe

    r = recipe([{"mixer": "mamba2"}, {"factor": 4}])
    validate(r)
    shown = r.to_display_yaml()
    assert "mamba:" in shown and "window" not in shown.split("scales:")[1].split("final_layers")[0]
    path = tmp_path / "r.yaml"
    path.write_text(shown)
    assert load_recipe(path).model == r.model
    plain = recipe([{"attention": "local"}, {"factor": 4}])
    assert "mamba:" not in plain.to_display_yaml() and "mixer" not in plain.to_display_yaml()
    assert dataclasses.replace(plain.model.scales[0]).mixer == "attention"
