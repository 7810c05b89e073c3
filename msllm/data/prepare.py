"""`msllm prep`: turn a corpus into a tokenizer and MDS shards of fixed token windows.

The steps, in order:
  1. Read the documents once to split them into train and validation (by a hash of each
     document's text, so the split never depends on order and a document is never in both).
  2. Train a sentencepiece tokenizer on the train documents (or copy the given `.model`).
  3. Tokenize every document in `data.workers` processes, append EOS to each, join them, cut the
     stream into windows of seq_len+1 tokens, and write the windows as MDS shards (a `tokens`
     column of int32, zstd, sha1 + xxh64 hashes), one folder per split.
  4. Write manifest.json (the completeness marker) and move the whole folder into place.

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

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np
from tqdm import tqdm

from msllm.config import DataConfig
from msllm.data.manifest import (
    MANIFEST_FILENAME,
    MANIFEST_FORMAT,
    SPLITS,
    is_remote,
    read_manifest,
    staging_folder,
    storage_code,
    storage_error,
    streaming_remote,
)
from msllm.data.sources import input_files, iter_documents
from msllm.data.tokenizer import (
    BYTES_DESCRIPTOR,
    TOKENIZER_FILENAME,
    file_sha256,
    load_sentencepiece,
    load_tokenizer_file,
    train_tokenizer,
)
from msllm.errors import DataError
from msllm.safe_files import is_link_error, open_lock_nofollow, write_new

# The schema LLM Foundry's convert_dataset_* scripts write: one int32 array per sample.
TOKENS_COLUMN = {"tokens": "ndarray:int32"}
SHARD_COMPRESSION = "zstd"
SHARD_HASHES = ["sha1", "xxh64"]

# Data fields that change nothing in the written samples; they stay out of the fingerprint.
# (`paths` and tokenizer.model are there by content: the inputs' sha256.)
_FIELDS_NOT_IN_FINGERPRINT = (
    "workers", "shuffle", "num_workers", "num_canonical_nodes", "cache_dir", "shards_dir", "paths", "prep_checkpoint_bytes"
)

# Documents are sent to the tokenizer processes in batches of about this many characters.
_BATCH_CHARS = 1 << 18

PROGRESS_FILENAME = "progress.json"


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
    existing = _existing_manifest(data_cfg)

    try:
        files = input_files(data_cfg)
    except DataError as exc:
        if existing is not None and not force:
            _say(quiet, f"msllm prep: the corpus is not here ({exc}); using the shards in {target} as they are")
            return existing
        raise
    fingerprint, inputs = _fingerprint(data_cfg, files, existing.get("inputs", []) if existing else [])

    if existing is not None:
        if existing.get("fingerprint") == fingerprint and not force:
            _say(quiet, f"msllm prep: {target} is up to date (use --force to rebuild it)")
            return existing
        if not force:
            raise DataError(
                f"{target} holds shards prepared from other {_what_differs(existing, data_cfg)}: run "
                "`msllm prep RECIPE --force` to replace them, or set data.shards_dir elsewhere"
            )
        if remote:
            raise DataError(
                f"{target} holds a dataset: msllm prep does not delete remote objects; remove them "
                "(e.g. `aws s3 rm --recursive`) or set data.shards_dir elsewhere"
            )
    elif not remote:
        _refuse_foreign(Path(target))  # --force or not: msllm replaces only what it made

    if remote:  # only now: training from a dataset that is up to date needs no write access
        _check_writable_remote(data_cfg)
    else:
        _refuse_foreign(Path(target))
    staging = staging_folder(data_cfg)
    with _exclusive(staging, target), _writing(staging):
        started = time.perf_counter()
        manifest = _write_dataset(data_cfg, staging, fingerprint, quiet)
        manifest["fingerprint"] = fingerprint
        manifest["inputs"] = inputs
        (staging / PROGRESS_FILENAME).unlink()
        # The manifest goes last: a folder with one is complete.
        write_new(staging / MANIFEST_FILENAME, json.dumps(manifest, indent=2) + "\n")
        if remote:
            _upload_finished(staging, target)
            shutil.rmtree(staging)
        else:
            _move_into_place(staging, Path(target))
    seconds = time.perf_counter() - started
    train, val = manifest["splits"]["train"], manifest["splits"]["validation"]
    _say(
        quiet,
        f"msllm prep: wrote {target}: train {train['samples']} samples ({train['tokens']:,} tokens, "
        f"{train['documents']} documents), validation {val['samples']} samples ({val['tokens']:,} "
        f"tokens, {val['documents']} documents), vocab {manifest['vocab_size']}, in {seconds:.1f} s",
    )
    return manifest


def _existing_manifest(data_cfg: DataConfig) -> Optional[dict[str, Any]]:
    """The manifest already in data.shards_dir, or None if it has none."""
    target = data_cfg.shards_dir
    if is_remote(target):
        try:
            return read_manifest(target, data_cfg)
        except DataError as exc:
            if "does not exist" in str(exc):
                return None
            raise
    if (Path(target) / MANIFEST_FILENAME).is_file():
        return read_manifest(target)
    return None


def _check_writable_remote(data_cfg: DataConfig) -> None:
    """A one-line error now, rather than after the tokenizer, if the bucket cannot be reached."""
    from streaming.base.storage.upload import CloudUploader

    target = data_cfg.shards_dir
    try:  # the uploader checks that the bucket exists and that the credentials may see it
        CloudUploader.get((str(staging_folder(data_cfg)), streaming_remote(target)), exist_ok=True)
    except Exception as exc:  # each cloud client raises its own types
        if storage_code(exc) == "404":  # of the bucket itself
            raise DataError(f"cannot write to {target}: the bucket does not exist (create it first)") from None
        raise DataError(f"cannot write to {target}: {storage_error(exc)}") from None


class _exclusive:
    """Holds `<staging>.lock` while prep writes: a second prep of the same target fails clearly."""

    def __init__(self, staging: Path, target: str):
        self.staging = staging
        self.lock_file = Path(str(staging) + ".lock")
        self.target = target

    def __enter__(self):
        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.handle = os.fdopen(open_lock_nofollow(self.lock_file), "r+")
        except OSError as exc:
            if is_link_error(exc):
                raise DataError(f"{self.lock_file} is a symbolic link: remove it, then rerun") from None
            raise
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.close()
            raise DataError(f"another msllm prep is writing {self.target} right now: wait for it") from None
        staging = self.staging
        if staging.is_symlink() or (staging.exists() and not staging.is_dir()):  # never written through or removed
            self.handle.close()
            what, fix = ((f"a symbolic link to {os.readlink(staging)}", f"remove the link (rm {staging}: what it "
                          "points to stays)") if staging.is_symlink() else ("a file", f"move it away (mv {staging} ...)"))
            raise DataError(f"{staging} is {what}, where msllm prep keeps its unfinished dataset, and msllm neither "
                            f"writes through it nor removes it: {fix}, then rerun")
        return self

    def __exit__(self, *exc_info):
        self.handle.close()  # the file stays: removing it would let a waiting prep lock a stale copy


@contextlib.contextmanager
def _writing(staging: Path) -> Iterator[None]:
    """A full disk (or a read-only or over-quota one) while prep writes: one line naming the folder
    prep writes in, and the file if it is in there (streaming's merge_index moves its result from
    a temporary folder, whose name would mislead). A rerun continues from what was saved; a
    complete dataset already at data.shards_dir is untouched until the end."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None:  # not the disk's: a library's own error, shown as it is
            raise
        name = exc.filename
        inside = isinstance(name, (str, bytes)) and Path(os.fsdecode(name)).absolute().is_relative_to(staging.absolute())
        file = f" ({exc.filename})" if inside else ""
        raise DataError(
            f"cannot write the dataset in {staging}: {exc.strerror}{file}: free space there or set "
            "data.shards_dir elsewhere, then rerun (prep continues from what it saved)"
        ) from None


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
    corpus_bytes: int = 0  # UTF-8 bytes of all documents (the progress bar's total)

    def split_of(self, text: str) -> str:
        return "validation" if document_hash_fraction(text) < self.threshold else "train"


