"""Shared pieces of the kernel tests (tests/test_loss.py, tests/test_kernel_check.py): the fixture
that lets the fused loss kernels run on the CPU. Nothing is tested here."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def cpu_kernels():
    """MSLLM_ALLOW_CPU_KERNELS=1 and TRITON_INTERPRET=1 for a module's tests, so that Liger's Triton
    kernels are interpreted on CPU tensors (the variables are restored after the module, the
    interpreted kernels stay interpreted). Triton reads TRITON_INTERPRET when it defines a kernel,
    its own standard library's at import: conftest.py sets it before anything imports triton, on a
    machine without CUDA (where nothing else can run a Triton kernel)."""
    import torch

    from msllm.errors import KernelError
    from msllm.train.loss import enable_cpu_kernels

    with pytest.MonkeyPatch.context() as mp:
        for name in ("MSLLM_ALLOW_CPU_KERNELS", "TRITON_INTERPRET"):
            if name in os.environ:
                mp.setenv(name, os.environ[name])  # restored on exit
            else:
                mp.delenv(name, raising=False)
        try:
            enable_cpu_kernels()
        except KernelError as exc:
            if not torch.cuda.is_available():
                raise  # conftest.py sets TRITON_INTERPRET=1 first thing on a machine without CUDA
            pytest.skip(f"Triton runs for the GPU in this process ({exc}); the needs-CUDA tests run the kernels there")
        yield
