"""Shards that move (copied elsewhere, corpus gone), and a prep that is killed and rerun."""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from fixtures.data import make_documents, text_config, write_text_files
from fixtures.train import msllm, start_msllm, wait_for_line
from msllm.config import TokenizerConfig
from msllm.data import build_dataloader, prepare_dataset, read_manifest


def _samples(cfg) -> np.ndarray:
    """Every train sample, unshuffled, as rows of seq_len+1 tokens."""
    loader = build_dataloader(cfg, "train", batch_size=1, seed=0, shuffle=False, repeat=False)
    return np.stack([np.concatenate([b["input_ids"][0].numpy(), b["labels"][0, -1:].numpy()]) for b in loader])


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_moved_shards_and_corpus_are_up_to_date_and_the_corpus_may_be_absent(data_small_corpus, tmp_path, capsys):
    cfg, _ = data_small_corpus
    original = Path(cfg.shards_dir)
    before = _tree(original)

    # Another machine: the shards and the corpus copied to other paths, the recipe pointing there.
    shutil.copytree(original, tmp_path / "elsewhere" / "shards")
    shutil.copytree(Path(cfg.paths[0]).parent, tmp_path / "elsewhere" / "corpus")
    moved = dataclasses.replace(
        cfg, shards_dir=str(tmp_path / "elsewhere" / "shards"), paths=[str(tmp_path / "elsewhere" / "corpus" / "*.txt")]
    )
    copied_tree = _tree(Path(moved.shards_dir))
    assert prepare_dataset(moved) == read_manifest(original)
    assert "is up to date" in capsys.readouterr().out
    assert _tree(Path(moved.shards_dir)) == copied_tree  # nothing rewritten

    # A changed corpus file is noticed by its content, wherever it is.
    changed = tmp_path / "elsewhere" / "corpus" / "doc0000.txt"
    changed.write_text(changed.read_text() + " One more sentence.", encoding="utf-8")
    with pytest.raises(Exception, match=r"input files \(their contents differ\).*--force"):
        prepare_dataset(moved)

    # The corpus gone: the shards are used as they are, and read the same as the originals.
    shutil.rmtree(tmp_path / "elsewhere" / "corpus")
    assert prepare_dataset(moved) == read_manifest(original)
    assert "the corpus is not here" in capsys.readouterr().out
    np.testing.assert_array_equal(_samples(moved), _samples(cfg))
    assert _tree(Path(moved.shards_dir)) == copied_tree  # reading wrote nothing into shards_dir
    assert _tree(original) == before


# Once progress.json records 3 parts done, the first tokens of part 3 are added and the prep
# prints a line and sleeps: a kill that follows lands in the middle of a part, at a known one.
_PAUSE_IN_PART_3 = """
import time
import msllm.data.prepare.write as write
_write_json, _add = write.write_json, write.WindowWriter.add
def write_json(path, value):
    _write_json(path, value)
    write.in_part_3 = path.name == write.PROGRESS_FILENAME and value.get("parts_done") == 3
def add(self, tokens, documents, text_bytes):
    _add(self, tokens, documents, text_bytes)
    if getattr(write, "in_part_3", False):
        print("PAUSED IN PART 3", flush=True)
        time.sleep(600)
write.write_json, write.WindowWriter.add = write_json, add
"""


@pytest.mark.slow
def test_killed_prep_continues_where_it_stopped_and_gives_the_same_shards(tmp_path, data_small_corpus):
    small_cfg, _ = data_small_corpus
    documents = make_documents(1500, seed=21, words=400)
    write_text_files(tmp_path / "corpus", documents)
    tokenizer = tmp_path / "given.model"  # a given tokenizer: the run is all tokenize + write
    shutil.copyfile(Path(small_cfg.shards_dir) / "tokenizer.model", tokenizer)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model:\n  arch: vanilla\n"
        "data:\n  source: text\n"
        f"  paths: ['{tmp_path}/corpus/*.txt']\n  shards_dir: {tmp_path}/shards\n  seq_len: 64\n"
        "  workers: 2\n  validation_fraction: 0.1\n  prep_checkpoint_bytes: 40000\n"
        f"  tokenizer:\n    model: {tokenizer}\n"
    )
    progress = tmp_path / ".shards.partial" / "progress.json"
    run = start_msllm("prep", recipe, python_code=_PAUSE_IN_PART_3)
    try:
        wait_for_line(run, "PAUSED IN PART 3")
    finally:
        run.send_signal(signal.SIGKILL)  # for real: no cleanup runs
        _, stderr = run.communicate()
    assert run.returncode == -signal.SIGKILL, stderr
    assert "<" in stderr and "B/s" in stderr  # the progress bar shows the time left and the rate
    assert not (tmp_path / "shards").exists()
    assert json.loads(progress.read_text())["parts_done"] == 3
    kept = _tree(tmp_path / ".shards.partial" / "train" / "part-00000")

    rerun = msllm("prep", recipe, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "continuing the interrupted run" in rerun.stdout
    assert _tree(tmp_path / "shards" / "train" / "part-00000") == kept  # finished parts were not redone
    assert not (tmp_path / ".shards.partial").exists()

    # The same samples as one uninterrupted prep (1 worker, one part: the layout does not matter).
    whole = text_config(
        tmp_path / "corpus",
        tmp_path / "whole",
        seq_len=64,
        workers=1,
        prep_checkpoint_bytes=1 << 40,
        tokenizer=TokenizerConfig(model=str(tokenizer)),
    )
    expected = prepare_dataset(whole, quiet=True)
    resumed = read_manifest(tmp_path / "shards")
    assert resumed["splits"] == expected["splits"] and resumed["fingerprint"] == expected["fingerprint"]
    resumed_cfg = dataclasses.replace(whole, shards_dir=str(tmp_path / "shards"))
    np.testing.assert_array_equal(_samples(resumed_cfg), _samples(whole))
