"""Reading shards: batches, resume, sequence-parallel slices, compatibility, shard checks."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch
from streaming import MDSWriter, StreamingDataset

from fixtures.data import make_documents, write_text_files
from msllm.config import DataConfig, TokenizerConfig
from msllm.data import build_dataloader, check_shards, prepare_dataset, read_manifest
from msllm.errors import DataError


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels"))


def test_batches_are_shifted_windows_of_the_right_shape(data_small_corpus):
    cfg, _ = data_small_corpus
    loader = build_dataloader(cfg, "train", batch_size=4, seed=0)
    batch = next(iter(loader))
    assert set(batch) == {"input_ids", "labels", "sample_id"}
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 64)
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["sample_id"].dtype == torch.int64
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    # sample_id is the sample's index in the split: reading that index again gives the same window
    for row, index in enumerate(batch["sample_id"].tolist()):
        assert torch.equal(loader.dataset[index]["input_ids"], batch["input_ids"][row])


def test_shuffle_is_deterministic_from_the_seed(data_small_corpus):
    cfg, _ = data_small_corpus
    first = _take(iter(build_dataloader(cfg, "train", batch_size=4, seed=7)), 3)
    again = _take(iter(build_dataloader(cfg, "train", batch_size=4, seed=7)), 3)
    other = _take(iter(build_dataloader(cfg, "train", batch_size=4, seed=8)), 3)
    assert all(_same(a, b) for a, b in zip(first, again))
    assert not all(_same(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("stop_after", ["mid_epoch", "at_epoch_end", "next_epoch"])
def test_resume_gives_the_batch_the_uninterrupted_run_would_read(data_small_corpus, stop_after):
    cfg, _ = data_small_corpus
    reference = build_dataloader(cfg, "train", batch_size=8, seed=3)
    per_epoch = len(reference)
    k = {"mid_epoch": 5, "at_epoch_end": per_epoch, "next_epoch": per_epoch + 4}[stop_after]
    stream = iter(reference)
    _take(stream, k)
    state = reference.state_dict()
    expected = _take(stream, 3)  # batches k+1 .. k+3, crossing into the next epoch if it comes

    resumed = build_dataloader(cfg, "train", batch_size=8, seed=3)
    resumed.load_state_dict(state)
    got = _take(iter(resumed), 3)
    assert all(_same(a, b) for a, b in zip(expected, got))
    if stop_after == "next_epoch":
        assert state["epoch"] == 1 and resumed.epoch == 1


def test_train_loader_repeats_epochs_and_reshuffles(data_small_corpus):
    cfg, _ = data_small_corpus
    loader = build_dataloader(cfg, "train", batch_size=8, seed=0)
    per_epoch = len(loader)
    batches = _take(iter(loader), 2 * per_epoch + 1)
    assert loader.epoch == 2
    epoch0 = torch.cat([b["input_ids"] for b in batches[:per_epoch]])
    epoch1 = torch.cat([b["input_ids"] for b in batches[per_epoch : 2 * per_epoch]])
    assert not torch.equal(epoch0, epoch1)  # another order ...
    # ... of the same samples, up to the partial batch that each epoch drops.
    rows0, rows1 = set(map(tuple, epoch0.tolist())), set(map(tuple, epoch1.tolist()))
    assert len(rows0) == len(rows1) == per_epoch * 8 and len(rows0 & rows1) >= len(rows0) - 8


def test_validation_loader_reads_the_whole_split_in_order(data_small_corpus):
    cfg, _ = data_small_corpus
    samples = read_manifest(cfg.shards_dir)["splits"]["validation"]["samples"]
    loader = build_dataloader(cfg, "validation", batch_size=8, seed=123)
    batches = list(loader)
    assert sum(len(b["input_ids"]) for b in batches) == samples
    again = list(build_dataloader(cfg, "validation", batch_size=8, seed=999))
    assert all(_same(a, b) for a, b in zip(batches, again))


def test_sequence_parallel_slices_are_complementary(data_small_corpus):
    cfg, _ = data_small_corpus
    whole = next(iter(build_dataloader(cfg, "validation", batch_size=4, seed=0)))
    parts = [
        next(iter(build_dataloader(cfg, "validation", batch_size=4, seed=0, sp_size=4, sp_rank=r))) for r in range(4)
    ]
    assert all(p["input_ids"].shape == (4, 16) for p in parts)
    for key in ("input_ids", "labels"):
        assert torch.equal(torch.cat([p[key] for p in parts], dim=1), whole[key])


def test_shards_are_plain_mds_that_streaming_reads_without_msllm(data_small_corpus):
    cfg, _ = data_small_corpus
    plain = StreamingDataset(local=f"{cfg.shards_dir}/validation", shuffle=False, batch_size=1)
    sample = plain[0]["tokens"]
    assert isinstance(sample, np.ndarray) and sample.dtype == np.int32 and sample.shape == (65,)
    ours = next(iter(build_dataloader(cfg, "validation", batch_size=1, seed=0)))
    assert ours["input_ids"][0].tolist() == sample[:-1].tolist()
    assert ours["labels"][0].tolist() == sample[1:].tolist()


@pytest.mark.parametrize("encoding", ["ndarray:int32", "bytes-int64", "bytes-int32"])
def test_reads_shards_written_in_llm_foundry_schema(tmp_path, encoding):
    """LLM Foundry's convert_dataset scripts: {'tokens': 'ndarray:int32'}; older ones int64 bytes."""
    rng = np.random.default_rng(0)
    written = {}
    for split in ("train", "val"):  # LLM Foundry names the held-out split `val`
        column = "ndarray:int32" if encoding == "ndarray:int32" else "bytes"
        dtype = np.int64 if encoding == "bytes-int64" else np.int32
        rows = rng.integers(0, 5000, size=(12, 33)).astype(dtype)
        with MDSWriter(out=str(tmp_path / split), columns={"tokens": column}, compression="zstd") as out:
            for row in rows:
                out.write({"tokens": row if column != "bytes" else row.tobytes()})
        written[split] = rows
    cfg = DataConfig(source="shards", shards_dir=str(tmp_path), seq_len=32)
    for split, folder in (("train", "train"), ("validation", "val")):
        batches = list(build_dataloader(cfg, split, batch_size=4, seed=0, shuffle=False, repeat=False))
        got = torch.cat([torch.cat([b["input_ids"], b["labels"][:, -1:]], dim=1) for b in batches])
        assert got.tolist() == written[folder].tolist()
    with pytest.raises(DataError, match=r"data\.seq_len 16 needs"):
        build_dataloader(dataclasses.replace(cfg, seq_len=16), "train", batch_size=4, seed=0)


