"""`python -m lab train-quickstart`: one quickstart-like run, its wall time split into phases."""

from __future__ import annotations

import pytest

from lab.quickstart import run_quickstart, to_markdown


@pytest.mark.slow
def test_the_quickstart_experiment_splits_the_wall_time_into_phases(tmp_path):
    r = run_quickstart(
        "recipes/models/vanilla-tiny.yaml",
        tmp_path,
        ("train.max_steps=4", "eval.every=2", "eval.max_batches=1", "checkpoint.every=0", "log.every=2"),
    )
    assert r["steps"] == 4 and r["tokens"] == 4 * 8 * 256
    assert 0 < r["prep_s"] < r["ready_s"] < r["wall_s"] and r["train_s"] > 0 and r["eval_s"] > 0
    assert abs(r["ready_s"] + r["train_s"] + r["eval_s"] + r["other_s"] - r["wall_s"]) < 1e-6
    assert (tmp_path / "shards" / "manifest.json").is_file()  # prepared afresh, not shared
    row = to_markdown([r]).splitlines()[-1]
    assert row.startswith("| recipes/models/vanilla-tiny.yaml |") and f"| {r['bits_per_byte']:.4f} |" in row
