"""`msllm bench generate` at a toy size: every model is measured, the tables have their rows, HF
Llama runs with vanilla's weights (the same greedy tokens), and the plot has one series per model.
(Speed itself is measured by the benchmark, not asserted.)"""

from __future__ import annotations

import re

import numpy as np

from msllm.bench.generate import COLORS, MODELS, Setting, measure_all, plot, to_markdown

TOY = Setting(
    prompt=48,
    new_tokens=6,
    uncached_tokens=2,
    sweep=((16, 4), (48, 6)),
    rounds=2,
    d_model=32,
    n_heads=2,
    vocab_size=256,
)


def series_in(path) -> int:
    """How many of the series colours the image shows (lines and markers, at least 50 pixels each)."""
    import matplotlib.image

    rgb = matplotlib.image.imread(str(path))[..., :3]
    shown = 0
    for color in COLORS:
        target = np.array([int(color[i : i + 2], 16) / 255 for i in (1, 3, 5)])
        shown += int((np.abs(rgb - target).max(axis=-1) < 0.02).sum() >= 50)
    return shown


def test_the_benchmark_measures_every_model_and_writes_its_tables_and_plot(tmp_path):
    results = measure_all(TOY)
    assert [r["model"] for r in results["main"]] == list(MODELS)
    assert [(r["prompt"], r["model"]) for r in results["sweep"]] == [(P, m) for P in (16, 48) for m in MODELS]
    for row in results["main"]:
        assert row["prefill_s"] > 0 and row["forward_s"] > 0 and row["decode_tokens_per_s"] > 0
        assert len(row["tokens"]) == TOY.new_tokens
        assert (row["model"] == "hf_llama") != (row.get("uncached_tokens_per_s", 0) > 0)
    text = to_markdown(results, TOY)
    for name in MODELS:
        cells = re.search(rf"^\| {name} \| (.*) \|$", text, re.M).group(1).split(" | ")
        assert len(cells) == 9, cells
        assert (cells[6] == "-") == (name == "hf_llama")  # uncached tokens/s: msllm's models only
    assert f"same first {TOY.new_tokens} of {TOY.new_tokens} tokens" in text  # HF Llama has vanilla's weights
    for prompt, new in TOY.sweep:  # the sweep's table: a tokens/s per model
        assert re.search(rf"^\| {prompt} \| {new} \|( [\d,.]+ \|){{{len(MODELS)}}}$", text, re.M)
    plot(results["sweep"], tmp_path / "generate.png")
    assert series_in(tmp_path / "generate.png") == len(MODELS)
    two = [r for r in results["sweep"] if r["model"] in ("retina", "hf_llama")]
    plot(two, tmp_path / "two.png")
    assert series_in(tmp_path / "two.png") == 2
