"""Byte-level data (data.tokenizer.type: bytes): the tokenizer, and prep -> train (a dynamic-chunking
bottom_up model) -> eval -> generate -> export end to end; resuming with another tokenizer refuses."""

from __future__ import annotations

import json

import pytest

from fixtures.train import base_recipe, check, error_lines, msllm, rows, write_recipe
from msllm.data.tokenizer import BYTES_DESCRIPTOR, EOS_ID, ByteTokenizer, load_tokenizer_file
from msllm.errors import DataError


def test_bytes_round_trip_non_ascii_text_exactly():
    tokenizer = ByteTokenizer()
    texts = ["Größe naïve café — 東京 🙂\n\ttabs", "", "plain ascii"]
    encoded = tokenizer.encode(texts, add_eos=True)
    assert encoded[1] == [EOS_ID]
    assert encoded[0][:3] == [4 + 0x47, 4 + 0x72, 4 + 0xC3]  # 'G', 'r', then the first byte of 'ö'
    assert all(4 <= i < 260 for i in encoded[0][:-1]) and tokenizer.vocab_size == 260
    assert [tokenizer.decode(ids) for ids in encoded] == texts  # the special ids are dropped
    assert len(encoded[0]) - 1 == len(texts[0].encode("utf-8"))
    assert tokenizer.bytes_per_token().sum() == 256  # each byte id stands for one byte; specials for none
    assert tokenizer.decode([4 + 0xC3]) == "\ufffd"  # half a character (a sampled byte) still decodes


def test_a_damaged_bytes_descriptor_is_one_clear_error(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(BYTES_DESCRIPTOR)
    assert load_tokenizer_file(path).kind == "bytes"
    path.write_bytes(BYTES_DESCRIPTOR.replace(b"260", b"300"))
    with pytest.raises(DataError, match="neither a sentencepiece model nor msllm's bytes descriptor"):
        load_tokenizer_file(path)


DYNAMIC = {
    "arch": "bottom_up",
    "d_model": 64,
    "n_heads": 4,
    "vocab_size": 320,  # as the sentencepiece shards' below, so that only the tokenizer differs
    "scales": [
        {"factor": 1, "layers": 1, "attention": "local", "window": 16},
        {"layers": 1, "pool": "dynamic", "target_ratio": 3.0},
    ],
}


@pytest.mark.slow
def test_bytes_prep_train_eval_generate_export_and_no_resume_with_another_tokenizer(tmp_path, tiny_data):
    corpus, sentencepiece_shards = tiny_data
    recipe = base_recipe(tmp_path / "byte_shards", corpus, tmp_path / "run")
    recipe["data"]["tokenizer"] = {"type": "bytes"}
    recipe["model"] = DYNAMIC
    path = write_recipe(tmp_path / "bytes.yaml", recipe)
    proc = check(msllm("train", path))  # preps the shards first
    manifest = json.loads((tmp_path / "byte_shards" / "manifest.json").read_text())
    assert manifest["vocab_size"] == 260 and manifest["tokenizer_source"] == "bytes"
    train = manifest["splits"]["train"]
    assert train["tokens"] == train["bytes"] + train["documents"]  # one id per byte, an EOS per document
    assert (tmp_path / "byte_shards" / "tokenizer.model").read_bytes() == BYTES_DESCRIPTOR

    logged = rows(tmp_path / "run")
    assert len(logged) == 12 and all(1.0 <= r["compression_s1"] <= 64 and r["ratio_loss_s1"] > 0 for r in logged)
    assert "compression s1 " in proc.stdout
    last_eval = rows(tmp_path / "run", "eval")[-1]
    split = manifest["splits"]["validation"]
    # Bits per byte from the byte counts: the loss per token times tokens per byte.
    assert last_eval["bits_per_byte"] == pytest.approx(
        last_eval["loss"] * split["tokens"] / split["bytes"] / 0.6931471805599453
    )
    ckpt = tmp_path / "run"
    evaluated = check(msllm("eval", path, "--checkpoint", ckpt))
    assert f"bpb {last_eval['bits_per_byte']:.4f}" in evaluated.stdout

    generated = check(msllm("generate", ckpt, "--prompt", "The old cät", "--max-new-tokens", "12", "--seed", "3"))
    assert generated.stdout.startswith("The old cät")
    exported = check(msllm("export", ckpt, "--out", tmp_path / "export"))
    assert "no hf/: byte-level" in exported.stdout and not (tmp_path / "export" / "hf").exists()
    assert (tmp_path / "export" / "tokenizer.model").read_bytes() == BYTES_DESCRIPTOR
    again = check(
        msllm("generate", tmp_path / "export", "--prompt", "The old cät", "--max-new-tokens", "12", "--seed", "3")
    )
    assert again.stdout == generated.stdout

    # The same run folder and model, now on sentencepiece shards: resuming refuses in one line.
    recipe["data"]["tokenizer"] = {"vocab_size": 320}
    recipe["data"]["shards_dir"] = str(sentencepiece_shards)
    recipe["train"]["max_steps"] = 20
    switched = write_recipe(tmp_path / "switched.yaml", recipe)
    refused = msllm("train", switched)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    (line,) = error_lines(refused)
    assert "was trained with tokenizer sha256" in line
