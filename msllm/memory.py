"""The memory of one training step, split by what holds it.

A training step keeps four things in memory:

- parameters, gradients and optimizer state: bytes per parameter fixed by the precision and AdamW
  (table below), divided over the data-parallel ranks as far as the ZeRO stage shards them;
- activations: the tensors autograd saves for backward during one micro-batch's forward pass and
  loss, measured with `torch.autograd.graph.saved_tensors_hooks` on a real forward pass in the
  recipe's precision. The loss counts: its fp32 log-probabilities (micro_batch x L x vocab) cost
  every architecture the same and are a large share at small widths.

  In backward, the loss adds two more buffers of that size (the gradients of the log-probabilities
  and of the logits) while everything saved is still alive: they are counted too.

`step_memory` computes the split; `measure_step_peak` runs real training steps and measures the
peak (CUDA's max_memory_allocated on an accelerator; on the CPU, every allocation and free that
torch's profiler records), so that the split is checked against a measurement (tests/test_memory.py).
The total is an upper bound of the peak: gradients grow in backward while activations are freed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn

# Bytes per parameter as (weights, gradients, optimizer state) for AdamW. fp32: weights, grads, and
# AdamW's two moments. bf16/fp16 (DeepSpeed): 16-bit weights and grads, and an fp32 master copy
# plus two fp32 moments in the optimizer (the "2 + 2 + 12" of the ZeRO paper).
BYTES_PER_PARAMETER = {"fp32": (4, 4, 8), "bf16": (2, 2, 12), "fp16": (2, 2, 12)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class StepMemory:
    """Bytes one rank holds for a training step."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int  # saved for backward in one micro-batch, plus the loss's backward buffers

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "total": self.total}

    def format(self) -> str:
        mib = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
        return (f"total {mib(self.total)} = parameters {mib(self.parameters)} + gradients {mib(self.gradients)}"
                f" + optimizer {mib(self.optimizer)} + activations {mib(self.activations)}")


def count_parameters(model: nn.Module) -> int:
    """Parameters of the model, tied ones once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def activation_bytes(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> int:
    """Bytes of the tensors autograd saves for backward in one forward pass (each storage counted
    once; parameters are not activations). With `labels`, the loss too: what its cross-entropy
    saves, plus the two fp32 buffers of the logits' size that its backward adds (the gradients of
    the log-probabilities and of the logits)."""
    from msllm.train.evaluate import token_cross_entropy_sum

    with saved_for_backward(exclude=model.parameters()) as storages:
        logits = model(input_ids)
        loss = token_cross_entropy_sum(logits, labels) if labels is not None else None
    loss_backward = 2 * logits.numel() * 4 if labels is not None else 0
    del logits, loss
    return sum(storages.values()) + loss_backward


@contextlib.contextmanager
def saved_for_backward(exclude: Iterable[torch.Tensor] = ()) -> Iterator[dict[int, int]]:
    """Record the tensors autograd saves for backward inside the block: yields {storage address:
    bytes}, each storage once, the storages of `exclude` (parameters, a layer's inputs) left out."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield storages


def parameter_state_bytes(n_parameters: int, precision: str = "fp32", zero_stage: int = 0, dp: int = 1) -> tuple[int, int, int]:
    """(parameters, gradients, optimizer state) bytes on one rank, as far as ZeRO shards them."""
    weight_bytes, grad_bytes, optim_bytes = BYTES_PER_PARAMETER[precision]
    parameters, gradients, optimizer = n_parameters * weight_bytes, n_parameters * grad_bytes, n_parameters * optim_bytes
    if zero_stage >= 1:
        optimizer //= dp
    if zero_stage >= 2:
        gradients //= dp
    if zero_stage >= 3:
        parameters //= dp
    return parameters, gradients, optimizer


def step_memory(model: nn.Module, vocab_size: int, micro_batch: int, seq_len: int, precision: str = "fp32",
                zero_stage: int = 0, dp: int = 1, seed: int = 0) -> StepMemory:
    """The memory split of a training step of `model` (as built, with activation checkpointing
    applied if wanted; parameters on the device where the forward pass should run) on `micro_batch` x `seq_len` tokens per rank, at `precision`, with ZeRO
    `zero_stage` over `dp` data-parallel ranks. Runs one forward pass (and loss) in `precision`
    on the model's device; the model is cast in place."""
    parameters, gradients, optimizer = parameter_state_bytes(count_parameters(model), precision, zero_stage, dp)
    model.to(DTYPES[precision])
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (1, seq_len + 1), generator=generator).to(device)
    # Samples do not interact, so one sample is measured and the micro-batch is a multiple of it.
    activations = micro_batch * activation_bytes(model, tokens[:, :-1], tokens[:, 1:])
    return StepMemory(parameters, gradients, optimizer, activations)


def measure_step_peak(model_cfg, micro_batch: int, seq_len: int, steps: int = 2) -> int:
    """Peak bytes of tensors alive during real training steps (forward, loss, backward, AdamW
    step) of a freshly built model, fp32, one rank, no ZeRO: compare with
    `step_memory(..., "fp32").total`. On CUDA it is the allocator's peak (max_memory_allocated);
    on the CPU, the peak of the running sum of every allocation and free that torch's profiler
    records (exact tensor bytes, without the C allocator's slack)."""
    from msllm.models import build_model
    from msllm.train.bare import bare_step

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = torch.randint(0, model_cfg.vocab_size, (micro_batch, seq_len + 1), device=device)

    def run() -> None:
        model = build_model(model_cfg).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)  # no flat copies
        for _ in range(steps):
            bare_step(model, optimizer, tokens[:, :-1], tokens[:, 1:])

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    changes = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in changes:
        live += nbytes
        peak = max(peak, live)
    return peak
