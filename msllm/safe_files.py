"""Writes that never follow a link out of the folder the user named.

A file msllm writes into a folder (a run's recipe.yaml, run.json, metrics.jsonl, .lock; a dataset's
manifest.json; an exported recipe) may have been replaced by a symbolic link to a file elsewhere.
Opening it for writing would write through the link, into a file that is not msllm's. So:

    write_new(path, data)         data written under a temporary name in the same folder, then
                                  renamed over `path`: a link there is replaced, never followed
    open_append_nofollow(path)    open for appending, refused (ELOOP) if `path` is a link
    open_lock_nofollow(path)      open (or create) a lock file for reading and writing, refused if a link
    check_no_outside_links(folder, names, what)
                                  a one-line error naming the first of `names` in `folder` that is a
                                  link pointing outside `folder`
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from msllm.errors import MsllmError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def write_new(path: str | Path, data: str | bytes, mode: int = 0o666) -> Path:
    """Write `data` to `path` through a temporary file of the same folder and a rename: a reader
    sees the old file or the new one, and a link at `path` is replaced, never written through.
    The file gets `mode` less the umask, as a plain open would give it. A failure is an OSError
    that names `path` (never the temporary name, which the user did not choose)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, mode)
        except FileExistsError:  # left by a killed process of the same pid: ours to replace
            os.unlink(tmp)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, mode)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError as exc:
        if exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    return path


def open_append_nofollow(path: str | Path, buffering: int = 1):
    """`path` opened for appending text (created 0666 less the umask if absent); OSError ELOOP when
    `path` is a symbolic link."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o666)
    return os.fdopen(fd, "a", buffering=buffering, encoding="utf-8")


def open_lock_nofollow(path: str | Path) -> int:
    """A descriptor of `path` opened for reading and writing (created 0644 if absent); OSError ELOOP
    when `path` is a symbolic link."""
    return os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o644)


def is_link_error(exc: OSError) -> bool:
    """Whether an open with O_NOFOLLOW failed because the path is a link."""
    return exc.errno in (errno.ELOOP, errno.EMLINK)


def outside_link(folder: Path, name: str) -> str | None:
    """Where `folder/name` points if it is a symbolic link that leads outside `folder` (or
    nowhere), else None."""
    entry = folder / name
    if not entry.is_symlink():
        return None
    target = os.readlink(entry)
    try:
        resolved = entry.resolve(strict=False)
        inside = resolved.is_relative_to(folder.resolve()) and resolved != folder.resolve()
    except (OSError, RuntimeError):  # a loop of links
        inside = False
    return None if inside else target


def check_no_outside_links(folder: Path, names, what: str, error: type[MsllmError] = MsllmError) -> None:
    """Raise `error` (one line) if one of `names` in `folder` is a link that leads outside it."""
    for name in names:
        target = outside_link(folder, name)
        if target is not None:
            raise error(
                f"{what} {folder}: {name} is a symbolic link to {target}, outside the folder, and msllm "
                f"would write through it: remove the link (rm {folder / name}) or use another folder"
            )
