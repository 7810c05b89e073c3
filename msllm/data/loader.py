"""Reading shards for training: batches of token windows over mosaicml-streaming.

`build_dataloader` returns a `TokenLoader`: iterate it for batches

    {"input_ids": LongTensor[B, L/sp], "labels": LongTensor[B, L/sp], "sample_id": LongTensor[B]}

A sample of L+1 tokens gives input_ids = tokens[:-1] and labels = tokens[1:] (sample_id: its
index in the split, whichever rank reads it); rank r of a
sequence-parallel group of sp ranks keeps positions [r*L/sp, (r+1)*L/sp) of both. The ranks of a
group read the same samples: StreamingDataset's `replication` makes them act as one data-parallel
rank. Which slice and which replication is the trainer's msllm.distributed.ParallelDims' to say.

Train loaders repeat: at the end of an epoch the next one starts (reshuffled by streaming from the
seed and the epoch number). `state_dict()` / `load_state_dict()` are streaming's (epoch, sample in
epoch), so a resumed run continues with exactly the batch the interrupted one would have read,
across epoch boundaries too.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from streaming import StreamingDataLoader, StreamingDataset
from streaming.base.util import clean_stale_shared_memory

from msllm.config import DataConfig
from msllm.data.integrity import check_index
from msllm.data.jobcache import (
    PROCESS,
    adopt_job_tag,
    check_shared_memory,
    job_cache_folder,
    job_tag,
    scope_streaming_shared_memory,
    shared_memory_needed,
    start_job_cache,
)
from msllm.data.manifest import (
    DOWNLOAD_RETRIES,
    DOWNLOAD_TIMEOUT_S,
    MANIFEST_FILENAME,
    background_failure,
    download,
    is_remote,
    keep_background_failures,
    remote_cache_root,
    streaming_remote,
)
from msllm.errors import DataError

# LLM Foundry's scripts name the held-out split `val`; ours is `validation`. Either is read.
_SPLIT_FOLDER_ALIASES = {"validation": ("validation", "val"), "train": ("train",)}


def tokens_of(sample: dict[str, Any], sample_len: int) -> np.ndarray:
    """The token ids of an MDS sample, whichever way its `tokens` column was encoded.

    Accepts `ndarray:int32` (what msllm and recent LLM Foundry write) and `bytes` holding a raw
    int32 or int64 array (older LLM Foundry shards wrote int64 bytes); the width is told apart by
    the byte length, since every sample holds `sample_len` tokens.
    """
    if "tokens" not in sample:
        raise DataError(f"a shard sample has no `tokens` column (columns: {', '.join(sample)})")
    value = sample["tokens"]
    if isinstance(value, np.ndarray):
        tokens = value.reshape(-1)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        width, remainder = divmod(len(value), sample_len)
        if remainder or width not in (4, 8):
            raise DataError(
                f"a shard sample holds {len(value)} bytes of tokens, not the {sample_len} int32 or int64 "
                f"tokens that data.seq_len {sample_len - 1} needs: set data.seq_len to the shards' "
                "sample length minus 1"
            )
        tokens = np.frombuffer(value, dtype=np.int32 if width == 4 else np.int64)
    else:
        raise DataError(f"a shard sample's `tokens` column is a {type(value).__name__}, not an array")
    if tokens.shape[0] != sample_len:
        raise DataError(
            f"a shard sample has {tokens.shape[0]} tokens but data.seq_len {sample_len - 1} needs "
            f"seq_len+1 = {sample_len}: the shards were written for seq_len {tokens.shape[0] - 1}; run "
            "`msllm prep RECIPE --force` or set data.seq_len to match"
        )
    return tokens


# How many samples streaming's two threads fetch ahead of training. Once that many are ready they
# poll every 7 ms (streaming's TICK), holding the GIL and a core at each wake: on a CPU-bound rank
# that slows the step (seen at a third of the main thread's samples, py-spy, 2 cores). Shards in a
# folder are fetched by a local copy, so the threads run through the epoch unthrottled and stop;
# a URI keeps streaming's default (8 batches ahead), which bounds what a short job downloads.
UNLIMITED_PREDOWNLOAD = 1 << 62


class TokenWindowDataset(StreamingDataset):
    """A StreamingDataset of token windows that returns this rank's slice of inputs and labels."""

    def __init__(self, *, seq_len: int, sp_size: int, sp_rank: int, **streaming_kwargs: Any):
        self.job_tag = job_tag()
        super().__init__(**streaming_kwargs)
        self.seq_len = seq_len
        self.slice_len = seq_len // sp_size
        self.slice_start = sp_rank * self.slice_len

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Unpickled in a DataLoader worker: name streaming's shared memory as the rank does.
        scope_streaming_shared_memory()
        adopt_job_tag(state["job_tag"])
        self.__dict__.update(state)

    def __getitem__(self, index: Any) -> dict[str, torch.Tensor]:
        tokens = tokens_of(super().__getitem__(index), self.seq_len + 1)
        start, end = self.slice_start, self.slice_start + self.slice_len
        return {
            "input_ids": torch.from_numpy(tokens[start:end].astype(np.int64)),
            "labels": torch.from_numpy(tokens[start + 1 : end + 1].astype(np.int64)),
            "sample_id": index,  # the sample's place in the split, whichever rank reads it (log.sample_ids)
        }


