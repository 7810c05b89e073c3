"""What made a run: written as `run.json` into every run folder and checkpoint, printed by `msllm eval`.

The trainer writes it into output_dir and into every checkpoint's meta.json (key `run_record`);
the resolved recipe is saved beside it (recipe.yaml). The record adds what the recipe does not say:
msllm's version and git commit (and whether the tree had uncommitted changes), the versions of
the libraries that change numbers (python, torch, deepspeed, streaming-community or
mosaicml-streaming: whichever provides `streaming`, sentencepiece),
the hash of the data manifest, the world size and parallel degrees, and the device. The trainer
adds `kernels`: the attention and loss kernels chosen, the ones used, and their start-up check
(msllm.train.kernel_check).
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import msllm
from msllm.safe_files import write_new

RUN_RECORD_FILENAME = "run.json"
LIBRARIES = ("torch", "deepspeed", "streaming-community", "mosaicml-streaming", "sentencepiece")
# The two distributions of `streaming` (docs/dependencies.md): a record names both, the absent one None.
STREAMING = ("streaming-community", "mosaicml-streaming")


def git_state(folder: Path) -> dict:
    """The commit of the git checkout holding `folder` and whether it has uncommitted changes
    (an installed wheel has no checkout: then both are None)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def manifest_sha256(manifest: dict) -> str:
    """The hash of a data manifest's content (canonical JSON), wherever its file was read from."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def collect(world_size: int, dp: int, sp: int, device: str, manifest: dict | None) -> dict:
    """The record of this process's run (every rank computes the same one; rank 0 writes it)."""
    versions = {"python": platform.python_version()}
    for name in ("msllm", *LIBRARIES):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "versions": versions,
        "git": git_state(Path(msllm.__file__).resolve().parent),
        "data_manifest_sha256": manifest_sha256(manifest) if manifest else None,
        "world_size": world_size,
        "parallel": {"dp": dp, "sp": sp},
        "device": device,
        "host": platform.node(),
    }


def write(record: dict, folder: Path) -> Path:
    return write_new(Path(folder) / RUN_RECORD_FILENAME, json.dumps(record, indent=2, sort_keys=True) + "\n")


def read(folder: Path) -> dict | None:
    path = Path(folder) / RUN_RECORD_FILENAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def describe(record: dict) -> str:
    """One line for logs: `msllm 0.1.0 @ 1a2b3c4d (dirty) | torch 2.14.1 | ... | world 2 (dp 2 x sp 1) on cpu`."""
    v, g = record["versions"], record["git"]
    commit = f" @ {g['commit'][:10]}{' (dirty)' if g['dirty'] else ''}" if g.get("commit") else ""
    libs = " | ".join(
        f"{name} {v.get(name)}" for name in ("python", *LIBRARIES) if v.get(name) is not None or name not in STREAMING
    )
    data = record.get("data_manifest_sha256")
    return (
        f"msllm {v.get('msllm')}{commit} | {libs} | world {record['world_size']} "
        f"(dp {record['parallel']['dp']} x sp {record['parallel']['sp']}) on {record['device']}"
        + (f" | data manifest {data[:12]}" if data else "")
    )
