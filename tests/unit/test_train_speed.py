"""`train.compile`: compiled blocks train like eager ones, and checkpoints move between the two;
and the lean step: steps that do not log never wait for the device.

The reference is the session's uncompiled 12-step run (checkpoints at steps 6 and 12). Losses are
compared with a relative tolerance of 1e-5: inductor fuses and reorders fp32 arithmetic, which
changes the last bits (measured here: at most 1.2e-7 relative over the 12 steps, a few fp32 ulps,
that AdamW steps could amplify); a block that is not trained, or a step taken twice or not at all,
moves the loss by more than 1e-2.
"""

from __future__ import annotations

import shutil

import pytest

from fixtures.train import check, losses, make_recipe, msllm

pytestmark = pytest.mark.slow

REL = 1e-5


def assert_losses_match(got: dict[int, float], ref: dict[int, float], steps: range) -> None:
    assert sorted(got) == list(steps)
    for step in steps:
        assert got[step] == pytest.approx(ref[step], rel=REL), (step, got[step], ref[step])


def test_compiled_run_logs_the_eager_losses_and_resumes_eagerly(tmp_path, tiny_data, reference_run):
    """Compiled steps 1-6 match the eager run; its checkpoint resumes without compilation."""
    _, ref_out, _ = reference_run
    ref = losses(ref_out)
    recipe, out = make_recipe(tmp_path, tiny_data, train={"compile": True})
    proc = check(msllm("train", recipe, "--set", "train.stop_at_step=6"))
    assert "stopped after step 6" in proc.stdout
    assert_losses_match(losses(out), ref, range(1, 7))
    check(msllm("train", recipe, "--set", "train.compile=false"))
    assert_losses_match(losses(out), ref, range(1, 13))


def test_eager_checkpoint_resumes_compiled_with_activation_checkpointing(tmp_path, tiny_data, reference_run):
    """The eager run's step-6 checkpoint continues compiled (blocks' parts compiled inside
    fairscale's checkpointing) to the eager run's losses."""
    _, ref_out, _ = reference_run
    recipe, out = make_recipe(tmp_path, tiny_data, train={"compile": True}, parallel={"activation_checkpointing": True})
    shutil.copytree(ref_out / "checkpoints" / "step_0000006", out / "checkpoints" / "step_0000006")
    proc = check(msllm("train", recipe))
    assert "resumed from" in proc.stdout and "at step 6" in proc.stdout
    got = losses(out)
    assert_losses_match(got, losses(ref_out), range(7, 13))


# Counts, per optimizer step, the calls by msllm's own code that read a tensor back to the host
# (on an accelerator each one waits for the device). torch's and DeepSpeed's calls are not counted:
# on the CPU every tensor is a host tensor, and AdamW reads its CPU step counters, say. msllm's
# code is told by the caller's module name, not its file's path (a venv inside a clone named
# msllm has torch under .../msllm/...).
_COUNT_HOST_READS = """
import sys
import torch
import msllm.train.trainer as trainer_module

reads = [0]
for name in ("item", "tolist", "cpu", "__float__", "__int__", "__bool__"):
    original = getattr(torch.Tensor, name)
    def counting(self, *args, _original=original, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller == "msllm" or caller.startswith("msllm."):
            reads[0] += 1
        return _original(self, *args, **kwargs)
    setattr(torch.Tensor, name, counting)

import deepspeed
allreduce = deepspeed.DeepSpeedEngine.allreduce_gradients
def counted_allreduce(self, *args, **kwargs):
    print("GRADIENT ALL-REDUCE", flush=True)
    return allreduce(self, *args, **kwargs)
deepspeed.DeepSpeedEngine.allreduce_gradients = counted_allreduce

train_step = trainer_module.Trainer.train_step
def counted_train_step(self, batches, plan):
    before = reads[0]
    train_step(self, batches, plan)
    print(f"HOST READS step {self.state.step}: {reads[0] - before}", flush=True)
trainer_module.Trainer.train_step = counted_train_step
"""


def test_steps_that_do_not_log_never_read_device_tensors(tmp_path, tiny_data):
    """With log.every 4, msllm reads one scalar back to the host on steps 1-3 and 5-7 (whether the
    gradients are finite: GuardedAdamW, which never applies a NaN update), nothing else (no loss,
    no norm); on steps 4 and 8 it also reads the loss and the gradient norm. A single rank
    all-reduces no gradients."""
    recipe, _ = make_recipe(
        tmp_path,
        tiny_data,
        train={"max_steps": 8},
        log={"every": 4, "tensorboard": False},
        eval={"every": 0, "max_batches": 1},
        checkpoint={"every": 0},
    )
    proc = check(msllm("train", recipe, python_code=_COUNT_HOST_READS))
    reads = {
        int(line.split()[3][:-1]): int(line.split()[4])
        for line in proc.stdout.splitlines()
        if line.startswith("HOST READS")
    }
    assert sorted(reads) == list(range(1, 9))
    assert all(reads[step] == 1 for step in (1, 2, 3, 5, 6, 7)), reads
    assert reads[4] > 1 and reads[8] > 1, reads
    # One rank at ZeRO 0: no gradient all-reduce (nothing to average).
    assert "GRADIENT ALL-REDUCE" not in proc.stdout
