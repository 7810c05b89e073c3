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

The cache removes only what it can prove it made, since data.cache_dir may name any folder. A
cache root is claimed when first used: absent or empty, it gets a marker file `.msllm-cache`
holding a random cache id; a root that holds anything else without that marker (a run folder, a
project) is refused with one line. Each job writes the cache id into its lock file and into a
marker inside its folder, and a later job removes a stale folder and its lock only when both
hold the id; every other file, in a claimed root too, is left alone.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path

import streaming.base.dataset
import streaming.base.shared
import streaming.base.shared.prefix
import streaming.base.util

from msllm.errors import DataError, short_repr
from msllm.safe_files import open_lock_nofollow

JOB_ENV = "MSLLM_DATA_JOB"
# A tag names a folder and a lock file in data.cache_dir and streaming's blocks in /dev/shm: one
# path component, never `..` or a slash (which would put them outside the cache), and short enough
# that the longest shared-memory name stays under NAME_MAX (255) with a long host name.
_TAG_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_RENDEZVOUS_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")
_LOCK_SUFFIX = ".lock"
ROOT_MARKER = ".msllm-cache"  # in a cache root: its cache id, then what the folder is
ENTRY_MARKER = ".msllm-cache-entry"  # in each job's folder: the id of the cache that made it


class ProcessDataJob:
    """What this process holds of its job's data side, in one place (state that lives as long as the
    process, as streaming's shared memory and the cache locks do; `PROCESS` is the one instance):

    tag            the job's tag, fixed at its first use
    job_locks      cache root -> the open file whose flock says "this job's cache folder there is in use"
    claimed_roots  cache root -> its cache id, once this process has checked or claimed it
    started        whether this process has cleaned the job's stale shared memory (once, before its
                   first dataset: msllm.data.loader)
    loaders_built  datasets made so far (each gets a cache folder of its own: streaming refuses two
                   datasets on one local folder)
    """

    def __init__(self):
        self.tag: str | None = None
        self.job_locks: dict[Path, object] = {}
        self.claimed_roots: dict[Path, str] = {}
        self.started = False
        self.loaders_built = 0


PROCESS = ProcessDataJob()


def job_tag() -> str:
    """This job's tag (see the module docstring), fixed at its first use in a process."""
    if PROCESS.tag is None:
        if os.environ.get(JOB_ENV):
            PROCESS.tag = checked_job_tag(os.environ[JOB_ENV])
        elif "MASTER_PORT" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            rendezvous = "\0".join(os.environ.get(k, "") for k in _RENDEZVOUS_VARIABLES)
            PROCESS.tag = "j" + hashlib.sha1(rendezvous.encode()).hexdigest()[:10]
        else:
            PROCESS.tag = f"p{os.getpid()}"
    return PROCESS.tag


def checked_job_tag(tag: str) -> str:
    """`tag` (MSLLM_DATA_JOB's value) if it is one safe name; a one-line DataError otherwise,
    raised before anything is created from it."""
    if _TAG_PATTERN.fullmatch(tag) is None:
        raise DataError(
            f"{JOB_ENV}={short_repr(tag)} is not a job tag: it names a folder in data.cache_dir and shared "
            "memory in /dev/shm, so it must be one name of at most 64 letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit (no '/', no '..'): set it to such a name (e.g. myjob-1), or unset it"
        )
    return tag


def adopt_job_tag(tag: str) -> None:
    """In a DataLoader worker process: use the tag of the rank that started it."""
    PROCESS.tag = tag


def scope_streaming_shared_memory() -> None:
    """Put the job tag in front of every shared-memory and file-lock name streaming makes.

    streaming builds all of them with `streaming.base.shared.prefix._get_path(n, what)` (imported
    by name into the modules below; streaming-community's util imports it from prefix when it is
    called, which then gets this one), so replacing it there scopes them all. Idempotent.
    """
    modules = (streaming.base.shared.prefix, streaming.base.shared, streaming.base.dataset, streaming.base.util)
    if getattr(streaming.base.shared.prefix._get_path, "msllm_scoped", False):
        return

    def _get_path(prefix_int: int, name: str) -> str:
        return f"msllm-{job_tag()}_{prefix_int:06}_{name}"

    _get_path.msllm_scoped = True  # type: ignore[attr-defined]
    for module in modules:
        module._get_path = _get_path  # type: ignore[attr-defined]


SHM = Path("/dev/shm")  # where POSIX shared memory lives on Linux (shm_open)
# streaming's blocks of one dataset (locals, barrier, next epoch, cache usage, shard states and access
# times, resume, epoch shape and data): at least a page each
SHM_PAGES_PER_DATASET = 10


def shared_memory_needed(samples: int, shards: int, batch_bytes: int, workers: int) -> int:
    """A lower bound of the shared memory (bytes) that reading one split takes on a node: streaming's
    small blocks (a page each), its per-shard state (9 bytes a shard), the epoch's sample order (8
    bytes a sample), and the batches that DataLoader workers hand over (2 in flight per worker)."""
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    return SHM_PAGES_PER_DATASET * page + 9 * shards + 8 * samples + 2 * workers * batch_bytes


