"""A running training's progress lines reach a log FILE as they are printed (slurm, nohup and `tee`
give stdout as a file or a pipe, which Python block-buffers), not only when the run ends."""

from __future__ import annotations

import re
import signal
import subprocess
import time

import pytest

from fixtures.launch import clean_env
from fixtures.train import make_recipe, msllm_command

STEP_LINE = re.compile(r"^step +\d+/", flags=re.M)


@pytest.mark.slow
def test_step_lines_reach_a_file_while_the_run_goes_on(tmp_path, tiny_data):
    recipe, out = make_recipe(
        tmp_path,
        tiny_data,
        train={"max_steps": 100_000},
        eval={"every": 0},
        checkpoint={"every": 0},
        log={"every": 1, "tensorboard": False},
    )
    env = clean_env()
    del env["PYTHONUNBUFFERED"]  # what a user's shell has: the fix must not depend on it
    log, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with log.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(msllm_command("train", recipe), stdout=stdout, stderr=stderr, env=env)
    try:
        # metrics.jsonl is written line by line; once it holds 3 train rows, the console lines of
        # those steps (printed in the same on_log call, ConsoleLogger before or after it) must
        # already be in the file: at least 2 of them. Block-buffered, the file has none yet.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = out / "metrics.jsonl"
            rows = metrics.read_text().count('"kind": "train"') if metrics.is_file() else 0
            if rows >= 3:
                break
            time.sleep(0.1)
        assert proc.poll() is None, f"the run ended early (exit {proc.returncode}):\n{err.read_text()[-3000:]}"
        assert rows >= 3, f"no 3 steps in 240 s:\n{err.read_text()[-3000:]}"
        printed = len(STEP_LINE.findall(log.read_text()))
        assert printed >= rows - 1, f"{rows} steps logged in metrics.jsonl but {printed} step lines in the log file"
        assert "training vanilla:" in log.read_text()  # the start-up lines (dist.say) too
    finally:
        proc.send_signal(signal.SIGTERM)  # the preemption path: a checkpoint, then exit 0
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
