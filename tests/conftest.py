"""Fixtures shared by several test modules (pytest finds them here without imports).

    data_small_corpus   a prepared text corpus (seq_len 64) for the data tests
    tiny_data           the trainer tests' tiny corpus and its shards
    reference_run       one uninterrupted run of the tiny vanilla recipe

Each is built once per session (on disk, so that every module shares it). Helpers that are not
fixtures live in data_helpers.py, train_helpers.py (running `msllm`), model_helpers.py (the tiny
model of each architecture), plot_helpers.py and launch.py (torchrun).

A test marked `@pytest.mark.needs_root("why")` skips, saying why, when not run as root, and fails
instead under CI (CI=true), which must run every test (`.ci/run` runs as root).

CI runs the suite on two pytest-xdist workers (`-n 2`). The integration tests share daemons and
module fixtures (slurm, dockerd, the base image) and the reliability tests signal training
processes at chosen moments: each of those two folders runs on one worker, as one xdist group
(with `--dist loadgroup`, which the addopts in pyproject.toml select).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from data_helpers import make_documents, text_config, write_text_files
from msllm.config import DataConfig, TokenizerConfig
from train_helpers import base_recipe, check, corpus_text, make_recipe, msllm


SERIAL_FOLDERS = ("integration", "reliability")


def pytest_collection_modifyitems(config, items) -> None:
    """Each of SERIAL_FOLDERS runs on one xdist worker, its tests one after another."""
    for item in items:
        folder = item.path.parent.name
        if folder in SERIAL_FOLDERS:
            item.add_marker(pytest.mark.xdist_group(folder))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    """`needs_root` without root: a skip, or under CI a failure (before any fixture is made)."""
    marker = item.get_closest_marker("needs_root")
    if marker is None or os.geteuid() == 0:
        return
    why = f"needs root ({marker.args[0] if marker.args else 'see the test'})"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{why}, and CI runs every test: run the suite as root (.ci/run does)", pytrace=False)
    pytest.skip(f"{why}: run as root to include it, as CI does")


@pytest.fixture(scope="session")
def data_small_corpus(tmp_path_factory) -> tuple[DataConfig, list[str]]:
    """A prepared text corpus of 120 documents (seq_len 64), shared by the loader tests.

    Tests must not write into it; copy it (shutil.copytree) to change it.
    """
    from msllm.data import prepare_dataset

    root = tmp_path_factory.mktemp("data_small_corpus")
    documents = make_documents(120, seed=1)
    write_text_files(root / "text", documents)
    cfg = text_config(root / "text", root / "shards", tokenizer=TokenizerConfig(vocab_size=512))
    prepare_dataset(cfg, quiet=True)
    return cfg, documents


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    """(corpus file, shards folder), built once per session (on disk, so every module shares it)."""
    from msllm.config import from_dict
    from msllm.data import prepare_dataset

    base = tmp_path_factory.getbasetemp() / "train_tiny_data"
    corpus, shards = base / "corpus.txt", base / "shards"
    if not (shards / "manifest.json").is_file():
        base.mkdir(parents=True, exist_ok=True)
        corpus.write_text(corpus_text())
        recipe = from_dict(base_recipe(shards, corpus, base / "unused"))
        prepare_dataset(recipe.data)
    return corpus, shards


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, tiny_data) -> tuple[Path, Path, str]:
    """(recipe, output_dir, stdout) of one uninterrupted single-process run of the tiny vanilla
    recipe (12 steps, ZeRO 0), made once per session even when several modules use it."""
    tmp = tmp_path_factory.getbasetemp() / "train_reference"
    tmp.mkdir(exist_ok=True)
    recipe, out = make_recipe(tmp, tiny_data)
    log = tmp / "stdout.txt"
    if not log.is_file():
        proc = check(msllm("train", recipe))
        log.write_text(proc.stdout)
    return recipe, out, log.read_text()


@pytest.fixture
def saved_plots(monkeypatch) -> dict:
    """{file name: (figure, path)} of every figure the benchmarks save during the test through
    msllm.bench.plotting.save, which still writes them: a test reads the series drawn on the
    figure and decodes the PNG on disk (`check_saved_plot`)."""
    from msllm.bench import plotting

    saved = {}
    save = plotting.save

    def save_and_keep(fig, path):
        saved[Path(path).name] = (fig, Path(path))
        return save(fig, path)

    monkeypatch.setattr(plotting, "save", save_and_keep)
    return saved
