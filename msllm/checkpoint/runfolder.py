"""The run folder (run.output_dir): one training at a time, and never two runs mixed in one folder.

`claim_run_folder` is called by every rank before anything is read from or written to the folder;
rank 0 does the work and tells the others the outcome:

- the lock: rank 0 holds an exclusive `fcntl.flock` on `output_dir/.lock` for the whole run and
  writes its pid, host and start time into it. The kernel drops the lock when the process dies
  (kill -9 included), so a stale lock never blocks a rerun; a second training on the folder gets a
  one-line error naming the holder.
- a fresh start (`checkpoint.resume: false`) into a folder that already holds a run (checkpoints or
  metrics) is refused, unless `msllm train --overwrite`, which first moves the old run aside to
  `OUTPUT_DIR.replaced-YYYYmmdd-HHMMSS` (never deleted).
- a folder that cannot be made or written (a file in the way, read-only, a full disk): one line.
- a folder whose entries msllm writes (RUN_ENTRIES) include a symbolic link that leads outside it
  is refused with one line: msllm would write through it into a file that is not the run's. The
  writes themselves never follow a link either (msllm.safe_files).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from msllm.distributed import collectives
from msllm.distributed.env import say
from msllm.errors import RunFolderError
from msllm.safe_files import check_no_outside_links, is_link_error, open_lock_nofollow

LOCK = ".lock"
# What msllm writes in a run folder: none of them may be a link that leads out of it.
RUN_ENTRIES = (LOCK, "metrics.jsonl", "recipe.yaml", "run.json", "checkpoints", "tensorboard")


class RunFolder:
    """The held lock of one run folder (rank 0 only; other ranks hold nothing)."""

    held: RunFolder | None = None  # the one this process holds (rank 0), for check_run_folder_held

    def __init__(self, path: Path, fd: int | None):
        self.path = path
        self.fd = fd
        if fd is not None:
            RunFolder.held = self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None
        if RunFolder.held is self:
            RunFolder.held = None


def check_run_folder_held() -> None:
    """Rank 0, before each checkpoint: a RunFolderError when the run folder whose lock this process
    holds was deleted or moved away (its `.lock` is not the file locked): the lock went with it, so
    another training could take the folder, and a checkpoint would be written into a new, empty
    folder that no rerun would find as this run. Nothing when no folder is held."""
    folder = RunFolder.held
    if folder is None or folder.fd is None:
        return
    held = os.fstat(folder.fd)
    try:
        now = os.stat(folder.path / LOCK, follow_symlinks=False)
        same = (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)
    except OSError:
        same = False
    if not same:
        raise RunFolderError(
            f"run.output_dir {folder.path} was deleted or moved while this run trained (its {LOCK} is gone): the "
            "run stops without writing anything more there; put the folder back and rerun the same command to "
            "resume from its last checkpoint (without it, a rerun starts from step 0)"
        )


def holds_a_run(out: Path) -> bool:
    ckpts = out / "checkpoints"
    return (out / "metrics.jsonl").is_file() or (ckpts.is_dir() and any(ckpts.iterdir()))


def claim_run_folder(recipe, is_main: bool, overwrite: bool = False) -> RunFolder:
    """Lock run.output_dir for this run (see the module doc); every rank calls this, rank 0 does
    the work and every rank raises its RunFolderError if it fails."""
    out = Path(recipe.run.output_dir)
    fd = collectives.on_rank0(_claim, out, recipe.checkpoint.resume, overwrite)
    return RunFolder(out, fd if is_main else None)


def _claim(out: Path, resume: bool, overwrite: bool) -> int:
    if overwrite and (out.resolve() == Path.cwd().resolve() or out.resolve() in Path.cwd().resolve().parents):
        raise RunFolderError(
            f"--overwrite would move run.output_dir {out} aside, and it holds the working directory "
            f"{Path.cwd()}: set run.output_dir to a folder of its own (e.g. runs/NAME)"
        )
    fd = _lock(out)
    if overwrite and holds_a_run(out):
        aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(out, aside)  # the lock moves with it and is dropped once the new one is held
        new_fd = _lock(out)
        os.close(fd)
        say(f"msllm: moved the previous run in {out} aside to {aside}")
        return new_fd
    if not resume and holds_a_run(out):
        os.close(fd)
        raise RunFolderError(
            f"run.output_dir {out} already holds a run and checkpoint.resume is false: use another "
            f"run.output_dir, resume it (checkpoint.resume: true), or pass --overwrite to move the old run aside"
        )
    return fd


def _lock(out: Path) -> int:
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"run.output_dir {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunFolderError(f"cannot use run.output_dir {out}: {exc.strerror or exc}") from None
    check_no_outside_links(out, RUN_ENTRIES, "run.output_dir", RunFolderError)
    try:
        fd = open_lock_nofollow(out / LOCK)
    except OSError as exc:
        if is_link_error(exc):
            raise RunFolderError(
                f"run.output_dir {out}: {LOCK} is a symbolic link: remove it (rm {out / LOCK})"
            ) from None
        raise RunFolderError(f"cannot use run.output_dir {out}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "an unknown process"
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunFolderError(
                f"run.output_dir {out} is in use by another training ({holder}): wait for it to end, "
                f"stop it, or use another run.output_dir"
            ) from None
        raise RunFolderError(f"cannot lock run.output_dir {out}: {exc.strerror or exc}") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(
            fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0
        )
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        raise RunFolderError(f"cannot write in run.output_dir {out}: {exc.strerror or exc}") from None
    return fd
