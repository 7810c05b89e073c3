"""Fast checks of the launchers' logic (no torch import, no daemons): the commands they build."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "launchers" / "local.sh"
RECIPE = REPO / "recipes" / "quickstart.yaml"


def local_sh(*args, env=None):
    e = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NPROC_PER_NODE", "NNODES", "HEAD_ADDR", "NODE_RANK", "OMP_NUM_THREADS")
    }
    e.update(env or {})
    return subprocess.run(["bash", str(LOCAL), "--dry-run", *args], capture_output=True, text=True, env=e, timeout=60)


def test_local_single_node_is_standalone():
    p = local_sh("--nproc", "2", str(RECIPE), "--set", "train.max_steps=3")
    assert p.returncode == 0, p.stderr
    assert "-m torch.distributed.run --nproc-per-node=2 --standalone --module msllm.cli train" in p.stderr
    assert p.stderr.rstrip().endswith("--set train.max_steps=3")
    threads = int(re.search(r"OMP_NUM_THREADS=(\d+)", p.stderr).group(1))
    assert threads == max(1, len(os.sched_getaffinity(0)) // 2)


def test_local_default_nproc_without_gpus_is_one():
    p = local_sh(str(RECIPE), env={"CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable})
    assert p.returncode == 0, p.stderr
    assert "--nproc-per-node=1 " in p.stderr


def test_local_multi_node_c10d_and_static():
    p = local_sh("--nproc", "1", "--nnodes", "2", "--head", "10.0.0.1:29400", "--local-addr", "10.0.0.2", str(RECIPE))
    assert p.returncode == 0, p.stderr
    assert (
        "--nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=10.0.0.1:29400 --rdzv-id=msllm --local-addr=10.0.0.2"
        in p.stderr
    )
    p = local_sh(str(RECIPE), env={"NPROC_PER_NODE": "4", "NNODES": "3", "HEAD_ADDR": "h0", "NODE_RANK": "2"})
    assert p.returncode == 0, p.stderr
    assert "--nnodes=3 --node-rank=2 --master-addr=h0 --master-port=29500" in p.stderr
    assert "OMP_NUM_THREADS=" in p.stderr


def test_local_errors_are_one_line():
    p = local_sh("--nproc", "1", "--nnodes", "2", str(RECIPE))
    assert p.returncode == 2 and "needs --head" in p.stderr
    p = local_sh("--nproc", "1", "no/such/recipe.yaml")
    assert p.returncode == 2 and "recipe file not found" in p.stderr
    p = local_sh("--bogus", str(RECIPE))
    assert p.returncode == 2 and "unknown option --bogus" in p.stderr


@pytest.mark.parametrize("script", ["slurm/train.sbatch", "deepspeed/train.sbatch"])
def test_sbatch_headers(script):
    text = (REPO / "launchers" / script).read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, flags=re.M))
    assert "requeue" in directives
    assert directives["signal"].startswith("B:USR1@")
    assert directives["ntasks-per-node"] == "1"
    assert directives["open-mode"] == "append"
    assert "%j" in directives["output"]


def test_sbatch_outside_slurm_fails_clearly():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    p = subprocess.run(
        ["bash", str(REPO / "launchers/slurm/train.sbatch"), str(RECIPE)], capture_output=True, text=True, env=env
    )
    assert p.returncode != 0 and "must run under slurm" in p.stderr


def _slurm_rank():
    spec = importlib.util.spec_from_file_location("slurm_rank", REPO / "launchers/deepspeed/slurm_rank.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_deepspeed_rank_mapping():
    mod = _slurm_rank()
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_TASKS_PER_NODE": "4(x2)",
        "MASTER_ADDR": "node7",
        "MASTER_PORT": "23456",
    }
    assert mod.map_slurm_env(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    with pytest.raises(SystemExit, match="not started by srun"):
        mod.map_slurm_env({})


def test_compose_ranks_are_consistent():
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    envs = [{**services[name].get("environment", {})} for name in services]
    assert sorted(int(e["RANK"]) for e in envs) == list(range(len(services)))
    assert {int(e["WORLD_SIZE"]) for e in envs} == {len(services)}
    assert all(s.get("network_mode") == "service:rank0" for n, s in services.items() if n != "rank0")


@pytest.mark.parametrize("script", ["local.sh", "slurm/train.sbatch", "deepspeed/train.sbatch"])
def test_launchers_keep_python_output_unbuffered(script):
    """Their logs are files or pipes: every Python process they start prints each line at once
    (msllm.cli line-buffers its own stdout too: tests/unit/test_live_logs.py)."""
    text = (REPO / "launchers" / script).read_text()
    assert re.search(r"^export PYTHONUNBUFFERED=1$", text, flags=re.M)