def choose_split_rule(data_cfg: DataConfig) -> SplitRule:
    """The threshold is validation_fraction, moved just enough that neither split is empty."""
    corpus_bytes = 0
    seen = set()
    for text in iter_documents(data_cfg):
        seen.add(document_hash_fraction(text))
        corpus_bytes += len(text.encode("utf-8"))
    fractions = sorted(seen)
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
    return SplitRule(threshold, corpus_bytes)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _write_dataset(data_cfg: DataConfig, out: Path, fingerprint: str, quiet: bool) -> dict[str, Any]:
    """Write the dataset into the staging folder `out`, continuing what an earlier run of the same
    inputs and settings saved there; return its manifest (without fingerprint and inputs)."""
    progress_file = out / PROGRESS_FILENAME
    progress = _read_json(progress_file)
    if progress.get("fingerprint") != fingerprint:  # nothing to continue from: start afresh
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        rule = choose_split_rule(data_cfg)
        progress = {"fingerprint": fingerprint, "threshold": rule.threshold, "corpus_bytes": rule.corpus_bytes}
        _write_json(progress_file, progress)
    else:
        rule = SplitRule(progress["threshold"], progress["corpus_bytes"])
        _say(quiet, f"msllm prep: continuing the interrupted run in {out}")

    tokenizer_file = out / TOKENIZER_FILENAME
    if data_cfg.tokenizer.type == "bytes":
        tokenizer_source = "bytes"
    elif data_cfg.tokenizer.model:
        given = Path(data_cfg.tokenizer.model)
        load_sentencepiece(given)  # a clear error if it is missing or not a model
        tokenizer_source = str(given)
    else:
        tokenizer_source = "trained"
    if not tokenizer_file.is_file():  # written under another name, then renamed: never half a file
        partial = out / (TOKENIZER_FILENAME + ".partial")
        partial.unlink(missing_ok=True)  # a link there is removed, never written through
        if data_cfg.tokenizer.type == "bytes":
            write_new(partial, BYTES_DESCRIPTOR)
        elif data_cfg.tokenizer.model:
            shutil.copyfile(data_cfg.tokenizer.model, partial)
        else:
            tok = data_cfg.tokenizer
            _say(quiet, f"msllm prep: training a {tok.type} tokenizer of {tok.vocab_size} pieces")
            train_docs = (t for t in iter_documents(data_cfg) if rule.split_of(t) == "train")
            train_tokenizer(train_docs, data_cfg.tokenizer, partial, num_threads=data_cfg.workers)
        os.replace(partial, tokenizer_file)
    tokenizer = load_tokenizer_file(tokenizer_file)
    ids = tokenizer.special_ids()
    if ids["eos_id"] < 0:
        raise DataError(f"the tokenizer {tokenizer_source} has no EOS piece: documents cannot be joined")

    counts = write_shards(
        documents=((rule.split_of(t), t) for t in iter_documents(data_cfg)),
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


_COUNTS = ("documents", "tokens", "bytes", "samples", "sample_bytes")


class WindowWriter:
    """Joins token arrays into one stream and writes it as windows of `window` tokens to `out`.

    `state` (from an earlier writer's `state()`) continues that writer's stream and counts: the
    tokens of its unfinished window come first. `remote`: MDSWriter also uploads the shards there.
    """

    def __init__(
        self,
        out: Path,
        window: int,
        shard_size_limit: int,
        byte_table: np.ndarray,
        remote: Optional[str] = None,
        state: Optional[dict[str, Any]] = None,
    ):
        from streaming import MDSWriter

        self.writer = MDSWriter(
            out=str(out) if remote is None else (str(out), remote),
            columns=TOKENS_COLUMN,
            compression=SHARD_COMPRESSION,
            hashes=SHARD_HASHES,
            size_limit=shard_size_limit,
            keep_local=True,
            exist_ok=True,  # what an interrupted run left of this sub-folder is replaced
        )
        self.window = window
        self.byte_table = byte_table
        state = state or {}
        self.pending = np.asarray(state.get("pending", []), dtype=np.int32)  # the tail shorter than a window
        self.counts = {key: int(state.get("counts", {}).get(key, 0)) for key in _COUNTS}

    def add(self, tokens: np.ndarray, documents: int, text_bytes: int) -> None:
        self.counts["documents"] += documents
        self.counts["bytes"] += text_bytes
        self.counts["tokens"] += len(tokens)
        stream = np.concatenate([self.pending, tokens])
        full = len(stream) // self.window
        windows = stream[: full * self.window].reshape(full, self.window)
        for sample in windows:
            self.writer.write({"tokens": sample})
        self.counts["samples"] += full
        self.counts["sample_bytes"] += int(self.byte_table[windows].sum())
        self.pending = stream[full * self.window :].copy()

    def close(self) -> dict[str, Any]:
        """Close the shards (and finish their upload); return the state to continue from."""
        self.writer.finish()
        return self.state()

    def state(self) -> dict[str, Any]:
        return {"pending": self.pending.tolist(), "counts": dict(self.counts)}

    def finish(self) -> dict[str, Any]:
        """Close the shards; the tail that does not fill a window is dropped (and counted)."""
        self.close()
        return summary_counts(self.counts, self.window)


def summary_counts(counts: dict[str, int], window: int) -> dict[str, Any]:
    """A split's figures for the manifest, from a WindowWriter's counts."""
    sample_tokens = counts["samples"] * window
    return {
        **counts,
        "sample_tokens": sample_tokens,
        "dropped_tokens": counts["tokens"] - sample_tokens,
        "tokens_per_byte": counts["tokens"] / counts["bytes"] if counts["bytes"] else 0.0,
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
    checkpoint_bytes: Optional[int] = None,
    total_bytes: Optional[int] = None,
    remote: Optional[str] = None,
) -> dict[str, dict[str, Any]]:
    """Tokenize (split, text) pairs in `workers` processes and write out/<split>/ MDS shards.

    The documents are cut into parts of about `checkpoint_bytes` of text (None: one part). Each
    part is written to out/<split>/part-NNNNN/, then out/progress.json records it as done (with
    the unfinished windows and counts): called again with the same documents, the done parts are
    skipped. At the end each split gets one index.json that joins its parts (also uploaded to
    `remote`/<split>/ when given, as the shards are). `total_bytes` (the documents' UTF-8 size)
    gives the progress bar its end, hence its ETA.
    """
    window = seq_len + 1
    progress_file = out / PROGRESS_FILENAME
    progress = _read_json(progress_file)
    parts_done = progress.get("parts_done", 0)
    states = progress.get("states", {})
    part_of = _part_numbers(checkpoint_bytes)
    numbered = ((part_of(text), split, text) for split, text in documents)
    to_write = (item for item in numbered if item[0] >= parts_done)

    def part_folder(split: str, part: int) -> Path:
        return out / split / f"part-{part:05d}"

    def open_part(part: int) -> dict[str, WindowWriter]:
        return {
            split: WindowWriter(
                part_folder(split, part), window, shard_size_limit, byte_table,
                remote=None if remote is None else f"{remote}/{split}/{part_folder(split, part).name}",
                state=states.get(split),
            )
            for split in SPLITS
        }

    pool = None
    if workers > 1:
        # Made before the progress bar starts its thread; each worker loads its own tokenizer.
        pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (str(tokenizer_file),))
        results: Iterator = pool.imap(_encode_batch, _batches(to_write))
    else:
        _init_worker(str(tokenizer_file))
        results = map(_encode_batch, _batches(to_write))
    done_bytes = sum(state["counts"]["bytes"] for state in states.values())
    part = parts_done
    writers = open_part(part)
    try:
        with tqdm(
            desc="tokenize + write", total=total_bytes, initial=done_bytes, unit="B", unit_scale=True, disable=quiet
        ) as bar:
            for batch_part, split, tokens, n_documents, n_bytes in results:
                while batch_part > part:  # the previous part is complete: save it
                    states = {split_: writer.close() for split_, writer in writers.items()}
                    part += 1
                    _write_json(progress_file, {**progress, "parts_done": part, "states": states})
                    writers = open_part(part)
                writers[split].add(tokens, n_documents, n_bytes)
                bar.update(n_bytes)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    counts = {split: writer.finish() for split, writer in writers.items()}
    part += 1
    _write_json(progress_file, {**progress, "parts_done": part, "states": {s: w.state() for s, w in writers.items()}})
    for split in SPLITS:
        _merge_part_indexes(out / split, [part_folder(split, n) for n in range(part)])
    return counts


