"""`msllm train`: the training loop on DeepSpeed.

`train(recipe)` reads the launcher's environment, fixes the parallel layout (`ParallelDims`) and
starts the process group; `Trainer(recipe, denv, dims)` then prepares, in order:

    the shards     rank 0 writes them if missing, every rank checks them (`Shards`)
    the engine     the model, built with the same seed on every rank, through
                   `parallelize(model, dims, recipe)` (sequence parallelism, activation
                   checkpointing, DeepSpeed)
    the loader     this rank's slice and replica of the train split, as `dims` says
    checkpoints    a `CheckpointManager`, which also decides what may be resumed

and `Trainer.fit()` resumes if it can, then runs the loop: for each optimizer step,
`grad_accum_steps` micro-batches go through forward, the loss and DeepSpeed's backward/step; then
the callbacks run (speed and logs, eval, checkpoints, preemption; msllm.train.callbacks).

A lean step: the host never waits for the accelerator on steps that do not log. The loss stays on
the device; `Trainer.read_results` is the one place where the host reads it back (one all-reduce,
one read), at log and checkpoint steps, at the last step and when stopping, and where the loss is
checked for divergence. Batches come in pinned memory on accelerators and are copied
asynchronously, so that while the device works the host already reads the next batch (with
data.num_workers > 0 the loader's workers prefetch as well). DeepSpeed's gradient norm is used
where it computes one; only fp32 ZeRO 0 (where it clips without keeping the norm) needs a pass of
our own, on the device and only on steps that read results. The per-step agreement on preemption
is a host-side all-reduce that never waits for the device (`dist.any_rank`).

Loss convention (what makes sequence parallelism exact): each rank sums the token cross-entropies
of its own slice and divides by the number of tokens of the whole global batch; the gradients are
then summed over all ranks. DeepSpeed averages gradients over its data-parallel ranks (the whole
world) and over accumulation steps, so the loss handed to its backward is multiplied back by that
divisor (`Trainer.grad_scale`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from msllm import run_record
from msllm.errors import DataError, RecipeError
from msllm.parallel import ParallelDims
from msllm.train import dist
from msllm.train.callbacks import (
    CheckpointCallback,
    ConsoleLogger,
    EvalCallback,
    JsonlLogger,
    PreemptionCallback,
    SpeedMonitor,
    TensorBoardLogger,
    fmt_duration,
    peak_flops,
)
from msllm.train.checkpoint import CheckpointManager, set_rng_state
from msllm.train.nonfinite import NonFiniteGuard
from msllm.train.runfolder import claim_run_folder
from msllm.train.dist import say
from msllm.train.loss import choose_kernel, model_loss
from msllm.train.optim import lr_at


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_data(recipe, denv):
    """Rank 0 writes the shards if they are missing (the others wait); every rank checks them and
    gets the same `Shards` record (manifest, tokenizer path and sha256)."""
    from msllm.data import check_shards, prepare_dataset

    err = ""
    if denv.is_main and recipe.data.source != "shards":
        if not (Path(recipe.data.shards_dir) / "manifest.json").is_file():
            say(f"preparing shards in {recipe.data.shards_dir} (first run) ...")
        try:
            prepare_dataset(recipe.data, force=False)
        except Exception as exc:  # tell the waiting ranks, then fail here with the real error
            dist.broadcast_object(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise
    err = dist.broadcast_object(err)
    if err:
        raise DataError(f"rank 0 could not prepare the shards: {err}")
    return check_shards(recipe.data)


def with_vocab_size(recipe, vocab_size: int):
    """The recipe with model.vocab_size taken from the tokenizer (0) or checked against it."""
    if recipe.model.vocab_size == 0:
        return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, vocab_size=vocab_size))
    if recipe.model.vocab_size < vocab_size:
        raise RecipeError(
            f"model.vocab_size {recipe.model.vocab_size} is smaller than the tokenizer's "
            f"{vocab_size} (set it to 0 to take the tokenizer's)"
        )
    return recipe


class Trainer:
    def __init__(self, recipe, denv: dist.DistEnv, dims: ParallelDims):
        from deepspeed.accelerator import get_accelerator

        from msllm.data import build_dataloader
        from msllm.models import build_model
        from msllm.parallel.parallelize import parallelize

        self.denv, self.dims = denv, dims
        self.accel = get_accelerator()
        # Before anything is written: a fused kernel that cannot run here is a one-line error.
        self.loss_kernel = choose_kernel(recipe.train.loss_kernel, self.accel.device_name())
        self.out = Path(recipe.run.output_dir)

        self.shards = prepare_data(recipe, denv)
        self.recipe = recipe = with_vocab_size(recipe, self.shards.vocab_size)
        t = recipe.train
        self.max_steps = t.max_steps
        self.gas = t.grad_accum_steps
        self.global_batch = t.micro_batch_size * self.gas * dims.dp
        self.tokens_per_step = self.global_batch * recipe.data.seq_len
        # sum of CE over the global batch / global tokens; DeepSpeed divides by world and gas.
        self.grad_scale = dims.world_size * self.gas / self.tokens_per_step

        seed_everything(recipe.run.seed)  # identical initial weights on every rank
        model = build_model(recipe.model)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.engine = parallelize(model, dims, recipe)
        self.device = self.engine.device
        self.run_record = run_record.collect(dims.world_size, dims.dp, dims.sp, str(self.device), self.shards.manifest)
        seed_everything(recipe.run.seed + 1000003 * (denv.rank + 1))  # per-rank streams from here

        self.loader = build_dataloader(
            recipe.data, "train", t.micro_batch_size, recipe.run.seed,
            sp_size=dims.sp, sp_rank=dims.sp_rank, replication=dims.replication,
            pin_memory=self.device.type != "cpu",
        )
        self.ckpt = CheckpointManager(self.out, recipe.checkpoint.keep_last, denv.rank, denv.world_size)

        self.step = 0
        self.tokens = 0
        self.resumed = False
        self.should_stop = False
        self.last_loss = math.nan
        self.last_lr = lr_at(0, t)
        self.last_grad_norm = None
        self.train_time = 0.0  # seconds inside train_step (throughput excludes eval and checkpoints)
        # fp32 ZeRO 0 is the one setup in which DeepSpeed computes no gradient norm for us.
        self.own_grad_norm = recipe.parallel.zero_stage == 0 and t.precision == "fp32"
        self.preemption = PreemptionCallback()
        self.nonfinite = NonFiniteGuard(t.max_skipped_steps)
        self.eval = EvalCallback(recipe, dims, self.shards)
        self.callbacks: list = []

    def fit(self, started: float | None = None) -> None:
        r = self.recipe
        self.resume()
        if self.denv.is_main:  # only once resume has accepted what is in output_dir
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "recipe.yaml").write_text(r.to_yaml())
            run_record.write(self.run_record, self.out)
        say(f"run: {run_record.describe(self.run_record)}")
        self.callbacks = self.make_callbacks()
        say(
            f"training {r.model.arch}: {self.n_params:,} parameters | {self.tokens_per_step:,} tokens/step "
            f"(global batch {self.global_batch} = micro {r.train.micro_batch_size} x accum {self.gas} x dp {self.dims.dp}, "
            f"seq_len {r.data.seq_len}) | world {self.denv.world_size} ({self.dims.describe()}, {self.denv.launcher}) | "
            f"ZeRO {r.parallel.zero_stage} | {r.train.precision} on {self.accel.device_name()} | "
            f"loss {self.loss_kernel}" + (" (auto)" if r.train.loss_kernel == "auto" else "") + " | "
            f"steps {self.step}/{self.max_steps}"
            + (f" | ready in {fmt_duration(time.perf_counter() - started)}" if started else "")
        )
        if self.step >= self.max_steps:  # a finished run: no second eval row, no new checkpoint
            say(f"nothing to do: the latest checkpoint is at step {self.step} >= train.max_steps {self.max_steps}")
            for cb in self.callbacks:
                cb.close()
            return
        batches = iter(self.loader)  # train loaders repeat epochs forever
        t_start = time.perf_counter()
        try:
            for cb in self.callbacks:
                cb.on_train_start(self)
            self.engine.train()
            while self.step < self.max_steps:
                self.train_step(batches)
                self.nonfinite.after_step(self)  # skipped updates: counted; too many in a row: stop
                for cb in self.callbacks:
                    cb.on_step_end(self)
                if self.should_stop:
                    why = self.preemption.received or (
                        "train.stop_at_step" if self.step == r.train.stop_at_step else "a signal to another rank"
                    )
                    say(f"stopped after step {self.step} on {why}: checkpoint saved; rerun to resume")
                    return
            self.nonfinite.at_end(self)
            for cb in self.callbacks:
                cb.on_train_end(self)
            summary = f"finished {self.step} steps ({self.tokens:,} tokens) in {fmt_duration(time.perf_counter() - t_start)}"
            if self.eval.last_row:
                e = self.eval.last_row
                summary += f" | validation loss {e['loss']:.4f} | ppl {e['perplexity']:.2f} | bits per byte {e['bits_per_byte']:.4f}"
            say(summary)
        finally:
            for cb in self.callbacks:
                cb.close()

    def resume(self) -> None:
        """Continue from the latest complete checkpoint in output_dir, if the recipe resumes and the
        checkpoint manager accepts it (same model and tokenizer, a compatible layout)."""
        found = self.ckpt.resume(self.engine, self.recipe, self.dims, self.shards.tokenizer_sha256)
        if found is None:
            return
        path, client, rank_state = found
        self.step = int(client["step"])
        self.tokens = int(client["tokens"])
        self.loader.load_state_dict(rank_state["dataloader"])
        set_rng_state(rank_state["rng"])
        self.resumed = True
        say(f"resumed from {path} at step {self.step} ({self.tokens:,} tokens seen)")

    def make_callbacks(self) -> list:
        """Speed first (it builds the log rows), the loggers on rank 0, then eval, checkpoints and
        preemption on every rank."""
        r = self.recipe
        fpt, peak = self.flops()
        callbacks = [SpeedMonitor(r.log.every, fpt, peak, self.denv.world_size)]
        if self.denv.is_main:
            callbacks.append(ConsoleLogger(self.max_steps))
            callbacks.append(JsonlLogger(self.out / "metrics.jsonl", self.step))
            if r.log.tensorboard:
                callbacks.append(TensorBoardLogger(self.out / "tensorboard", self.step))
        return callbacks + [self.eval, CheckpointCallback(r, self.dims, self.shards), self.preemption]

    def log(self, row: dict) -> None:
        """Hand a metrics row (kind "train" or "eval") to every callback."""
        for cb in self.callbacks:
            cb.on_log(self, row)

    def reads_results(self, step: int) -> bool:
        """Whether step `step` reads its loss and gradient norm back from the device: the steps that
        log a row, the checkpoint steps (no diverged weights are saved), the last step, and a stop."""
        r = self.recipe
        return (
            step % r.log.every == 0
            or step == self.max_steps
            or step == r.train.stop_at_step
            or self.should_stop
            or bool(r.checkpoint.every and step % r.checkpoint.every == 0)
        )

    def train_step(self, batches) -> None:
        """One optimizer step over `grad_accum_steps` micro-batches; waits for the device only on
        steps that read results."""
        t0 = time.perf_counter()
        engine = self.engine
        step = self.step + 1
        # Agreed by all ranks before the step, so that they all read results and stop together.
        self.should_stop = dist.any_rank(self.preemption.received is not None) or step == self.recipe.train.stop_at_step
        read = self.reads_results(step)
        ce_sum = grad_norm = None
        for micro in range(self.gas):
            batch = next(batches)
            ids = batch["input_ids"].to(self.device, non_blocking=True)
            labels = batch["labels"].to(self.device, non_blocking=True)
            ce = model_loss(engine, ids, labels, self.loss_kernel, self.recipe.train.loss_chunk_size)
            engine.backward(ce * self.grad_scale)
            if micro == self.gas - 1:
                self.last_lr = float(engine.get_lr()[0])  # the rate this update uses (a host value)
                if read and self.own_grad_norm:
                    grad_norm = _grad_norm(engine.module)
            engine.step()
            ce_sum = ce.detach() if ce_sum is None else ce_sum + ce.detach()
        self.step = step
        self.tokens += self.tokens_per_step
        if read:
            self.read_results(ce_sum, grad_norm)
        self.train_time += time.perf_counter() - t0

    def read_results(self, ce_sum: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """The one place where the host waits for the device: the global loss of this step (one
        all-reduce of this rank's cross-entropy sum, on the device), the gradient norm (ours, or
        DeepSpeed's)."""
        loss = dist.all_reduce_sum(ce_sum.float().reshape(1).clone())
        self.last_loss = loss.item() / self.tokens_per_step
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        self.last_grad_norm = None if grad_norm is None else float(grad_norm)
        # A non-finite loss has non-finite gradients: that update was skipped (NonFiniteGuard).

    def flops(self) -> tuple[float | None, float]:
        """(training FLOPs per token, peak FLOP/s per device) for MFU; the log says which peak."""
        from msllm.models import flops_per_token

        try:
            fpt = float(flops_per_token(self.recipe.model, self.recipe.data.seq_len))
        except Exception as exc:  # MFU is informative; never stop a run for it
            say(f"(MFU unavailable: flops_per_token failed: {exc})")
            fpt = None
        found = peak_flops(self.device, self.recipe.train.peak_flops) if self.denv.is_main else None
        peak, source = dist.broadcast_object(found)  # rank 0 measures; every rank uses the same peak
        say(f"peak for MFU: {peak / 1e12:.3g} TFLOP/s per device ({source})")
        return fpt, peak


def _grad_norm(module: torch.nn.Module) -> torch.Tensor:
    """The global 2-norm of the gradients, left on the device."""
    grads = [p.grad.detach().float() for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def train(recipe, overwrite: bool = False) -> None:
    """Entry point of `msllm train` (one process, torchrun, deepspeed launcher or srun).
    `overwrite`: move a run already in run.output_dir aside first (msllm.train.runfolder)."""
    t0 = time.perf_counter()
    denv = dist.read_env()
    dims = ParallelDims.from_recipe(recipe, denv.world_size, denv.rank)  # fails before any rank waits
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if "OMP_NUM_THREADS" not in os.environ and local_world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))  # ranks share the cores
    dist.init_distributed(denv)
    folder = claim_run_folder(recipe, denv.is_main, overwrite)  # one training per folder, one run in it
    try:
        Trainer(recipe, denv, dims).fit(started=t0)
    finally:
        folder.release()
    sys.stdout.flush()
