"""Issue 32 (third round), item 2: a /dev/shm too small for streaming's shared arrays (Docker's
default is 64 MB) is one line naming `docker run --shm-size`, not a SIGBUS (exit 135, no message)."""

from __future__ import annotations

import os
import subprocess

import pytest

from fixtures.launch import clean_env, torchrun_command
from fixtures.reliability import checkpoints, one_line_error, tree_digest
from fixtures.train import msllm_command

# Runs "$@" in a mount namespace of its own, on an 8 KiB tmpfs at /dev/shm (the host's is untouched).
TINY_SHM = 'mount -t tmpfs -o size=8k tmpfs /dev/shm && exec "$@"'


@pytest.mark.slow
@pytest.mark.needs_root("mounts an 8 KiB tmpfs on /dev/shm in a mount namespace")
def test_full_dev_shm_is_one_line_and_keeps_the_run(run_copy):
    """Probe class: a full /dev/shm (an 8 KiB tmpfs), on a resumed run."""
    recipe, out = run_copy
    before = tree_digest(out)
    proc = subprocess.run(
        [
            "unshare",
            "--mount",
            "sh",
            "-c",
            TINY_SHM,
            "sh",
            *msllm_command("train", recipe, "--set", "train.max_steps=8"),
        ],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = one_line_error(proc, "train")
    assert "/dev/shm has 8 KiB free of 8 KiB, and reading the train split needs at least " in line, line
    assert "docker run --shm-size=1g" in line and "free /dev/shm" in line
    assert tree_digest(out) == before and checkpoints(out) == ["step_0000003", "step_0000006"]


def test_shared_memory_estimate():
    """Probe class: the estimate itself: a page per streaming block, 8 bytes a sample, 2 batches a worker."""
    from msllm.data.jobcache import SHM_PAGES_PER_DATASET, check_shared_memory, shared_memory_needed
    from msllm.errors import DataError

    page = os.sysconf("SC_PAGE_SIZE")
    base = shared_memory_needed(0, 0, 0, 0)
    assert base >= SHM_PAGES_PER_DATASET * page
    assert shared_memory_needed(10**6, 10, 1000, 2) == base + 90 + 8 * 10**6 + 4000
    check_shared_memory("train", 1)  # the host's /dev/shm has a byte
    with pytest.raises(DataError, match=r"needs at least 1048576\.0 MiB .* --shm-size=2048g"):
        check_shared_memory("train", 1 << 40)


@pytest.mark.slow
@pytest.mark.needs_root("mounts an 8 KiB tmpfs on /dev/shm in a mount namespace")
def test_full_dev_shm_with_two_ranks_is_one_line_on_each(run_copy):
    """Probe class: a full /dev/shm (an 8 KiB tmpfs) under 2 ranks (torchrun, gloo), on a resumed
    run. The peer of the rank that hit it died with a gloo traceback; now every rank checks
    /dev/shm before streaming allocates there (right after the loaders' start-up barrier), so each
    stops with the same one line and no traceback of msllm's (torchrun adds its own ChildFailedError
    report, as for every failed rank), and the run's files stay."""
    recipe, out = run_copy
    before = tree_digest(out)
    proc = subprocess.run(
        ["unshare", "--mount", "sh", "-c", TINY_SHM, "sh"]
        + torchrun_command(2, "-m", "msllm.cli", "train", recipe, "--set", "train.max_steps=8"),
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0, proc.stdout[-2000:]
    # Every rank that prints says the same line (torchrun may stop a rank before it gets there).
    errors = {line for line in proc.stderr.splitlines() if line.startswith("msllm train: ")}
    assert len(errors) == 1, proc.stderr[-4000:]
    (line,) = errors
    assert "/dev/shm has 8 KiB free of 8 KiB, and reading the train split needs at least " in line, line
    assert "docker run --shm-size=1g" in line
    assert not [
        line for line in proc.stderr.splitlines() if line.startswith("[rank") or ("File " in line and "/msllm/" in line)
    ], proc.stderr[-4000:]
    assert tree_digest(out) == before and checkpoints(out) == ["step_0000003", "step_0000006"]
