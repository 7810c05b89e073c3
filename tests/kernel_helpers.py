"""Shared pieces of the kernel tests (tests/test_loss.py, tests/test_kernel_check.py): the fixture
that lets the fused loss kernels run on the CPU. Nothing is tested here."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def cpu_kernels():
    """MSLLM_ALLOW_CPU_KERNELS=1 and TRITON_INTERPRET=1 for a module's tests (set before
    liger_kernel is imported, so that its Triton kernels are interpreted on CPU tensors; the
    variables are restored after the module, the interpreted kernels stay interpreted)."""
    from msllm.train.loss import enable_cpu_kernels

    with pytest.MonkeyPatch.context() as mp:
        for name in ("MSLLM_ALLOW_CPU_KERNELS", "TRITON_INTERPRET"):
            if name in os.environ:
                mp.setenv(name, os.environ[name])  # restored on exit
            else:
                mp.delenv(name, raising=False)
        enable_cpu_kernels()
        yield
