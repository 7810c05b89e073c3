"""Shared pieces of the trainer tests (tests/test_train*.py, test_export.py, test_generate.py).

A tiny corpus, a recipe writer, and runners for `msllm` in a subprocess (one process, or several
gloo ranks through tests/launch.py's torchrun). Their fixtures (the tiny shards, one reference
run) are in conftest.py. Nothing is tested here.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import yaml
from launch import clean_env, torchrun


_NOUNS = "cat dog bird river mountain city king queen child teacher ship road garden house forest storm".split()
_VERBS = "sees finds builds crosses follows paints carries remembers watches opens".split()
_ADJS = "old small bright quiet green distant heavy gentle ancient red".split()


def corpus_text(documents: int = 300, seed: int = 0) -> str:
    """Short documents of simple sentences, separated by blank lines (about 67 KB)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(documents):
        sentences = [
            f"The {rng.choice(_ADJS)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the {rng.choice(_ADJS)} {rng.choice(_NOUNS)}."
            for _ in range(rng.randint(3, 8))
        ]
        docs.append(" ".join(sentences))
    return "\n\n".join(docs) + "\n"


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


def msllm(*args, env: dict | None = None, timeout: float = 300, python_code: str | None = None,
          cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`msllm ARGS` in one fresh process (optionally after running `python_code`, e.g. a patch)."""
    prelude = (python_code or "") + "\nimport sys\nfrom msllm.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    command = [sys.executable, "-c", prelude, *map(str, args)]
    return subprocess.run(command, env=env or clean_env(), capture_output=True, text=True, timeout=timeout, cwd=cwd)


def msllm_torchrun(nproc: int, *args, timeout: float = 400, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`msllm ARGS` on `nproc` gloo ranks under torchrun."""
    return torchrun(nproc, "-m", "msllm.cli", *args, timeout=timeout, cwd=cwd)


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT\n{proc.stdout[-4000:]}\nSTDERR\n{proc.stderr[-4000:]}"
    return proc


def rows(output_dir: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def losses(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(output_dir)}


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("msllm ")]


def make_recipe(tmp: Path, tiny_data, name: str = "recipe.yaml", **sections) -> tuple[Path, Path]:
    """Write a tiny recipe (sections merged into the base one) -> (recipe path, output_dir)."""
    corpus, shards = tiny_data
    out = tmp / (Path(name).stem + "_run")
    recipe = base_recipe(shards, corpus, out)
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return write_recipe(tmp / name, recipe), out
