"""Where prep writes: the staging folder (`.NAME.partial` beside a local data.shards_dir), its lock,
its progress file, and the move of the finished dataset into place. What msllm did not write (a
file, a link, a folder of other files) is never replaced."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from msllm.config import DataConfig
from msllm.data.manifest import MANIFEST_FILENAME, MANIFEST_FORMAT, is_remote, read_manifest
from msllm.errors import DataError
from msllm.safe_files import is_link_error, open_lock_nofollow, write_new

PROGRESS_FILENAME = "progress.json"


def existing_manifest(data_cfg: DataConfig) -> dict[str, Any] | None:
    """The manifest already in data.shards_dir, or None if it has none."""
    target = data_cfg.shards_dir
    if is_remote(target):
        try:
            return read_manifest(target, data_cfg)
        except DataError as exc:
            if "does not exist" in str(exc):
                return None
            raise
    if (Path(target) / MANIFEST_FILENAME).is_file():
        return read_manifest(target)
    return None


class StagingLock:
    """Holds `<staging>.lock` while prep writes: a second prep of the same target fails clearly."""

    def __init__(self, staging: Path, target: str):
        self.staging = staging
        self.lock_file = Path(str(staging) + ".lock")
        self.target = target

    def __enter__(self):
        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.handle = os.fdopen(open_lock_nofollow(self.lock_file), "r+")
        except OSError as exc:
            if is_link_error(exc):
                raise DataError(f"{self.lock_file} is a symbolic link: remove it, then rerun") from None
            raise
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.close()
            raise DataError(f"another msllm prep is writing {self.target} right now: wait for it") from None
        staging = self.staging
        if staging.is_symlink() or (staging.exists() and not staging.is_dir()):  # never written through or removed
            self.handle.close()
            what, fix = (
                (
                    f"a symbolic link to {os.readlink(staging)}",
                    f"remove the link (rm {staging}: what it points to stays)",
                )
                if staging.is_symlink()
                else ("a file", f"move it away (mv {staging} ...)")
            )
            raise DataError(
                f"{staging} is {what}, where msllm prep keeps its unfinished dataset, and msllm neither "
                f"writes through it nor removes it: {fix}, then rerun"
            )
        return self

    def __exit__(self, *exc_info):
        self.handle.close()  # the file stays: removing it would let a waiting prep lock a stale copy


@contextlib.contextmanager
def writing(staging: Path) -> Iterator[None]:
    """A full disk (or a read-only or over-quota one) while prep writes: one line naming the folder
    prep writes in, and the file if it is in there (streaming's merge_index moves its result from
    a temporary folder, whose name would mislead). A rerun continues from what was saved; a
    complete dataset already at data.shards_dir is untouched until the end."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None:  # not the disk's: a library's own error, shown as it is
            raise
        name = exc.filename
        inside = isinstance(name, (str, bytes)) and Path(os.fsdecode(name)).absolute().is_relative_to(
            staging.absolute()
        )
        file = f" ({exc.filename})" if inside else ""
        raise DataError(
            f"cannot write the dataset in {staging}: {exc.strerror}{file}: free space there or set "
            "data.shards_dir elsewhere, then rerun (prep continues from what it saved)"
        ) from None


def is_msllm_dataset(folder: Path) -> bool:
    """Whether `folder` is a dataset msllm wrote: a folder (not a link) whose manifest.json is msllm's."""
    manifest = read_json(folder / MANIFEST_FILENAME) if folder.is_dir() and not folder.is_symlink() else {}
    return manifest.get("format") == MANIFEST_FORMAT


def refuse_foreign(folder: Path) -> None:
    """A DataError if `folder` holds something msllm did not write (a file, a link, a folder of
    files without msllm's manifest): --force never replaces it, so the message never offers it."""
    if not (folder.exists() or folder.is_symlink()) or is_msllm_dataset(folder):
        return
    if folder.is_dir() and not folder.is_symlink():
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
        if not entries:
            return  # an empty folder: nothing to lose
        listing = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        what = f"holds files that msllm did not put there ({listing}) and no msllm {MANIFEST_FILENAME}"
    else:
        what = "is a link" if folder.is_symlink() else "is a file"
    raise DataError(
        f"data.shards_dir {folder} {what}: msllm never replaces what it did not write; set data.shards_dir "
        "to a new or empty folder (or move those files away), then run `msllm prep RECIPE`"
    )


def move_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished folder to the target. An old target (msllm's: refuse_foreign let it
    through) is first moved aside to `.NAME.old-<time>-<pid>`, and deleted once the new one is in
    place only if it is still an msllm dataset; anything else there is kept, and said so."""
    if target.exists() or target.is_symlink():
        refuse_foreign(target)  # checked again: it may have changed while prep ran
        old = target.parent / f".{target.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        os.replace(target, old)
        os.replace(tmp, target)
        if is_msllm_dataset(old):
            shutil.rmtree(old, ignore_errors=True)
        elif old.is_symlink() or not old.is_dir() or any(old.iterdir()):
            print(f"msllm prep: what was in {target} is kept in {old} (msllm did not write it)", flush=True)
        else:
            old.rmdir()
    else:
        os.replace(tmp, target)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def write_json(path: Path, value: dict[str, Any]) -> None:
    """Write by rename, so that a kill leaves the old file or the new one, never half of one."""
    write_new(path, json.dumps(value) + "\n")
