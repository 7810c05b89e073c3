"""Entry point for each rank started by `deepspeed --launcher slurm`: map srun's variables, then train.

DeepSpeed's slurm launcher runs `srun -n N python -u THIS_FILE ARGS...` and sets neither RANK nor
MASTER_ADDR, so this maps them from srun's variables before `msllm train` reads them:

    RANK <- SLURM_PROCID, WORLD_SIZE <- SLURM_NTASKS, LOCAL_RANK <- SLURM_LOCALID,
    LOCAL_WORLD_SIZE <- SLURM_NTASKS_PER_NODE (or the tasks on this node),
    MASTER_ADDR <- first host of SLURM_JOB_NODELIST (unless already set), MASTER_PORT <- 29500
    (unless already set; launchers/deepspeed/train.sbatch sets both).

    python launchers/deepspeed/slurm_rank.py train RECIPE [--set section.key=value ...]

Everything after this file's name is the `msllm` command line (MSLLM_MODULE picks another module
with the same `train RECIPE` interface, as the integration tests do).
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys


def _first_host(nodelist: str) -> str:
    out = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True
    ).stdout.split()
    if not out:
        raise SystemExit(f"slurm_rank.py: no hosts in SLURM_JOB_NODELIST={nodelist!r}")
    return out[0]


def map_slurm_env(env: dict) -> dict:
    """The torch.distributed variables for this srun task (only the ones not already set)."""
    missing = [k for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID") if k not in env]
    if missing:
        raise SystemExit(f"slurm_rank.py: not started by srun ({', '.join(missing)} unset)")
    out = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env["SLURM_LOCALID"],
    }
    per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1")
    out["LOCAL_WORLD_SIZE"] = per_node.split("(")[0].split(",")[0]
    if "MASTER_ADDR" not in env:
        out["MASTER_ADDR"] = _first_host(env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"])
    if "MASTER_PORT" not in env:
        out["MASTER_PORT"] = "29500"
    return out


def main() -> None:
    os.environ.update(map_slurm_env(dict(os.environ)))
    module = os.environ.get("MSLLM_MODULE", "msllm.cli")
    sys.argv = [module, *sys.argv[1:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
