"""Never apply a non-finite update; stop after too many in a row, naming the last good checkpoint.

Two pieces:

- `GuardedAdamW`: torch's AdamW that skips an update whose gradients are not all finite and says
  so through the `overflow` attribute, the contract DeepSpeed's own fp16 and ZeRO optimizers
  follow: DeepSpeed then counts the step in `engine.skipped_steps`, reports it through
  `engine.was_step_applied()`, and leaves the lr schedule where it was. ZeRO 1-3 check gradients
  themselves (an invalid global norm is an overflow) and call this optimizer only for finite ones.
  Its finiteness check is the guard's only cost: one scalar copied to the host per optimizer step,
  here and nowhere else.
- `NonFiniteGuard`: after each step, counts the skipped ones; after `train.max_skipped_steps` in a
  row it turns the step's plan into a stop for divergence (msllm.train.schedule), whose
  DivergenceError names the last good checkpoint (the checkpoints that hold the weights which
  gave the first non-finite gradients are set aside; checkpoints are never written with
  non-finite weights: the Checkpointer refuses).
"""

from __future__ import annotations

import dataclasses

import torch

from msllm.distributed.env import say
from msllm.errors import DivergenceError
from msllm.train.schedule import StepPlan, StopRequest


class GuardedAdamW(torch.optim.AdamW):
    overflow = False  # read by DeepSpeed after every step: True means "this update was skipped"

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            norms = torch._foreach_norm(grads)
            self.overflow = not bool(torch.isfinite(torch.stack(norms)).all())  # the one host sync
        else:
            self.overflow = False
        if self.overflow:
            return None
        return super().step(closure)


class NonFiniteGuard:
    """Counts the skipped updates; a streak of `max_in_a_row` ends the run as a stop request."""

    def __init__(self, max_in_a_row: int, checkpointer):
        self.max_in_a_row = max_in_a_row
        self.checkpointer = checkpointer
        self.in_a_row = 0  # while > 0, no checkpoint is saved: weights that give NaN gradients are none to resume
        self.skipped = 0  # over the whole run (this process)

    def check(self, engine, plan: StepPlan) -> StepPlan:
        """After optimizer step `plan.step`: the plan as it now stands. A skipped update cancels the
        step's checkpoint; too many in a row, or a run that reaches max_steps inside a streak (it has
        no good final state), become a stop for divergence."""
        inner = getattr(engine, "basic_optimizer", None)
        applied = engine.was_step_applied() and not getattr(inner, "overflow", False)
        if applied:  # (a non-finite loss has non-finite gradients: never applied)
            self.in_a_row = 0
            return plan
        self.in_a_row += 1
        self.skipped += 1
        say(
            f"step {plan.step}: gradients not finite: update skipped "
            f"({self.in_a_row} in a row; the run stops at {self.max_in_a_row})"
        )
        plan = dataclasses.replace(plan, checkpoint=False)
        if self.in_a_row < self.max_in_a_row and not plan.last:
            return plan
        first_bad = plan.step - self.in_a_row + 1
        where = self.checkpointer.set_aside_diverged(first_bad)
        if first_bad == 1:  # the gradients of the run's first weights, before any update: lr made none of them
            where = (
                "the first step's gradients, from the weights the run started with, were already not finite, "
                "so a lower train.lr cannot help: look at the model's numerics and initial weights (does it "
                "train with train.precision fp32?)"
            )
        return plan.stopped(
            StopRequest(
                "divergence",
                DivergenceError(
                    f"training diverged: {self.in_a_row} updates in a row (steps {first_bad}-{plan.step}) had NaN or "
                    f"inf gradients and were skipped; {where}"
                ),
            )
        )
