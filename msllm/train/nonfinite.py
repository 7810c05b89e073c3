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
  row it stops the run with a DivergenceError naming the last good checkpoint (checkpoints are
  never written with non-finite weights: CheckpointManager.save refuses).
"""

from __future__ import annotations

import torch

from msllm.errors import DivergenceError
from msllm.train.dist import say


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
    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0  # while > 0, no checkpoint is saved (CheckpointCallback asks)
        self.skipped = 0  # over the whole run (this process)

    def after_step(self, trainer) -> None:
        """Called once per optimizer step, after `trainer.step` has advanced."""
        engine = trainer.engine
        inner = getattr(engine, "basic_optimizer", None)
        applied = engine.was_step_applied() and not getattr(inner, "overflow", False)
        if applied:  # (a non-finite loss has non-finite gradients: never applied)
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.skipped += 1
        say(
            f"step {trainer.step}: gradients not finite: update skipped "
            f"({self.in_a_row} in a row; the run stops at {self.max_in_a_row})"
        )
        if self.in_a_row >= self.max_in_a_row:
            self.stop(trainer, first_bad=trainer.step - self.in_a_row + 1)

    def at_end(self, trainer) -> None:
        """A run that reaches max_steps inside a streak of skipped steps has no good final state."""
        if self.in_a_row:
            self.stop(trainer, first_bad=trainer.step - self.in_a_row + 1)

    def stop(self, trainer, first_bad: int) -> None:
        """Set aside the checkpoints that hold the weights which gave the first non-finite gradients
        (the update of step first_bad - 1 made them) and stop, naming the newest one before."""
        from msllm.train import dist
        from msllm.train.checkpoint import list_complete, step_of

        ckpt = trainer.ckpt
        good = [p for p in list_complete(ckpt.root) if step_of(p) < first_bad - 1]
        if trainer.denv.is_main:
            for bad in list_complete(ckpt.root):
                if step_of(bad) >= first_bad - 1:
                    ckpt.set_aside(bad, f"its weights gave NaN or inf gradients at step {first_bad}", suffix="diverged")
        dist.barrier()
        where = (
            f"the last good checkpoint is {good[-1]}: rerun with a lower train.lr to resume from it"
            if good else "no checkpoint before that is left: rerun with a lower train.lr to start over"
        )
        raise DivergenceError(
            f"training diverged: {self.in_a_row} updates in a row (steps {first_bad}-{trainer.step}) had NaN or "
            f"inf gradients and were skipped; {where}"
        )
