"""Checks, before the first step, that the manifest and the shard indexes can be used.

`check_manifest(manifest, shards_dir)`: the manifest has its seq_len, vocab_size and tokenizer
hash, and lists a train and a validation split, each with samples, tokens and bytes (bits per byte
divides by the latter), so that an edited or truncated manifest fails at start instead of after
the whole run. (The shards themselves are checked by
streaming against prep's hashes as they are copied into the job's cache: msllm.data.jobcache.)

`check_index(index, where)`: every file a split's index.json names is a relative path inside the
split's folder. mosaicml-streaming joins these names to the shards folder (to read) and to the
job's cache (to write) as they are, so an index from elsewhere naming `/home/me/.bashrc` or
`../../x` would make training read or overwrite that file.
"""

from __future__ import annotations

from typing import Any

from msllm.errors import DataError, short_repr

_FIX = "run `msllm prep RECIPE --force` to rewrite the shards"
# The shard files an MDS, JSON or CSV shard's entry in index.json names (streaming's Reader).
SHARD_FILE_KEYS = ("raw_data", "zip_data", "raw_meta", "zip_meta")


def check_manifest(manifest: dict, shards_dir: str) -> None:
    """DataError unless the manifest has the fields the trainer reads, of their types, and a
    train and a validation split that are not empty."""
    for field, kind in (("seq_len", int), ("vocab_size", int), ("tokenizer_sha256", str)):
        value = manifest.get(field)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 1):
            raise DataError(f"{shards_dir}/manifest.json: {field} is {short_repr(value)} (missing or edited): {_FIX}")
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        raise DataError(f"{shards_dir}/manifest.json lists no splits: {_FIX}")
    for name in ("train", "validation"):
        split = splits.get(name)
        if not isinstance(split, dict):
            raise DataError(f"{shards_dir}/manifest.json has no {name} split: {_FIX}")
        for field in ("samples", "tokens", "bytes"):
            value = split.get(field)
            if not isinstance(value, (int, float)) or value <= 0:
                raise DataError(
                    f"{shards_dir}/manifest.json: the {name} split has {field} {value!r} (empty or edited): {_FIX}"
                )


def check_index(index: Any, where: str) -> None:
    """DataError unless `index` (a parsed index.json, read from `where`) is an MDS index (version
    2) whose every shard names its files by plain relative paths: names separated by `/` (the
    sub-folders of streaming's merged indexes, `part-00000/shard.00000.mds`), none of them empty,
    `.` or `..`, no absolute path, no backslash."""
    if not isinstance(index, dict) or index.get("version") != 2 or not isinstance(index.get("shards"), list):
        raise DataError(f"{where} is not an MDS index (version 2 with a list of shards): {_FIX}")
    for number, shard in enumerate(index["shards"]):
        if not isinstance(shard, dict) or not isinstance(shard.get("raw_data"), dict):
            raise DataError(f"{where}: shard {number} has no raw_data entry: {_FIX}")
        for key in SHARD_FILE_KEYS:
            info = shard.get(key)
            if info is None:
                continue
            name = info.get("basename") if isinstance(info, dict) else info
            if not _is_relative_name(name):
                raise DataError(
                    f"{where}: shard {number} names its {key} file {short_repr(name, limit=300)}, "
                    "which is not a file inside the split's "
                    f"folder (absolute, `..`, empty or not a name): refused, nothing read or written; {_FIX}"
                )


def _is_relative_name(name: Any) -> bool:
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name or "\0" in name:
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))
