"""What a training job keeps on its node: a local cache of the shards, and streaming's shared memory.

Every loader reads its split through a local cache folder of its own job, local shards_dir or
remote alike: streaming copies (or downloads) each compressed shard there, checks its hash and
decompresses it there. Nothing is ever written into data.shards_dir, so a read-only shards folder
shared by many nodes and jobs works, and two jobs that first read one folder at the same moment
do not race.

Several jobs may run on one node. mosaicml-streaming names its shared-memory blocks and file locks
`<n>_<what>` for a host-wide counter n, and its `clean_stale_shared_memory()` unlinks every block
on the host, including those of running jobs. Here every name gets the job's tag in front, so the
cleanup at job start (of blocks a crashed earlier attempt of the same job left) only touches the
job's own names, and two jobs never pick the same name.

The job tag is the same in every process of a job and differs between jobs that run at the same
time on one host: MSLLM_DATA_JOB if set, else a hash of the launcher's rendezvous
(MASTER_ADDR, MASTER_PORT, SLURM_JOB_ID, TORCHELASTIC_RUN_ID) when started by a launcher, else
the process id. DataLoader worker processes take their rank's tag with the pickled dataset (not
from the environment, which unrelated jobs started from the same process would inherit too).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import socket
from pathlib import Path

JOB_ENV = "MSLLM_DATA_JOB"
_RENDEZVOUS_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")
_LOCK_SUFFIX = ".lock"

# cache root -> the open file whose flock says "this job's cache folder there is in use"
_job_locks: dict[Path, object] = {}


_tag: str | None = None


def job_tag() -> str:
    """This job's tag (see the module docstring), fixed at its first use in a process."""
    global _tag
    if _tag is None:
        if os.environ.get(JOB_ENV):
            _tag = os.environ[JOB_ENV]
        elif "MASTER_PORT" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            rendezvous = "\0".join(os.environ.get(k, "") for k in _RENDEZVOUS_VARIABLES)
            _tag = "j" + hashlib.sha1(rendezvous.encode()).hexdigest()[:10]
        else:
            _tag = f"p{os.getpid()}"
    return _tag


def adopt_job_tag(tag: str) -> None:
    """In a DataLoader worker process: use the tag of the rank that started it."""
    global _tag
    _tag = tag


def scope_streaming_shared_memory() -> None:
    """Put the job tag in front of every shared-memory and file-lock name streaming makes.

    streaming builds all of them with `streaming.base.shared.prefix._get_path(n, what)` (imported
    by name into the modules below), so replacing it there scopes them all. Idempotent.
    """
    import streaming.base.dataset
    import streaming.base.shared
    import streaming.base.shared.prefix
    import streaming.base.util

    modules = (streaming.base.shared.prefix, streaming.base.shared, streaming.base.dataset, streaming.base.util)
    if getattr(streaming.base.shared.prefix._get_path, "msllm_scoped", False):
        return

    def _get_path(prefix_int: int, name: str) -> str:
        return f"msllm-{job_tag()}_{prefix_int:06}_{name}"

    _get_path.msllm_scoped = True  # type: ignore[attr-defined]
    for module in modules:
        module._get_path = _get_path  # type: ignore[attr-defined]


def job_cache_folder(cache_root: Path) -> Path:
    """`cache_root/<job tag>-<host name>`: the folder of this job's split caches on this node. The
    host name keeps the nodes of one job apart where they share the cache root (a cache_dir on a
    shared filesystem, or emulated nodes on one machine): each node's first rank holds its folder's
    lock for the whole job, and a second node waiting on it would never start."""
    return cache_root / f"{job_tag()}-{socket.gethostname()}"


def start_job_cache(cache_root: Path) -> None:
    """On a node's first rank, once per job and cache root: take this job's cache folder, emptied, and lock it.

    A cache folder left by an earlier job with the same tag is removed (its shards may be of
    other contents), and so are the folders of jobs that are no longer running (their lock is
    free), so caches do not pile up in the temp dir. Folders of running jobs are left alone.
    """
    cache_root = cache_root.absolute()
    if cache_root in _job_locks:
        return
    cache_root.mkdir(parents=True, exist_ok=True)
    mine = job_cache_folder(cache_root)
    lock = open(str(mine) + _LOCK_SUFFIX, "a+")
    fcntl.flock(lock, fcntl.LOCK_EX)  # an earlier attempt of this job may still be exiting
    _job_locks[cache_root] = lock
    shutil.rmtree(mine, ignore_errors=True)
    mine.mkdir()
    for lock_file in cache_root.glob("*" + _LOCK_SUFFIX):
        folder = Path(str(lock_file)[: -len(_LOCK_SUFFIX)])
        if folder == mine:
            continue
        with open(lock_file, "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a running job holds it
            shutil.rmtree(folder, ignore_errors=True)
            lock_file.unlink(missing_ok=True)
