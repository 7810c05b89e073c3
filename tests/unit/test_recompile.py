"""Recompilation of the compiled blocks (`train.compile`: each Block compiled in place by
msllm.distributed.parallelize.compile_blocks) when shapes vary: another length than training's,
the short last batch of eval, dynamic chunking's chunk count that changes every step; and of
FlexAttention (the kernel of local and retina attention on CUDA), both its compiled kernel
(msllm.models.attention.kernels._compiled_flex_attention, which runs flex outside a compiled block)
and flex traced inside the compiled blocks. The CPU has FlexAttention's forward only, so flex is
counted on forwards.

Counted with torch._dynamo.utils.counters["stats"]["unique_graphs"] (every graph dynamo compiles).
The backend is aot_eager: dynamo and AOTAutograd trace with symbolic shapes as they do for
inductor, and that is where the guards that cause recompiles come from; inductor's C++ compile of
each graph would take minutes on 2 cores (one slow test counts flex on inductor itself, which
adds no guard here but once failed to compile a symbolic case). What is asserted is a bound, measured here (torch
2.14.1) and kept with a margin of nothing: a new guard that recompiles shows up as a failure.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from fixtures.models import tiny_config, tiny_model
from msllm.config import ScaleConfig
from msllm.distributed.parallelize import compile_blocks
from msllm.models import build_model
from msllm.models.attention import SlidingWindow, kernels, local_attention, use_kernel
from msllm.models.retina import RetinaPattern, pool_levels, retina_attention
from msllm.train.evaluate import evaluate, pad_batch
from msllm.train.loss import IGNORE_INDEX, model_loss

VOCAB = 97


def compiled(model):
    compile_blocks(model, backend="aot_eager")
    torch._dynamo.reset()
    counters.clear()
    return model


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def step(model, batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    model_loss(model, ids, torch.roll(ids, -1, 1), "chunked").backward()


def chunking_model():
    torch.manual_seed(0)
    return build_model(
        tiny_config(
            "bottom_up",
            scales=[ScaleConfig(1, 1, "local", 8), ScaleConfig(1, 1, "full", pool="dynamic", target_ratio=4.0)],
        )
    )


@pytest.mark.parametrize(
    "arch",
    ["vanilla", pytest.param("bottom_up", marks=pytest.mark.slow), pytest.param("retina", marks=pytest.mark.slow)],
)
def test_training_at_one_shape_compiles_once_and_other_lengths_at_most_twice_more(arch):
    """Training's shape: compiled on the first step, never again. Other lengths (eval at another
    length, a recipe's seq_len changed on resume): automatic dynamic shapes compile once more with
    the length symbolic; a guard on the length (retina's blocks: whether it divides by the block)
    can add one more. Then no new length compiles anything."""
    model = compiled(tiny_model(arch, vocab_size=VOCAB))
    step(model, 2, 64)
    first = graphs()
    for seed in range(1, 3):
        step(model, 2, 64, seed)
    assert graphs() == first
    for length in (48, 37, 100, 128):
        step(model, 2, length)
    settled = graphs()
    assert settled <= first + 2, (arch, first, settled)
    for length in (33, 77, 200, 65):
        step(model, 2, length)
    assert graphs() == settled, (arch, settled, graphs())


def test_dynamic_chunking_changes_its_chunk_count_every_step_without_recompiling():
    """The coarse scale's length is the number of chunks, which the data decides at every step: the
    coarse block compiles at most twice (static, then symbolic) however many counts it sees."""
    model = compiled(chunking_model())
    counts = []
    for seed in range(6):
        step(model, 2, 64, seed)
        counts.append(next(m.last_chunks.selected.shape[1] for m in model.modules() if hasattr(m, "last_chunks")))
        if seed == 0:
            first = graphs()
    assert len(set(counts)) >= 3, counts  # the chunk count did vary
    assert graphs() <= first + 1, (counts, first, graphs())


@pytest.mark.slow
def test_eval_pads_its_short_last_batch_and_compiles_nothing_for_it():
    """7 validation samples in batches of 4: the last batch (3 rows) is padded to 4 rows of
    ignored labels, so it reuses the graphs of the first (no_grad graphs: eval's own). The loss is
    the same as the unpadded batches' (1e-6 relative)."""
    model = compiled(tiny_model("bottom_up", vocab_size=VOCAB))
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (7, 65), generator=g)
    batches = [{"input_ids": tokens[i : i + 4, :-1], "labels": tokens[i : i + 4, 1:]} for i in (0, 4)]
    manifest = {"splits": {"validation": {"samples": 7, "tokens": 7 * 64, "bytes": 7 * 64 * 4}}}
    with torch.no_grad():
        model_loss(model, batches[0]["input_ids"], batches[0]["labels"], auxiliary=False)
    before = graphs()
    row = evaluate(model, batches, manifest, batch_size=4, max_batches=0, device=torch.device("cpu"))
    assert graphs() == before
    with torch.no_grad():
        expected = sum(model_loss(model, b["input_ids"], b["labels"], auxiliary=False) for b in batches) / (7 * 64)
    assert row["eval_tokens"] == 7 * 64
    torch.testing.assert_close(torch.tensor(row["loss"]), expected.double().float(), rtol=1e-6, atol=0)


def test_padding_is_exact():
    ids, labels = torch.arange(6).view(2, 3), torch.arange(6).view(2, 3)
    padded_ids, padded_labels = pad_batch(ids, labels, 3, 5)
    assert padded_ids.shape == padded_labels.shape == (3, 5)
    assert torch.equal(padded_ids[:2, :3], ids) and (padded_ids[2] == 0).all()
    assert (padded_labels[2] == IGNORE_INDEX).all() and (padded_labels[:, 3:] == IGNORE_INDEX).all()
    assert pad_batch(ids, labels, 2)[0] is ids


# ----------------------------------------------------------------------------------------------
# FlexAttention
# ----------------------------------------------------------------------------------------------

FLEX_PATTERNS = {  # what the architectures run on flex: local layers' window, retina's levels
    "window": SlidingWindow(20),
    "retina": RetinaPattern(5, 2, 3),
}
# From a first length over 128 (a static graph), then the symbolic graph, then the cases torch
# specialises in it: one block of queries (L <= 128), and one block of keys; then 1 and multiples
# of 128; 100, 110 and 120 pad to the same block.
FLEX_LENGTHS = (200, 300, 100, 110, 120, 128, 256, 513, 1000, 37, 1)
FLEX_LATER_LENGTHS = (150, 700, 64, 129, 2, 384)
FLEX_GRAPHS = 4  # the stated bound (msllm.models.attention.kernels._compiled_flex_attention)


def flex_forward(pattern, length: int, sliced: bool, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(output of `kernel`, output of the dense reference) of `pattern` at `length` queries: the
    whole sequence, or (`sliced`) a slice of sequence parallelism's, the 4th of 4 (its queries at
    positions from 3 * length, after a halo of the previous slice's keys; retina's pooled keys from
    the whole sequence)."""
    g = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(1, 2, length, 8, generator=g) for _ in range(3))
    past = tuple(torch.randn(1, 2, pattern.block, 8, generator=g) for _ in range(2)) if sliced else None
    first_position = 3 * length if sliced else 0
    if isinstance(pattern, RetinaPattern) and sliced:
        whole = (torch.randn(1, 2, 4 * length, 8, generator=g) for _ in range(2))
        pooled = pool_levels(*whole, pattern.factor, pattern.levels)
    else:
        pooled = None

    def run(kernel):
        if isinstance(pattern, SlidingWindow):
            return local_attention(q, k, v, pattern.window, past, first_position, kernel)
        return retina_attention(q, k, v, pattern, pooled, past, first_position, kernel)

    return run(kernel), run("dense")


@pytest.fixture
def flex_compiled_with(monkeypatch):
    """flex_compiled_with(backend): msllm's compiled flex_attention made on `backend`, its graphs
    counted from zero."""

    def use(backend: str) -> None:
        monkeypatch.setattr(
            kernels, "_compiled_flex_attention", functools.partial(kernels._compiled_flex_attention, backend)
        )
        torch._dynamo.reset()
        counters.clear()

    return use


def check_flex_lengths(pattern, sliced: bool) -> list[int]:
    """Flex at every FLEX_LENGTHS then FLEX_LATER_LENGTHS, each against the dense reference;
    the graphs compiled so far after each length."""
    counts = []
    for length in FLEX_LENGTHS + FLEX_LATER_LENGTHS:
        got, expected = flex_forward(pattern, length, sliced, "flex")
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5, msg=f"L={length}")
        counts.append(graphs())
    return counts


@pytest.mark.parametrize("sliced", [False, True], ids=["whole", "slice"])
@pytest.mark.parametrize("name", list(FLEX_PATTERNS))
def test_compiled_flex_compiles_at_most_4_graphs_over_any_lengths(name, sliced, flex_compiled_with):
    """The compiled flex kernel, as local and retina attention call it outside a compiled block
    (eval, or training without train.compile): the first length compiles a static graph, the next
    a symbolic one, and torch specialises that on one block of queries and on one block of keys:
    4 graphs at most. Lengths that pad to the same blocks share a graph, and the mask's numbers
    (first position, segment lengths) are tensors, so no value of theirs compiles. It was one graph
    per length (100, 110, 120, 200 gave 1, 2, 3, 4)."""
    flex_compiled_with("aot_eager")
    counts = check_flex_lengths(FLEX_PATTERNS[name], sliced)
    assert counts[0] == 1
    if not sliced:  # 100, 110 and 120 queries and keys: one block each (after a halo, 110 keys and more take two)
        assert counts[FLEX_LENGTHS.index(120)] == counts[FLEX_LENGTHS.index(100)], counts
    settled = counts[len(FLEX_LENGTHS) - 1]
    assert settled <= FLEX_GRAPHS, counts
    assert counts[-1] == settled, counts


@pytest.mark.slow
def test_compiled_flex_on_inductor_compiles_as_many_graphs_and_stays_exact(flex_compiled_with):
    """The same on inductor, the backend that runs on CUDA (here its CPU kernel): its lowering adds
    no guard of its own, and every pattern compiles and matches the dense reference in the same
    process (a captured tensor of symbolic size failed inductor's CPU C++ compile)."""
    flex_compiled_with("inductor")
    before = 0
    for name, pattern in FLEX_PATTERNS.items():
        for sliced in (False, True):
            counts = check_flex_lengths(pattern, sliced)
            assert counts[-1] - before <= FLEX_GRAPHS, (name, sliced, counts)
            before = counts[-1]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["retina", "bottom_up"])
def test_flex_inside_the_compiled_blocks_compiles_a_bounded_number_of_graphs(arch):
    """train.compile on CUDA traces flex inside each compiled block. Over lengths from 64 to 1002,
    multiples of 128 or not, the blocks compile at most 4 more graphs than for the first length
    (the blocks kernel, the same lengths: 3 for retina, 2 for bottom_up), then none; the outputs
    are the eager blocks kernel's (forwards: the CPU has no flex backward). Lengths shorter than
    retina's pooling reaches or bottom_up's coarse factor compile more, on either kernel."""
    lengths = (256, 384, 100, 110, 128, 200, 302, 255, 129, 64, 513)
    later = (1000, 1001, 1002, 131, 253, 640)
    model = tiny_model(arch, vocab_size=VOCAB)
    tokens = {n: torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(n)) for n in lengths + later}
    with torch.no_grad():
        expected = {n: model(ids) for n, ids in tokens.items()}
        compiled(model)
        use_kernel("flex")
        try:
            counts = []
            for n in lengths + later:
                torch.testing.assert_close(model(tokens[n]), expected[n], atol=1e-6, rtol=1e-5, msg=f"L={n}")
                counts.append(graphs())
        finally:
            use_kernel(None)
    first, settled = counts[0], counts[len(lengths) - 1]
    assert settled <= first + 4, counts
    assert counts[-1] == settled, counts
