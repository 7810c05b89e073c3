"""Fixtures of the reliability suite: one small trained run, shared by every case as a copy.

Each case breaks something (a file, a value, the disk, a signal) and asserts three things: the exit
code, the one-line message, and that nothing good was lost or overwritten.
"""

from __future__ import annotations

import shutil

import pytest

from fixtures.train import check, make_recipe, msllm, recipe_paths

# The recipe sections of the shared trained run (and of each copy of it).
TRAINED = dict(train={"max_steps": 6}, eval={"every": 0, "max_batches": 2}, checkpoint={"every": 3, "keep_last": 2})


@pytest.fixture(scope="session")
def trained_run(made_once, tiny_data):
    """(recipe, output_dir) of a finished 6-step run with checkpoints at steps 3 and 6, made once
    per test run. Never write into it: use `run_copy`."""

    def make(tmp):
        recipe, _ = make_recipe(tmp, tiny_data, **TRAINED)
        check(msllm("train", recipe))

    return recipe_paths(made_once("reliability_trained", make))


@pytest.fixture
def run_copy(tmp_path, trained_run, tiny_data):
    """(recipe, output_dir) of a private copy of `trained_run`, free to break."""
    _, out = trained_run
    recipe, copy = make_recipe(tmp_path, tiny_data, **TRAINED)
    shutil.copytree(out, copy)
    return recipe, copy


@pytest.fixture(scope="session")
def zero1_run(made_once, tiny_data):
    """(recipe, output_dir) of a finished 2-step ZeRO-1 run (its checkpoint is DeepSpeed's sharded
    one, read through zero_to_fp32), made once per test run. Never write into it."""

    def make(tmp):
        recipe, _ = make_recipe(
            tmp,
            tiny_data,
            parallel={"zero_stage": 1},
            train={"max_steps": 2},
            eval={"every": 0, "max_batches": 1},
            checkpoint={"every": 2, "keep_last": 1},
        )
        check(msllm("train", recipe))

    return recipe_paths(made_once("reliability_zero1", make))
