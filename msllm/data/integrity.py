"""Checks, before the first step, that the manifest describes usable splits.

`check_splits(manifest, shards_dir)`: the manifest lists a train and a validation split, each with
samples, tokens and bytes (bits per byte divides by the latter), so that an edited or truncated
manifest fails at start instead of after the whole run. (The shards themselves are checked by
streaming against prep's hashes as they are copied into the job's cache: msllm.data.jobcache.)
"""

from __future__ import annotations

from msllm.errors import DataError

_FIX = "run `msllm prep RECIPE --force` to rewrite the shards"


def check_splits(manifest: dict, shards_dir: str) -> None:
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
                raise DataError(f"{shards_dir}/manifest.json: the {name} split has {field} {value!r} (empty or edited): {_FIX}")
