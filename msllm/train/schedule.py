"""What is due at a step: decided once, before the step, and agreed by every rank.

    plan = schedule.at(step)   -> StepPlan(step, log, eval, checkpoint, last, stop)

Every component acts on the plan instead of working it out (the loop, the loggers, eval, the
checkpointer). The intervals come from the recipe (log.every, eval.every, checkpoint.every,
train.max_steps); a stop is a StopRequest, whatever asked for it:

- a signal: SIGTERM or SIGUSR1 (what slurm sends before preemption or the time limit) or SIGINT
  (Ctrl-C) to any rank; the ranks agree on it before each step with one host-side all-reduce that
  never waits for the accelerator (collectives.any_rank), so that they all stop after the same
  step. A second SIGINT stops at once (KeyboardInterrupt, exit 130);
- `train.stop_at_step`;
- divergence: too many skipped updates in a row (msllm.train.nonfinite), found after the step, with
  the error the run ends with.

A stop checkpoints (but divergence) and skips eval; the run then ends with exit 0 (or the error).
"""

from __future__ import annotations

import dataclasses
import signal
import time
from dataclasses import dataclass

from msllm.distributed import collectives
from msllm.errors import MsllmError


@dataclass(frozen=True)
class StopRequest:
    reason: str  # "SIGTERM", "train.stop_at_step", "divergence", ...
    error: MsllmError | None = None  # the run ends with it (divergence); None: a clean stop, exit 0


@dataclass(frozen=True)
class StepPlan:
    step: int
    log: bool  # read the loss back and log a row
    eval: bool
    checkpoint: bool
    last: bool  # step == train.max_steps
    stop: StopRequest | None = None

    @property
    def reads_results(self) -> bool:
        """Whether the step reads its loss and gradient norm back from the device (the steps that
        log, checkpoint (no diverged weights are saved), the last, and a stop)."""
        return self.log or self.checkpoint or self.last or self.stop is not None

    def stopped(self, request: StopRequest) -> StepPlan:
        """This plan after `request` came up during the step: no eval, and no checkpoint of
        weights that diverged."""
        return dataclasses.replace(self, stop=request, eval=False, checkpoint=self.checkpoint and request.error is None)


class Schedule:
    def __init__(self, recipe):
        self.max_steps = recipe.train.max_steps
        self.stop_at_step = recipe.train.stop_at_step
        self.log_every = recipe.log.every
        self.eval_every = recipe.eval.every
        self.checkpoint_every = recipe.checkpoint.every
        self.signals = StopSignals()

    def at(self, step: int) -> StepPlan:
        """The plan of optimizer step `step` (1-based). Collective: every rank calls it each step."""
        stop = None
        if collectives.any_rank(self.signals.received is not None):
            stop = StopRequest(self.signals.received or "a signal to another rank")
        elif step == self.stop_at_step:
            stop = StopRequest("train.stop_at_step")
        last = step == self.max_steps
        return StepPlan(
            step=step,
            log=step % self.log_every == 0 or last or stop is not None,
            eval=stop is None and (bool(self.eval_every and step % self.eval_every == 0) or last),
            checkpoint=bool(self.checkpoint_every and step % self.checkpoint_every == 0) or last or stop is not None,
            last=last,
            stop=stop,
        )

    def close(self) -> None:
        self.signals.close()


class StopSignals:
    """Notes SIGTERM, SIGUSR1 and SIGINT while installed; the schedule turns them into a stop."""

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
    # torchrun passes the SIGINT it gets from the terminal on to its ranks, which had it already:
    # a SIGINT this soon after the first is the same Ctrl-C, not a second one.
    SAME_CTRL_C_S = 2.0

    def __init__(self):
        self.received: str | None = None
        self.first_sigint = None
        self.previous = {}

    def _handler(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT":
            now = time.monotonic()
            if self.first_sigint is not None and now - self.first_sigint > self.SAME_CTRL_C_S:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now (exit 130), without a checkpoint
            self.first_sigint = self.first_sigint or now
        self.received = self.received or name

    def install(self) -> None:
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                try:
                    self.previous[sig] = signal.signal(sig, self._handler)
                except ValueError:  # not the main thread
                    pass

    def close(self) -> None:
        for sig, old in self.previous.items():
            signal.signal(sig, old)
        self.previous = {}
