"""docker/Dockerfile built on a private Docker engine, and the tiny recipe trained in containers.

The image is built with `--build-arg BASE_IMAGE=` a base made locally (see docker_engine.py), as
on a cluster one passes the site's PyTorch image; both the build and the runs have no network.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from integ_helpers import REPO, TINY_RECIPE, need, need_root_and_tools

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BASE_TAG = "msllm-test-base:latest"
IMAGE = "msllm-test:latest"


@pytest.fixture(scope="module")
def engine():
    from docker_engine import IMAGE_PATH, DockerEngine, base_image_tar

    need_root_and_tools("dockerd")
    tar = base_image_tar()
    eng = DockerEngine()
    try:
        eng.start()
        proc = eng.docker("import", "--change", f"ENV PATH={IMAGE_PATH}", str(tar), BASE_TAG, check=False, timeout=900)
        need(proc.returncode == 0, f"docker import of {tar} failed:\n{proc.stdout[-3000:]}")
        proc = eng.docker(
            "build",
            "--network",
            "none",
            "-f",
            str(REPO / "docker" / "Dockerfile"),
            "--build-arg",
            f"BASE_IMAGE={BASE_TAG}",
            "--build-arg",
            "PIP_FLAGS=--no-build-isolation --no-index",
            "--build-arg",
            "PREBUILD_DS_CPU_OPS=1",
            "-t",
            IMAGE,
            str(REPO),
            check=False,
            timeout=900,
        )
        assert proc.returncode == 0, f"docker build failed:\n{proc.stdout[-5000:]}"
        yield eng
    finally:
        eng.stop()


def _writable(path):
    path.mkdir()
    os.chown(path, 1000, 1000)  # the image's user
    return path


@pytest.fixture(scope="module")
def host_shards(tmp_path_factory):
    """The tiny recipe's shards, prepared on the host (outside any container) by `msllm prep`.

    The containers mount them read-only at another path (/data/tiny): shards are portable (the
    up-to-date check is by content, not path), and the loader writes nothing into them.
    """
    from msllm.config import load_recipe
    from msllm.data import prepare_dataset

    shards = tmp_path_factory.mktemp("host-shards") / "tiny"
    data = load_recipe(TINY_RECIPE).data
    prepare_dataset(dataclasses.replace(data, shards_dir=str(shards)), quiet=True)
    return shards


def _volumes(tmp_path, shards, out=None):
    out = out or _writable(tmp_path / "out")
    return out, [
        "-v",
        f"{TINY_RECIPE}:/recipes/tiny.yaml:ro",
        "-v",
        f"{shards}:/data/tiny:ro",
        "-v",
        f"{out}:/out",
    ]


def test_image_metadata(engine):
    cfg = json.loads(engine.docker("image", "inspect", IMAGE).stdout)[0]["Config"]
    assert cfg["Entrypoint"] == ["msllm"]
    assert cfg["User"] not in ("", "0", "root"), cfg["User"]
    assert engine.docker("run", "--rm", "--network", "none", "--entrypoint", "id", IMAGE, "-u").stdout.strip() == "1000"
    # Only what the image needs is in it: no tests, no .git, no runs.
    listing = engine.docker(
        "run", "--rm", "--network", "none", "--entrypoint", "ls", IMAGE, "-A", "/opt/msllm"
    ).stdout.split()
    assert {"msllm", "recipes", "launchers", "pyproject.toml"} <= set(listing), listing
    assert not {"tests", ".git", "runs", "data"} & set(listing), listing


def test_tiny_recipe_in_a_container_without_network(engine, trainer, host_shards, tmp_path):
    out, vols = _volumes(tmp_path, host_shards)
    proc = engine.docker(
        "run",
        "--rm",
        "--network",
        "none",
        "-e",
        "OMP_NUM_THREADS=2",
        *vols,
        IMAGE,
        "train",
        "/recipes/tiny.yaml",
        "--set",
        "run.output_dir=/out/run",
        "--set",
        "data.shards_dir=/data/tiny",
        check=False,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-5000:]
    # The host's shards are taken as they are, not prepared again.
    assert "is up to date" in proc.stdout or "as they are" in proc.stdout, proc.stdout[-3000:]
    assert trainer.start_steps(proc.stdout) == [0], proc.stdout[-3000:]
    assert trainer.checkpoint_steps(out / "run")[-1] == 6, proc.stdout[-3000:]
    assert (out / "run").stat().st_uid == 1000


def test_two_containers_one_rank_each(engine, trainer, host_shards, tmp_path):
    """The compose.yaml layout: one rank per container; rank 1 shares rank 0's network namespace.
    Both containers (two data-loader nodes) read one read-only shards folder, first at once."""
    out = _writable(tmp_path / "out")
    names = [f"msllm-r{r}-{os.getpid()}" for r in range(2)]
    for rank, name in enumerate(names):
        _, vols = _volumes(tmp_path, host_shards, out=out)
        net = "none" if rank == 0 else f"container:{names[0]}"
        env = [
            f"RANK={rank}",
            "WORLD_SIZE=2",
            "LOCAL_RANK=0",
            "LOCAL_WORLD_SIZE=1",
            "MASTER_ADDR=127.0.0.1",
            "MASTER_PORT=29610",
            "OMP_NUM_THREADS=1",
        ]
        engine.docker(
            "run",
            "-d",
            "--name",
            name,
            "--network",
            net,
            *[a for e in env for a in ("-e", e)],
            *vols,
            IMAGE,
            "train",
            "/recipes/tiny.yaml",
            "--set",
            "run.output_dir=/out/run",
            "--set",
            "data.shards_dir=/data/tiny",
        )
    codes, logs = [], []
    for name in names:
        codes.append(int(engine.docker("wait", name, timeout=600).stdout.strip()))
        logs.append(engine.docker("logs", name).stdout)
        engine.docker("rm", name)
    text = "\n".join(logs)
    assert codes == [0, 0], text[-5000:]
    assert trainer.world_size(text) == 2, text[-3000:]
    assert trainer.checkpoint_steps(out / "run")[-1] == 6, text[-3000:]
