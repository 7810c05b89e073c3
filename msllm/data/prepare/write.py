"""Writing: the token stream cut into windows of seq_len+1 tokens, written as MDS shards, one
sub-folder per split and part (a part: about data.prep_checkpoint_bytes of text, after which the
progress is saved), then one merged index per split."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from streaming import MDSWriter
from streaming.base.util import merge_index
from tqdm import tqdm

from msllm.data.manifest import SPLITS
from msllm.data.prepare.staging import PROGRESS_FILENAME, read_json, write_json
from msllm.data.prepare.tokenize import encoded_batches

# The schema LLM Foundry's convert_dataset_* scripts write: one int32 array per sample.
TOKENS_COLUMN = {"tokens": "ndarray:int32"}
SHARD_COMPRESSION = "zstd"
SHARD_HASHES = ["sha1", "xxh64"]


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
        remote: str | None = None,
        state: dict[str, Any] | None = None,
    ):
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
    checkpoint_bytes: int | None = None,
    total_bytes: int | None = None,
    remote: str | None = None,
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
    progress = read_json(progress_file)
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
                part_folder(split, part),
                window,
                shard_size_limit,
                byte_table,
                remote=None if remote is None else f"{remote}/{split}/{part_folder(split, part).name}",
                state=states.get(split),
            )
            for split in SPLITS
        }

    done_bytes = sum(state["counts"]["bytes"] for state in states.values())
    part = parts_done
    with encoded_batches(to_write, tokenizer_file, workers) as results:
        writers = open_part(part)
        with tqdm(
            desc="tokenize + write", total=total_bytes, initial=done_bytes, unit="B", unit_scale=True, disable=quiet
        ) as bar:
            for batch_part, split, tokens, n_documents, n_bytes in results:
                while batch_part > part:  # the previous part is complete: save it
                    states = {split_: writer.close() for split_, writer in writers.items()}
                    part += 1
                    write_json(progress_file, {**progress, "parts_done": part, "states": states})
                    writers = open_part(part)
                writers[split].add(tokens, n_documents, n_bytes)
                bar.update(n_bytes)
    counts = {split: writer.finish() for split, writer in writers.items()}
    part += 1
    write_json(progress_file, {**progress, "parts_done": part, "states": {s: w.state() for s, w in writers.items()}})
    for split in SPLITS:
        _merge_part_indexes(out / split, [part_folder(split, n) for n in range(part)])
    return counts


def _part_numbers(checkpoint_bytes: int | None):
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
    logging.disable(logging.WARNING)  # merge_index warns about the temporary folder it uses
    try:
        merge_index([str(part / "index.json") for part in parts], str(split_dir), keep_local=True)
    finally:
        logging.disable(logging.NOTSET)
