"""The bare training step: forward, `msllm train`'s loss, backward and the optimizer step, with no
DeepSpeed engine, data loader or callbacks.

It is the reference that the benchmarks time (`msllm bench throughput` compares `msllm train`
against it) and that msllm.train.memory measures, so that they all time and measure the same step.
"""

from __future__ import annotations

import torch

from msllm.train.loss import model_loss


def bare_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    autocast_dtype: torch.dtype | None = None,
    loss_kernel: str = "chunked",
    loss_chunk_size: int = 0,
) -> torch.Tensor:
    """One step on one batch: the summed token cross-entropy of `model` (msllm.train.loss, under
    autocast to `autocast_dtype` when given), backward, then `optimizer.step()` and `zero_grad`
    (without an optimizer the gradients are left for the caller). Returns the loss, detached;
    reading it is the caller's choice (a read waits for the device)."""
    with torch.autocast(input_ids.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = model_loss(model, input_ids, labels, loss_kernel, loss_chunk_size)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()
