"""Assertions and file surgery shared by the reliability cases."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import torch


def one_line_error(proc: subprocess.CompletedProcess, command: str, code: int = 2) -> str:
    """The single `msllm COMMAND: error: ...` line of a failed run (no traceback); returns its text."""
    assert proc.returncode == code, f"exit {proc.returncode}\nSTDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"msllm {command}: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def tree_digest(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder`: equal before and after = nothing touched."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


class Malicious:
    """Unpickling this runs `touch MARKER`: what a tampered checkpoint would do with os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_malicious(path: Path, marker: Path) -> None:
    """Replace a torch file by one whose unpickling runs a command, and re-record its checksum in
    the checkpoint's meta.json (as an attacker who rewrites the whole folder would)."""
    torch.save({"module": Malicious(marker), "msllm": Malicious(marker)}, path)
    rerecord_checksum(path)


def rerecord_checksum(path: Path) -> None:
    meta_file = path.parent / "meta.json"
    meta = json.loads(meta_file.read_text())
    if "files" in meta:
        from msllm.train.checkpoint import file_digest

        meta["files"][path.name] = file_digest(path)
        meta_file.write_text(json.dumps(meta, indent=1) + "\n")
