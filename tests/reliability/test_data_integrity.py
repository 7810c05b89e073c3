"""Issue 12, items 6, 10, 11 and 12: shards are checked against prep's hashes, a manifest that was
edited fails before the first step, eval checks the tokenizer, and messages name real commands."""

from __future__ import annotations

import json
import shutil

import pytest

from fixtures.reliability import cli, flip_bytes, one_line, one_line_error, tree_digest
from fixtures.train import base_recipe, check, corpus_text, losses, make_recipe, msllm, write_recipe


def _shards_copy(tmp_path, tiny_data):
    _, shards = tiny_data
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    return copy


def test_corrupt_decompressed_copy_beside_the_shards_is_never_read(tmp_path, tiny_data, trained_run):
    """What older versions read unchecked: a decompressed copy next to the .zstd, corrupted. Each
    job now decompresses into its own cache from the hash-checked .zstd, so it trains exactly as
    on clean shards and leaves the stray file alone."""
    import zstandard

    shards = _shards_copy(tmp_path, tiny_data)
    raw = shards / "train" / "part-00000" / "shard.00000.mds"
    raw.write_bytes(
        zstandard.ZstdDecompressor().decompress((shards / "train" / "part-00000" / "shard.00000.mds.zstd").read_bytes())
    )
    flip_bytes(raw, 256)
    stray = raw.read_bytes()
    recipe, out = make_recipe(
        tmp_path,
        tiny_data,
        train={"max_steps": 6},
        eval={"every": 0, "max_batches": 2},
        checkpoint={"every": 3, "keep_last": 2},
    )
    check(msllm("train", recipe, "--set", f"data.shards_dir={shards}"))
    assert losses(out) == losses(trained_run[1])
    assert raw.read_bytes() == stray


def test_corrupt_compressed_shard_is_one_line(tmp_path, tiny_data):
    shards = _shards_copy(tmp_path, tiny_data)
    flip_bytes(shards / "train" / "part-00000" / "shard.00000.mds.zstd", 16)
    recipe, out = make_recipe(tmp_path, tiny_data)
    line = one_line_error(msllm("train", recipe, "--set", f"data.shards_dir={shards}"), "train")
    assert "shard.00000.mds.zstd" in line and "hash" in line and "msllm prep RECIPE --force" in line
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize("edit", ["splits removed", "zero-byte validation split", "no validation split"])
def test_edited_manifest_fails_before_the_first_step(tmp_path, tiny_data, edit):
    shards = _shards_copy(tmp_path, tiny_data)
    manifest = json.loads((shards / "manifest.json").read_text())
    if edit == "splits removed":
        del manifest["splits"]
    elif edit == "zero-byte validation split":
        manifest["splits"]["validation"]["bytes"] = 0
    else:
        del manifest["splits"]["validation"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    recipe, out = make_recipe(tmp_path, tiny_data)
    line = one_line_error(msllm("train", recipe, "--set", f"data.shards_dir={shards}"), "train")
    assert "manifest.json" in line and "msllm prep RECIPE --force" in line
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_eval_refuses_shards_of_another_tokenizer(tmp_path, tiny_data, trained_run, capsys):
    from msllm.config import from_dict
    from msllm.data import prepare_dataset

    corpus = tmp_path / "other.txt"
    corpus.write_text(corpus_text(seed=7))
    raw = base_recipe(tmp_path / "other_shards", corpus, tmp_path / "unused")
    prepare_dataset(from_dict(raw).data, quiet=True)  # same vocab size, another tokenizer
    recipe = write_recipe(tmp_path / "other.yaml", raw)
    code, _, err = cli(capsys, "eval", recipe, "--checkpoint", trained_run[1])
    assert "was trained with tokenizer sha256" in one_line(code, err, "eval")


def test_train_into_a_foreign_shards_dir_names_msllm_prep(tmp_path, tiny_data):
    junk = tmp_path / "shards"
    junk.mkdir()
    (junk / "notes.txt").write_text("not shards\n")
    recipe, _ = make_recipe(tmp_path, tiny_data)
    line = one_line_error(msllm("train", recipe, "--set", f"data.shards_dir={junk}"), "train")
    assert "holds files that msllm did not put there (notes.txt)" in line and "run `msllm prep RECIPE`" in line
    assert "--force" not in line  # issue 32: --force never replaces a folder msllm did not write
    assert tree_digest(junk) == {"notes.txt": tree_digest(junk)["notes.txt"]}
