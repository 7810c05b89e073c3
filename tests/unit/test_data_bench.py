"""`msllm bench`: the registry and the data benchmarks' entries (the benchmarks themselves are
run by hand, their results are committed in benchmarks/)."""

import argparse

import pytest

from msllm.bench import BENCHMARKS, machine_description, run_benchmark
from msllm.errors import MsllmError


def test_list_names_the_data_benchmarks(capsys):
    run_benchmark(argparse.Namespace(name=None, list=True, out="unused"))
    out = capsys.readouterr().out
    assert "data-prep" in out and "data-loader" in out
    assert {"data-prep", "data-loader"} <= set(BENCHMARKS)


def test_unknown_benchmark_is_one_line(tmp_path):
    with pytest.raises(MsllmError, match=r"^unknown benchmark 'nope'; choose from: .*data-prep"):
        run_benchmark(argparse.Namespace(name="nope", list=False, out=str(tmp_path)))


def test_results_are_appended_with_command_and_machine(tmp_path, monkeypatch):
    monkeypatch.setitem(BENCHMARKS, "data-fake", lambda args: "| a | b |\n|---|---|\n| 1 | 2 |")
    for _ in range(2):
        run_benchmark(argparse.Namespace(name="data-fake", list=False, out=str(tmp_path)))
    text = (tmp_path / "data-fake.md").read_text()
    assert text.count("Command: `msllm bench data-fake`") == 2 and text.count("| 1 | 2 |") == 2
    assert "cores (" in machine_description() and "torch" in machine_description()
