"""Fixtures shared by several test modules (pytest finds them here without imports).

    data_small_corpus   a prepared text corpus (seq_len 64) for the data tests
    tiny_data           the trainer tests' tiny corpus and its shards
    reference_run       one uninterrupted run of the tiny vanilla recipe
    made_once           made_once(name, make) -> a folder that `make` fills once per test run

Each is built once per test run, on disk (`made_once`): every module, and every xdist worker,
shares it. Helpers that are not fixtures live in the package tests/fixtures/ (its docstring lists
them): `from fixtures.train import msllm`.

The folders follow the package: unit/ (one process), distributed/ (several ranks under torchrun,
and the scripts they run), reliability/ (injected faults), integration/ (slurm, Docker, network
namespaces), lab/ (the experiments of lab/ at toy sizes).

A test marked `@pytest.mark.needs_root("why")` skips, saying why, when not run as root, and fails
instead under CI (CI=true), which must run every test (`.ci/run` runs as root).

A test marked `@pytest.mark.needs_cuda("why")` skips, saying why, where torch sees no CUDA device
(every CI machine so far): the marker is how `msllm bench gpu` finds them (`pytest -m needs_cuda`
over tests/), so every CUDA-only test carries it rather than its own skipif.

CI runs the suite on two pytest-xdist workers (`-n 2`). A module whose tests share a module-scoped
fixture (dockerd and its image, a slurm cluster, exported models) runs on one worker, as one xdist
group (`--dist loadgroup`, which the addopts in pyproject.toml select), so that the fixture is built
once; every other test goes to whichever worker is free.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from filelock import FileLock

from fixtures.data import make_documents, text_config, write_text_files
from fixtures.train import base_recipe, check, corpus_text, make_recipe, msllm, recipe_paths
from msllm.config import DataConfig, TokenizerConfig


def _interpret_triton_without_cuda() -> None:
    """Liger's Triton kernels run on the CPU in the tests under Triton's interpreter
    (tests/fixtures/kernels.py), which Triton reads when it defines a kernel, its own standard
    library's included, at import: so it is set here, before anything imports triton, and only
    without CUDA (where nothing else can run a Triton kernel; on a GPU the CUDA tests need Triton
    compiled)."""
    import sys

    import torch

    if "triton" not in sys.modules and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_interpret_triton_without_cuda()


def pytest_configure(config) -> None:
    """Under xdist, each worker computes on its share of the cores: with every worker on all of
    them, OpenMP threads wait on each other (the 16k-token model tests took 1.4x as long with 2
    threads per worker on 2 cores). Processes the tests start set their own threads."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


# Before xdist's own hook, which reads the xdist_group marks (a later mark would be ignored).
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items) -> None:
    """The tests of a module that share a module-scoped fixture form one xdist group (one worker)."""
    for item in items:
        fixtures = getattr(item, "_fixtureinfo", None)
        scopes = {d.scope for defs in (fixtures.name2fixturedefs.values() if fixtures else ()) for d in defs}
        if "module" in scopes:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    """`needs_root` without root: a skip, or under CI a failure; `needs_cuda` without a CUDA device:
    a skip (before any fixture is made)."""
    cuda = item.get_closest_marker("needs_cuda")
    if cuda is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip(
                f"needs CUDA ({cuda.args[0] if cuda.args else 'see the test'}): run it on a GPU, e.g. msllm bench gpu"
            )
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
def made_once(tmp_path_factory):
    """made_once(name, make) -> Path: the folder `name` that `make(folder)` filled, once in the whole
    test run. The first xdist worker to ask makes it, under a file lock; the others wait and share
    it. Read it, never write into it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's temp folder, above each worker's own

    def made_once(name: str, make) -> Path:
        folder = root / name
        with FileLock(str(root / f"{name}.lock")):
            if not (folder / ".made").is_file():
                shutil.rmtree(folder, ignore_errors=True)  # a make() that failed half-way
                folder.mkdir(parents=True)
                make(folder)
                (folder / ".made").touch()
        return folder

    return made_once


@pytest.fixture(scope="session")
def tiny_data(made_once) -> tuple[Path, Path]:
    """(corpus file, shards folder), made once per test run."""
    from msllm.config import from_dict
    from msllm.data import prepare_dataset

    def make(base: Path) -> None:
        (base / "corpus.txt").write_text(corpus_text())
        prepare_dataset(from_dict(base_recipe(base / "shards", base / "corpus.txt", base / "unused")).data)

    base = made_once("train_tiny_data", make)
    return base / "corpus.txt", base / "shards"


@pytest.fixture(scope="session")
def reference_run(made_once, tiny_data) -> tuple[Path, Path, str]:
    """(recipe, output_dir, stdout) of one uninterrupted single-process run of the tiny vanilla
    recipe (12 steps, ZeRO 0), made once per test run even when several modules use it."""

    def make(tmp: Path) -> None:
        recipe, _ = make_recipe(tmp, tiny_data)
        (tmp / "stdout.txt").write_text(check(msllm("train", recipe)).stdout)

    tmp = made_once("train_reference", make)
    return *recipe_paths(tmp), (tmp / "stdout.txt").read_text()


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
