"""Issue 32 (third round), item 4: what streaming's background threads find after the first shard
(a later shard that fails its hash, a data.cache_dir that fills up) is one line naming the shard
or the folder and the fix, instead of "RuntimeError: Background thread failed" and two tracebacks;
the run's checkpoints stay."""

from __future__ import annotations

import subprocess

import pytest

from fixtures.reliability import assert_kept, checkpoints, flip_bytes, one_line_error, tree_digest
from fixtures.train import check, make_recipe, msllm


def _run_on_small_shards(tmp_path, tiny_data):
    """(recipe, output_dir, shards) of a 2-step run (checkpoint at step 2) on shards of about 15
    samples each (37 train shards): the loader's threads copy the later ones into the cache."""
    from msllm.config import load_recipe
    from msllm.data import prepare_dataset

    shards = tmp_path / "shards"
    recipe, out = make_recipe(
        tmp_path,
        tiny_data,
        data={"shards_dir": str(shards), "shard_size_limit": 4096},
        train={"max_steps": 2},
        checkpoint={"every": 2},
        eval={"every": 0, "max_batches": 1},
    )
    prepare_dataset(load_recipe(recipe).data)
    check(msllm("train", recipe))
    assert checkpoints(out) == ["step_0000002"]
    return recipe, out, shards


@pytest.mark.slow
def test_a_later_shard_that_fails_its_hash_is_one_line(tmp_path, tiny_data):
    """Probe class: a flipped byte in a later training shard (found by streaming's download thread)."""
    recipe, out, shards = _run_on_small_shards(tmp_path, tiny_data)
    bad = shards / "train" / "part-00000" / "shard.00030.mds.zstd"
    flip_bytes(bad, count=1)
    before = tree_digest(out / "checkpoints")
    line = one_line_error(msllm("train", recipe, "--set", "train.max_steps=6"), "train")
    assert f"shard {bad} fails its hash check (corrupt or changed): run `msllm prep RECIPE --force`" in line, line
    assert_kept(before, out / "checkpoints")  # what a rerun resumes from


@pytest.mark.slow
@pytest.mark.needs_root("mounts a 64 KiB tmpfs as data.cache_dir")
def test_a_full_cache_dir_is_one_line(tmp_path, tiny_data):
    """Probe class: data.cache_dir on a 64 KiB tmpfs, filled by the shards the loader's thread copies."""
    recipe, out, _ = _run_on_small_shards(tmp_path, tiny_data)
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], check=True)
    try:
        before = tree_digest(out / "checkpoints")
        line = one_line_error(
            msllm("train", recipe, "--set", "train.max_steps=6", "--set", f"data.cache_dir={disk / 'cache'}"), "train"
        )
        assert f"data.cache_dir {disk / 'cache'} is full (No space left on device" in line, line
        assert "set data.cache_dir to a larger disk, then rerun the same command: training resumes" in line
        assert_kept(before, out / "checkpoints")  # what a rerun resumes from
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
