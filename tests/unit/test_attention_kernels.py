"""Attention kernels: each pattern (sliding window, retina) is one definition, and every kernel
computes it. On the CPU: the blocked SDPA kernel against the dense reference (forward and
gradients, with and without a halo from a previous rank); FlexAttention's mask_mod and block
tables against the dense mask, over every (query, key) pair; FlexAttention's compiled forward
against the dense reference (the CPU has no FlexAttention backward). Retina's definition itself:
every earlier position within reach seen exactly once, at one resolution."""

from __future__ import annotations

import pytest
import torch

from msllm.config import ModelConfig, ScaleConfig
from msllm.models import build_model
from msllm.models.attention import (
    FLEX_BLOCK,
    SlidingWindow,
    dense_mask,
    flex_block_mask,
    flex_mask_mod,
    flex_offsets,
    kernel_for,
    local_attention,
)
from msllm.models.retina import RetinaPattern, pool_levels, retina_attention

PATTERNS = {
    "window-8": SlidingWindow(8),
    "window-1": SlidingWindow(1),
    "window-7": SlidingWindow(7),
    "retina-w4-k2-3": RetinaPattern(4, 2, 3),
    "retina-w3-k4-3": RetinaPattern(3, 4, 3),
    "retina-w5-k2-4": RetinaPattern(5, 2, 4),
    "retina-w6-k4-2": RetinaPattern(6, 4, 2),
    "retina-w3-k2-1": RetinaPattern(3, 2, 1),
}


def run(pattern, q, k, v, kernel, past=None, first_position=0):
    if isinstance(pattern, SlidingWindow):
        return local_attention(q, k, v, pattern.window, past, first_position, kernel=kernel)
    return retina_attention(q, k, v, pattern, None, past, first_position, kernel=kernel)


