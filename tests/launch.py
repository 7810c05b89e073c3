"""Start a script under torchrun from a test: free port, clean env, one thread per rank."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

# Variables of an outer launcher that would confuse the one a test starts.
LAUNCHER_VARIABLES = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
    "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_STEP_NUM_TASKS",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, server, what: str = "", seconds: float = 60) -> None:
    """Wait until something listens on 127.0.0.1:`port`; fail if `server` (a Popen) ends or
    `seconds` pass first (`what`: text for the failure, e.g. the server's log)."""
    import time

    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, what
            time.sleep(0.2)


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def torchrun_command(nproc: int, *args: str | Path) -> list[str]:
    """The command line of `torchrun --nproc_per_node=nproc ARGS...` on a free local port (ARGS: a
    script and its arguments, or `-m module ...`)."""
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", *map(str, args),
    ]


def torchrun(nproc: int, *args: str | Path, env: dict | None = None, timeout: float = 600, cwd=None):
    """Run `torchrun_command(nproc, ARGS...)` to its end and return the CompletedProcess (stdout
    and stderr captured as text)."""
    return subprocess.run(torchrun_command(nproc, *args), env=env or clean_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)
