"""`msllm bench throughput` at a toy size: a model trains in the bare loop and in `msllm train`, each
in a fresh process, and the table and the plot are written. (Speed itself is measured by the
benchmark, not asserted.)"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from fixtures.plots import check_png, legend_labels, lines
from msllm.bench.throughput import CPU, loss_rows, measure, measure_trainer, plot, rows_for, table


def test_one_measurement_reports_speed_mfu_and_memory():
    row = measure("retina", "recipes/models/retina-tiny.yaml", 0, 64, 128, 1, compiled=False)
    assert row["model"] == "retina" and row["batch"] == 2
    assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1 and row["peak_gib"] > 0
    assert row["ops_per_step"] > 100  # forward + loss + backward of two retina layers


@pytest.mark.slow
def test_compiled_blocks_dispatch_fewer_operations_than_eager():
    """The dispatch counter sees the compiled code's own calls, not inductor's fused kernels."""
    from fixtures.models import tiny_model
    from msllm.bench.throughput import dispatched_ops
    from msllm.distributed.parallelize import compile_blocks
    from msllm.train.bare import bare_step

    ids = torch.randint(0, 97, (2, 65))
    counts = {}
    for compiled in (False, True):
        model = tiny_model("bottom_up")
        if compiled:
            compile_blocks(model)
        bare_step(model, None, ids[:, :-1], ids[:, 1:])  # compiles
        model.zero_grad()
        # the lambda runs inside dispatched_ops, in this iteration
        counts[compiled] = dispatched_ops(lambda: bare_step(model, None, ids[:, :-1], ids[:, 1:]))  # noqa: B023
    assert 0 < counts[True] < counts[False] / 2, counts


@pytest.mark.slow
def test_the_benchmark_writes_its_table_and_plot(tmp_path, saved_plots):
    setting = dataclasses.replace(CPU, lengths=(32, 64), tokens_per_step=64, steps=1)
    rows = rows_for(setting, models=("hf_llama",), modes=(False,))
    assert [(r["model"], r["L"]) for r in rows] == [("hf_llama", 32), ("hf_llama", 64)]
    assert all("error" not in r for r in rows), rows
    text = table(rows, setting)  # two rounds each (the CPU setting): the faster one is kept
    assert text.count("| hf_llama | eager | bare |") == 2 and "ran 2 times, alternately" in text
    plot(rows, tmp_path / "throughput.png", "toy")
    fig, path = saved_plots["throughput.png"]
    check_png(fig, path)
    assert legend_labels(fig) == ["bare, eager"]  # the one loop and mode measured
    speed, ratio, memory = fig.axes  # one model: one column of three
    assert lines(speed) == {"bare, eager": ([32, 64], [r["tokens_per_s"] for r in rows])}
    assert lines(memory) == {"bare, eager": ([32, 64], [r["peak_gib"] for r in rows])}
    assert not lines(ratio)  # no msllm train run to compare


@pytest.mark.slow
def test_the_trainer_is_measured_on_its_own_shards_and_compared_with_the_bare_loop(tmp_path, monkeypatch):
    recipe = str(Path("recipes/models/vanilla-tiny.yaml").resolve())
    monkeypatch.chdir(tmp_path)  # the trainer's shards go to ./data/throughput-V-L
    kwargs = dict(
        name="vanilla", recipe_path=recipe, vocab_size=0, seq_len=64, tokens_per_step=128, steps=2, compiled=False
    )
    trained = measure_trainer(**kwargs)
    assert "error" not in trained, trained
    assert trained["loop"] == "msllm train" and trained["batch"] == 2
    assert trained["tokens_per_s"] > 0 and 0 < trained["mfu"] < 1 and trained["peak_gib"] > 0
    assert (tmp_path / "data" / "throughput-4000-64" / "manifest.json").is_file()
    bare = measure(**kwargs)
    text = table([bare, trained], dataclasses.replace(CPU, tokens_per_step=128, steps=2))
    ratio = trained["tokens_per_s"] / bare["tokens_per_s"]
    assert trained["loss"] == bare["loss"] == "chunked"  # what auto chooses on the CPU, in both loops
    assert (
        f"| vanilla | eager | msllm train | chunked | 64 | 2 | {trained['tokens_per_s']:,.0f} | {ratio:.2f}x |" in text
    )


@pytest.mark.slow
def test_the_loss_kernels_are_timed_against_each_other():
    setting = dataclasses.replace(CPU, tokens_per_step=64, steps=1, rounds=1, loss_length=32)
    rows = loss_rows(setting, cuda=False)
    assert [(r["model"], r["loss"], r["L"]) for r in rows] == [
        (m, k, 32) for m in ("vanilla", "bottom_up") for k in ("dense", "chunked")
    ]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert table(rows, setting).count("| bare | dense | 32 |") == 2


@pytest.mark.slow
def test_the_sequence_parallel_bench_splits_memory_and_sends_halos(tmp_path):
    from msllm.bench import sequence_parallel

    for arch in sequence_parallel.ARCHS:  # the shipped 16k recipes, at 2k tokens
        shipped = Path(f"recipes/long_context/{arch}-16k-cpu.yaml").resolve()
        (tmp_path / shipped.name).write_text(f"base: {shipped}\ndata: {{seq_len: 2048}}\n")
    results = sequence_parallel.run(str(tmp_path), sps=(1, 2))
    assert [(r["arch"], r["sp"], r["seq_len"]) for r in results] == [
        (arch, sp, 2048) for arch in sequence_parallel.ARCHS for sp in (1, 2)
    ]
    by = {(r["arch"], r["sp"]): r for r in results}
    for arch in sequence_parallel.ARCHS:
        one, two = by[arch, 1], by[arch, 2]
        assert one["bytes_sent"] == 0 < two["bytes_sent"]
        assert two["activation_bytes"] < 0.75 * one["activation_bytes"], arch
    assert sequence_parallel.to_markdown(results).count("\n") == 1 + len(results)


def test_the_attention_bench_times_each_kernel_and_checks_it_against_dense():
    from msllm.bench import attention

    setting = attention.Setting(heads=2, head_dim=8, seq_len=256, window=16, check_len=128, dtype="float32", repeats=1)
    rows = attention.run(setting, torch.device("cpu"))
    assert [r["kernel"] for r in rows] == ["dense", "blocks"]  # no flex on the CPU: no backward there
    assert rows[1]["max_diff"] < 1e-5
    assert all(r["ms"] > 0 and r["saved_mib"] > 0 and r["peak_mib"] is None for r in rows)
    text = attention.to_markdown(rows, setting, "the CPU")
    assert "| dense |" in text and "| (reference) |" in text and f"| {rows[1]['max_diff']:.2e} |" in text
    long = dataclasses.replace(setting, seq_len=attention.DENSE_MAX_LEN * 2)
    assert "not run: L x L mask" in attention.to_markdown([{"kernel": "dense", "skipped": "L x L mask"}], long, "x")


@pytest.mark.slow
def test_the_loss_bench_alternates_the_kernels_in_msllm_train_and_measures_their_memory(tmp_path, monkeypatch):
    from msllm.bench import loss

    recipe = str(Path("recipes/models/vanilla-tiny.yaml").resolve())
    bookcorpus = Path("recipes/models/vanilla-bookcorpus.yaml").resolve()
    monkeypatch.chdir(tmp_path)
    speed = loss.speed_rows(("dense", "chunked"), rounds=2, steps=1, recipe=recipe)
    assert [(r["round"], r["loss"]) for r in speed] == [(1, "dense"), (1, "chunked"), (2, "dense"), (2, "chunked")]
    assert all(r["loop"] == "msllm train" and r["tokens_per_s"] > 0 for r in speed), speed
    (tmp_path / "recipes" / "models").mkdir(parents=True)
    for name in ("vanilla-bookcorpus.yaml", "bookcorpus-base.yaml"):
        (tmp_path / "recipes" / "models" / name).write_text((bookcorpus.parent / name).read_text())
    rows = loss.memory_rows(sample_len=64)  # the micro-batch's figure, measured on short samples
    memory = {r["kernel"]: r["bytes"] for r in rows}
    assert memory["chunked"] < 0.3 * 2**30 < 5.5 * 2**30 < memory["dense"]  # issue 17's target, and the old cost
    text = loss.to_markdown(speed, rows)
    ratios = [speed[i + 1]["tokens_per_s"] / speed[i]["tokens_per_s"] for i in (0, 2)]
    for i, ratio in enumerate(ratios):
        assert (
            f"| {i + 1} | {speed[2 * i]['tokens_per_s']:,.0f} | {speed[2 * i + 1]['tokens_per_s']:,.0f} "
            f"| {ratio:.3f}x |" in text
        )
    assert f"Median chunked / dense over the rounds: **{(ratios[0] + ratios[1]) / 2:.3f}x**" in text
    assert f"| chunked | {memory['chunked'] / 2**20:,.1f} |" in text
