"""`msllm bench startup`: what the commands that use a trained model cost beyond their own work.

A tiny vanilla run (recipes/models/vanilla-tiny.yaml, 4 steps) is trained once into a temporary
folder; then, in ROUNDS rounds, each command runs in a fresh process, alternating with the
baseline `python -c "import torch, msllm"` (a shared CPU's speed drifts, more than what is
measured): `msllm eval`, `generate` (4 new tokens), `export`, `inspect --no-measure`, and `train`
of the finished run ("nothing to do"). The table gives the median wall time of each, the baseline's,
and their ratio; the commands' own work here is a fraction of a second (a 2-batch evaluation, four
tokens, a small safetensors file). None of them imports DeepSpeed or measures a matmul peak
(tests/unit/test_startup.py checks that).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from msllm.bench import shipped_recipe

ROUNDS = 5
RECIPE = "models/vanilla-tiny.yaml"  # under the recipes folder (--recipes)


def _timed(command: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - start


def commands(recipe: str, run: Path, out: Path) -> dict[str, list[str]]:
    msllm = [sys.executable, "-m", "msllm.cli"]
    settings = [
        "--set",
        f"run.output_dir={run}",
        "--set",
        "train.max_steps=4",
        "--set",
        "eval.max_batches=2",
        "--set",
        "checkpoint.every=0",
        "--set",
        "log.tensorboard=false",
    ]
    return {
        "python -c 'import torch, msllm'": [sys.executable, "-c", "import torch, msllm"],
        "msllm eval": [*msllm, "eval", recipe, *settings, "--checkpoint", str(run)],
        "msllm generate": [*msllm, "generate", str(run), "--prompt", "The", "--max-new-tokens", "4", "--seed", "0"],
        "msllm export": [*msllm, "export", str(run), "--out", str(out), "--force"],
        "msllm inspect --no-measure": [*msllm, "inspect", recipe, "--no-measure"],
        "msllm train (nothing to do)": [*msllm, "train", recipe, *settings],
    }


def measure(recipe: str | None = None, rounds: int = ROUNDS) -> dict[str, list[float]]:
    recipe = recipe or shipped_recipe(RECIPE)
    with tempfile.TemporaryDirectory(prefix="msllm-startup-") as tmp:
        run, out = Path(tmp) / "run", Path(tmp) / "export"
        todo = commands(recipe, run, out)
        _timed(todo["msllm train (nothing to do)"])  # trains the 4 steps once
        times: dict[str, list[float]] = {name: [] for name in todo}
        for _ in range(rounds):
            for name, command in todo.items():
                if name != "python -c 'import torch, msllm'":
                    times["python -c 'import torch, msllm'"].append(_timed(todo["python -c 'import torch, msllm'"]))
                times[name].append(_timed(command))
    return times


def to_markdown(times: dict[str, list[float]]) -> str:
    baseline_name = "python -c 'import torch, msllm'"
    baseline = statistics.median(times[baseline_name])
    lines = [
        f"Median wall time of {len(times['msllm eval'])} runs each, every command in a fresh process, alternating "
        f"with the baseline (`{baseline_name}`, {len(times[baseline_name])} runs); a tiny vanilla run "
        f"(recipes/{RECIPE}, 4 steps). Target (issue 21): at most 1.5x the baseline plus the command's own work.",
        "",
        "| command | median s | min s | max s | vs baseline |",
        "|---|---|---|---|---|",
    ]
    for name, values in times.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median:.2f} | {min(values):.2f} | {max(values):.2f} | {median / baseline:.2f}x |")
    return "\n".join(lines)


def bench_startup(args) -> str:
    return to_markdown(measure())
