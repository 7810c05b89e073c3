"""`msllm bench gpu` on a machine without a GPU: one line, exit 2, nothing written; its test part
selects exactly the CUDA-only tests (here all skipped)."""

from __future__ import annotations

from pathlib import Path

from fixtures.train import msllm
from msllm.bench.gpu import cuda_tests

ROOT = Path(__file__).resolve().parents[2]


def test_bench_gpu_refuses_without_a_gpu_in_one_line(tmp_path):
    done = msllm("bench", "gpu", "--out", tmp_path, timeout=120, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "msllm bench: error: msllm bench gpu needs a CUDA GPU and this machine has none; run it on a GPU node "
        "(from the repository root), or run the CPU benchmarks (msllm bench --list)"
    ]
    assert not list(tmp_path.iterdir())


def test_the_cuda_tests_part_selects_the_cuda_only_tests():
    result = cuda_tests(ROOT)
    assert result["exit_code"] == 0, result["report"]
    assert result["summary"].startswith("7 skipped"), result["summary"]  # 3 + 2 attention, 2 loss kernels
