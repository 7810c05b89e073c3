"""`msllm prep`: sources, split, tokenizer, shards, manifest, up-to-date check, bad input."""

from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pytest
import zstandard

from fixtures.data import make_documents, text_config, write_text_files
from msllm.config import DataConfig, TokenizerConfig
from msllm.data import build_dataloader, load_tokenizer, prepare_dataset, read_manifest
from msllm.data.prepare.split import document_hash_fraction
from msllm.errors import DataError


def _all_train_tokens(cfg: DataConfig) -> np.ndarray:
    """Every token of the train split, in shard order (one unshuffled pass, batch of 1)."""
    loader = build_dataloader(cfg, "train", batch_size=1, seed=0, shuffle=False, repeat=False)
    samples = [torch_cat(batch) for batch in loader]
    return np.concatenate(samples)


def torch_cat(batch) -> np.ndarray:
    # A window of L+1 tokens is input_ids plus the last label.
    return np.concatenate([batch["input_ids"][0].numpy(), batch["labels"][0, -1:].numpy()])


def test_round_trip_text_to_batches_gives_back_the_text(data_small_corpus):
    cfg, documents = data_small_corpus
    manifest = read_manifest(cfg.shards_dir)
    tokenizer = load_tokenizer(cfg.shards_dir)
    threshold = manifest["validation_threshold"]
    train_docs = [d for d in documents if document_hash_fraction(d) >= threshold]

    expected = np.concatenate([np.array(ids, dtype=np.int64) for ids in tokenizer.encode(train_docs, add_eos=True)])
    got = _all_train_tokens(cfg)
    counts = manifest["splits"]["train"]
    assert counts["samples"] * (cfg.seq_len + 1) == len(got) == counts["sample_tokens"]
    assert counts["tokens"] == len(expected)
    assert counts["documents"] == len(train_docs)
    assert counts["bytes"] == sum(len(d.encode("utf-8")) for d in train_docs)
    # The windows are the token stream of the train documents, joined by EOS, cut at the end.
    np.testing.assert_array_equal(got, expected[: len(got)])

    # Decoding the documents that fit whole gives the text back exactly (identity normalisation).
    eos = manifest["eos_id"]
    ends = np.flatnonzero(got == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    decoded = [tokenizer.decode(got[s:e].tolist()) for s, e in zip(starts, ends)]
    assert len(decoded) >= len(train_docs) - 1
    assert decoded == train_docs[: len(decoded)]


def test_train_and_validation_share_no_document(data_small_corpus):
    cfg, documents = data_small_corpus
    manifest = read_manifest(cfg.shards_dir)
    threshold = manifest["validation_threshold"]
    validation = {d for d in documents if document_hash_fraction(d) < threshold}
    train = {d for d in documents if document_hash_fraction(d) >= threshold}
    assert validation and train and not (validation & train)
    assert manifest["splits"]["validation"]["documents"] == len(validation)
    assert manifest["splits"]["train"]["documents"] == len(train)

    # And the token streams: decode every validation sample; none contains a train document.
    tokenizer = load_tokenizer(cfg.shards_dir)
    loader = build_dataloader(cfg, "validation", batch_size=4, seed=0)
    text = "".join(
        tokenizer.decode(torch_cat({k: v[i : i + 1] for k, v in b.items()}).tolist())
        for b in loader
        for i in range(len(b["input_ids"]))
    )
    for document in train:
        assert document.split("\n")[0] + "\n" not in text  # "Document N.\n" heads every document


def test_neither_split_is_ever_empty(tmp_path):
    from msllm.data.prepare.split import choose_split_rule

    documents = make_documents(3, seed=11, words=20)
    write_text_files(tmp_path / "text", documents)
    for fraction, expected_validation in ((1e-9, 1), (0.999999, 2)):
        cfg = text_config(tmp_path / "text", tmp_path / "shards", validation_fraction=fraction)
        rule = choose_split_rule(cfg)
        splits = [rule.split_of(d) for d in documents]
        assert splits.count("validation") == expected_validation and "train" in splits
    (tmp_path / "text" / "doc0001.txt").unlink()
    (tmp_path / "text" / "doc0002.txt").unlink()
    with pytest.raises(DataError, match=r"holds a single distinct document.*split_on_blank_lines: true$"):
        choose_split_rule(text_config(tmp_path / "text", tmp_path / "shards"))


def test_manifest_records_what_the_trainer_needs(data_small_corpus):
    cfg, _ = data_small_corpus
    manifest = read_manifest(cfg.shards_dir)
    assert (manifest["pad_id"], manifest["unk_id"], manifest["bos_id"], manifest["eos_id"]) == (0, 1, 2, 3)
    assert manifest["vocab_size"] == 512 and manifest["seq_len"] == 64
    assert len(manifest["tokenizer_sha256"]) == 64
    assert manifest["data"]["seq_len"] == 64 and manifest["data"]["source"] == "text"
    for split in ("train", "validation"):
        counts = manifest["splits"][split]
        assert set(counts) >= {"documents", "tokens", "samples", "bytes", "tokens_per_byte", "sample_bytes"}
        assert counts["tokens_per_byte"] == pytest.approx(counts["tokens"] / counts["bytes"])
        assert 0 < counts["sample_bytes"] <= counts["bytes"] * 1.01


def test_rerun_does_nothing_unless_forced_and_refuses_other_settings(tmp_path, capsys):
    write_text_files(tmp_path / "text", make_documents(30, seed=2, words=60))
    cfg = text_config(tmp_path / "text", tmp_path / "shards", seq_len=32, workers=1)
    first = prepare_dataset(cfg)
    shard = next((tmp_path / "shards" / "train").glob("part-*/*.zstd"))
    mtime = shard.stat().st_mtime_ns
    capsys.readouterr()

    assert prepare_dataset(cfg) == first
    assert "up to date" in capsys.readouterr().out
    assert shard.stat().st_mtime_ns == mtime

    other = text_config(tmp_path / "text", tmp_path / "shards", seq_len=16, workers=1)
    with pytest.raises(DataError, match=r"data\.seq_len 32 vs 16.*--force"):
        prepare_dataset(other)
    rebuilt = prepare_dataset(other, force=True)
    assert rebuilt["seq_len"] == 16 and read_manifest(tmp_path / "shards")["seq_len"] == 16

    # A changed input file makes the shards out of date as well.
    (tmp_path / "text" / "doc0000.txt").write_text("A new first document.\nWith two lines.", encoding="utf-8")
    with pytest.raises(DataError, match=r"input files"):
        prepare_dataset(other)


def test_a_crash_leaves_no_dataset_that_looks_complete(tmp_path, monkeypatch):
    write_text_files(tmp_path / "text", make_documents(20, seed=3, words=60))
    cfg = text_config(tmp_path / "text", tmp_path / "shards", seq_len=32, workers=1)

    from msllm.data.prepare import write

    def crash(self):
        raise RuntimeError("disk full")

    monkeypatch.setattr(write.WindowWriter, "finish", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_dataset(cfg, quiet=True)
    assert not (tmp_path / "shards").exists()
    # What was written waits in the staging folder for the rerun, which completes the dataset.
    assert (tmp_path / ".shards.partial" / "tokenizer.model").is_file()
    monkeypatch.undo()
    manifest = prepare_dataset(cfg, quiet=True)
    assert read_manifest(tmp_path / "shards") == manifest
    assert not (tmp_path / ".shards.partial").exists()


def test_a_folder_that_is_not_a_dataset_is_not_overwritten(tmp_path):
    write_text_files(tmp_path / "text", make_documents(20, seed=3, words=60))
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "precious.txt").write_text("keep me")
    cfg = text_config(tmp_path / "text", tmp_path / "shards", seq_len=32, workers=1)
    for force in (False, True):  # --force never replaces a folder msllm did not write
        with pytest.raises(DataError, match=r"holds files that msllm did not put there \(precious.txt\)") as caught:
            prepare_dataset(cfg, force=force, quiet=True)
        assert "--force" not in str(caught.value)
    assert (tmp_path / "shards" / "precious.txt").read_text() == "keep me"


def test_jsonl_plain_gz_and_zst_with_a_text_field(tmp_path):
    documents = make_documents(40, seed=4, words=60)
    lines = [json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(documents)]
    (tmp_path / "a.jsonl").write_text("".join(lines[:15]), encoding="utf-8")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(lines[15:30]))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress("".join(lines[30:]).encode()))
    cfg = DataConfig(
        source="jsonl",
        paths=[str(tmp_path / "*.jsonl*")],
        text_field="body",
        shards_dir=str(tmp_path / "shards"),
        seq_len=32,
        workers=1,
        tokenizer=TokenizerConfig(vocab_size=360),
    )
    manifest = prepare_dataset(cfg, quiet=True)
    splits = manifest["splits"]
    assert splits["train"]["documents"] + splits["validation"]["documents"] == 40
    assert splits["train"]["bytes"] + splits["validation"]["bytes"] == sum(len(d.encode()) for d in documents)


