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
    """{relative path: sha256} of every file under `folder`: equal before and after = nothing touched.
    The run-folder lock (`.lock`, rewritten by whoever takes it) is left out."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
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
    """Record `path`'s new checksum in its checkpoint's meta.json, and meta.json's in COMPLETE (as
    one who rewrites the whole folder would)."""
    from msllm.checkpoint.files import file_digest

    meta_file = path.parent / "meta.json"
    meta = json.loads(meta_file.read_text())
    if "files" in meta:
        meta["files"][path.name] = file_digest(path)
        meta_file.write_text(json.dumps(meta, indent=1) + "\n")
    complete = path.parent / "COMPLETE"
    lines = complete.read_text().splitlines()
    if any(line.startswith("meta ") for line in lines):
        complete.write_text("".join(f"meta {file_digest(meta_file)}\n" if line.startswith("meta ") else line + "\n"
                                    for line in lines))


def cli(capsys, *args) -> tuple[int, str, str]:
    """`msllm ARGS` in this process (for commands that start no training): (exit code, stdout, stderr)."""
    from msllm.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(code: int, err: str, command: str, expected_code: int = 2) -> str:
    assert code == expected_code, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"msllm {command}: ")]
    assert len(lines) == 1, err
    return lines[0]


def flip_bytes(path: Path, count: int = 64) -> None:
    """Invert `count` bytes in the middle of a file (same size, different content)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, min(mid + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


LLAMA_CONFIG = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=320, hidden_size=64,
                    intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                    max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)


def write_llama_folder(folder: Path, tokenizer: Path, **config) -> Path:
    """A Hugging Face Llama folder as `msllm import-hf` reads it (config.json and tokenizer.model;
    no weights: they are read only when a run starts from it). `config` overrides LLAMA_CONFIG."""
    import shutil

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**LLAMA_CONFIG, **config}))
    shutil.copyfile(tokenizer, folder / "tokenizer.model")
    return folder
