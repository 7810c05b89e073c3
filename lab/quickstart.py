"""`python -m lab train-quickstart`: the two quickstart recipes end to end, the one source of the
README's quickstart figures.

Each recipe runs as `msllm train` in a fresh process with a fresh output_dir and a fresh shards
folder (so that data preparation is part of every run; DeepSpeed's one-time compile of its CPU op
is not: delete ~/.cache/torch_extensions first to include it). Each line the run prints is
timed as it arrives (msllm line-buffers its output), which splits the wall time into: data
preparation, start-up until the first step ("ready in"), the training loop (the trainer's own
step times), evaluation, and the rest (checkpoints, the final eval's bookkeeping). Reported with
the load average before and after: on a machine shared with other work every figure stretches.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab import REPO

RECIPES = ("recipes/quickstart.yaml", "recipes/quickstart-vanilla.yaml")  # relative to the repository


def run_quickstart(recipe: str, folder: Path, overrides: tuple[str, ...] = (), root: Path = REPO) -> dict:
    """One run of `recipe` (a path relative to `root`, the repository; with `--set` overrides) in
    `folder` (output_dir and shards there): its phases and results."""
    cmd = [
        sys.executable,
        "-m",
        "msllm.cli",
        "train",
        str(root / recipe),
        "--set",
        f"run.output_dir={folder / 'run'}",
        "--set",
        f"data.shards_dir={folder / 'shards'}",
        *[x for o in overrides for x in ("--set", o)],
    ]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    arrived: list[tuple[float, str]] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            arrived.append((time.perf_counter() - t0, line.rstrip("\n")))
        stderr = proc.stderr.read()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{recipe} failed: {(stderr.strip().splitlines() or ['?'])[-1]}")

    def at(pattern: str) -> float:
        return next(t for t, line in arrived if re.search(pattern, line))

    rows = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    start_line = next(line for _, line in arrived if line.startswith("training "))
    params = start_line.split(":")[1].split("parameters")[0].strip()
    minutes_part, seconds_part = re.search(r"ready in (?:(\d+)m)?(\d+)s", start_line).groups()
    ready = 60 * int(minutes_part or 0) + int(seconds_part)
    step_time = sum(r["step_time_s"] * (r["step"] - p["step"]) for p, r in zip([{"step": 0}] + train, train))
    eval_time = sum(r["eval_time_s"] for r in evals)
    return {
        "recipe": recipe,
        "params": params,
        "steps": train[-1]["step"],
        "tokens": train[-1]["tokens"],
        "wall_s": wall,
        "prep_s": at(r"^msllm prep: wrote") - at(r"^preparing shards"),
        "ready_s": ready,
        "train_s": step_time,
        "eval_s": eval_time,
        "other_s": wall - ready - step_time - eval_time,
        "tokens_per_s": train[-1]["tokens"] / step_time if step_time else float("nan"),
        "eval_loss": evals[-1]["loss"],
        "bits_per_byte": evals[-1]["bits_per_byte"],
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(round(seconds % 60)):02d}"


def to_markdown(results: list[dict]) -> str:
    lines = [
        "Each recipe in a fresh process, output_dir and shards folder (data preparation included; DeepSpeed's "
        "one-time compile of its CPU op was cached). Phases: data prep (tokenizer and shards); ready = from the "
        "command's start to the first step (prep, DeepSpeed, model, loader); training loop = the trainer's step "
        "times; eval = every evaluation; other = checkpoints and the rest.",
        "",
        "| recipe | parameters | steps | tokens | whole command | data prep | ready | training loop | eval | other "
        "| training tokens/s | val loss | val bits/byte | load average before / after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['recipe']} | {r['params']} | {r['steps']} | {r['tokens']:,} | {minutes(r['wall_s'])} "
            f"| {r['prep_s']:.0f} s "
            f"| {r['ready_s']:.0f} s | {minutes(r['train_s'])} | {r['eval_s']:.0f} s | {r['other_s']:.0f} s "
            f"| {r['tokens_per_s']:,.0f} | {r['eval_loss']:.4f} | {r['bits_per_byte']:.4f} "
            f"| {r['load_before']:.1f} / {r['load_after']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def bench_quickstart(args) -> str:
    """Both quickstart recipes, one after the other, each in a temporary folder."""
    results = []
    for recipe in RECIPES:
        with tempfile.TemporaryDirectory(prefix="msllm-quickstart-") as tmp:
            results.append(run_quickstart(recipe, Path(tmp)))
            print(results[-1], flush=True)
    return to_markdown(results)
