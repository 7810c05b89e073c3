"""The manifest: what a shards folder holds, and the checks that it fits a recipe.

`manifest.json` is written last, after every shard, so its presence marks a complete dataset.
Its fields are described in docs/data.md, section "The manifest (`manifest.json`)"; the ones the trainer uses:

    vocab_size, seq_len, pad_id, unk_id, bos_id, eos_id, tokenizer_path, tokenizer_sha256,
    splits: {train: {documents, tokens, samples, bytes, ...}, validation: {...}}

A `shards_dir` may be a remote URI that streaming can read (s3://, gs://, oci://, ...):
the manifest and tokenizer are then downloaded into a local cache folder first (data.cache_dir).
`file:///path` reads a mounted folder the same way, through the cache.

Object storage that stops answering (issue 32) is given up on within a bound, never waited on
forever: each S3 request connects within CONNECT_TIMEOUT_S and reads within DOWNLOAD_TIMEOUT_S,
botocore tries it CLIENT_ATTEMPTS times, streaming tries a shard DOWNLOAD_RETRIES times: at most
STORE_GIVE_UP_S seconds per shard. Then `msllm train` stops with one line naming the store and
saying that a rerun resumes from the last checkpoint (`store_unreachable`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streaming.base.storage.download import CloudDownloader, S3Downloader

from msllm.config import DataConfig
from msllm.data.integrity import check_manifest
from msllm.data.jobcache import claim_cache_root
from msllm.data.tokenizer import TOKENIZER_FILENAME, file_sha256, load_tokenizer_file
from msllm.errors import DataError, short_repr

CONNECT_TIMEOUT_S = 10
DOWNLOAD_TIMEOUT_S = 30  # streaming's download_timeout: the read timeout of one request
CLIENT_ATTEMPTS = 3  # botocore's attempts of one request (its first one included)
DOWNLOAD_RETRIES = 2  # streaming's download_retry: attempts of one shard
STORE_GIVE_UP_S = DOWNLOAD_RETRIES * CLIENT_ATTEMPTS * (CONNECT_TIMEOUT_S + DOWNLOAD_TIMEOUT_S)  # 240 s

MANIFEST_FILENAME = "manifest.json"
MANIFEST_FORMAT = "msllm-shards/1"
SPLITS = ("train", "validation")


def is_remote(shards_dir: str) -> bool:
    """A URI is read through a local cache; `file://PATH` does so for a mounted folder (e.g. NFS)."""
    return "://" in shards_dir


def streaming_remote(uri: str) -> str:
    """The remote as streaming names it: its downloaders take a plain path for local files."""
    return uri[len("file://") :] if uri.startswith("file://") else uri


def remote_cache_root(data_cfg: DataConfig | None = None) -> Path:
    """Where copies of remote shards go: data.cache_dir, or a folder under the system temp dir."""
    if data_cfg is not None and data_cfg.cache_dir:
        return Path(data_cfg.cache_dir)
    return Path(tempfile.gettempdir()) / "msllm-data-cache"


def staging_folder(data_cfg: DataConfig) -> Path:
    """Where `msllm prep` writes a dataset before it is complete: next to a local target (so the
    final move is a rename), in the local cache for a remote one."""
    target = data_cfg.shards_dir
    if is_remote(target):
        return remote_cache_root(data_cfg) / f"prep-{hashlib.sha1(target.encode()).hexdigest()[:16]}.partial"
    folder = Path(target)
    return folder.parent / f".{folder.name}.partial"


def _local_copy(shards_dir: str, filename: str, cache_root: Path) -> Path:
    """The local path of a file of shards_dir, downloading it first if shards_dir is remote."""
    if not is_remote(shards_dir):
        return Path(shards_dir) / filename

    claim_cache_root(cache_root)  # never write into a folder that holds files msllm did not put there
    local = cache_root / hashlib.sha1(shards_dir.encode()).hexdigest()[:16] / filename
    download(streaming_remote(shards_dir).rstrip("/") + "/" + filename, local)
    return local


def download(remote: str, local: Path) -> None:
    """Download the object `remote` (a URI, or a path as streaming names local files) to `local`,
    whole or not at all (through a temporary name); a one-line DataError if it cannot."""
    bound_object_store_waits()  # before the first client of this process is made
    tmp = local.parent / f".{local.name}.{os.getpid()}.tmp"
    try:
        CloudDownloader.direct_download(remote, str(tmp), timeout=DOWNLOAD_TIMEOUT_S)
    except FileNotFoundError:
        raise DataError(f"{remote} does not exist") from None
    except Exception as exc:  # each cloud client raises its own types
        if storage_code(exc) in ("404", "NoSuchKey"):
            raise DataError(f"{remote} does not exist (check the bucket and the path in data.shards_dir)") from None
        raise DataError(f"cannot download {remote}: {storage_error(exc)}") from None
    os.replace(tmp, local)


class _BackgroundFailures(logging.Filter):
    """streaming downloads shards in a thread pool. mosaicml-streaming 0.13 logs a failed download
    through concurrent.futures ("exception calling callback") as a traceback, and the main thread
    only gets "Background thread failed": this keeps the download's exception (for the one line)
    and drops that traceback. (streaming-community 0.14 logs nothing and chains the download's
    exception to its "StreamingDataset background thread failed: ..." instead: `_download_cause`.)"""

    last: BaseException | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.getMessage().startswith("exception calling callback"):
            _BackgroundFailures.last = record.exc_info[1]
            return False
        return True


_BOUNDED = False


def bound_object_store_waits() -> None:
    """Once per process: S3 clients that streaming makes connect within CONNECT_TIMEOUT_S and try
    a request CLIENT_ATTEMPTS times (streaming's own client sets only the read timeout, so a store
    that stopped answering was waited on for minutes per request), and a failed background
    download is kept for `store_unreachable` instead of printed as a traceback."""
    global _BOUNDED
    if _BOUNDED:
        return
    from botocore.config import Config  # noqa: PLC0415 (optional: boto3, the [s3] extra)

    def _create_s3_client(self, unsigned: bool = False, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
        """streaming's S3Downloader._create_s3_client, with the bounds above."""
        from boto3.session import Session  # noqa: PLC0415 (optional: boto3, the [s3] extra)
        from botocore import UNSIGNED  # noqa: PLC0415 (optional: boto3, the [s3] extra)

        config = Config(
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=timeout,
            retries={"mode": "adaptive", "total_max_attempts": CLIENT_ATTEMPTS},
            **({"signature_version": UNSIGNED} if unsigned else {}),
        )
        self._s3_client = Session().client("s3", config=config, endpoint_url=os.environ.get("S3_ENDPOINT_URL"))

    S3Downloader._create_s3_client = _create_s3_client
    keep_background_failures()
    _BOUNDED = True


