"""Tokenizing: the tokenizer of the dataset (trained on the train documents, copied from
data.tokenizer.model, or the byte tokenizer), and the documents encoded in data.workers processes
(batches of documents of one split, EOS after each document)."""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from msllm.config import DataConfig
from msllm.data.manifest import SPLITS
from msllm.data.prepare.read import train_documents
from msllm.data.prepare.split import SplitRule, SplitScan, choose_split_rule
from msllm.data.tokenizer import (
    BYTES_DESCRIPTOR,
    TOKENIZER_FILENAME,
    load_sentencepiece,
    load_tokenizer_file,
    train_tokenizer,
)
from msllm.errors import DataError
from msllm.safe_files import write_new

# Documents are sent to the tokenizer processes in batches of about this many characters.
_BATCH_CHARS = 1 << 18


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


def make_tokenizer(data_cfg: DataConfig, out: Path, rule: SplitRule | None, say) -> tuple[Path, str, SplitRule]:
    """out/tokenizer.model, unless an earlier run left it there: the byte tokenizer's descriptor, a
    copy of data.tokenizer.model, or a sentencepiece model trained on the train documents. `rule`:
    the split (None: not found yet: it is found here, in the pass that trains the tokenizer when one
    is trained). Returns (its path, where it comes from: "bytes", the given path or "trained", the
    split rule)."""
    tokenizer_file = out / TOKENIZER_FILENAME
    if data_cfg.tokenizer.type == "bytes":
        source = "bytes"
    elif data_cfg.tokenizer.model:
        given = Path(data_cfg.tokenizer.model)
        load_sentencepiece(given)  # a clear error if it is missing or not a model
        source = str(given)
    else:
        source = "trained"
    if rule is None and (tokenizer_file.is_file() or source != "trained"):
        rule = choose_split_rule(data_cfg)
    if not tokenizer_file.is_file():  # written under another name, then renamed: never half a file
        partial = out / (TOKENIZER_FILENAME + ".partial")
        partial.unlink(missing_ok=True)  # a link there is removed, never written through
        if data_cfg.tokenizer.type == "bytes":
            write_new(partial, BYTES_DESCRIPTOR)
        elif data_cfg.tokenizer.model:
            shutil.copyfile(data_cfg.tokenizer.model, partial)
        else:
            tok = data_cfg.tokenizer
            say(f"msllm prep: training a {tok.type} tokenizer of {tok.vocab_size} pieces")
            if rule is None:
                rule = train_while_splitting(data_cfg, partial)
            else:
                train_tokenizer(train_documents(data_cfg, rule), tok, partial, num_threads=data_cfg.workers)
        os.replace(partial, tokenizer_file)
    return tokenizer_file, source, rule


def train_while_splitting(data_cfg: DataConfig, out_path: Path) -> SplitRule:
    """Train the tokenizer in the same pass over the corpus that finds the split (SplitScan): on the
    documents whose hash is at or above data.validation_fraction, the train split's, unless the
    threshold has to move (a corpus whose hashes all lie on one side of it): then it is trained
    again, on the train split. The same documents in the same order as a pass of its own: the same
    tokenizer. Returns the split rule."""
    scan = SplitScan(data_cfg)
    guess = SplitRule(data_cfg.validation_fraction)
    failed = None
    try:
        train_tokenizer(
            (text for text in scan.documents() if guess.split_of(text) == "train"),
            data_cfg.tokenizer,
            out_path,
            num_threads=data_cfg.workers,
        )
    except DataError as exc:  # sentencepiece's, or the corpus's own, which sentencepiece wraps
        failed = exc
    if scan.error is not None:
        raise scan.error
    rule = scan.finish()  # a corpus that cannot be split fails here, as before any training
    if rule.threshold != guess.threshold:
        train_tokenizer(train_documents(data_cfg, rule), data_cfg.tokenizer, out_path, num_threads=data_cfg.workers)
    elif failed is not None:
        raise failed
    return rule


@contextlib.contextmanager
def encoded_batches(
    documents: Iterable[tuple[int, str, str]], tokenizer_file: Path, workers: int
) -> Iterator[Iterator[tuple[int, str, np.ndarray, int, int]]]:
    """(part, split, tokens, documents, text bytes) of the (part, split, text) documents, batch by
    batch and in order, encoded in `workers` processes (1: in this one). The pool is made before a
    progress bar starts its thread; each worker loads its own tokenizer; it ends with the block."""
    if workers <= 1:
        _init_worker(str(tokenizer_file))
        yield map(_encode_batch, _batches(documents))
        return
    pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (str(tokenizer_file),))
    try:
        yield pool.imap(_encode_batch, _batches(documents))
    finally:
        pool.terminate()
        pool.join()
