"""Shared pieces of the tests that run `msllm` (the trainer's, the reliability cases, the CLI's).

A tiny corpus, a recipe writer, and the one way to run `msllm` in another process: `msllm`
(to its end), `start_msllm` (in the background; `wait_for_line` reads its progress), both over
`msllm_command`, and `msllm_torchrun` (several gloo ranks through tests/launch.py's torchrun).
Their fixtures (the tiny shards, one reference run) are in conftest.py. Nothing is tested here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from launch import clean_env, torchrun
from msllm.bench.model_startup import corpus_text  # noqa: F401  (the tiny corpus of the tests and that bench)


def base_recipe(shards: Path, corpus: Path, output_dir: Path) -> dict:
    """A 150k-parameter vanilla model, seq_len 64, 4 samples per rank per step."""
    return {
        "run": {"name": "tiny", "output_dir": str(output_dir), "seed": 1},
        "data": {
            "source": "text",
            "paths": [str(corpus)],
            "split_on_blank_lines": True,
            "validation_fraction": 0.1,
            "shards_dir": str(shards),
            "seq_len": 64,
            "workers": 1,
            "tokenizer": {"vocab_size": 320},
        },
        "model": {
            "arch": "vanilla",
            "d_model": 64,
            "n_heads": 4,
            "scales": [{"factor": 1, "layers": 2, "attention": "full"}],
        },
        "train": {"max_steps": 12, "micro_batch_size": 4, "lr": 3.0e-3, "min_lr": 3.0e-4, "warmup_steps": 2},
        "eval": {"every": 6, "max_batches": 4},
        "checkpoint": {"every": 6, "keep_last": 2},
        "log": {"every": 1},
    }


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def msllm_command(*args, python_code: str | None = None) -> list[str]:
    """The command line of `msllm ARGS` in a fresh interpreter, after running `python_code` (e.g. a
    patch) when given: the one way the tests start `msllm` in another process."""
    prelude = (python_code or "") + "\nimport sys\nfrom msllm.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return [sys.executable, "-c", prelude, *map(str, args)]


def msllm(*args, env: dict | None = None, timeout: float = 300, python_code: str | None = None,
          cwd: Path | None = None, **run) -> subprocess.CompletedProcess:
    """`msllm ARGS` in one fresh process, run to its end (stdout and stderr captured as text)."""
    return subprocess.run(msllm_command(*args, python_code=python_code), env=env or clean_env(), capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, **run)


def start_msllm(*args, python_code: str | None = None, env: dict | None = None) -> subprocess.Popen:
    """`msllm ARGS` started in the background, its stdout and stderr as text pipes (read the
    progress lines with `wait_for_line`)."""
    return subprocess.Popen(msllm_command(*args, python_code=python_code), env=env or clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_line(proc: subprocess.Popen, text: str) -> str:
    """Read `proc`'s stdout up to the first line that holds `text` and return it; fail with the end
    of its stderr if it ends first."""
    for line in proc.stdout:
        if text in line:
            return line
    raise AssertionError(f"the process ended (exit {proc.wait()}) before printing {text!r}:\n{proc.stderr.read()[-3000:]}")


def wait_for_a_signal_before_step(step: int) -> str:
    """Python code for `python_code=`: just before optimizer step `step` the training prints
    `WAITING FOR A SIGNAL BEFORE STEP <step>` and waits (up to 120 s) until a stop signal has
    reached it. A test that signals once it reads that line knows the run stops after exactly
    that step, however slowly the machine runs."""
    return f"""
import time
import msllm.train.schedule as _schedule
_plan_of_step = _schedule.Schedule.at
def _wait_then_plan(self, step):
    if step == {step}:
        print("WAITING FOR A SIGNAL BEFORE STEP {step}", flush=True)
        deadline = time.monotonic() + 120
        while self.signals.received is None and time.monotonic() < deadline:
            time.sleep(0.01)
    return _plan_of_step(self, step)
_schedule.Schedule.at = _wait_then_plan
"""


def msllm_torchrun(nproc: int, *args, timeout: float = 400, cwd: Path | None = None,
                   env: dict | None = None) -> subprocess.CompletedProcess:
    """`msllm ARGS` on `nproc` gloo ranks under torchrun (`torchrun_command` starts them in the
    background)."""
    return torchrun(nproc, "-m", "msllm.cli", *args, timeout=timeout, cwd=cwd, env=env)


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT\n{proc.stdout[-4000:]}\nSTDERR\n{proc.stderr[-4000:]}"
    return proc


def rows(output_dir: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def losses(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(output_dir)}


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("msllm ")]


def recipe_paths(tmp: Path, name: str = "recipe.yaml") -> tuple[Path, Path]:
    """(recipe path, output_dir) of the recipe `make_recipe(tmp, ..., name)` writes."""
    return tmp / name, tmp / (Path(name).stem + "_run")


def make_recipe(tmp: Path, tiny_data, name: str = "recipe.yaml", **sections) -> tuple[Path, Path]:
    """Write a tiny recipe (sections merged into the base one) -> (recipe path, output_dir)."""
    corpus, shards = tiny_data
    path, out = recipe_paths(tmp, name)
    recipe = base_recipe(shards, corpus, out)
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return write_recipe(path, recipe), out
