"""`msllm bench throughput` at a toy size: every model trains in the bare loop of a fresh process,
and the table and the plot are written. (Speed itself is measured by the benchmark, not asserted.)"""

from __future__ import annotations

import dataclasses

import pytest

from msllm.bench.throughput import CPU, measure, plot, rows_for, table


def test_one_measurement_reports_speed_mfu_and_memory():
    row = measure("retina", "recipes/models/retina-tiny.yaml", 0, 64, 128, 1, compiled=False)
    assert row["model"] == "retina" and row["batch"] == 2
    assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1 and row["peak_gib"] > 0


@pytest.mark.slow
def test_the_benchmark_writes_its_table_and_plot(tmp_path):
    setting = dataclasses.replace(CPU, lengths=(32, 64), tokens_per_step=64, steps=1)
    rows = rows_for(setting, models=("hf_llama",), modes=(False,))
    assert [(r["model"], r["L"]) for r in rows] == [("hf_llama", 32), ("hf_llama", 64)]
    assert all("error" not in r for r in rows), rows
    text = table(rows, setting)
    assert text.count("| hf_llama | eager |") == 2
    plot(rows, tmp_path / "throughput.png", "toy")
    assert (tmp_path / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
