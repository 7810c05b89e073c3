"""The bare training step: forward, `msllm train`'s loss, backward and the optimizer step, with no
DeepSpeed engine, data loader or callbacks.

It is the reference that the benchmarks time (`msllm bench throughput` compares `msllm train`
against it) and that msllm.memory measures, so that they all time and measure the same step.
"""

from __future__ import annotations

from typing import Callable

import torch

from msllm.train.evaluate import token_cross_entropy_sum


def bare_step(forward: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer | None,
              input_ids: torch.Tensor, labels: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One step on one batch: `forward(input_ids) -> logits` (under autocast to `autocast_dtype`
    when given), the summed token cross-entropy, backward, then `optimizer.step()` and
    `zero_grad` (without an optimizer the gradients are left for the caller). Returns the loss,
    detached; reading it is the caller's choice (a read waits for the device)."""
    # The logits are not kept in a variable: alive through backward, they would add their size to
    # the peak that msllm.memory measures (msllm train does not keep them either).
    with torch.autocast(input_ids.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = token_cross_entropy_sum(forward(input_ids), labels)  # fp32: the loss casts the logits
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()