# ----------------------------------------------------------------------------------------------
# Shards that do not fit the recipe
# ----------------------------------------------------------------------------------------------


def test_check_shards_seq_len_differs(data_small_corpus):
    cfg, _ = data_small_corpus
    assert check_shards(cfg).manifest["seq_len"] == 64
    with pytest.raises(DataError) as e:
        check_shards(dataclasses.replace(cfg, seq_len=512))
    assert str(e.value) == (
        f"the shards in {cfg.shards_dir} hold samples for seq_len 64 but the recipe has data.seq_len 512: "
        "run `msllm prep RECIPE --force` to rebuild them, or set data.shards_dir elsewhere"
    )


def test_check_shards_tokenizer_differs(data_small_corpus, tmp_path):
    cfg, _ = data_small_corpus
    write_text_files(tmp_path / "text", make_documents(20, seed=9, words=60))
    other = DataConfig(
        source="text",
        paths=[str(tmp_path / "text" / "*.txt")],
        shards_dir=str(tmp_path / "o"),
        seq_len=32,
        workers=1,
        tokenizer=TokenizerConfig(vocab_size=360),
    )
    prepare_dataset(other, quiet=True)
    named = dataclasses.replace(cfg, tokenizer=TokenizerConfig(model=str(tmp_path / "o" / "tokenizer.model")))
    with pytest.raises(DataError, match=r"is not the tokenizer the shards in .* were written with .*--force"):
        check_shards(named)
    with pytest.raises(DataError, match=r"data.tokenizer.vocab_size 1000: run `msllm prep RECIPE --force`"):
        check_shards(dataclasses.replace(cfg, tokenizer=TokenizerConfig(vocab_size=1000)))
    with pytest.raises(DataError, match=r"model.vocab_size 100 is smaller than"):
        check_shards(cfg, vocab_size=100)

    copy = tmp_path / "copy"
    shutil.copytree(cfg.shards_dir, copy)
    shutil.copyfile(tmp_path / "o" / "tokenizer.model", copy / "tokenizer.model")
    with pytest.raises(DataError, match=r"differs from the tokenizer the shards were written with"):
        check_shards(dataclasses.replace(cfg, shards_dir=str(copy)))