def keep_background_failures() -> None:
    """Once per process: a failure in streaming's background threads (a shard that fails its hash,
    a full cache, a store gone) is kept for `background_failure` instead of printed as a traceback."""
    log = logging.getLogger("concurrent.futures")
    if not any(isinstance(f, _BackgroundFailures) for f in log.filters):
        log.addFilter(_BackgroundFailures())


def background_failure(exc: BaseException) -> BaseException | None:
    """The exception of streaming's background thread behind `exc` (mosaicml-streaming's "Background
    thread failed", whose cause was kept; streaming-community's "StreamingDataset background thread
    failed", which chains it); None for any other error."""
    if "background thread failed" not in str(exc).lower():
        return None
    return _download_cause(exc) or _BackgroundFailures.last


def store_unreachable(exc: BaseException, shards_dir: str) -> DataError | None:
    """The one-line error for a loader that failed because the object store holding `shards_dir`
    stopped answering (streaming's "Background thread failed", or a worker process's copy of it);
    None for any other failure."""
    if not is_remote(shards_dir) or "background thread failed" not in str(exc).lower():
        return None
    cause = _download_cause(exc) or _BackgroundFailures.last
    missing = missing_object(cause) if cause is not None else None
    if missing is not None:  # the store answered: the object is not there, and waiting will not bring it
        return DataError(
            f"{missing} is missing from the object store at {shards_dir} (not found): the dataset there is "
            "incomplete: restore the object (or remove the dataset there and run `msllm prep RECIPE` again), "
            "then rerun the same command: training resumes from the last checkpoint"
        )
    why = storage_error(cause) if cause is not None else "a shard download failed"
    return DataError(
        f"the object store at {shards_dir} is unreachable ({why}); msllm gave up on a shard after at most "
        f"{STORE_GIVE_UP_S} s: when it answers again, rerun the same command: training resumes from the "
        "last checkpoint"
    )