def _part_numbers(checkpoint_bytes: Optional[int]):
    """A function that numbers documents, in order, by the part they fall in: a part ends after
    the document that brings it to `checkpoint_bytes` of text. Depends on the order only, so a
    rerun numbers the same documents the same way."""
    state = {"part": 0, "bytes": 0}

    def part_of(text: str) -> int:
        part = state["part"]
        if checkpoint_bytes is not None:
            state["bytes"] += len(text.encode("utf-8"))
            if state["bytes"] >= checkpoint_bytes:
                state["part"], state["bytes"] = part + 1, 0
        return part

    return part_of


def _merge_part_indexes(split_dir: Path, parts: list[Path]) -> None:
    """One index.json for the split that names the shards of every part (part-N/shard...)."""
    import logging

    from streaming.base.util import merge_index

    logging.disable(logging.WARNING)  # merge_index warns about the temporary folder it uses
    try:
        merge_index([str(part / "index.json") for part in parts], str(split_dir), keep_local=True)
    finally:
        logging.disable(logging.NOTSET)


def _upload_finished(staging: Path, target: str) -> None:
    """Upload the merged indexes, the tokenizer and, last, the manifest (the shards already are)."""
    from streaming.base.storage.upload import CloudUploader

    uploader = CloudUploader.get((str(staging), streaming_remote(target)), keep_local=True, exist_ok=True)
    for name in [f"{split}/index.json" for split in SPLITS] + [TOKENIZER_FILENAME, MANIFEST_FILENAME]:
        try:
            uploader.upload_file(name)
        except Exception as exc:  # each cloud client raises its own types
            raise DataError(f"cannot upload {name} to {target}: {storage_error(exc)}") from None


