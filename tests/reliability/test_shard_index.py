"""Issue 19, item 2: a shards index cannot make training read or write files outside its split.

mosaicml-streaming joins each shard's `raw_data.basename` and `zip_data.basename` to the shards
folder (to read) and to the job's cache (to write) as they are. An index.json with an absolute
path made training write the decompressed shard there; one naming an existing file read it as a
shard. Every index is now checked before streaming sees it: one line, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil

import pytest

from fixtures.reliability import cli, one_line, one_line_error, tree_digest
from fixtures.train import make_recipe, msllm


def _shards_with(tmp_path, tiny_data, split: str, key: str, name: str):
    """A copy of the tiny shards whose `split` index names shard 0's `key` file `name`."""
    shards = tmp_path / "shards"
    shutil.copytree(tiny_data[1], shards)
    index_file = shards / split / "index.json"
    index = json.loads(index_file.read_text())
    index["shards"][0][key]["basename"] = name
    index_file.write_text(json.dumps(index))
    return shards


@pytest.mark.slow
def test_absolute_raw_name_in_a_train_index_writes_nothing_there(tmp_path, tiny_data):
    """The issue's case: training used to write the 136 kB decompressed shard at that path, exit 0."""
    target = tmp_path / "elsewhere" / "written.mds"
    target.parent.mkdir()
    shards = _shards_with(tmp_path, tiny_data, "train", "raw_data", str(target))
    recipe, out = make_recipe(tmp_path, tiny_data)
    line = one_line_error(msllm("train", recipe, "--set", f"data.shards_dir={shards}"), "train")
    assert f"{shards / 'train' / 'index.json'}: shard 0 names its raw_data file '{target}'" in line
    assert "refused, nothing read or written" in line
    assert not target.exists() and list(target.parent.iterdir()) == []
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize(
    "key, name",
    [
        ("raw_data", "../escaped.mds"),
        ("zip_data", "part-00000/../../../x.zstd"),
        ("raw_data", ""),
        ("zip_data", "part-00000//shard.00000.mds.zstd"),
        ("raw_data", "part-00000\\shard.00000.mds"),
    ],
)
def test_names_that_leave_the_split_are_refused(tmp_path, tiny_data, trained_run, capsys, key, name):
    shards = _shards_with(tmp_path, tiny_data, "validation", key, name)
    before = tree_digest(tmp_path)
    recipe, run = trained_run
    code, _, err = cli(
        capsys,
        "eval",
        recipe,
        "--checkpoint",
        run,
        "--set",
        f"data.shards_dir={shards}",
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
    )
    line = one_line(code, err, "eval")
    assert f"{shards / 'validation' / 'index.json'}: shard 0 names its {key} file {name!r}" in line
    assert not (tmp_path / "escaped.mds").exists() and not (tmp_path / "x.zstd").exists()
    after = tree_digest(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("cache/")} == before


def test_an_existing_file_named_by_the_index_is_not_read(tmp_path, tiny_data, trained_run, capsys):
    """Named by an absolute path, a file outside the shards is refused before streaming opens it:
    no copy of it reaches the job's cache."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"private bytes " * 100)
    shards = _shards_with(tmp_path, tiny_data, "validation", "zip_data", str(secret))
    recipe, run = trained_run
    cache = tmp_path / "cache"
    code, _, err = cli(
        capsys,
        "eval",
        recipe,
        "--checkpoint",
        run,
        "--set",
        f"data.shards_dir={shards}",
        "--set",
        f"data.cache_dir={cache}",
    )
    assert f"names its zip_data file '{secret}'" in one_line(code, err, "eval")
    assert not [p for p in cache.rglob("*") if p.is_file() and b"private bytes" in p.read_bytes()]


def test_a_sub_folder_name_that_is_not_there_is_one_line(tmp_path, tiny_data, trained_run, capsys):
    """`a/b` stays inside the split (msllm's own merged indexes name `part-00000/shard...`), so it is
    not refused as a path; the file is missing, which is one line naming it."""
    shards = _shards_with(tmp_path, tiny_data, "validation", "zip_data", "a/b")
    recipe, run = trained_run
    code, _, err = cli(capsys, "eval", recipe, "--checkpoint", run, "--set", f"data.shards_dir={shards}")
    assert f"No such file or directory: {shards / 'validation' / 'a' / 'b'}" in one_line(code, err, "eval")
