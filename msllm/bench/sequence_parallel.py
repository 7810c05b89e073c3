"""`msllm bench sequence-parallel`: per-rank training-step memory, step time and traffic of the
multi-scale models at 16k tokens with sp = 1, 2 and 4.

For each architecture's recipe in recipes/long_context/*-16k-cpu.yaml and each sp, it starts
`torchrun --nproc_per_node=sp -m msllm.bench.sequence_parallel RECIPE` (one sequence-parallel
group, batch 1) and reads one JSON line back from rank 0. Each rank measures:
- the memory of a training step (msllm.train.memory): fp32 parameters, gradients and AdamW state (sequence
  parallelism replicates them), and the activations of its slice with the loss, the largest over
  the ranks;
- step time: forward + backward of one sample, the median of 3 after a warm-up, the slowest rank;
- bytes sent per step by each rank (halo exchanges, all-to-alls, all-gathers; the largest),
  counted by `count_traffic`, a hook this benchmark installs around the steps: the model code
  calls plain collectives and knows nothing of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from msllm.bench import shipped_recipe
from msllm.config import load_recipe
from msllm.distributed import ParallelDims, sequence
from msllm.distributed.env import free_port
from msllm.models import build_model
from msllm.models.registry import ARCH_CONFIGS  # noqa: E402
from msllm.train.bare import bare_step
from msllm.train.memory import activation_bytes, count_parameters, loss_activation_bytes, parameter_state_bytes

ARCHS = tuple(name for name, cls in ARCH_CONFIGS.items() if not cls.baseline)  # the multi-scale ones


class Traffic:
    """Bytes this process has sent to the other ranks of its group, by kind of exchange."""

    def __init__(self):
        self.bytes_sent: dict[str, int] = {"halo": 0, "all_to_all": 0, "all_gather": 0, "all_reduce": 0}

    def count(self, kind: str, tensor, fraction: float = 1.0) -> None:
        self.bytes_sent[kind] += int(tensor.numel() * tensor.element_size() * fraction)

    def reset(self) -> None:
        for kind in self.bytes_sent:
            self.bytes_sent[kind] = 0


class _CountingComm:
    """A stand-in for a communication module (torch.distributed, deepspeed.comm) that counts what
    each collective sends, then calls the real one; every other name is the module's own. The
    bytes are those each rank sends: the isends of a batch; for an all-gather, its tensor to each
    of the others; for an all-reduce, 2(n-1)/n of its tensor (a ring); for an all-to-all, all but
    its own 1/n."""

    def __init__(self, comm, traffic: Traffic):
        self._comm, self._traffic = comm, traffic

    def __getattr__(self, name: str):
        return getattr(self._comm, name)

    def _size(self, group) -> int:
        return self._comm.get_world_size(group)

    def batch_isend_irecv(self, ops):
        for op in ops:
            if op.op is dist.isend:
                self._traffic.count("halo", op.tensor)
        return self._comm.batch_isend_irecv(ops)

    def all_gather(self, tensor_list, tensor, group=None, **kwargs):
        self._traffic.count("all_gather", tensor, self._size(group) - 1)
        return self._comm.all_gather(tensor_list, tensor, group=group, **kwargs)

    def all_reduce(self, tensor, *args, group=None, **kwargs):
        n = self._size(group)
        self._traffic.count("all_reduce", tensor, 2 * (n - 1) / n)
        return self._comm.all_reduce(tensor, *args, group=group, **kwargs)

    def all_to_all_single(self, output, input, *args, group=None, **kwargs):
        n = self._size(group)
        self._traffic.count("all_to_all", input, (n - 1) / n)
        return self._comm.all_to_all_single(output, input, *args, group=group, **kwargs)


@contextlib.contextmanager
def count_traffic(traffic: Traffic | None = None):
    """Within the block, count into `traffic` (yielded) the bytes that the sequence-parallel
    modules send: the collectives msllm.distributed.sequence calls through its `dist`, and the
    all-to-alls of DeepSpeed-Ulysses (deepspeed.sequence.layer's `dist`, deepspeed.comm), are
    wrapped by counting stand-ins and put back on the way out."""
    import deepspeed.sequence.layer as ulysses  # noqa: PLC0415 (heavy: DeepSpeed)

    traffic = traffic if traffic is not None else Traffic()
    patched = [(sequence, sequence.dist), (ulysses, ulysses.dist)]
    for module, comm in patched:
        module.dist = _CountingComm(comm, traffic)
    try:
        yield traffic
    finally:
        for module, comm in patched:
            module.dist = comm


def _worker(recipe_path: str) -> None:
    import deepspeed  # noqa: PLC0415 (heavy: DeepSpeed)

    faulthandler.enable(all_threads=True)  # a native abort prints every thread's Python stack to stderr
    deepspeed.init_distributed(dist_backend=deepspeed.get_accelerator().communication_backend_name())
    sp = dist.get_world_size()
    recipe = load_recipe(recipe_path, [f"parallel.sp={sp}"])
    cfg = dataclasses.replace(recipe.model, vocab_size=recipe.data.tokenizer.vocab_size)
    L = recipe.data.seq_len
    torch.manual_seed(0)
    dims = ParallelDims(world_size=sp, rank=dist.get_rank(), sp=sp)
    model = sequence.apply_sequence_parallel(build_model(cfg), dims.sequence_parallel_group())
    ids = torch.randint(0, cfg.vocab_size, (1, L + 1), generator=torch.Generator().manual_seed(0))
    rank = dist.get_rank()
    inputs = ids[:, rank * L // sp : (rank + 1) * L // sp]
    labels = ids[:, rank * L // sp + 1 : (rank + 1) * L // sp + 1]

    body = activation_bytes(model, inputs)
    loss = loss_activation_bytes(model, ids[:, rank * L // sp : (rank + 1) * L // sp + 1], L // sp)  # this rank's slice
    activations = body + loss
    states = sum(parameter_state_bytes(count_parameters(model)))

    def step() -> float:
        start = time.perf_counter()
        bare_step(model, None, inputs, labels)  # no optimizer: its time does not depend on sp
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step()  # warm-up
    with count_traffic() as traffic:
        times = [step() for _ in range(3)]
    sent = sum(traffic.bytes_sent.values()) / 3
    figures = torch.tensor([activations, body, loss, statistics.median(times), sent], dtype=torch.float64)
    dist.all_reduce(figures, op=dist.ReduceOp.MAX)
    if rank == 0:
        activations, body, loss, seconds, sent = figures.tolist()
        print(
            "RESULT "
            + json.dumps(
                {
                    "arch": cfg.arch,
                    "sp": sp,
                    "seq_len": L,
                    "activation_bytes": activations,
                    "body_bytes": body,
                    "loss_bytes": loss,
                    "step_bytes": states + activations,
                    "step_seconds": seconds,
                    "bytes_sent": sent,
                }
            ),
            flush=True,
        )
    dist.barrier()
    dist.destroy_process_group()
    # The figures are out; leave without interpreter finalisation. In CI a worker once aborted
    # ("terminate called without an active exception", SIGABRT) after its step: gloo's native threads
    # can still hold tensors when Python tears down (pytorch/pytorch#190489, #179291).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def bench_sequence_parallel(args) -> str:
    """Every multi-scale architecture at sp = 1, 2, 4: the markdown table."""
    return to_markdown(run(shipped_recipe("long_context")))


def run(recipes_dir: str = "recipes/long_context", sps: tuple[int, ...] = (1, 2, 4)) -> list[dict]:
    results = []
    for arch in ARCHS:
        recipe = Path(recipes_dir) / f"{arch}-16k-cpu.yaml"
        for sp in sps:
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // sp))}
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nproc_per_node={sp}",
                "--master_addr=127.0.0.1",
                f"--master_port={free_port()}",
                "-m",
                "msllm.bench.sequence_parallel",
                str(recipe),
            ]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                raise RuntimeError(
                    f"benchmark of {recipe} with sp={sp} failed (exit {done.returncode}):\n"
                    f"stdout: {done.stdout[-1000:]}\nstderr: {done.stderr[-3000:]}"
                )
            result = json.loads(lines[-1][len("RESULT ") :])
            results.append(result)
            print(
                f"{arch:<10} sp={sp}  step memory {result['step_bytes'] / 2**20:8.1f} MiB/rank  "
                f"step {result['step_seconds']:6.2f} s  sent {result['bytes_sent'] / 2**20:7.2f} MiB/rank",
                flush=True,
            )
    return results


def to_markdown(results: list[dict]) -> str:
    base = {r["arch"]: r for r in results if r["sp"] == 1}
    rows = [
        "| arch | sp | training-step MiB per rank | vs sp=1 | activations MiB (body + loss) | vs sp=1 | "
        "body MiB | loss MiB (chunked) | step s (fwd+bwd) | MiB sent per rank per step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        b = base.get(r["arch"])
        total = r["step_bytes"] / b["step_bytes"] if b else float("nan")
        acts = r["activation_bytes"] / b["activation_bytes"] if b else float("nan")
        rows.append(
            f"| {r['arch']} | {r['sp']} | {r['step_bytes'] / 2**20:.1f} | {total:.3f} | "
            f"{r['activation_bytes'] / 2**20:.1f} | {acts:.3f} | {r['body_bytes'] / 2**20:.1f} | "
            f"{r['loss_bytes'] / 2**20:.1f} | {r['step_seconds']:.2f} | {r['bytes_sent'] / 2**20:.2f} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    _worker(sys.argv[1])