def _batches(documents: Iterable[tuple[int, str, str]]) -> Iterator[tuple[int, str, list[str]]]:
    """Group (part, split, text) into per-split batches of about _BATCH_CHARS characters, in
    order; a batch never spans two parts."""
    pending: dict[str, list[str]] = {split: [] for split in SPLITS}
    sizes = {split: 0 for split in SPLITS}
    current = None
    for part, split, text in documents:
        if part != current:
            for name in SPLITS:
                if pending[name]:
                    yield current, name, pending[name]
                    pending[name], sizes[name] = [], 0
            current = part
        pending[split].append(text)
        sizes[split] += len(text)
        if sizes[split] >= _BATCH_CHARS:
            yield part, split, pending[split]
            pending[split], sizes[split] = [], 0
    for split in SPLITS:
        if pending[split]:
            yield current, split, pending[split]


_worker_tokenizer = None


def _init_worker(tokenizer_file: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer_file(tokenizer_file)


def _encode_batch(batch: tuple[int, str, list[str]]) -> tuple[int, str, np.ndarray, int, int]:
    """Tokens of a batch of documents, EOS after each, as one int32 array."""
    part, split, texts = batch
    encoded = _worker_tokenizer.encode(texts, add_eos=True)
    tokens = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int32, count=sum(map(len, encoded)))
    return part, split, tokens, len(texts), sum(len(t.encode("utf-8")) for t in texts)


