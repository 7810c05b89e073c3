"""The tree is clean for ruff, as the pre-commit hooks (.pre-commit-config.yaml) leave it: `ruff check .`
and `ruff format --check .` from the repository root, with the settings of pyproject.toml's [tool.ruff]
(one line length, 120, for the linter and the formatter). ruff comes with the dev extra."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]], ids=["check", "format"])
def test_ruff_passes_on_the_whole_tree(args):
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", *args, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"ruff {' '.join(args)} (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