class TokenLoader:
    """Batches of one split, with streaming's resumable state. Train loaders repeat forever."""

    def __init__(self, loader: StreamingDataLoader, split: str, repeat: bool):
        self.loader = loader
        self.dataset: TokenWindowDataset = loader.dataset
        self.split = split
        self.repeat = repeat

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self.loader)

    @property
    def epoch(self) -> int:
        """The epoch being read (the next one if none has started)."""
        return max(self.dataset.next_epoch - 1, 0)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        keep_background_failures()  # a failure in streaming's threads: kept for the one line below
        empty_epochs = 0
        while True:
            yielded = False
            try:
                for batch in self.loader:
                    yielded = True
                    yield batch
            except Exception as exc:
                stream = self.dataset.streams[0]
                cause = background_failure(exc) or exc  # "Background thread failed": what failed there
                _raise_if_checksum_failure(cause, stream.local, stream.remote)
                _raise_if_cache_full(cause, stream.local)
                raise
            if not self.repeat:
                return
            # A resumed epoch may have nothing left in it; two empty epochs in a row mean no data.
            empty_epochs = 0 if yielded else empty_epochs + 1
            if empty_epochs >= 2:
                raise DataError(
                    f"the {self.split} split gives no batches: it has fewer samples than one batch per rank"
                )

    def state_dict(self) -> dict[str, Any]:
        """Where this loader is: {epoch, sample_in_epoch, ...} (streaming's resumption state)."""
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a state_dict(); takes effect at the next iteration."""
        self.loader.load_state_dict(state)


def build_dataloader(
    data_cfg: DataConfig,
    split: str,
    batch_size: int,
    seed: int,
    sp_size: int = 1,
    sp_rank: int = 0,
    replication: int | None = None,
    shuffle: bool | None = None,
    repeat: bool | None = None,
    num_workers: int | None = None,
    pin_memory: bool = False,
) -> TokenLoader:
    """A loader of `split` ("train" or "validation") of the shards in data.shards_dir.

    shuffle: default data.shuffle for train, False for validation (deterministic from `seed`).
    repeat: default True for train (epochs follow each other forever), False for validation
      (one pass over the whole split, every data-parallel rank its share; streaming pads the
      shares to equal length by repeating a few samples).
    sp_size, sp_rank: keep slice `sp_rank` of `sp_size` equal slices of every sample.
    replication: how many consecutive ranks read the same samples (streaming's `replication`;
      None: every rank its own). The trainer takes all three from its ParallelDims.
    num_workers: DataLoader worker processes (default data.num_workers).
    pin_memory: batches in page-locked memory, so that the copy to an accelerator is asynchronous.

    Works in one process with no environment, and under torchrun / the deepspeed launcher
    (streaming reads RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE).
    """
    if split not in _SPLIT_FOLDER_ALIASES:
        raise DataError(f"unknown split {split!r}: use 'train' or 'validation'")
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    if sp_size < 1 or not 0 <= sp_rank < sp_size:
        raise DataError(f"sequence-parallel rank {sp_rank} is not in a group of {sp_size}")
    if data_cfg.seq_len % sp_size:
        raise DataError(f"data.seq_len {data_cfg.seq_len} does not split evenly over sp={sp_size} ranks")

    if shuffle is None:
        shuffle = data_cfg.shuffle and split == "train"
    _start_job_once(data_cfg)
    local, remote = _split_location(data_cfg, split)
    index = _fetch_checked_index(data_cfg, local, remote)
    workers = data_cfg.num_workers if num_workers is None else num_workers
    batch_bytes = batch_size * (2 * data_cfg.seq_len // sp_size + 1) * 8  # input_ids, labels (int64), sample_id
    samples = sum(int(shard.get("samples", 0)) for shard in index["shards"])
    check_shared_memory(split, shared_memory_needed(samples, len(index["shards"]), batch_bytes, workers))
    PROCESS.loaders_built += 1
    dataset = TokenWindowDataset(
        seq_len=data_cfg.seq_len,
        sp_size=sp_size,
        sp_rank=sp_rank,
        local=local,
        remote=remote,
        batch_size=batch_size,
        shuffle=shuffle,
        shuffle_seed=seed,
        replication=replication,
        # Fixes the global sample order whatever the number of ranks (streaming's elastic
        # determinism); a resumed loader takes the value saved in its state.
        num_canonical_nodes=data_cfg.num_canonical_nodes or None,
        validate_hash=_hash_to_validate(index),
        predownload=None if is_remote(data_cfg.shards_dir) else UNLIMITED_PREDOWNLOAD,
        download_timeout=DOWNLOAD_TIMEOUT_S,
        download_retry=DOWNLOAD_RETRIES,  # bounded: msllm.data.manifest
    )
    try:  # fail early and clearly: a sample of the wrong length, a corrupt first shard
        tokens_of(StreamingDataset.__getitem__(dataset, 0), data_cfg.seq_len + 1)
    except ValueError as exc:
        _raise_if_checksum_failure(exc, local, remote)
        raise
    loader = StreamingDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        drop_last=split == "train",
        pin_memory=pin_memory,
    )
    return TokenLoader(loader, split, repeat=split == "train" if repeat is None else repeat)


def _start_job_once(data_cfg: DataConfig) -> None:
    """Once per process, before its first dataset: scope streaming's shared memory to this job,
    and on the node's first rank take the job's cache folder and free what crashed attempts of
    this job left in shared memory.

    clean_stale_shared_memory() only sees this job's names (they carry its tag), so it cannot
    touch another job's blocks; it ends with a barrier when torch.distributed is up, so the other
    ranks wait for the cache folder.
    """
    scope_streaming_shared_memory()
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        start_job_cache(remote_cache_root(data_cfg))  # once per cache root
    if not PROCESS.started:
        clean_stale_shared_memory()
        PROCESS.started = True


def _split_location(data_cfg: DataConfig, split: str) -> tuple[str, str]:
    """(local, remote) for StreamingDataset: a fresh folder of this job's cache, and the split.

    The split is read as streaming's `remote` even when it is a local folder: streaming then
    copies each shard into the cache and decompresses it there, never next to the shards.
    """
    shards_dir = data_cfg.shards_dir
    if is_remote(shards_dir):
        remote = streaming_remote(shards_dir).rstrip("/") + "/" + split
    else:
        root = Path(shards_dir)
        for folder in _SPLIT_FOLDER_ALIASES[split]:
            if (root / folder / "index.json").is_file():
                remote = str((root / folder).resolve())
                break
        else:
            if not root.exists():
                raise DataError(f"no shards at {root}: run `msllm prep RECIPE` first")
            if not (root / MANIFEST_FILENAME).is_file() and data_cfg.source != "shards":
                raise DataError(f"{root} holds no complete dataset (no {MANIFEST_FILENAME}): run `msllm prep RECIPE`")
            raise DataError(f"no {split} shards in {root} (expected {root / split / 'index.json'})")
    # A folder per loader: streaming refuses a cache folder that another live dataset uses. The
    # ranks of a node build their loaders in the same order, so they agree on the name.
    name = f"{split}-{PROCESS.loaders_built}-{hashlib.sha1(remote.encode()).hexdigest()[:8]}"
    return str(job_cache_folder(remote_cache_root(data_cfg)) / name), remote


def _fetch_checked_index(data_cfg: DataConfig, local: str, remote: str) -> dict[str, Any]:
    """Copy (or download) the split's index.json into the loader's cache folder `local`, check
    that every file it names stays inside the split (msllm.data.integrity.check_index), and
    return it. streaming then reads this very copy (it fetches an index only when `local` has
    none), so what it sees is what was checked: every index of a training or an eval goes
    through here."""
    where = f"{remote.rstrip('/')}/index.json"
    folder = Path(local)
    folder.mkdir(parents=True, exist_ok=True)
    unchecked = folder / f"index.json.{os.getpid()}.unchecked"  # not the name streaming reads
    try:
        if is_remote(data_cfg.shards_dir):
            download(where, unchecked)
        else:
            shutil.copyfile(where, unchecked)
        index = json.loads(unchecked.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable, not JSON or not UTF-8
        unchecked.unlink(missing_ok=True)
        raise DataError(f"{where} is not a readable MDS index: run `msllm prep RECIPE --force`") from None
    try:
        check_index(index, where)
    except DataError:
        unchecked.unlink()
        raise
    os.replace(unchecked, folder / "index.json")  # the ranks of a node write the same bytes: any rename wins
    return index


def _hash_to_validate(index: dict[str, Any]) -> str | None:
    """xxh64 (else sha1) if every shard records it: streaming checks each shard as it arrives in
    the cache, so a corrupt or changed shard is caught when first read."""
    recorded = [set(shard.get("hashes", [])) for shard in index["shards"]]
    for algorithm in ("xxh64", "sha1"):
        if recorded and all(algorithm in hashes for hashes in recorded):
            return algorithm
    return None


def _raise_if_cache_full(exc: BaseException, local: str) -> None:
    """A shard that could not be copied or decompressed into the job's cache because its disk is
    full: a one-line DataError naming data.cache_dir."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        cache_dir = Path(local).parent.parent  # data.cache_dir / <job>-<host> / <split folder>
        raise DataError(
            f"data.cache_dir {cache_dir} is full ({exc.strerror}{f': {exc.filename}' if exc.filename else ''}): "
            "free space there or set data.cache_dir to a larger disk, then rerun the same command: training "
            "resumes from the last checkpoint"
        ) from None


def _raise_if_checksum_failure(exc: BaseException, local: str, remote: str) -> None:
    """A shard whose hash check failed (in the cache): a one-line DataError naming the shard."""
    text = str(exc)
    if "Checksum failure" in text:
        where = text.split("Checksum failure:", 1)[1].strip().splitlines()[0]
        if where.startswith(local.rstrip("/") + "/"):  # the copy in the cache: name the original
            where = remote.rstrip("/") + "/" + where[len(local.rstrip("/")) + 1 :]
        raise DataError(
            f"shard {where} fails its hash check (corrupt or changed): run `msllm prep RECIPE --force` "
            "to rewrite the shards"
        ) from None
