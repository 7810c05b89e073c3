"""The data pipeline: corpus -> sentencepiece tokenizer -> MDS shards -> batches.

Public API (what the trainer and the CLI use):

    prepare_dataset(data_cfg, force=False) -> manifest dict
        `msllm prep`: train or copy the tokenizer, write shards_dir/{train,validation}/ MDS shards,
        shards_dir/tokenizer.model and shards_dir/manifest.json. Does nothing when the shards are
        up to date with the recipe's data section and input files (unless force).
    read_manifest(shards_dir) -> dict
        The manifest: "vocab_size", "seq_len", "pad_id", "unk_id", "bos_id", "eos_id",
        "tokenizer_sha256", "splits": {"train": {"documents", "tokens", "samples", "bytes", ...},
        "validation": {...}}; docs/data.md, section "The manifest (`manifest.json`)", lists every field.
    check_shards(data_cfg, vocab_size=None) -> Shards(manifest, tokenizer_path, tokenizer_sha256)
        DataError unless the shards fit the recipe (seq_len, tokenizer hash, vocab size).
    build_dataloader(data_cfg, split, batch_size, seed, sp_size=1, sp_rank=0, replication=None,
                     shuffle=None, repeat=None, num_workers=None, pin_memory=False) -> TokenLoader
        Batches {"input_ids": LongTensor[B, L/sp], "labels": LongTensor[B, L/sp]}; train loaders
        repeat epochs forever; state_dict() / load_state_dict() resume exactly.
    load_tokenizer(shards_dir) -> the tokenizer (msllm.data.tokenizer: sentencepiece or bytes)

Every bad input is a one-line msllm.errors.DataError.
"""

from msllm.data.streaming_lazy import import_streaming

import_streaming()  # before anything else imports streaming: see streaming_lazy.py

from msllm.data.manifest import Shards, check_shards, load_tokenizer, read_manifest  # noqa: E402
from msllm.data.prepare import prepare_dataset  # noqa: E402


def build_dataloader(*args, **kwargs):
    """See msllm.data.loader.build_dataloader (imported on first use: streaming is slow to import)."""
    from msllm.data.loader import build_dataloader as build  # noqa: PLC0415 (start-up: the loader imports streaming's dataloader, only training needs it)

    return build(*args, **kwargs)


def __getattr__(name):
    if name in ("TokenLoader", "TokenWindowDataset", "tokens_of"):
        from msllm.data import loader  # noqa: PLC0415 (start-up: the loader imports streaming's dataloader, only training needs it)

        return getattr(loader, name)
    raise AttributeError(f"module 'msllm.data' has no attribute {name!r}")


__all__ = [
    "prepare_dataset",
    "read_manifest",
    "check_shards",
    "Shards",
    "build_dataloader",
    "load_tokenizer",
    "TokenLoader",
]
