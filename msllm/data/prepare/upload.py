"""A remote data.shards_dir (s3://...): the write access checked before any work, and the files
uploaded once the dataset is complete (MDSWriter uploads the shards themselves as it writes them:
msllm.data.prepare.write)."""

from __future__ import annotations

from pathlib import Path

from streaming.base.storage.upload import CloudUploader

from msllm.config import DataConfig
from msllm.data.manifest import MANIFEST_FILENAME, SPLITS, staging_folder, storage_code, storage_error, streaming_remote
from msllm.data.tokenizer import TOKENIZER_FILENAME
from msllm.errors import DataError


def check_writable_remote(data_cfg: DataConfig) -> None:
    """A one-line error now, rather than after the tokenizer, if the bucket cannot be reached."""
    target = data_cfg.shards_dir
    try:  # the uploader checks that the bucket exists and that the credentials may see it
        CloudUploader.get((str(staging_folder(data_cfg)), streaming_remote(target)), exist_ok=True)
    except Exception as exc:  # each cloud client raises its own types
        if storage_code(exc) == "404":  # of the bucket itself
            raise DataError(f"cannot write to {target}: the bucket does not exist (create it first)") from None
        raise DataError(f"cannot write to {target}: {storage_error(exc)}") from None


def upload_finished(staging: Path, target: str) -> None:
    """Upload the merged indexes, the tokenizer and, last, the manifest (the shards already are)."""
    uploader = CloudUploader.get((str(staging), streaming_remote(target)), keep_local=True, exist_ok=True)
    for name in [f"{split}/index.json" for split in SPLITS] + [TOKENIZER_FILENAME, MANIFEST_FILENAME]:
        try:
            uploader.upload_file(name)
        except Exception as exc:  # each cloud client raises its own types
            raise DataError(f"cannot upload {name} to {target}: {storage_error(exc)}") from None