def test_text_split_on_blank_lines_and_reused_tokenizer(tmp_path, data_small_corpus):
    small_cfg, _ = data_small_corpus
    documents = make_documents(30, seed=5, words=40)
    (tmp_path / "all.txt").write_text("\n\n\n".join(documents), encoding="utf-8")
    given = str(tmp_path / "given.model")
    shutil.copyfile(f"{small_cfg.shards_dir}/tokenizer.model", given)
    cfg = DataConfig(
        source="text",
        paths=[str(tmp_path / "all.txt")],
        split_on_blank_lines=True,
        shards_dir=str(tmp_path / "s"),
        seq_len=32,
        workers=1,
        tokenizer=TokenizerConfig(model=given),
    )
    manifest = prepare_dataset(cfg, quiet=True)
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["validation"]["documents"] == 30
    assert manifest["tokenizer_sha256"] == read_manifest(small_cfg.shards_dir)["tokenizer_sha256"]
    assert manifest["tokenizer_source"] == given


@pytest.mark.slow
def test_builtin_wikipedia_sample_prepares_with_sane_counts(tmp_path):
    cfg = DataConfig(
        source="wikipedia-sample",
        shards_dir=str(tmp_path / "wiki"),
        seq_len=256,
        tokenizer=TokenizerConfig(vocab_size=1000, input_sentence_size=20000),
    )
    manifest = prepare_dataset(cfg, quiet=True)
    train, validation = manifest["splits"]["train"], manifest["splits"]["validation"]
    assert train["documents"] + validation["documents"] == 106
    assert validation["documents"] >= 1 and validation["samples"] >= 1
    assert 2_800_000 < train["bytes"] + validation["bytes"] < 3_400_000
    assert 0.2 < train["tokens_per_byte"] < 0.6
    assert train["samples"] == train["tokens"] // 257
    text = load_tokenizer(tmp_path / "wiki").decode(
        next(iter(build_dataloader(cfg, "validation", batch_size=1, seed=0)))["input_ids"][0].tolist()
    )
    assert "[[" not in text and "{{" not in text and len(text.split()) > 20  # markup stripped


