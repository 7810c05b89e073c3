"""`msllm prep`: turn a corpus into a tokenizer and MDS shards of fixed token windows.

The stages, in order, each in its module:
  1. split.py     Split the documents into train and validation (by a hash of each document's
                  text, so the split never depends on order and a document is never in both).
  2. tokenize.py  Train a sentencepiece tokenizer on the train documents, in the same pass over
                  the corpus as the split (or copy the given `.model`, or take the byte tokenizer).
  3. write.py     Tokenize every document in `data.workers` processes (tokenize.py), append EOS to
                  each, join them, cut the stream into windows of seq_len+1 tokens, and write the
                  windows as MDS shards (a `tokens` column of int32, zstd, sha1 + xxh64 hashes),
                  one folder per split.
  4. this module  Write manifest.json (the completeness marker) and move the whole folder into
                  place (staging.py), or upload what is left to a remote one (upload.py).

read.py holds what reads the inputs: the corpus passes and the fingerprint. The corpus is read
twice: once for the split (and, in the same pass, the tokenizer's training on the documents at or
above data.validation_fraction: the train split unless the threshold has to move, when it is
trained again in a pass of its own), once to encode and write. The split needs every document's
hash before any document can be labelled, and the documents cannot be encoded before the
tokenizer is trained: two passes is the least.

Everything is written to a staging folder (`.NAME.partial` next to a local data.shards_dir) and
moved into place at the end, so a crash never leaves a half-written dataset that looks complete,
and a complete one is replaced only when asked to (--force). --force replaces only a dataset msllm
wrote (a folder with msllm's manifest.json): a folder of other files, a file or a link at
data.shards_dir is refused in one line, whatever the flags; the replaced dataset is moved aside
(`.NAME.old-<time>-<pid>`) until the new one is in place, then deleted.

Interrupted and rerun, prep continues where it stopped: step 3 saves its progress after every
data.prep_checkpoint_bytes of text (the windows written so far, in one MDS sub-folder per split
and save, `train/part-00003/`, and the tokens of the unfinished window); the tokenizer is kept.
The sub-folders are joined by one merged index per split (streaming's merge_index).

A remote data.shards_dir (s3://...) gets the same dataset: MDSWriter uploads each shard as it is
written, then the merged indexes, the tokenizer and, last, the manifest are uploaded.

Whether existing shards are up to date is decided by content: a hash of the data settings, the
sha256 of every input file (in order) and of a given tokenizer, never their paths. Shards can
therefore be moved or copied anywhere, and the corpus may be absent where they are used.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import shutil
import time
from pathlib import Path
from typing import Any

from msllm.config import DataConfig
from msllm.data.manifest import (
    MANIFEST_FILENAME,
    MANIFEST_FORMAT,
    SPLITS,
    is_remote,
    read_manifest,
    staging_folder,
    streaming_remote,
)
from msllm.data.prepare.read import input_fingerprint, labelled_documents, what_differs
from msllm.data.prepare.split import SplitRule
from msllm.data.prepare.staging import (
    PROGRESS_FILENAME,
    StagingLock,
    existing_manifest,
    move_into_place,
    read_json,
    refuse_foreign,
    write_json,
    writing,
)

# What msllm.bench.data times of the stages, by these names (it imports this package as `prep`).
from msllm.data.prepare.tokenize import _batches, _encode_batch, _init_worker, make_tokenizer  # noqa: E402, F401
from msllm.data.prepare.upload import check_writable_remote, upload_finished
from msllm.data.prepare.write import (
    SHARD_COMPRESSION,
    SHARD_HASHES,
    TOKENS_COLUMN,
    WindowWriter,  # noqa: E402, F401
    write_shards,
)
from msllm.data.sources import input_files
from msllm.data.tokenizer import (  # noqa: E402, F401
    TOKENIZER_FILENAME,
    bytes_per_token,
    file_sha256,
    load_sentencepiece,
    load_tokenizer_file,
)
from msllm.errors import DataError
from msllm.safe_files import write_new

__all__ = ["prepare_dataset"]


def prepare_dataset(data_cfg: DataConfig, force: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Prepare the shards of a recipe's data section and return their manifest.

    Does nothing (and returns the existing manifest) when data.shards_dir already holds shards
    made from the same settings and input contents, unless `force`, or when it holds shards and
    the corpus is not here (the shards are what training reads). For `source: shards`, only reads
    the manifest of what is there.
    """
    if data_cfg.source == "shards":
        return read_manifest(data_cfg.shards_dir, data_cfg)
    target = data_cfg.shards_dir
    remote = is_remote(target)
    existing = existing_manifest(data_cfg)

    try:
        files = input_files(data_cfg)
    except DataError as exc:
        if existing is not None and not force:
            say(quiet, f"msllm prep: the corpus is not here ({exc}); using the shards in {target} as they are")
            return existing
        raise
    fingerprint, inputs = input_fingerprint(data_cfg, files, existing.get("inputs", []) if existing else [])

    if existing is not None:
        if existing.get("fingerprint") == fingerprint and not force:
            say(quiet, f"msllm prep: {target} is up to date (use --force to rebuild it)")
            return existing
        if not force:
            raise DataError(
                f"{target} holds shards prepared from other {what_differs(existing, data_cfg)}: run "
                "`msllm prep RECIPE --force` to replace them, or set data.shards_dir elsewhere"
            )
        if remote:
            raise DataError(
                f"{target} holds a dataset: msllm prep does not delete remote objects; remove them "
                "(e.g. `aws s3 rm --recursive`) or set data.shards_dir elsewhere"
            )
    elif not remote:
        refuse_foreign(Path(target))  # --force or not: msllm replaces only what it made

    if remote:  # only now: training from a dataset that is up to date needs no write access
        check_writable_remote(data_cfg)
    else:
        refuse_foreign(Path(target))
    staging = staging_folder(data_cfg)
    with StagingLock(staging, target), writing(staging):
        started = time.perf_counter()
        manifest = write_dataset(data_cfg, staging, fingerprint, quiet)
        manifest["fingerprint"] = fingerprint
        manifest["inputs"] = inputs
        (staging / PROGRESS_FILENAME).unlink()
        # The manifest goes last: a folder with one is complete.
        write_new(staging / MANIFEST_FILENAME, json.dumps(manifest, indent=2) + "\n")
        if remote:
            upload_finished(staging, target)
            shutil.rmtree(staging)
        else:
            move_into_place(staging, Path(target))
    seconds = time.perf_counter() - started
    train, val = manifest["splits"]["train"], manifest["splits"]["validation"]
    say(
        quiet,
        f"msllm prep: wrote {target}: train {train['samples']} samples ({train['tokens']:,} tokens, "
        f"{train['documents']} documents), validation {val['samples']} samples ({val['tokens']:,} "
        f"tokens, {val['documents']} documents), vocab {manifest['vocab_size']}, in {seconds:.1f} s",
    )
    return manifest


