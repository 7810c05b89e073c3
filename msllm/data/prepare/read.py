"""What prep reads: the inputs (their contents, with the data settings, make the fingerprint that
says whether shards are up to date) and the corpus, pass by pass, each document labelled with its
split (msllm.data.sources reads the files)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from msllm.config import DataConfig
from msllm.data.manifest import MANIFEST_FORMAT
from msllm.data.sources import iter_documents
from msllm.data.tokenizer import file_sha256
from msllm.errors import DataError

# Data fields that change nothing in the written samples; they stay out of the fingerprint.
# (`paths` and tokenizer.model are there by content: the inputs' sha256.)
_FIELDS_NOT_IN_FINGERPRINT = (
    "workers",
    "shuffle",
    "num_workers",
    "num_canonical_nodes",
    "cache_dir",
    "shards_dir",
    "paths",
    "prep_checkpoint_bytes",
)


def input_fingerprint(
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
    settings = data_settings(dataclasses.asdict(data_cfg))
    blob = json.dumps(
        {"format": MANIFEST_FORMAT, "data": settings, "inputs": [i["sha256"] for i in inputs]}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest(), inputs


def data_settings(data: dict[str, Any]) -> dict[str, Any]:
    """The data settings that decide the samples (a given tokenizer counts by its content)."""
    settings = {k: v for k, v in data.items() if k not in _FIELDS_NOT_IN_FINGERPRINT}
    settings["tokenizer"] = {k: v for k, v in settings.get("tokenizer", {}).items() if k != "model"}
    return settings


def what_differs(manifest: dict[str, Any], data_cfg: DataConfig) -> str:
    before, now = data_settings(manifest.get("data", {})), data_settings(dataclasses.asdict(data_cfg))
    changed = [f"data.{k} {before.get(k)!r} vs {now[k]!r}" for k in now if before.get(k) != now[k]]
    return "settings (" + "; ".join(changed) + ")" if changed else "input files (their contents differ)"


def describe_source(data_cfg: DataConfig) -> str:
    if data_cfg.source in ("text", "jsonl"):
        return f"data.paths {data_cfg.paths}"
    return f"data.source {data_cfg.source}"


def labelled_documents(data_cfg: DataConfig, rule) -> Iterator[tuple[str, str]]:
    """One pass over the corpus: (split, text) of every document, in order (`rule`: a SplitRule)."""
    return ((rule.split_of(text), text) for text in iter_documents(data_cfg))


def train_documents(data_cfg: DataConfig, rule) -> Iterator[str]:
    """One pass over the corpus: the text of the train documents, in order."""
    return (text for split, text in labelled_documents(data_cfg, rule) if split == "train")
