"""Host memory freed while the model is built goes back to the system (glibc's malloc only).

    freed_blocks_returned()   a context for a ZeRO-3 start-up (model build and deepspeed.initialize)

Why: building the model allocates and frees large blocks on the host (zero.Init builds each module
whole for a moment before partitioning it; init_parameters computes each parameter's whole value).
glibc serves blocks over its mmap threshold (128 KiB at first) by mmap and unmaps them when freed,
but each such free raises the threshold to the freed block's size (up to 32 MiB). The later blocks
of that size then come from the heap, between the small partitions that stay, and that fragmented
heap is never returned: at ZeRO-3 on 4 CPU ranks a 304M-parameter model's start-up took 1.40-1.46x
the memory of the whole model built on one rank instead of 0.81x (benchmarks/model-startup.md).

Inside the context the threshold is fixed at 128 KiB, so every large block freed is unmapped at
once. After it, the threshold and the trim threshold are fixed where glibc's dynamic adjustment
would have taken them (32 MiB and twice that), so training's own allocations are served as they
would have been. A process started with MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ in its
environment chose its own settings: they are left alone. On other C libraries nothing changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from collections.abc import Iterator

# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
START_UP_MMAP_THRESHOLD = 128 * 1024  # glibc's initial threshold
STEADY_MMAP_THRESHOLD = 32 * 2**20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: the dynamic threshold's ceiling
STEADY_TRIM_THRESHOLD = 2 * STEADY_MMAP_THRESHOLD  # what the dynamic adjustment sets beside it


def _glibc() -> ctypes.CDLL | None:
    """glibc's malloc, or None on another C library (musl, macOS) or when the user set its tunables."""
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")):
        return None
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it: musl's mallopt does nothing useful)
        return libc
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def freed_blocks_returned() -> Iterator[None]:
    """Large host blocks freed inside go back to the system at once (module docstring)."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, START_UP_MMAP_THRESHOLD)
    try:
        yield
    finally:
        libc.malloc_trim(0)
        libc.mallopt(M_MMAP_THRESHOLD, STEADY_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, STEADY_TRIM_THRESHOLD)
