"""mkdocs hook: the pages written from the code at build time.

- reference/config.md and reference/cli.md, from msllm/config.py and msllm/cli.py
  (msllm.reference: the functions that write them, tested in tests/unit/test_docs.py);
- benchmarks/: the committed benchmark results (benchmarks/*.md and their plots), and
  lab/results/: the committed results of the lab's experiments (lab/results/*.md and their plots),
  each at the same path in the site as in the repository, so that the docs link to the files
  themselves rather than to a copy.

The checkout that holds this file is imported, never another installed msllm.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULT_FILES = (".md", ".png")
RESULT_FOLDERS = ("benchmarks", "lab/results")  # relative to the repository and to the site alike


def on_files(files, config):
    from msllm.reference import cli_reference, config_reference  # noqa: PLC0415 (this checkout's: ROOT leads sys.path)

    files.append(File.generated(config, "reference/config.md", content=config_reference()))
    files.append(File.generated(config, "reference/cli.md", content=cli_reference()))
    for folder in RESULT_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*")):  # subfolders too (lab/results/bytes-controls/)
            if path.is_file() and path.suffix in RESULT_FILES:
                name = path.relative_to(ROOT / folder).as_posix()
                files.append(File.generated(config, f"{folder}/{name}", abs_src_path=str(path)))
    return files
