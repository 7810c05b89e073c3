"""`msllm bench gpu` on a machine without a GPU: one line, exit 2, nothing written; its test part
runs exactly the tests marked `needs_cuda` anywhere under tests/ (here all skipped, none passed),
and every CUDA-only test carries that marker."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from fixtures.train import msllm
from msllm.bench.gpu import CUDA_MARKER, cuda_tests

ROOT = Path(__file__).resolve().parents[2]


def test_bench_gpu_refuses_without_a_gpu_in_one_line(tmp_path):
    done = msllm("bench", "gpu", "--out", tmp_path, timeout=120, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "msllm bench: error: msllm bench gpu needs a CUDA GPU and this machine has none; run it on a GPU node "
        "(from the repository root), or run the CPU benchmarks (msllm bench --list)"
    ]
    assert not list(tmp_path.iterdir())


def marked_tests() -> list[str]:
    """The ids of the tests that pytest collects under tests/ with the needs_cuda marker."""
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", CUDA_MARKER, "tests"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [line for line in proc.stdout.splitlines() if "::" in line]


def test_the_cuda_tests_part_runs_every_test_marked_needs_cuda_and_here_skips_them():
    marked = marked_tests()
    # The tests of each kind of GPU-only kernel (a fixed -k selection in two files once missed mamba-ssm's).
    for test in (
        "test_attention_kernels.py::test_flex_matches_the_dense_reference_forward_and_backward_on_cuda",
        "test_loss.py::test_fused_cuda_kernels_match_chunked",
        "test_mamba2.py::test_the_mamba_ssm_kernel_matches_the_pytorch_scan_on_cuda",
    ):
        assert any(test in m for m in marked), (test, marked)
    result = cuda_tests(ROOT)
    assert result["exit_code"] == 0, result["report"]
    assert re.match(rf"{len(marked)} skipped, \d+ deselected in ", result["summary"]), (len(marked), result["summary"])
    skipped = re.findall(r"^SKIPPED \[(\d+)\] .*: needs CUDA \(", result["report"], re.MULTILINE)
    assert sum(map(int, skipped)) == len(marked), result["report"]  # each skipped by the marker, saying why


def test_every_cuda_only_test_is_marked_needs_cuda_rather_than_skipped_on_its_own():
    """A test that skips itself without CUDA would be skipped by `msllm bench gpu` too: never run."""
    own_skips = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in sorted((ROOT / "tests").rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"skipif\(.*cuda\.(is_available|device_count)", line)
    ]
    assert not own_skips, f"mark them @pytest.mark.needs_cuda(why) instead: {own_skips}"
