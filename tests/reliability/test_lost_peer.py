"""Issue 32 (third round), item 1: a rank lost mid-run (kill -9 of one of two ranks under torchrun)
is one line on the survivor, naming the lost rank and saying that a rerun resumes from the last
checkpoint, instead of gloo's "Connection reset by peer" traceback; the rerun resumes."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from fixtures.launch import clean_env, torchrun_command
from fixtures.train import check, make_recipe, msllm_torchrun, wait_for_line
from msllm.checkpoint.files import latest_complete, step_of


def rank_pids(launcher: int) -> dict[int, int]:
    """{RANK: pid} of the worker processes torchrun (pid `launcher`) started."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            ppid = int(next(line for line in status.splitlines() if line.startswith("PPid:")).split()[1])
            if ppid != launcher:
                continue
            env = dict(v.split("=", 1) for v in (entry / "environ").read_text().split("\0") if "=" in v)
        except (OSError, StopIteration, ValueError):  # a process that ended meanwhile
            continue
        if "RANK" in env:
            ranks[int(env["RANK"])] = int(entry.name)
    return ranks


@pytest.mark.slow
@pytest.mark.parametrize("killed", [1, 0])
def test_a_rank_killed_mid_run_is_one_line_on_the_survivor(tmp_path, tiny_data, killed):
    """Probe class: a lost peer (kill -9 of one rank of two, gloo under torchrun)."""
    recipe, out = make_recipe(
        tmp_path, tiny_data, train={"max_steps": 100000}, checkpoint={"every": 2}, eval={"every": 0, "max_batches": 1}
    )
    proc = subprocess.Popen(
        torchrun_command(2, "-m", "msllm.cli", "train", recipe),
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_line(proc, " 3/100000 |")  # step 2's checkpoint is complete
        ranks = rank_pids(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[killed], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    lines = [line for line in stderr.splitlines() if line.startswith("msllm train: ")]
    assert len(lines) == 1, stderr[-4000:]
    assert lines[0].startswith(f"msllm train: error: lost rank {killed} of the job (its connection was reset"), lines[0]
    assert (
        f"so rank {1 - killed} stops too: rerun the same command: training resumes from the last checkpoint ("
        in lines[0]
    )
    # torchrun prints its own ChildFailedError traceback; the survivor prints none ("[rank0]: Traceback").
    assert not [
        line for line in stderr.splitlines() if line.startswith("[rank") or ("File " in line and "/msllm/" in line)
    ], stderr[-4000:]
    saved = latest_complete(out / "checkpoints")
    assert saved is not None and step_of(saved) >= 2 and str(saved) in lines[0]
    if killed == 1:
        return  # the rerun is the same whichever rank was lost: made once, after rank 0 (the lock holder) died
    rerun = check(msllm_torchrun(2, "train", recipe, "--set", f"train.max_steps={step_of(saved) + 1}", timeout=300))
    assert f"resumed from {saved} at step {step_of(saved)}" in rerun.stdout