def _download_cause(exc: BaseException) -> BaseException | None:
    """The exception that streaming-community chains to its "background thread failed" (the
    failed download), if any."""
    seen = set()
    cause = exc.__cause__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if "background thread failed" not in str(cause).lower():
            return cause
        cause = cause.__cause__
    return None


# How streaming's downloaders word a missing object ("Object s3://b/x/shard.00003.mds.zstd not found").
_NOT_FOUND = re.compile(r"Object (\S+?) not found")


def missing_object(exc: BaseException) -> str | None:
    """The object that a failed download did not find (as streaming names it), or None when `exc`
    is not a not-found error (S3's 403 stays "access denied": it may be either)."""
    if not isinstance(exc, FileNotFoundError) and storage_code(exc) not in ("404", "NoSuchKey"):
        return None
    match = _NOT_FOUND.search(str(exc))
    return match.group(1) if match else (getattr(exc, "filename", None) or "a shard object")


def storage_code(exc: BaseException) -> str:
    """The error code of a cloud client's error ("404", "NoSuchBucket", ...), or ""."""
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def storage_error(exc: BaseException) -> str:
    """What went wrong talking to object storage, in a few words and what to check."""
    code, name = storage_code(exc), type(exc).__name__
    if code == "NoSuchBucket":
        return "the bucket does not exist (create it, or fix the bucket name in data.shards_dir)"
    if code in ("404", "NoSuchKey"):
        return "not found (check the bucket and the path in data.shards_dir)"
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "ExpiredToken"):
        return (
            f"access denied ({code}): check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE) and their permissions on the bucket"
        )
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return "no credentials found: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
    endpoint = os.environ.get("S3_ENDPOINT_URL")
    where = f"S3_ENDPOINT_URL={endpoint}" if endpoint else "the default endpoint"
    if name in ("ConnectTimeoutError", "ReadTimeoutError"):  # a store that accepts and never answers (frozen)
        return f"the object store did not answer in time ({where}): check the endpoint and the network"
    if name in ("EndpointConnectionError", "ConnectionClosedError"):
        return f"cannot connect to the object store ({where}): check the endpoint and the network"
    text = str(exc).splitlines()[0] if str(exc) else repr(exc)
    return f"{name}: {text}"


def read_manifest(shards_dir: str | Path, data_cfg: DataConfig | None = None) -> dict[str, Any]:
    """The manifest of a shards folder, or a DataError saying how to make one."""
    shards_dir = str(shards_dir)
    path = _local_copy(shards_dir, MANIFEST_FILENAME, remote_cache_root(data_cfg))
    if not path.is_file():
        if not is_remote(shards_dir) and not Path(shards_dir).exists():
            raise DataError(f"no shards at {shards_dir}: run `msllm prep RECIPE` first")
        raise DataError(
            f"{shards_dir} has no {MANIFEST_FILENAME}, so it is not a complete msllm dataset: "
            "run `msllm prep RECIPE` (add --force to replace what is there)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path} is not valid JSON: run `msllm prep RECIPE --force` to rewrite it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path} is not an msllm manifest ({MANIFEST_FORMAT}); run `msllm prep RECIPE --force`")
    return manifest


def tokenizer_path(shards_dir: str | Path, data_cfg: DataConfig | None = None) -> Path:
    """The local path of the tokenizer saved with the shards (downloaded if shards_dir is remote)."""
    return _local_copy(str(shards_dir), TOKENIZER_FILENAME, remote_cache_root(data_cfg))


def load_tokenizer(shards_dir: str | Path, data_cfg: DataConfig | None = None):
    """The tokenizer saved with the shards (`shards_dir/tokenizer.model`), as msllm.data.tokenizer's
    interface (sentencepiece or bytes)."""
    path = tokenizer_path(shards_dir, data_cfg)
    if not path.is_file():
        raise DataError(f"{shards_dir} has no tokenizer.model: run `msllm prep RECIPE` first")
    return load_tokenizer_file(path)


@dataclass(frozen=True)
class Shards:
    """Shards checked against a recipe, read once: their manifest and their tokenizer."""

    manifest: dict[str, Any]
    tokenizer_path: Path  # a local file (downloaded first when shards_dir is remote)
    tokenizer_sha256: str

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])


