"""Helpers for the launcher integration tests: processes, waiting, the trainer under test.

Every component is started here, by the test session, and stopped by its pid (or the process
group it leads, which it was started in). A component that cannot start makes the test FAIL
with a message naming what is missing; only MSLLM_SKIP_INTEGRATION=1 turns that into a skip.

The tests need root, and the Debian packages that .ci/install-system.sh installs (slurmctld,
slurmd, slurm-client, munge, docker.io, debootstrap, iproute2).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TINY_RECIPE = HERE / "tiny_recipe.yaml"
SKIP_ALL = os.environ.get("MSLLM_SKIP_INTEGRATION") == "1"

# Which trainer the tests launch: "real" runs `python -m msllm.cli train` (the `msllm train`
# command); "standin" runs tests/integration/standin_train.py, a small torch.distributed program
# with the same contract (ranks from torchrun/srun variables, checkpoints in run.output_dir,
# resume, checkpoint-and-exit on SIGTERM/SIGUSR1). MSLLM_TEST_TRAINER overrides the default.
TRAINER = os.environ.get("MSLLM_TEST_TRAINER", "real")


def need(ok: bool, message: str) -> None:
    """Fail the test (never skip it silently) when a component is missing or does not start."""
    if ok:
        return
    if SKIP_ALL:
        pytest.skip(message)
    pytest.fail(message, pytrace=False)


# ----------------------------------------------------------------------------------------------
# Processes: started in their own session, stopped by pid / their own process group
# ----------------------------------------------------------------------------------------------


class Procs:
    """Processes this test session started; stop() ends exactly those, newest first."""

    def __init__(self) -> None:
        self.started: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: list[str], log: Path, **kw) -> subprocess.Popen:
        fh = open(log, "ab")
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, **kw)
        fh.close()
        self.started.append((name, proc))
        return proc

    @staticmethod
    def stop_one(proc: subprocess.Popen, timeout: float = 15) -> None:
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the group this Popen leads (start_new_session)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)

    def stop(self) -> None:
        for _, proc in reversed(self.started):
            self.stop_one(proc)
        self.started.clear()


def run(cmd, check=True, timeout=120, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.STDOUT)
    proc = subprocess.run(cmd, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited with {proc.returncode}:\n{proc.stdout}")
    return proc


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5, diagnostics=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    extra = f"\n{diagnostics()}" if diagnostics else ""
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}{extra}", pytrace=False)


def tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"({path}: {exc})"
    return f"--- {path} (last {n} lines) ---\n" + "\n".join(lines[-n:])


def need_root_and_tools(*tools: str) -> None:
    need(os.geteuid() == 0, "the integration tests need root (daemons, namespaces, mounts)")
    missing = [t for t in tools if shutil.which(t) is None]
    need(
        not missing,
        f"missing {', '.join(missing)}: run .ci/install-system.sh (Debian packages slurmctld slurmd "
        "slurm-client munge docker.io debootstrap iproute2)",
    )


# ----------------------------------------------------------------------------------------------
# The trainer under test and its logs
# ----------------------------------------------------------------------------------------------


@dataclass
class Trainer:
    """How to run the trainer under test, and how to read what it did."""

    kind: str
    env: dict = field(default_factory=dict)

    def recipe_args(self, output_dir: Path, shards_dir: Path, **overrides) -> list[str]:
        sets = {"run.output_dir": str(output_dir), "data.shards_dir": str(shards_dir), **overrides}
        return [str(TINY_RECIPE)] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]

    def held_before_step(self, step: int) -> dict:
        """The environment of a job whose ranks wait, once they reach optimizer step `step`, until
        a stop signal reaches them, and print a line saying so (`WAITING FOR A SIGNAL`): a test
        that signals once the line is in the log knows the run stops after exactly `step`. The
        real trainer runs as held_train.py; the stand-in reads STANDIN_HOLD_AFTER_STEP."""
        if self.kind == "standin":
            return {"STANDIN_HOLD_AFTER_STEP": str(step)}
        path = os.pathsep.join(p for p in (str(HERE), str(REPO / "tests"), os.environ.get("PYTHONPATH")) if p)
        return {"MSLLM_MODULE": "held_train", "MSLLM_HOLD_BEFORE_STEP": str(step), "PYTHONPATH": path}

    @staticmethod
    def checkpoint_steps(output_dir: Path) -> list[int]:
        """Steps of the complete checkpoints in a run's output_dir (checkpoints/step_0000200/COMPLETE)."""
        steps = []
        for d in (output_dir / "checkpoints").glob("step_*"):
            m = re.fullmatch(r"step_0*(\d+)", d.name)
            if m and (d / "COMPLETE").exists():
                steps.append(int(m.group(1)))
        return sorted(steps)

    def start_steps(self, log_text: str) -> list[int]:
        """The step each (re)start of the run began from, in order (rank 0's start line)."""
        if self.kind == "standin":
            pattern = r"start_step=(\d+) rank=0 "
        else:  # "training vanilla: ... | world 2 (...) | ... | steps 4/16 | ..."
            pattern = r"^training .*?\| steps (\d+)/\d+\b"
        return [int(s) for s in re.findall(pattern, log_text, flags=re.M)]

    def world_size(self, log_text: str) -> int | None:
        pattern = r"start_step=\d+ rank=0 world=(\d+)" if self.kind == "standin" else r"^training .*?\| world (\d+)\b"
        found = re.findall(pattern, log_text, flags=re.M)
        return int(found[0]) if found else None

    def signal_stop_steps(self, log_text: str) -> list[int]:
        """Steps at which the run checkpointed and stopped on a signal."""
        pattern = (
            r"rank 0 stopping on a signal at step (\d+)" if self.kind == "standin" else r"stopped after step (\d+) on"
        )
        return [int(s) for s in re.findall(pattern, log_text)]

    def hosts(self, log_text: str) -> set[str] | None:
        """Hostnames the ranks ran on, when the trainer logs them (the stand-in does)."""
        if self.kind != "standin":
            return None
        return set(re.findall(r"start_step=\d+ rank=\d+ .*host=(\S+)", log_text))


def base_env(trainer: Trainer) -> dict:
    env = dict(os.environ)
    env.update(trainer.env)
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("PYTHON", sys.executable)
    return env
