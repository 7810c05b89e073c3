"""`msllm bench ops` at a toy size: one model's operations per step counted, with its layers, and the
table it writes. (The counts at BookCorpus sizes are the benchmark's, in benchmarks/ops.md.)"""

from __future__ import annotations

from msllm.bench.ops import count_ops, table


def test_a_count_has_the_models_blocks_and_its_operations_per_layer():
    row = count_ops("retina", "recipes/models/retina-tiny.yaml", 0, 64, 2, compiled=False)
    assert row["mode"] == "eager" and row["loss"] == "chunked"
    assert row["layers"] == 4  # recipes/models/retina-tiny.yaml: 4 retina layers
    assert row["ops_per_step"] > 4 * 100  # forward + loss + backward: hundreds of operations per layer
    assert row["ops_per_layer"] == row["ops_per_step"] / 4


def test_the_same_step_counts_the_same_operations_again():
    """The count is of operations, not of time: two counts of one setting agree exactly."""
    first, second = (count_ops("vanilla", "recipes/models/vanilla-tiny.yaml", 0, 32, 2, compiled=False) for _ in "ab")
    assert first["ops_per_step"] == second["ops_per_step"]


def test_the_table_compares_each_model_with_vanilla_and_its_compiled_count_with_its_eager_one():
    rows = [
        dict(model="vanilla", mode="eager", layers=14, loss="chunked", ops_per_step=3000, ops_per_layer=3000 / 14),
        dict(model="vanilla", mode="compiled", layers=14, loss="chunked", ops_per_step=600, ops_per_layer=600 / 14),
        dict(model="retina", mode="eager", layers=30, loss="chunked", ops_per_step=9000, ops_per_layer=300),
    ]
    text = table(rows, 256, 4, "CPU")
    assert "L = 256, batch 4, on the CPU" in text
    assert "| vanilla-14 | 14 | chunked | 3,000 | 214 | 1.00x | 600 | 43 | 0.20 |" in text
    assert "| retina-30 | 30 | chunked | 9,000 | 300 | 3.00x |  |  |  |" in text  # no compiled row: blank
