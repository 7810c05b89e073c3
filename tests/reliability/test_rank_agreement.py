"""Issue 32, item 3: ranks started with different recipes (another --set on one rank) stop at
start-up, all of them, with one line naming the keys that differ, instead of hanging in a
collective that the others never reach."""

from __future__ import annotations

import time

import pytest

from fixtures.launch import clean_env, torchrun
from fixtures.train import make_recipe

# torchrun starts this script on every rank; rank 1 adds the --set that the test passes it.
PER_RANK = """
import os, sys
from msllm.cli import main
args = sys.argv[1:]
if os.environ["RANK"] == "1":
    args += ["--set", os.environ["MSLLM_TEST_RANK1_SET"]]
sys.exit(main(args))
"""


@pytest.mark.parametrize(
    "override, shown",
    [
        ("train.max_steps=6", "train.max_steps 6 vs 12"),
        ("run.seed=2", "run.seed 2 vs 1"),
    ],
)
@pytest.mark.slow
def test_ranks_with_different_recipes_all_stop_with_one_line(tmp_path, tiny_data, override, shown):
    """Probe class: ranks that disagree (2 ranks under torchrun, rank 1 given another --set)."""
    recipe, out = make_recipe(tmp_path, tiny_data, eval={"every": 0, "max_batches": 1})
    script = tmp_path / "per_rank.py"
    script.write_text(PER_RANK)
    started = time.monotonic()
    proc = torchrun(2, script, "train", recipe, env=clean_env(MSLLM_TEST_RANK1_SET=override), timeout=180)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0, proc.stdout[-2000:]
    errors = {line for line in proc.stderr.splitlines() if line.startswith("msllm train: error: ")}
    assert len(errors) == 1, proc.stderr[-3000:]  # every rank that prints says the same line
    (line,) = errors
    assert "the ranks were started with different recipes (rank 1 vs rank 0: " + shown in line, line
    assert "same recipe file and the same --set overrides" in line
    # torchrun prints its own ChildFailedError traceback; none comes from msllm's code.
    assert not [line for line in proc.stderr.splitlines() if line.strip().startswith("File ") and "/msllm/" in line], (
        proc.stderr[-3000:]
    )
    assert elapsed < 120
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
