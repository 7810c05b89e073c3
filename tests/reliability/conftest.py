"""Fixtures of the reliability suite: one small trained run, shared by every case as a copy.

Each case breaks something (a file, a value, the disk, a signal) and asserts three things: the exit
code, the one-line message, and that nothing good was lost or overwritten.
"""

from __future__ import annotations

import shutil

import pytest

from train_helpers import check, make_recipe, msllm


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_data):
    """(recipe, output_dir) of a finished 6-step run with checkpoints at steps 3 and 6.
    Never write into it: use `run_copy`."""
    tmp = tmp_path_factory.getbasetemp() / "reliability_trained"
    tmp.mkdir(exist_ok=True)
    recipe, out = make_recipe(
        tmp, tiny_data, train={"max_steps": 6}, eval={"every": 0, "max_batches": 2}, checkpoint={"every": 3, "keep_last": 2}
    )
    if not (out / "checkpoints" / "step_0000006" / "COMPLETE").is_file():
        check(msllm("train", recipe))
    return recipe, out


@pytest.fixture
def run_copy(tmp_path, trained_run, tiny_data):
    """(recipe, output_dir) of a private copy of `trained_run`, free to break."""
    _, out = trained_run
    recipe, copy = make_recipe(
        tmp_path, tiny_data, train={"max_steps": 6}, eval={"every": 0, "max_batches": 2}, checkpoint={"every": 3, "keep_last": 2}
    )
    shutil.copytree(out, copy)
    return recipe, copy