# ----------------------------------------------------------------------------------------------
# Bad input: one clear line each
# ----------------------------------------------------------------------------------------------


def _cfg(tmp_path, **kw) -> DataConfig:
    settings = dict(
        source="text",
        shards_dir=str(tmp_path / "shards"),
        seq_len=32,
        workers=1,
        tokenizer=TokenizerConfig(vocab_size=360),
    )
    settings.update(kw)
    return DataConfig(**settings)


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_file_and_empty_glob(tmp_path):
    with pytest.raises(DataError) as e:
        prepare_dataset(_cfg(tmp_path, paths=[str(tmp_path / "nope.txt")]))
    assert _one_line(e) == f"data.paths: no such file: {tmp_path / 'nope.txt'}"
    with pytest.raises(DataError) as e:
        prepare_dataset(_cfg(tmp_path, paths=[str(tmp_path / "*.txt")]))
    assert "matches no files" in _one_line(e)


def test_empty_corpus(tmp_path):
    (tmp_path / "blank.txt").write_text("  \n\n ")
    with pytest.raises(DataError) as e:
        prepare_dataset(_cfg(tmp_path, paths=[str(tmp_path / "blank.txt")]))
    assert _one_line(e).startswith("empty corpus:")


def test_undecodable_bytes_fail_or_skip_with_file_and_count(tmp_path, capsys):
    write_text_files(tmp_path / "text", make_documents(20, seed=6, words=60))
    (tmp_path / "text" / "bad.txt").write_bytes(b"caf\xe9 latin-1 text")
    paths = [str(tmp_path / "text" / "*.txt")]
    with pytest.raises(DataError) as e:
        prepare_dataset(_cfg(tmp_path, paths=paths))
    assert _one_line(e) == (
        f"{tmp_path / 'text' / 'bad.txt'}: bytes that are not UTF-8; fix the file or set data.on_decode_error: skip"
    )
    manifest = prepare_dataset(_cfg(tmp_path, paths=paths, on_decode_error="skip"))
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["validation"]["documents"] == 20
    skipped = f"skipped 1 document(s) with bytes that are not UTF-8: {tmp_path / 'text' / 'bad.txt'} (1)"
    assert skipped in capsys.readouterr().out