def test_missing_shards(tmp_path):
    cfg = DataConfig(shards_dir=str(tmp_path / "none"), seq_len=64)
    with pytest.raises(DataError, match=r"^no shards at .*: run `msllm prep RECIPE` first$"):
        check_shards(cfg)
    with pytest.raises(DataError, match=r"^no shards at .*: run `msllm prep RECIPE` first$"):
        build_dataloader(cfg, "train", batch_size=2, seed=0)


def test_a_shard_whose_hash_fails(data_small_corpus, tmp_path):
    cfg, _ = data_small_corpus
    copy = tmp_path / "copy"
    shutil.copytree(cfg.shards_dir, copy)
    shard = next((copy / "train").glob("part-*/*.mds.zstd"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError) as e:
        build_dataloader(dataclasses.replace(cfg, shards_dir=str(copy)), "train", batch_size=2, seed=0)
    assert str(e.value) == (
        f"shard {shard} fails its hash check (corrupt or changed): "
        "run `msllm prep RECIPE --force` to rewrite the shards"
    )


def test_remote_shards_read_through_a_per_run_local_cache(data_small_corpus, tmp_path):
    """A URI shards_dir (file:// here; s3://, gs://... the same way) is copied into data.cache_dir."""
    cfg, _ = data_small_corpus
    remote = dataclasses.replace(cfg, shards_dir=f"file://{cfg.shards_dir}", cache_dir=str(tmp_path / "cache"))
    assert check_shards(remote).manifest["seq_len"] == cfg.seq_len
    local_batches = _take(iter(build_dataloader(cfg, "train", batch_size=4, seed=2)), 3)
    for _ in range(2):  # two loaders in a row (as two runs would) do not collide
        remote_batches = _take(iter(build_dataloader(remote, "train", batch_size=4, seed=2)), 3)
        assert all(_same(a, b) for a, b in zip(local_batches, remote_batches))
    assert len(list((tmp_path / "cache").glob("*/train-*/index.json"))) == 2


def test_dataloader_worker_processes_give_the_same_batches_and_resume(data_small_corpus):
    cfg, _ = data_small_corpus
    in_process = iter(build_dataloader(cfg, "train", batch_size=8, seed=4, num_workers=0))
    loader = build_dataloader(cfg, "train", batch_size=8, seed=4, num_workers=1)
    stream = iter(loader)
    k = len(loader) + 2  # into the second epoch
    assert all(_same(next(in_process), next(stream)) for _ in range(k))
    state = loader.state_dict()
    expected = next(stream)
    resumed = build_dataloader(cfg, "train", batch_size=8, seed=4, num_workers=1)
    resumed.load_state_dict(state)
    assert _same(next(iter(resumed)), expected)