def test_the_kernel_is_chosen_by_device_type():
    assert kernel_for(torch.device("cuda", 0)) == "flex"
    assert kernel_for(torch.device("cpu")) == "blocks"


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("L", [1, 5, 37, 70])
def test_blocked_sdpa_matches_the_dense_reference_forward_and_backward(name, L):
    pattern = PATTERNS[name]
    torch.manual_seed(L)
    inputs = [torch.randn(2, 3, L, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    grad_out = torch.randn(2, 3, L, 4, dtype=torch.float64)
    results = {}
    for kernel in ("dense", "blocks"):
        out = run(pattern, *inputs, kernel)
        grads = torch.autograd.grad((out * grad_out).sum(), inputs)
        results[kernel] = (out, *grads)
    for got, expected, what in zip(results["blocks"], results["dense"], ("output", "dq", "dk", "dv")):
        torch.testing.assert_close(got, expected, msg=f"{name} L={L}: {what}")


@pytest.mark.parametrize("name", ["window-7", "retina-w4-k2-3", "retina-w3-k4-3", "retina-w5-k2-4"])
@pytest.mark.parametrize("rank", [0, 1, 2])
def test_a_slice_with_its_halo_computes_its_part_of_the_whole_sequence(name, rank):
    """What sequence parallelism does, without processes: the slice of `rank` (positions from
    rank * L_slice), given the previous slice's last `pattern.block` keys and the whole sequence's
    pooled keys, gives that part of the unsplit output, with every kernel the CPU can train."""
    pattern = PATTERNS[name]
    L_slice = 32
    torch.manual_seed(rank)
    q, k, v = (torch.randn(1, 2, 3 * L_slice, 4, dtype=torch.float64) for _ in range(3))
    whole = run(pattern, q, k, v, "dense")
    start = rank * L_slice
    part = slice(start, start + L_slice)
    halo = slice(start - pattern.block, start) if rank else slice(0, pattern.block)
    past = (k[:, :, halo], v[:, :, halo]) if rank else (torch.zeros_like(k[:, :, halo]),) * 2
    for kernel in ("dense", "blocks"):
        if isinstance(pattern, SlidingWindow):
            out = local_attention(q[:, :, part], k[:, :, part], v[:, :, part], pattern.window, past, start, kernel)
        else:
            pooled = pool_levels(k, v, pattern.factor, pattern.levels)
            out = retina_attention(q[:, :, part], k[:, :, part], v[:, :, part], pattern, pooled, past, start, kernel)
        torch.testing.assert_close(out, whole[:, :, part], msg=f"{name} rank {rank} {kernel}")


def flex_layout(pattern, L, past=0, first_position=0):
    """The key segments' (length, first index) of `pattern` for L queries (pooled levels whole)."""
    layout = [(L + past, first_position - past)]
    if isinstance(pattern, RetinaPattern):
        layout += [((first_position + L) // pattern.factor**level, 0) for level in range(1, pattern.levels)]
    return tuple(layout)


def dense_mask_laid_out_for_flex(pattern, first_position, L, layout):
    """The dense reference mask, its columns moved to where FlexAttention's layout puts each key."""
    offsets = flex_offsets(layout)
    n_q = -(-L // FLEX_BLOCK) * FLEX_BLOCK
    mask = torch.zeros(n_q, offsets[-1], dtype=torch.bool)
    reference = dense_mask(pattern, first_position, L, layout, "cpu")
    column = 0
    for s, (length, _) in enumerate(layout):
        mask[:L, offsets[s] : offsets[s] + length] = reference[:, column : column + length]
        column += length
    return mask


FLEX_CASES = [(L, past, first) for L in (40, 200, 300) for past, first in ((0, 0), (8, 0), (8, 256))]


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("L,past,first_position", FLEX_CASES)
def test_flex_mask_mod_over_every_query_key_pair_is_the_dense_mask(name, L, past, first_position):
    pattern = PATTERNS[name]
    layout = flex_layout(pattern, L, past, first_position)
    expected = dense_mask_laid_out_for_flex(pattern, first_position, L, layout)
    mask_mod = flex_mask_mod(pattern, first_position, layout)
    q_idx = torch.arange(expected.shape[0]).view(-1, 1)
    kv_idx = torch.arange(expected.shape[1]).view(1, -1)
    got = mask_mod(0, 0, q_idx, kv_idx)
    assert torch.equal(got[:L], expected[:L]), name


def check_block_tables(pattern, L, past, first_position):
    """FlexAttention computes only the key blocks its table lists, and applies mask_mod only to the
    partial ones: listed must cover every block with a visible pair, full ones must be all visible.
    Returns the number of full blocks."""
    layout = flex_layout(pattern, L, past, first_position)
    expected = dense_mask_laid_out_for_flex(pattern, first_position, L, layout)
    n_q, n_kv = expected.shape[0] // FLEX_BLOCK, expected.shape[1] // FLEX_BLOCK
    blocks = expected.view(n_q, FLEX_BLOCK, n_kv, FLEX_BLOCK)
    real_rows = (torch.arange(n_q * FLEX_BLOCK) < L).view(n_q, FLEX_BLOCK, 1, 1)
    any_seen = blocks.any(dim=3).any(dim=1)
    all_seen = (blocks | ~real_rows).all(dim=3).all(dim=1)  # padded queries' rows do not matter

    block_mask = flex_block_mask(pattern, first_position, L, layout, torch.device("cpu"))

    def listed(num, indices):
        table = torch.zeros(n_q, n_kv, dtype=torch.bool)
        for row in range(n_q):
            table[row, indices[0, 0, row, : num[0, 0, row]].long()] = True
        return table

    partial = listed(block_mask.kv_num_blocks, block_mask.kv_indices)
    full = listed(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    assert not (partial & full).any()
    assert not (any_seen & ~(partial | full)).any(), "a block with a visible pair is not listed"
    assert not (full & ~all_seen).any(), "a block is marked full but not wholly visible"
    return int(full.sum())


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("L,past,first_position", FLEX_CASES)
def test_flex_block_tables_list_every_seen_block_and_skip_the_mask_only_where_all_is_seen(
    name, L, past, first_position
):
    check_block_tables(PATTERNS[name], L, past, first_position)


@pytest.mark.parametrize("pattern", [SlidingWindow(512), RetinaPattern(512, 2, 3)])
def test_flex_block_tables_skip_the_mask_on_wholly_seen_blocks(pattern):
    assert check_block_tables(pattern, 700, 512, 1024) > 0


@pytest.mark.slow
def test_compiled_flex_attention_forward_matches_the_dense_reference():
    """The fused kernel (inductor's CPU FlexAttention, float32, forward only) with our BlockMask:
    block tables, mask_mod and the layout of segments together."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 300, 8) for _ in range(3))
    for pattern in (SlidingWindow(20), RetinaPattern(5, 2, 3)):
        expected = run(pattern, q, k, v, "dense")
        torch.testing.assert_close(run(pattern, q, k, v, "flex"), expected, atol=2e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Retina's definition
# ----------------------------------------------------------------------------------------------


def seen_tokens(pattern: RetinaPattern, t: int) -> list[int]:
    """Every token query t sees, once per key that covers it (a pooled key covers its block)."""
    seen = []
    for level, (lo, hi) in enumerate(pattern.ranges(t)):
        size = pattern.factor**level
        for index in range(max(lo, 0), hi):
            seen.extend(range(index * size, (index + 1) * size))
    return seen


@pytest.mark.parametrize("window,factor,levels", [(4, 2, 3), (3, 4, 3), (5, 2, 4), (6, 4, 2), (1, 2, 3), (8, 3, 3)])
def test_retina_sees_every_earlier_position_within_reach_exactly_once(window, factor, levels):
    pattern = RetinaPattern(window, factor, levels)
    for t in range(400):
        seen = seen_tokens(pattern, t)
        reach = max(pattern.ranges(t)[-1][0], 0) * factor ** (levels - 1)
        assert sorted(seen) == list(range(reach, t + 1)), f"query {t}"
        # each level: w to w+k-1 keys where the sequence is long enough, the fine ones ending at t
        for level, (lo, hi) in enumerate(pattern.ranges(t)):
            if lo >= 0:
                assert window <= hi - lo <= window + factor - 1, (t, level, lo, hi)


def test_retina_query_10_sees_token_6_with_window_4_factor_2_and_3_levels():
    """The blind spot of the first design: token 6 fell between the fine window (7..10) and the
    level-1 blocks lying wholly before it."""
    pattern = RetinaPattern(4, 2, 3)
    (fine_lo, fine_hi), (lo1, hi1), _ = pattern.ranges(10)
    assert (fine_lo, fine_hi) == (6, 11)  # tokens 6..10
    assert (lo1, hi1) == (-2, 3)  # blocks 0..2: tokens 0..5
    assert sorted(seen_tokens(pattern, 10)) == list(range(11))


# ----------------------------------------------------------------------------------------------
# On a GPU (skipped on the CPU, where FlexAttention has no backward): the kernel that trains there
# ----------------------------------------------------------------------------------------------

CUDA_PATTERNS = {
    "window-300": SlidingWindow(300),
    "retina-w4-k2-3": RetinaPattern(4, 2, 3),
    "retina-w64-k4-3": RetinaPattern(64, 4, 3),
}


@pytest.mark.needs_cuda("FlexAttention backward")
@pytest.mark.parametrize("name", list(CUDA_PATTERNS))
def test_flex_matches_the_dense_reference_forward_and_backward_on_cuda(name):
    """A slice after a halo (as under sequence parallelism), float32, forward and gradients."""
    pattern = CUDA_PATTERNS[name]
    torch.manual_seed(0)
    L, rank = 700, 1
    device = torch.device("cuda")
    q, k, v = (torch.randn(2, 4, 2 * L, 64, device=device) for _ in range(3))
    past = (k[:, :, L - pattern.block : L], v[:, :, L - pattern.block : L])
    part = [x[:, :, L:].clone().requires_grad_(True) for x in (q, k, v)]
    grad_out = torch.randn_like(part[0])
    results = {}
    for kernel in ("dense", "flex"):
        if isinstance(pattern, SlidingWindow):
            out = local_attention(*part, pattern.window, past, rank * L, kernel)
        else:
            pooled = pool_levels(k, v, pattern.factor, pattern.levels)
            out = retina_attention(*part, pattern, pooled, past, rank * L, kernel)
        results[kernel] = (out, *torch.autograd.grad((out * grad_out).sum(), part))
    for got, expected, what in zip(results["flex"], results["dense"], ("output", "dq", "dk", "dv")):
        torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3, msg=f"{name}: {what}")


@pytest.mark.needs_cuda("FlexAttention backward")
@pytest.mark.parametrize("arch", ["bottom_up", "retina"])
def test_a_model_on_flex_attention_compiles_as_one_graph_on_cuda(arch):
    """The BlockMask is built inside the graph when compiling (no cache lookup, no graph break)."""
    scales = [ScaleConfig(1, 1, "local", 64)] + ([ScaleConfig(4, 1, "full")] if arch == "bottom_up" else [])
    own = {"retina": dict(retina_factor=4, retina_levels=3), "bottom_up": dict(final_layers=1)}[arch]
    cfg = ModelConfig(arch=arch, vocab_size=128, d_model=128, n_heads=2, scales=scales, **own)
    torch.manual_seed(0)
    model = build_model(cfg).cuda()
    ids = torch.randint(0, 128, (2, 1000), device="cuda")
    eager = model(ids)
    compiled = torch.compile(model, fullgraph=True)(ids)
    torch.testing.assert_close(compiled, eager, atol=2e-3, rtol=2e-3)
    compiled.float().pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