def check_shards(data_cfg: DataConfig, vocab_size: int | None = None) -> Shards:
    """Check that the shards in data.shards_dir fit the recipe; return them as a `Shards` record.

    DataError (one line) when: the shards are missing or incomplete; the manifest lacks a field
    or disagrees with its tokenizer (vocab_size, special ids: edited); their seq_len is not the
    recipe's; their tokenizer is not the one the recipe names (data.tokenizer.model) or the saved
    tokenizer file was changed; the recipe trains a tokenizer of another vocab size; or the model's
    `vocab_size` is too small for the token ids in the shards.
    """
    shards_dir = data_cfg.shards_dir
    manifest = read_manifest(shards_dir, data_cfg)
    check_manifest(manifest, shards_dir)  # an edited manifest fails here, not after the whole run
    fix = "run `msllm prep RECIPE --force` to rebuild them, or set data.shards_dir elsewhere"
    if manifest["seq_len"] != data_cfg.seq_len:
        raise DataError(
            f"the shards in {shards_dir} hold samples for seq_len {manifest['seq_len']} but the recipe "
            f"has data.seq_len {data_cfg.seq_len}: {fix}"
        )
    saved_tokenizer = tokenizer_path(shards_dir, data_cfg)
    if not saved_tokenizer.is_file() or file_sha256(saved_tokenizer) != manifest["tokenizer_sha256"]:
        raise DataError(
            f"{saved_tokenizer} is missing or differs from the tokenizer the shards were written "
            f"with (sha256 {manifest['tokenizer_sha256'][:12]}...): {fix}"
        )
    # The model's vocabulary comes from the manifest: one that disagrees with the tokenizer
    # (edited) would index past the embedding at the first token it lacks.
    tokenizer = load_tokenizer_file(saved_tokenizer)
    recorded = {"vocab_size": manifest["vocab_size"], **{k: manifest.get(k) for k in tokenizer.special_ids()}}
    actual = {"vocab_size": tokenizer.vocab_size, **tokenizer.special_ids()}
    for field, value in actual.items():
        if recorded[field] != value:
            raise DataError(
                f"{shards_dir}/manifest.json says {field} {short_repr(recorded[field])} but its tokenizer.model has "
                f"{value} (the manifest was edited): {fix}"
            )
    if data_cfg.source != "shards":
        wants_bytes = data_cfg.tokenizer.type == "bytes"
        if wants_bytes != (tokenizer.kind == "bytes"):
            raise DataError(
                f"the shards in {shards_dir} were written with a {tokenizer.kind} tokenizer but the recipe has "
                f"data.tokenizer.type {data_cfg.tokenizer.type}: {fix}"
            )
        if wants_bytes:
            pass  # the descriptor was checked above: nothing else to agree on
        elif data_cfg.tokenizer.model:
            given = Path(data_cfg.tokenizer.model)
            if not given.is_file():
                raise DataError(f"data.tokenizer.model: no such file: {given}")
            given_sha = file_sha256(given)
            if given_sha != manifest["tokenizer_sha256"]:
                raise DataError(
                    f"data.tokenizer.model {given} (sha256 {given_sha[:12]}...) is not the tokenizer the "
                    f"shards in {shards_dir} were written with ({manifest['tokenizer_sha256'][:12]}...): {fix}"
                )
        elif manifest["vocab_size"] != data_cfg.tokenizer.vocab_size:
            raise DataError(
                f"the shards in {shards_dir} were tokenized with a vocabulary of {manifest['vocab_size']} "
                f"but the recipe has data.tokenizer.vocab_size {data_cfg.tokenizer.vocab_size}: {fix}"
            )
    if vocab_size is not None and vocab_size > 0 and vocab_size < manifest["vocab_size"]:
        raise DataError(
            f"model.vocab_size {vocab_size} is smaller than the shards' tokenizer vocabulary "
            f"{manifest['vocab_size']}: set model.vocab_size to 0 (take it from the data) or "
            f"{manifest['vocab_size']} or more"
        )
    return Shards(manifest=manifest, tokenizer_path=saved_tokenizer, tokenizer_sha256=manifest["tokenizer_sha256"])