def test_jsonl_line_without_the_field(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "one document"}\n\n{"content": "no text field"}\n')
    with pytest.raises(DataError) as e:
        prepare_dataset(_cfg(tmp_path, source="jsonl", paths=[str(tmp_path / "d.jsonl")]))
    assert _one_line(e).startswith(f"{tmp_path / 'd.jsonl'}:3: no field 'text' (has: content)")


def test_vocab_size_the_corpus_cannot_support(tmp_path):
    write_text_files(tmp_path / "text", make_documents(10, seed=7, words=30))
    cfg = _cfg(tmp_path, paths=[str(tmp_path / "text" / "*.txt")], tokenizer=TokenizerConfig(vocab_size=50000))
    with pytest.raises(DataError) as e:
        prepare_dataset(cfg)
    message = _one_line(e)
    assert message.startswith("data.tokenizer.vocab_size 50000 is more than this corpus supports (at most ")
    assert "set data.tokenizer.vocab_size to" in message
    cfg = _cfg(tmp_path, paths=[str(tmp_path / "text" / "*.txt")], tokenizer=TokenizerConfig(vocab_size=100))
    with pytest.raises(DataError) as e:
        prepare_dataset(cfg)
    assert "data.tokenizer.vocab_size 100 is too small: this corpus needs at least" in _one_line(e)


def test_split_too_small_for_one_sample(tmp_path):
    write_text_files(tmp_path / "text", make_documents(10, seed=8, words=30))
    cfg = _cfg(tmp_path, paths=[str(tmp_path / "text" / "*.txt")], seq_len=4096)
    with pytest.raises(DataError) as e:
        prepare_dataset(cfg)
    assert "fewer than one sample of seq_len+1 = 4097: lower data.seq_len" in _one_line(e)


def test_cli_prep_prints_one_line_and_exits_2(tmp_path, capsys):
    from msllm.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model:\n  arch: vanilla\n"
        f"data:\n  source: text\n  paths: ['{tmp_path}/missing/*.txt']\n  shards_dir: {tmp_path}/s\n"
    )
    assert main(["prep", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"msllm prep: error: data.paths: the glob '{tmp_path}/missing/*.txt' matches no files"
