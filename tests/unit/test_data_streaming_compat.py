"""Shards across the two distributions of `streaming` (docs/dependencies.md): a shard folder that
mosaicml-streaming 0.13.0 wrote (tests/streaming_shards/, made by its make_shards.py) reads with
the installed one (streaming-community) sample for sample, in the same shuffled order, and resumes
from 0.13.0's resumption state at the same sample; the installed one writes the very same bytes
(so 0.13.0 reads what it writes); and msllm's loader reads the folder."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

HERE = Path(__file__).parent.parent / "streaming_shards"
WRITTEN_BY_0_13 = HERE / "mosaicml-streaming-0.13.0"


@pytest.fixture(scope="module")
def make_shards():
    spec = importlib.util.spec_from_file_location("make_shards", HERE / "make_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_fixture_is_in_msllms_shard_format(make_shards):
    from msllm.data.prepare.write import SHARD_COMPRESSION, SHARD_HASHES, TOKENS_COLUMN

    assert (make_shards.COLUMNS, make_shards.COMPRESSION, make_shards.HASHES) == (
        TOKENS_COLUMN,
        SHARD_COMPRESSION,
        SHARD_HASHES,
    )
    reading = json.loads((WRITTEN_BY_0_13 / "reading.json").read_text())
    assert reading["written_by"] == "mosaicml-streaming 0.13.0"
    files = _files(WRITTEN_BY_0_13 / "shards")
    assert sum(map(len, files.values())) < 20_000 and len(files) >= 8  # tiny, several shards per part
    index = json.loads(files["index.json"])
    assert index["version"] == 2 and {s["raw_data"]["basename"].split("/")[0] for s in index["shards"]} == {
        "part-00000",
        "part-00001",
    }


def test_shards_written_by_0_13_read_with_the_installed_streaming_in_the_same_order(make_shards, tmp_path):
    """Every sample (hashes checked), the shuffled order of an epoch with num_canonical_nodes set
    (the order msllm resumes on any number of ranks), the resumption state, and the samples read
    after resuming from 0.13.0's state: all as 0.13.0 read them."""
    shutil.copytree(WRITTEN_BY_0_13 / "shards", tmp_path / "shards")
    reading = json.loads((WRITTEN_BY_0_13 / "reading.json").read_text())
    order, state = make_shards.read(tmp_path / "shards")
    assert sorted(order) == list(range(make_shards.PARTS * make_shards.SAMPLES_PER_PART))
    assert order == reading["epoch_order"]
    assert state == reading["state"]
    assert set(state) == {"epoch", "sample_in_epoch", "num_canonical_nodes", "shuffle_seed", "initial_physical_nodes"}
    resumed, _ = make_shards.read(tmp_path / "shards", reading["state"])
    assert resumed == reading["resumed_order"] == order[make_shards.RESUME_AFTER :]


def test_the_installed_streaming_writes_what_0_13_wrote(make_shards, tmp_path):
    """Byte for byte (indexes, shards, hashes): what the installed streaming writes, 0.13.0 reads."""
    make_shards.write(tmp_path / "shards")
    assert _files(tmp_path / "shards") == _files(WRITTEN_BY_0_13 / "shards")


def test_msllms_loader_reads_shards_written_by_0_13(make_shards, tmp_path):
    import torch

    from msllm.config import DataConfig
    from msllm.data import build_dataloader

    shutil.copytree(WRITTEN_BY_0_13 / "shards", tmp_path / "train")
    cfg = DataConfig(
        source="shards", shards_dir=str(tmp_path), seq_len=make_shards.SAMPLE_LEN - 1, cache_dir=str(tmp_path / "cache")
    )
    batches = list(build_dataloader(cfg, "train", batch_size=4, seed=0, shuffle=False, repeat=False))
    rows = torch.cat([torch.cat([b["input_ids"], b["labels"][:, -1:]], dim=1) for b in batches])
    assert [row.tolist() for row in rows] == [make_shards.sample(i).tolist() for i in range(len(rows))]
    assert len(rows) == make_shards.PARTS * make_shards.SAMPLES_PER_PART