def write_dataset(data_cfg: DataConfig, out: Path, fingerprint: str, quiet: bool) -> dict[str, Any]:
    """Write the dataset into the staging folder `out`, continuing what an earlier run of the same
    inputs and settings saved there; return its manifest (without fingerprint and inputs)."""
    progress_file = out / PROGRESS_FILENAME
    progress = read_json(progress_file)
    fresh = progress.get("fingerprint") != fingerprint
    if fresh:  # nothing to continue from: start afresh; the split is found with the tokenizer
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        rule = None
    else:
        rule = SplitRule(progress["threshold"], progress["corpus_bytes"])
        say(quiet, f"msllm prep: continuing the interrupted run in {out}")

    tokenizer_file, tokenizer_source, rule = make_tokenizer(data_cfg, out, rule, lambda message: say(quiet, message))
    if fresh:
        progress = {"fingerprint": fingerprint, "threshold": rule.threshold, "corpus_bytes": rule.corpus_bytes}
        write_json(progress_file, progress)
    tokenizer = load_tokenizer_file(tokenizer_file)
    ids = tokenizer.special_ids()
    if ids["eos_id"] < 0:
        raise DataError(f"the tokenizer {tokenizer_source} has no EOS piece: documents cannot be joined")

    counts = write_shards(
        documents=labelled_documents(data_cfg, rule),
        tokenizer_file=tokenizer_file,
        out=out,
        seq_len=data_cfg.seq_len,
        workers=data_cfg.workers,
        shard_size_limit=data_cfg.shard_size_limit,
        byte_table=tokenizer.bytes_per_token(),
        quiet=quiet,
        checkpoint_bytes=data_cfg.prep_checkpoint_bytes,
        total_bytes=rule.corpus_bytes,
        remote=streaming_remote(data_cfg.shards_dir) if is_remote(data_cfg.shards_dir) else None,
    )
    window = data_cfg.seq_len + 1
    for split in SPLITS:
        if counts[split]["samples"] == 0:
            raise DataError(
                f"the {split} split has {counts[split]['tokens']} tokens, fewer than one sample of "
                f"seq_len+1 = {window}: lower data.seq_len, "
                + ("raise data.validation_fraction, " if split == "validation" else "")
                + "or add text"
            )
    return {
        "format": MANIFEST_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tokenizer_path": TOKENIZER_FILENAME,
        "tokenizer_sha256": file_sha256(tokenizer_file),
        "tokenizer_source": tokenizer_source,
        "vocab_size": tokenizer.vocab_size,
        **ids,
        "seq_len": data_cfg.seq_len,
        "sample_len": window,
        "columns": TOKENS_COLUMN,
        "compression": SHARD_COMPRESSION,
        "hashes": SHARD_HASHES,
        "validation_threshold": rule.threshold,
        "splits": counts,
        "data": dataclasses.asdict(data_cfg),
    }


def say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, flush=True)