def check_shared_memory(split: str, need: int, shm: Path = SHM) -> None:
    """A one-line DataError when `shm` (/dev/shm) has less than `need` bytes free: streaming writes
    its shared arrays there, and a write past a full tmpfs is a SIGBUS (exit 135, no message), as
    in a Docker container with its default 64 MB. Nothing is checked where there is no /dev/shm."""
    try:
        usage = shutil.disk_usage(shm)
    except OSError:
        return
    if usage.free >= need:
        return
    suggest = max(1, -(-2 * need // (1 << 30)))  # GiB: twice the need, at least 1
    raise DataError(
        f"{shm} has {_size(usage.free)} free of {_size(usage.total)}, and reading the {split} split needs at least "
        f"{_size(need)} of shared memory there (streaming's sample order and the batches in flight): give the "
        f"container more (docker run --shm-size={suggest}g) or free {shm} (blocks left by crashed jobs)"
    )


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.0f} KiB"


def job_cache_folder(cache_root: Path) -> Path:
    """`cache_root/<job tag>-<host name>`: the folder of this job's split caches on this node. The
    host name keeps the nodes of one job apart where they share the cache root (a cache_dir on a
    shared filesystem, or emulated nodes on one machine): each node's first rank holds its folder's
    lock for the whole job, and a second node waiting on it would never start."""
    return cache_root / f"{job_tag()}-{socket.gethostname()}"


def claim_cache_root(cache_root: Path) -> str:
    """The cache id of `cache_root`, claiming the folder for msllm if it is absent or empty; a
    DataError naming what is there if it holds files without msllm's marker."""
    job_tag()  # a bad MSLLM_DATA_JOB is refused before the cache (or anything in it) is made
    root = cache_root.absolute()
    if root in PROCESS.claimed_roots:
        return PROCESS.claimed_roots[root]
    root.mkdir(parents=True, exist_ok=True)
    marker = root / ROOT_MARKER
    if not marker.is_file():
        foreign = sorted(
            p.name + ("/" if p.is_dir() else "") for p in root.iterdir() if not (p.name == ROOT_MARKER and p.is_file())
        )  # another process may claim it now
        if foreign:
            listing = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise DataError(
                f"data.cache_dir {cache_root} holds files that msllm did not put there ({listing}): use an "
                "empty folder or a new one"
            )
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pass  # claimed by another process at the same moment: its id is ours
        else:
            with os.fdopen(fd, "w") as f:
                f.write(
                    f"{uuid.uuid4().hex}\nmsllm's data cache (data.cache_dir): msllm removes only the "
                    f"job folders here that hold {ENTRY_MARKER} with the id above.\n"
                )
    for _ in range(200):  # a marker just created by another process may not hold its id yet
        cache_id = _first_line(marker)
        if cache_id:
            PROCESS.claimed_roots[root] = cache_id
            return cache_id
        time.sleep(0.01)
    raise DataError(f"{marker} holds no cache id: remove it, or set data.cache_dir to an empty folder")


def start_job_cache(cache_root: Path) -> None:
    """On a node's first rank, once per job and cache root: take this job's cache folder, emptied, and lock it.

    A cache folder left by an earlier job with the same tag is removed (its shards may be of
    other contents), and so are the folders of jobs that are no longer running (their lock is
    free), so caches do not pile up in the temp dir; each only if it holds this cache's id.
    Folders of running jobs, and anything else, are left alone.
    """
    cache_id = claim_cache_root(cache_root)
    cache_root = cache_root.absolute()
    if cache_root in PROCESS.job_locks:
        return
    mine = job_cache_folder(cache_root)
    lock = os.fdopen(open_lock_nofollow(str(mine) + _LOCK_SUFFIX), "r+")  # a link there: ELOOP, never followed
    fcntl.flock(lock, fcntl.LOCK_EX)  # an earlier attempt of this job may still be exiting
    lock.seek(0)
    lock.truncate()
    lock.write(cache_id + "\n")
    lock.flush()
    PROCESS.job_locks[cache_root] = lock
    if mine.exists() or mine.is_symlink():  # left by an earlier attempt of this job
        if not _is_entry(mine, cache_id):
            raise DataError(
                f"{mine} is in the data cache but msllm did not make it: remove it, or set data.cache_dir elsewhere"
            )
        shutil.rmtree(mine)
    mine.mkdir()
    (mine / ENTRY_MARKER).write_text(cache_id + "\n")
    for lock_file in cache_root.iterdir():
        name = lock_file.name
        if not name.endswith(_LOCK_SUFFIX) or name == _LOCK_SUFFIX or _first_line(lock_file) != cache_id:
            continue  # not a lock file of this cache
        folder = lock_file.with_name(name[: -len(_LOCK_SUFFIX)])
        if folder == mine:
            continue
        try:
            probe = open(lock_file)
        except FileNotFoundError:
            continue  # removed by another job starting now
        with probe:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a running job holds it
            if _is_entry(folder, cache_id):
                shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists() and not folder.is_symlink():
                lock_file.unlink(missing_ok=True)


def _is_entry(folder: Path, cache_id: str) -> bool:
    """Whether `folder` is a job folder that this cache made (it holds the cache's entry marker)."""
    return folder.is_dir() and not folder.is_symlink() and _first_line(folder / ENTRY_MARKER) == cache_id


def _first_line(path: Path) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.readline(200).strip()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return ""
