"""`msllm bench train-quickstart`: run the two quickstart recipes end to end and report their figures.

Each recipe runs as `msllm train` in a fresh process with a fresh output_dir (the shards are reused
if present: delete data/ first to include data preparation, and ~/.cache/torch_extensions to include
DeepSpeed's first-use compile). Reported: wall time of the whole command, training throughput, and
the final validation loss and bits per byte.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPES = ("recipes/quickstart.yaml", "recipes/quickstart-vanilla.yaml")


def run_quickstart(recipe: str, output_dir: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "msllm.cli", "train", recipe, "--set", f"run.output_dir={output_dir}"],
        capture_output=True, text=True,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise RuntimeError(f"{recipe} failed: {tail}")
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    params = next((line.split(":")[1].split("parameters")[0].strip() for line in proc.stdout.splitlines()
                   if line.startswith("training ")), "?")
    step_time = sum(r["step_time_s"] * (r["step"] - p["step"]) for p, r in zip([{"step": 0}] + train, train))
    return {
        "recipe": recipe,
        "params": params,
        "steps": train[-1]["step"],
        "tokens": train[-1]["tokens"],
        "wall_s": wall,
        "train_s": step_time,
        "tokens_per_s": train[-1]["tokens"] / step_time if step_time else float("nan"),
        "final_train_loss": train[-1]["loss"],
        "eval_loss": evals[-1]["loss"],
        "bits_per_byte": evals[-1]["bits_per_byte"],
    }


def bench_quickstart(args) -> str:
    """Both quickstart recipes, one after the other, in a temporary folder: the markdown table."""
    lines = [
        "| recipe | parameters | steps | tokens | wall time (whole command) | training time | tokens/s | val loss | val bits/byte |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="msllm-quickstart-") as tmp:
        for recipe in RECIPES:
            r = run_quickstart(recipe, Path(tmp) / Path(recipe).stem)
            lines.append(
                f"| {r['recipe']} | {r['params']} | {r['steps']} | {r['tokens']:,} | {r['wall_s']:.0f} s | "
                f"{r['train_s']:.0f} s | {r['tokens_per_s']:,.0f} | {r['eval_loss']:.4f} | {r['bits_per_byte']:.4f} |"
            )
    return "\n".join(lines) + "\n"