# ----------------------------------------------------------------------------------------------
# Up-to-date check and the final rename
# ----------------------------------------------------------------------------------------------


def _fingerprint(
    data_cfg: DataConfig, files: list[Path], known: list[dict[str, Any]]
) -> tuple[str, list[dict[str, Any]]]:
    """A hash of what decides the shards' content: the data settings and the inputs' contents.

    `known`: the inputs recorded in an existing manifest; a file whose path, size and mtime match
    a record keeps its recorded sha256 instead of being read again.
    """
    watched = list(files)
    if data_cfg.tokenizer.model:
        watched.append(Path(data_cfg.tokenizer.model))
    recorded = {(k.get("path"), k.get("bytes"), k.get("mtime_ns")): k.get("sha256") for k in known}
    inputs = []
    for path in watched:
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise DataError(f"no such file: {path}") from None
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        sha256 = recorded.get(key) or file_sha256(path)
        inputs.append({"path": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256})
    blob = json.dumps(
        {"format": MANIFEST_FORMAT, "data": _settings(dataclasses.asdict(data_cfg)), "inputs": [i["sha256"] for i in inputs]},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest(), inputs


def _settings(data: dict[str, Any]) -> dict[str, Any]:
    """The data settings that decide the samples (a given tokenizer counts by its content)."""
    settings = {k: v for k, v in data.items() if k not in _FIELDS_NOT_IN_FINGERPRINT}
    settings["tokenizer"] = {k: v for k, v in settings.get("tokenizer", {}).items() if k != "model"}
    return settings


def _what_differs(manifest: dict[str, Any], data_cfg: DataConfig) -> str:
    before, now = _settings(manifest.get("data", {})), _settings(dataclasses.asdict(data_cfg))
    changed = [f"data.{k} {before.get(k)!r} vs {now[k]!r}" for k in now if before.get(k) != now[k]]
    return "settings (" + "; ".join(changed) + ")" if changed else "input files (their contents differ)"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _write_json(path: Path, value: dict[str, Any]) -> None:
    """Write by rename, so that a kill leaves the old file or the new one, never half of one."""
    write_new(path, json.dumps(value) + "\n")


def is_msllm_dataset(folder: Path) -> bool:
    """Whether `folder` is a dataset msllm wrote: a folder (not a link) whose manifest.json is msllm's."""
    manifest = _read_json(folder / MANIFEST_FILENAME) if folder.is_dir() and not folder.is_symlink() else {}
    return manifest.get("format") == MANIFEST_FORMAT


def _refuse_foreign(folder: Path) -> None:
    """A DataError if `folder` holds something msllm did not write (a file, a link, a folder of
    files without msllm's manifest): --force never replaces it, so the message never offers it."""
    if not (folder.exists() or folder.is_symlink()) or is_msllm_dataset(folder):
        return
    if folder.is_dir() and not folder.is_symlink():
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
        if not entries:
            return  # an empty folder: nothing to lose
        listing = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        what = f"holds files that msllm did not put there ({listing}) and no msllm {MANIFEST_FILENAME}"
    else:
        what = "is a link" if folder.is_symlink() else "is a file"
    raise DataError(
        f"data.shards_dir {folder} {what}: msllm never replaces what it did not write; set data.shards_dir "
        "to a new or empty folder (or move those files away), then run `msllm prep RECIPE`"
    )


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished folder to the target. An old target (msllm's: _refuse_foreign let it
    through) is first moved aside to `.NAME.old-<time>-<pid>`, and deleted once the new one is in
    place only if it is still an msllm dataset; anything else there is kept, and said so."""
    if target.exists() or target.is_symlink():
        _refuse_foreign(target)  # checked again: it may have changed while prep ran
        old = target.parent / f".{target.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        os.replace(target, old)
        os.replace(tmp, target)
        if is_msllm_dataset(old):
            shutil.rmtree(old, ignore_errors=True)
        elif old.is_symlink() or not old.is_dir() or any(old.iterdir()):
            print(f"msllm prep: what was in {target} is kept in {old} (msllm did not write it)", flush=True)
        else:
            old.rmdir()
    else:
        os.replace(tmp, target)


def _describe_source(data_cfg: DataConfig) -> str:
    if data_cfg.source in ("text", "jsonl"):
        return f"data.paths {data_cfg.paths}"
    return f"data.source {data_cfg.source}"


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, flush=True)
