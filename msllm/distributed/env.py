"""Who am I in the job: the launcher's environment, read once (collectives.py starts the group).

The launcher decides the environment; `read_env` maps each of them to (rank, world, local rank):

- torchrun and the deepspeed launcher set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
- srun alone (or `deepspeed --launcher slurm`) sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID:
  MASTER_ADDR defaults to the first host of the step's node list and MASTER_PORT to a port derived
  from the job id;
- a plain process with none of these is rank 0 of a world of 1 (on a free local port).
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass

from msllm.errors import LauncherError, short_repr


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a local rendezvous: fixed ports collide with other jobs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host(env: dict) -> str | None:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return None
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
        ).stdout.split()
        return out[0] if out else None
    except (OSError, subprocess.SubprocessError):
        # Without scontrol, a plain "node1" or "node[1-3]" list still names its first host.
        head = nodelist.split(",")[0]
        if "[" in head:
            prefix, rest = head.split("[", 1)
            head = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
        return head


def read_env(environ: dict | None = None) -> DistEnv:
    """Read (and complete) the launcher's environment variables; nothing is started here."""
    env = os.environ if environ is None else environ
    try:
        if "RANK" in env and "WORLD_SIZE" in env:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            local = int(env.get("LOCAL_RANK", "0"))
            launcher = "deepspeed launcher" if "LOCAL_SIZE" in env else "torchrun"
            if "LOCAL_WORLD_SIZE" not in env and "LOCAL_SIZE" in env:
                env["LOCAL_WORLD_SIZE"] = env["LOCAL_SIZE"]  # the deepspeed launcher's name; streaming reads ours
        elif "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
            rank = int(env["SLURM_PROCID"])
            world = int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"])
            local = int(env.get("SLURM_LOCALID", "0"))
            launcher = "srun"
            if "MASTER_ADDR" not in env:
                env["MASTER_ADDR"] = _first_slurm_host(env) or "127.0.0.1"
            if "MASTER_PORT" not in env:
                env["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 20000)
            per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
            if "LOCAL_WORLD_SIZE" not in env and per_node.split("(")[0].isdigit():
                env["LOCAL_WORLD_SIZE"] = per_node.split("(")[0]  # streaming reads it
        else:
            rank, world, local, launcher = 0, 1, 0, "single process"
            env.setdefault("LOCAL_WORLD_SIZE", "1")
            env.setdefault("MASTER_ADDR", "127.0.0.1")
            env.setdefault("MASTER_PORT", str(free_port()))
    except ValueError as exc:
        raise LauncherError(f"launcher environment: rank variables are not integers ({exc})") from None
    if world < 1 or not 0 <= rank < world:
        raise LauncherError(f"launcher environment: rank {rank} is not within world size {world}")
    if world > 1:
        _check_master(env)
        start_timeout_s(env)  # a bad value: one line now, not after the wait it sets
    env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(rank), str(world), str(local)
    return DistEnv(rank=rank, world_size=world, local_rank=local, launcher=launcher)


def _check_master(env) -> None:
    """MASTER_PORT a port number: one line, rather than a traceback inside the process group's start."""
    port = env.get("MASTER_PORT", "")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise LauncherError(f"launcher environment: MASTER_PORT {port!r} is not a port number (1-65535)")


def check_master_resolves(env=None) -> None:
    """MASTER_ADDR a host name that resolves (called just before the process group starts): one
    line naming it, rather than a traceback from the rendezvous."""
    env = os.environ if env is None else env
    addr = env.get("MASTER_ADDR", "")
    if not addr:
        raise LauncherError("launcher environment: MASTER_ADDR is not set: set it to the host of rank 0")
    try:
        socket.getaddrinfo(addr, None)
    except (OSError, UnicodeError) as exc:
        raise LauncherError(
            f"launcher environment: MASTER_ADDR {addr!r} does not resolve to an address "
            f"({getattr(exc, 'strerror', None) or exc}): set it to the host of rank 0"
        ) from None


START_TIMEOUT_ENV = "MSLLM_START_TIMEOUT"
# How long the ranks of a job wait for each other at start-up (seconds). Longer than any normal
# start stagger (nodes of one job start within seconds; a container image unpacked or torch imported
# from a network filesystem, within minutes), and a sixth of the process group's 60 minutes: a job
# whose peer never starts ends in 10 minutes, not an hour. Slower sites set MSLLM_START_TIMEOUT.
DEFAULT_START_TIMEOUT_S = 600.0


def start_timeout_s(env=None) -> float:
    """MSLLM_START_TIMEOUT (seconds > 0), or DEFAULT_START_TIMEOUT_S; a LauncherError if it is not a number."""
    env = os.environ if env is None else env
    text = env.get(START_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_START_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise LauncherError(
            f"launcher environment: {START_TIMEOUT_ENV} {short_repr(text)} is not a number of seconds > 0: set it "
            f"to e.g. {DEFAULT_START_TIMEOUT_S:.0f}, or unset it"
        )
    return seconds


def say(*args) -> None:
    """Print on rank 0 only (callable before the process group starts). Each line reaches a log
    file at once: msllm.cli line-buffers stdout for every print of the process."""
    if os.environ.get("RANK", "0") == "0":
        print(*args)
