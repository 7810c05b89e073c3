"""Fixtures for the launcher integration tests: real slurm daemons, network namespaces, dockerd.

Every component is started by the test session and stopped by its pid (or the process group it
leads). A component that cannot start makes the test FAIL with a message naming what is missing;
only MSLLM_SKIP_INTEGRATION=1 turns that into a skip. The tests need root and the Debian packages
that .ci/install-system.sh installs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# The helpers next to this file are imported by name, whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from integ_helpers import HERE, SKIP_ALL, TINY_RECIPE, TRAINER, Trainer, need_root_and_tools, run  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if not SKIP_ALL:
        return
    mark = pytest.mark.skip(reason="MSLLM_SKIP_INTEGRATION=1 is set")
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(mark)


@pytest.fixture(scope="session")
def trainer() -> Trainer:
    if TRAINER == "standin":
        return Trainer("standin", env={"MSLLM_MODULE": "standin_train", "PYTHONPATH": str(HERE)})
    return Trainer("real", env={"MSLLM_MODULE": "msllm.cli"})


@pytest.fixture(scope="session")
def shards_dir(made_once, tmp_path_factory, trainer) -> Path:
    """The tiny recipe's tokenizer and shards, prepared once per test run."""
    if trainer.kind != "real":
        return tmp_path_factory.mktemp("shards") / "tiny"

    def make(folder: Path) -> None:
        path = folder / "tiny"
        proc = run(
            [sys.executable, "-m", "msllm.cli", "prep", str(TINY_RECIPE), "--set", f"data.shards_dir={path}"],
            check=False,
            timeout=600,
        )
        assert proc.returncode == 0, f"`msllm prep` of the tiny recipe failed:\n{proc.stdout[-3000:]}"
        # One single-process step, so that the loader has unpacked the (zstd) shards before two
        # "nodes" share the folder: first use by two nodes at once raced here (FileNotFoundError
        # on train/shard.00000.mds), a data-loader matter that these launcher tests sidestep.
        proc = run(
            [
                sys.executable,
                "-m",
                "msllm.cli",
                "train",
                str(TINY_RECIPE),
                "--set",
                f"data.shards_dir={path}",
                "--set",
                f"run.output_dir={folder / 'warmup'}",
                "--set",
                "train.max_steps=1",
            ],
            check=False,
            timeout=600,
            env={**os.environ, "OMP_NUM_THREADS": "2"},
        )
        assert proc.returncode == 0, f"a one-step `msllm train` of the tiny recipe failed:\n{proc.stdout[-3000:]}"

    return made_once("integration_shards", make) / "tiny"


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """Two emulated slurm nodes (node1, node2) on this machine; see slurm_cluster.py."""
    from slurm_cluster import SlurmCluster

    need_root_and_tools("munged", "slurmctld", "slurmd", "sbatch", "unshare")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
