"""`msllm bench attention`: one layer's sliding-window attention, forward + backward, per kernel.

For each kernel of msllm.models.attention that trains on the device (the CPU: `dense` and
`blocks`; CUDA: `blocks` and `flex`, and `dense` where its L x L mask fits): the median time of
forward + backward over random queries, keys and values [1, H, L, D], and the bytes that autograd
saves for backward (the attention's share of a training step's activation memory; on CUDA also the
allocator's peak). Each kernel is first checked against `dense` at a length where `dense` fits:
the largest difference of the outputs and of the gradients of q, k and v.

- GPU: the BookCorpus recipes' heads (H = 8, D = 64), bf16, L = 65536, window 256: the issue's
  target is <= 2 ms for forward + backward.
- CPU: H = 4, D = 16, fp32, L = 4096, window 64, so that CI can smoke-test it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from msllm.models.attention import local_attention
from msllm.train.memory import saved_for_backward


@dataclass(frozen=True)
class Setting:
    heads: int
    head_dim: int
    seq_len: int
    window: int
    check_len: int  # length of the agreement check against dense
    dtype: str
    repeats: int  # timed repetitions (the median counts), after two warm-up ones


GPU = Setting(heads=8, head_dim=64, seq_len=65536, window=256, check_len=4096, dtype="bfloat16", repeats=20)
CPU = Setting(heads=4, head_dim=16, seq_len=4096, window=64, check_len=1024, dtype="float32", repeats=5)
DENSE_MAX_LEN = 16384  # dense builds an L x L mask and L x L scores


def _inputs(setting: Setting, seq_len: int, device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shape = (1, setting.heads, seq_len, setting.head_dim)
    dtype = getattr(torch, setting.dtype)
    return [torch.randn(shape, generator=generator).to(device, dtype).requires_grad_() for _ in range(3)]


def _forward_backward(kernel: str, window: int, q, k, v):
    out = local_attention(q, k, v, window, kernel=kernel)
    out.backward(torch.ones_like(out))
    return out


def agreement(kernel: str, setting: Setting, device) -> float:
    """Largest |difference| from dense, over the output and the gradients of q, k, v."""
    runs = []
    for name in ("dense", kernel):
        q, k, v = _inputs(setting, setting.check_len, device)
        out = _forward_backward(name, setting.window, q, k, v)
        runs.append([out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()])
    return max((a - b).abs().max().item() for a, b in zip(*runs))


def measure(kernel: str, setting: Setting, device) -> dict:
    """Median forward + backward time, bytes saved for backward, and (CUDA) peak bytes allocated."""
    cuda = device.type == "cuda"
    q, k, v = _inputs(setting, setting.seq_len, device)
    with saved_for_backward(exclude=(q, k, v)) as saved:  # q, k, v are the layer's input
        _forward_backward(kernel, setting.window, q, k, v)
    saved_bytes = sum(saved.values())

    def synchronize():
        if cuda:
            torch.cuda.synchronize()

    times = []
    for i in range(setting.repeats + 2):
        for t in (q, k, v):
            t.grad = None
        synchronize()
        if i == 2 and cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        _forward_backward(kernel, setting.window, q, k, v)
        synchronize()
        if i >= 2:  # two warm-up runs: compilation, plans, allocator
            times.append(time.perf_counter() - start)
    return {
        "kernel": kernel,
        "ms": 1000 * statistics.median(times),
        "saved_mib": saved_bytes / 2**20,
        "peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None,
    }


def kernels_for(device) -> list[str]:
    if device.type == "cuda":
        return ["dense", "blocks", "flex"]
    return ["dense", "blocks"]  # FlexAttention has no CPU backward


def run(setting: Setting, device) -> list[dict]:
    rows = []
    for kernel in kernels_for(device):
        row = {"kernel": kernel}
        if kernel != "dense":
            row["max_diff"] = agreement(kernel, setting, device)
        if kernel == "dense" and setting.seq_len > DENSE_MAX_LEN:
            row["skipped"] = f"L x L mask at L = {setting.seq_len}"
        else:
            row.update(measure(kernel, setting, device))
        print(row, flush=True)
        rows.append(row)
    return rows


def to_markdown(rows: list[dict], setting: Setting, device_name: str) -> str:
    lines = [
        f"Sliding-window attention on {device_name}: one layer, [1, {setting.heads}, L, {setting.head_dim}], "
        f"{setting.dtype}, L = {setting.seq_len}, window {setting.window}; forward + backward, the median of "
        f'{setting.repeats} runs after 2 warm-up runs. "saved": bytes autograd keeps for backward (q, k, v '
        f'excluded); "peak": CUDA max_memory_allocated above the inputs. "max |diff| vs dense": over the output '
        f"and the q, k, v gradients at L = {setting.check_len}.",
        "",
        "| kernel | fwd+bwd ms | saved MiB | peak MiB | max abs diff vs dense |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        diff = f"{r['max_diff']:.2e}" if "max_diff" in r else "(reference)"
        if "skipped" in r:
            lines.append(f"| {r['kernel']} | not run: {r['skipped']} | | | {diff} |")
            continue
        peak = f"{r['peak_mib']:,.1f}" if r["peak_mib"] is not None else "n/a (CPU)"
        lines.append(f"| {r['kernel']} | {r['ms']:.2f} | {r['saved_mib']:,.1f} | {peak} | {diff} |")
    return "\n".join(lines)


def bench_attention(args) -> str:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    setting = GPU if cuda else CPU
    return to_markdown(run(setting, device), setting, torch.cuda.get_device_name() if cuda else "the CPU")
