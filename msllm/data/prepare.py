"""`msllm prep`: turn a corpus into a tokenizer and MDS shards of fixed token windows.

The steps, in order:
  1. Read the documents once to split them into train and validation (by a hash of each
     document's text, so the split never depends on order and a document is never in both).
  2. Train a sentencepiece tokenizer on the train documents (or copy the given `.model`).
  3. Tokenize every document in `data.workers` processes, append EOS to each, join them, cut the
     stream into windows of seq_len+1 tokens, and write the windows as MDS shards (a `tokens`
     column of int32, zstd, sha1 + xxh64 hashes), one folder per split.
  4. Write manifest.json (the completeness marker) and rename the whole folder into place.

Everything is written to a hidden temporary folder next to `data.shards_dir` and renamed into
place at the end, so a crash never leaves a half-written dataset that looks complete, and a
complete one is replaced only when asked to (--force).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from msllm.config import DataConfig
from msllm.data.manifest import MANIFEST_FILENAME, MANIFEST_FORMAT, SPLITS, is_remote, read_manifest
from msllm.data.sources import input_files, iter_documents
from msllm.data.tokenizer import (
    TOKENIZER_FILENAME,
    bytes_per_token,
    file_sha256,
    load_sentencepiece,
    special_ids,
    train_tokenizer,
)
from msllm.errors import DataError

# The schema LLM Foundry's convert_dataset_* scripts write: one int32 array per sample.
TOKENS_COLUMN = {"tokens": "ndarray:int32"}
SHARD_COMPRESSION = "zstd"
SHARD_HASHES = ["sha1", "xxh64"]

# Data fields that change nothing in the written shards; they stay out of the fingerprint.
_FIELDS_NOT_IN_FINGERPRINT = ("workers", "shuffle", "num_workers", "cache_dir", "shards_dir")

# Documents are sent to the tokenizer processes in batches of about this many characters.
_BATCH_CHARS = 1 << 18


def prepare_dataset(data_cfg: DataConfig, force: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Prepare the shards of a recipe's data section and return their manifest.

    Does nothing (and returns the existing manifest) when data.shards_dir already holds shards
    made from the same inputs and settings, unless `force`. For `source: shards`, only reads the
    manifest of what is there.
    """
    if data_cfg.source == "shards":
        return read_manifest(data_cfg.shards_dir, data_cfg)
    if is_remote(data_cfg.shards_dir):
        raise DataError(
            f"data.shards_dir {data_cfg.shards_dir} is remote: `msllm prep` writes a local folder; "
            "prepare locally, upload the folder, then train with data.source: shards"
        )
    target = Path(data_cfg.shards_dir)
    files = input_files(data_cfg)
    fingerprint, inputs = _fingerprint(data_cfg, files)

    if (target / MANIFEST_FILENAME).is_file():
        existing = read_manifest(target)
        if existing.get("fingerprint") == fingerprint and not force:
            _say(quiet, f"msllm prep: {target} is up to date (use --force to rebuild it)")
            return existing
        if not force:
            raise DataError(
                f"{target} holds shards prepared from other {_what_differs(existing, data_cfg)}: rerun "
                "with --force to replace them, or set data.shards_dir elsewhere"
            )
    elif target.exists() and (not target.is_dir() or any(target.iterdir())) and not force:
        raise DataError(
            f"{target} exists but is not a complete msllm dataset (no {MANIFEST_FILENAME}): remove it, "
            "or rerun with --force to replace it"
        )

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporary_folders(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        started = time.perf_counter()
        manifest = _write_dataset(data_cfg, tmp, quiet)
        manifest["fingerprint"] = fingerprint
        manifest["inputs"] = inputs
        # The manifest goes last: a folder with one is complete.
        (tmp / MANIFEST_FILENAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _move_into_place(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - started
    train, val = manifest["splits"]["train"], manifest["splits"]["validation"]
    _say(
        quiet,
        f"msllm prep: wrote {target}: train {train['samples']} samples ({train['tokens']:,} tokens, "
        f"{train['documents']} documents), validation {val['samples']} samples ({val['tokens']:,} "
        f"tokens, {val['documents']} documents), vocab {manifest['vocab_size']}, in {seconds:.1f} s",
    )
    return manifest


# ----------------------------------------------------------------------------------------------
# The split
# ----------------------------------------------------------------------------------------------


def document_hash_fraction(text: str) -> float:
    """A number in [0, 1) fixed by the document's text: the split compares it to a threshold."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") / 2.0**64


@dataclasses.dataclass
class SplitRule:
    """Documents whose hash fraction is below `threshold` go to validation, the rest to train."""

    threshold: float

    def split_of(self, text: str) -> str:
        return "validation" if document_hash_fraction(text) < self.threshold else "train"


def choose_split_rule(data_cfg: DataConfig) -> SplitRule:
    """The threshold is validation_fraction, moved just enough that neither split is empty."""
    fractions = sorted({document_hash_fraction(text) for text in iter_documents(data_cfg)})
    where = _describe_source(data_cfg)
    if not fractions:
        raise DataError(f"empty corpus: {where} holds no documents (only empty or skipped text)")
    if len(fractions) < 2:
        raise DataError(
            f"{where} holds a single distinct document, but train and validation each need one: add "
            "documents" + (" or set data.split_on_blank_lines: true" if data_cfg.source == "text" else "")
        )
    threshold = data_cfg.validation_fraction
    if fractions[0] >= threshold:  # validation would be empty: give it the lowest-hash document
        threshold = float(np.nextafter(fractions[0], 1.0))
    elif fractions[-1] < threshold:  # train would be empty: give it the highest-hash document
        threshold = fractions[-1]
    return SplitRule(threshold)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _write_dataset(data_cfg: DataConfig, out: Path, quiet: bool) -> dict[str, Any]:
    rule = choose_split_rule(data_cfg)
    tokenizer_file = out / TOKENIZER_FILENAME
    if data_cfg.tokenizer.model:
        given = Path(data_cfg.tokenizer.model)
        load_sentencepiece(given)  # a clear error if it is missing or not a model
        shutil.copyfile(given, tokenizer_file)
        tokenizer_source = str(given)
    else:
        tok = data_cfg.tokenizer
        _say(quiet, f"msllm prep: training a {tok.type} tokenizer of {tok.vocab_size} pieces")
        train_docs = (t for t in iter_documents(data_cfg) if rule.split_of(t) == "train")
        train_tokenizer(train_docs, data_cfg.tokenizer, tokenizer_file, num_threads=data_cfg.workers)
        tokenizer_source = "trained"
    processor = load_sentencepiece(tokenizer_file)
    ids = special_ids(processor)
    if ids["eos_id"] < 0:
        raise DataError(f"the tokenizer {tokenizer_source} has no EOS piece: documents cannot be joined")

    counts = write_shards(
        documents=((rule.split_of(t), t) for t in iter_documents(data_cfg)),
        tokenizer_file=tokenizer_file,
        out=out,
        seq_len=data_cfg.seq_len,
        workers=data_cfg.workers,
        shard_size_limit=data_cfg.shard_size_limit,
        byte_table=bytes_per_token(processor),
        quiet=quiet,
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
        "vocab_size": processor.GetPieceSize(),
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


class WindowWriter:
    """Joins token arrays into one stream and writes it as windows of `window` tokens."""

    def __init__(self, out: Path, window: int, shard_size_limit: int, byte_table: np.ndarray):
        from streaming import MDSWriter

        self.writer = MDSWriter(
            out=str(out),
            columns=TOKENS_COLUMN,
            compression=SHARD_COMPRESSION,
            hashes=SHARD_HASHES,
            size_limit=shard_size_limit,
        )
        self.window = window
        self.byte_table = byte_table
        self.pending = np.empty(0, dtype=np.int32)  # the tail shorter than a window
        self.documents = self.tokens = self.bytes = self.samples = self.sample_bytes = 0

    def add(self, tokens: np.ndarray, documents: int, text_bytes: int) -> None:
        self.documents += documents
        self.bytes += text_bytes
        self.tokens += len(tokens)
        stream = np.concatenate([self.pending, tokens])
        full = len(stream) // self.window
        windows = stream[: full * self.window].reshape(full, self.window)
        for sample in windows:
            self.writer.write({"tokens": sample})
        self.samples += full
        self.sample_bytes += int(self.byte_table[windows].sum())
        self.pending = stream[full * self.window :].copy()

    def finish(self) -> dict[str, Any]:
        """Close the shards; the tail that does not fill a window is dropped (and counted)."""
        self.writer.finish()
        sample_tokens = self.samples * self.window
        return {
            "documents": self.documents,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "samples": self.samples,
            "sample_tokens": sample_tokens,
            "sample_bytes": self.sample_bytes,
            "dropped_tokens": self.tokens - sample_tokens,
            "tokens_per_byte": self.tokens / self.bytes if self.bytes else 0.0,
        }


def write_shards(
    documents: Iterable[tuple[str, str]],
    tokenizer_file: Path,
    out: Path,
    seq_len: int,
    workers: int,
    shard_size_limit: int,
    byte_table: np.ndarray,
    quiet: bool = False,
) -> dict[str, dict[str, Any]]:
    """Tokenize (split, text) pairs in `workers` processes and write out/<split>/ MDS shards."""
    writers = {split: WindowWriter(out / split, seq_len + 1, shard_size_limit, byte_table) for split in SPLITS}
    pool = None
    if workers > 1:
        # Made before the progress bar starts its thread; each worker loads its own tokenizer.
        pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (str(tokenizer_file),))
        results: Iterator = pool.imap(_encode_batch, _batches(documents))
    else:
        _init_worker(str(tokenizer_file))
        results = map(_encode_batch, _batches(documents))
    try:
        with tqdm(desc="tokenize + write", unit="tok", unit_scale=True, disable=quiet) as progress:
            for split, tokens, n_documents, n_bytes in results:
                writers[split].add(tokens, n_documents, n_bytes)
                progress.update(len(tokens))
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return {split: writer.finish() for split, writer in writers.items()}


def _batches(documents: Iterable[tuple[str, str]]) -> Iterator[tuple[str, list[str]]]:
    """Group documents into per-split batches of about _BATCH_CHARS characters, in order."""
    pending: dict[str, list[str]] = {split: [] for split in SPLITS}
    sizes = {split: 0 for split in SPLITS}
    for split, text in documents:
        pending[split].append(text)
        sizes[split] += len(text)
        if sizes[split] >= _BATCH_CHARS:
            yield split, pending[split]
            pending[split], sizes[split] = [], 0
    for split in SPLITS:
        if pending[split]:
            yield split, pending[split]


_worker_tokenizer = None


def _init_worker(tokenizer_file: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_sentencepiece(tokenizer_file)


def _encode_batch(batch: tuple[str, list[str]]) -> tuple[str, np.ndarray, int, int]:
    """Tokens of a batch of documents, EOS after each, as one int32 array."""
    split, texts = batch
    encoded = _worker_tokenizer.encode(texts, add_eos=True, num_threads=1)
    tokens = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int32, count=sum(map(len, encoded)))
    return split, tokens, len(texts), sum(len(t.encode("utf-8")) for t in texts)


# ----------------------------------------------------------------------------------------------
# Up-to-date check and the final rename
# ----------------------------------------------------------------------------------------------


def _fingerprint(data_cfg: DataConfig, files: list[Path]) -> tuple[str, list[dict[str, Any]]]:
    """A hash of what decides the shards' content: the data settings and the input files' stats."""
    settings = {k: v for k, v in dataclasses.asdict(data_cfg).items() if k not in _FIELDS_NOT_IN_FINGERPRINT}
    watched = list(files)
    if data_cfg.tokenizer.model:
        watched.append(Path(data_cfg.tokenizer.model))
    inputs = []
    for path in watched:
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise DataError(f"no such file: {path}") from None
        inputs.append({"path": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    blob = json.dumps({"format": MANIFEST_FORMAT, "data": settings, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest(), inputs


def _what_differs(manifest: dict[str, Any], data_cfg: DataConfig) -> str:
    before = manifest.get("data", {})
    now = dataclasses.asdict(data_cfg)
    changed = [
        f"data.{k} {before.get(k)!r} vs {now[k]!r}"
        for k in now
        if k not in _FIELDS_NOT_IN_FINGERPRINT and before.get(k) != now[k]
    ]
    return "settings (" + "; ".join(changed) + ")" if changed else "input files (changed since)"


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished folder to the target; an old target is moved aside, then deleted."""
    if target.exists() or target.is_symlink():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
        os.replace(tmp, target)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    else:
        os.replace(tmp, target)


def _remove_stale_temporary_folders(target: Path) -> None:
    """Temporary folders left by crashed runs (their process is gone) are removed."""
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe_source(data_cfg: DataConfig) -> str:
    if data_cfg.source in ("text", "jsonl"):
        return f"data.paths {data_cfg.paths}"
    return f"data.source {data_cfg.source}"


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, flush=True)
