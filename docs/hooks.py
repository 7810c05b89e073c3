"""mkdocs hook: the pages written from the code at build time.

- reference/config.md and reference/cli.md, from msllm/config.py and msllm/cli.py
  (msllm.reference: the functions that write them, tested in tests/test_docs.py);
- benchmarks/: the committed benchmark results (benchmarks/*.md and their plots), so that the docs
  link to the files themselves rather than to a copy.

The checkout that holds this file is imported, never another installed msllm.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BENCHMARK_FILES = (".md", ".png")


def on_files(files, config):
    from msllm.reference import cli_reference, config_reference

    files.append(File.generated(config, "reference/config.md", content=config_reference()))
    files.append(File.generated(config, "reference/cli.md", content=cli_reference()))
    for path in sorted((ROOT / "benchmarks").iterdir()):
        if path.suffix in BENCHMARK_FILES:
            files.append(File.generated(config, f"benchmarks/{path.name}", abs_src_path=str(path)))
    return files
