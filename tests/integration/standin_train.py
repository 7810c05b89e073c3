"""A stand-in for `msllm train` used by the launcher integration tests while the trainer is written.

    python -m standin_train train RECIPE [--set section.key=value ...]

It behaves the way the launchers expect of the trainer: it reads the rank from torchrun's
variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or from srun's (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID plus MASTER_ADDR/MASTER_PORT), joins a gloo process group, does one
all_reduce per step, writes a checkpoint every `checkpoint.every` steps and at the end into
`run.output_dir/checkpoints/step_000000N/` (a `COMPLETE` marker last, as the trainer does), resumes from the
latest complete checkpoint, and on SIGTERM or SIGUSR1 saves a checkpoint at the current step and exits 0.

It logs `msllm-standin: start_step=N rank=R world=W host=H` once per rank, the same facts the
tests read from the real trainer's log.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml


def _recipe(path: str, overrides: list[str]) -> dict:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    for item in overrides:
        key, value = item.split("=", 1)
        node = raw
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = yaml.safe_load(value)
    return raw


def _env_rank() -> tuple[int, int, int]:
    if "RANK" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if "SLURM_PROCID" in os.environ:
        os.environ.setdefault("MASTER_PORT", "29500")
        return (
            int(os.environ["SLURM_PROCID"]),
            int(os.environ["SLURM_NTASKS"]),
            int(os.environ.get("SLURM_LOCALID", "0")),
        )
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    return 0, 1, 0


def _latest(ckpt_root: Path) -> int:
    steps = [int(p.name.split("_")[1]) for p in ckpt_root.glob("step_*") if (p / "COMPLETE").exists()]
    return max(steps, default=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["train"])
    parser.add_argument("recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    recipe = _recipe(args.recipe, args.overrides)
    out = Path(recipe["run"]["output_dir"])
    max_steps = int(recipe["train"]["max_steps"])
    every = int(recipe.get("checkpoint", {}).get("every", 0))
    step_seconds = float(os.environ.get("STANDIN_STEP_SECONDS", "0.5"))
    hold_after = int(os.environ.get("STANDIN_HOLD_AFTER_STEP", "0"))  # Trainer.held_before_step

    rank, world, local_rank = _env_rank()
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGUSR1, on_signal)

    dist.init_process_group("gloo", rank=rank, world_size=world)
    ckpt_root = out / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    start = _latest(ckpt_root)
    print(
        f"msllm-standin: start_step={start} rank={rank} world={world} local_rank={local_rank} "
        f"host={socket.gethostname()}",
        flush=True,
    )

    def save(step: int) -> None:
        dist.barrier()
        if rank == 0:
            d = ckpt_root / f"step_{step:07d}"
            d.mkdir(exist_ok=True)
            (d / "state.json").write_text(json.dumps({"step": step, "world": world}))
            (d / "COMPLETE").write_text("")
            print(f"msllm-standin: saved checkpoint step={step}", flush=True)
        dist.barrier()

    step = start
    while step < max_steps:
        if step == hold_after and step > start:  # once, in the run that reached it
            print(f"msllm-standin: WAITING FOR A SIGNAL AFTER STEP {step}", flush=True)
            deadline = time.monotonic() + 120
            while stop["signal"] is None and time.monotonic() < deadline:
                time.sleep(0.01)
        # Every rank must agree on stopping, or the collectives below would hang.
        flag = torch.tensor([1.0 if stop["signal"] else 0.0])
        dist.all_reduce(flag)
        if flag.item() > 0:
            print(f"msllm-standin: rank {rank} stopping on a signal at step {step}", flush=True)
            save(step)
            dist.destroy_process_group()
            return 0
        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t)
        assert t.item() == world * (world + 1) / 2, t
        step += 1
        (out / "steps").mkdir(exist_ok=True)
        (out / "steps" / f"rank{rank}-step{step}").write_text(socket.gethostname())
        if rank == 0:
            print(f"msllm-standin: step {step}", flush=True)
        if every and step % every == 0 and step < max_steps:
            save(step)
        time.sleep(step_seconds)
    save(step)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
