"""`msllm train`: the training loop on DeepSpeed.

`train(recipe)` reads the launcher's environment, fixes the parallel layout (`ParallelDims`) and
starts the process group; `Trainer(recipe, denv, dims)` then prepares, in order:

    the shards     rank 0 writes them if missing, every rank checks them (`Shards`)
    the engine     the model, built with the same seed on every rank, made parallel
                   (msllm.distributed.parallelize) and wrapped in DeepSpeed (msllm.train.engine)
    the loader     this rank's slice and replica of the train split, as `dims` says
    the state      TrainState: what a checkpoint holds; the Checkpointer owns the checkpoints
    the schedule   what is due at each step (msllm.train.schedule)

and `Trainer.fit()` resumes if it can, then runs the loop, which reads as torchtitan's:

    plan = schedule.at(step)         what is due, agreed by every rank
    train_step(plan)                 grad_accum_steps micro-batches: forward with the loss, backward, step
    plan = guard.check(engine, plan) a skipped update cancels the checkpoint; too many: a stop
    plan = shards_watch.check(plan)  the shards changed under the run: a stop; gone: no eval
    metrics = step_metrics(plan)     the step's metrics mapping; the train row at the steps that log
    log(metrics)                     the row to the loggers (msllm.train.callbacks), when the plan logs
    component.on_step(plan, metrics) eval (msllm.train.callbacks)
    checkpointer.save(step)          when the plan says so
    stop when the plan says so

A lean step: the host never waits for the accelerator on steps that do not read results. The
loss stays on the device; `Trainer.read_results` is the one place where the host reads it back
(one all-reduce, one read). Batches come in pinned memory on accelerators and are copied
asynchronously. DeepSpeed's gradient norm is used where it computes one; only fp32 ZeRO 0 (where
it clips without keeping the norm) needs a pass of our own, on the device and only on steps that
read results.

Loss convention (what makes sequence parallelism exact): each rank sums the token cross-entropies
of its own slice (msllm.train.loss) and divides by the number of tokens of the whole global batch;
the gradients are then summed over all ranks. DeepSpeed averages gradients over its data-parallel
ranks (the whole world) and over accumulation steps, so the loss handed to its backward is
multiplied back by that divisor (`Trainer.grad_scale`).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from msllm import run_record
from msllm.checkpoint.checkpointer import Checkpointer, finished_checkpoint
from msllm.checkpoint.files import read_meta
from msllm.checkpoint.llama import load_initial_weights
from msllm.checkpoint.runfolder import claim_run_folder
from msllm.checkpoint.state import Tokenizer, TrainState
from msllm.config import with_vocab_size
from msllm.distributed import ParallelDims, collectives
from msllm.distributed.env import DistEnv, read_env, say
from msllm.metrics import MfuMeter, Throughput, accelerator_max_allocated, fmt_duration, peak_rss_bytes
from msllm.safe_files import write_new
from msllm.train.callbacks import ConsoleLogger, EvalCallback, JsonlLogger, ShardsWatch, TensorBoardLogger
from msllm.train.engine import build_engine, build_model_for_training, lr_at, param_names
from msllm.train.host_allocator import freed_blocks_returned
from msllm.train.kernel_check import at_start
from msllm.train.loss import choose_kernel, model_loss
from msllm.train.memory import check_can_train, check_fits
from msllm.train.nonfinite import NonFiniteGuard
from msllm.train.schedule import Schedule


class Trainer:
    def __init__(self, recipe, denv: DistEnv, dims: ParallelDims):
        from deepspeed.accelerator import get_accelerator  # noqa: PLC0415 (heavy: DeepSpeed)

        from msllm.data import build_dataloader  # noqa: PLC0415 (start-up: a finished run's msllm train imports no streaming)

        self.denv, self.dims = denv, dims
        self.accel = get_accelerator()
        # Before anything is written: a fused kernel that cannot run here is a one-line error.
        self.loss_kernel = choose_kernel(recipe.train.loss_kernel, self.accel.device_name())
        self.out = Path(recipe.run.output_dir)
        self.shards = prepare_data(recipe)
        self.recipe = recipe = with_vocab_size(recipe, self.shards.vocab_size)
        t = recipe.train
        self.max_steps = t.max_steps
        self.gas = t.grad_accum_steps
        self.global_batch = t.micro_batch_size * self.gas * dims.dp
        self.tokens_per_step = self.global_batch * recipe.data.seq_len
        # sum of CE over the global batch / global tokens; DeepSpeed divides by world and gas.
        self.grad_scale = dims.world_size * self.gas / self.tokens_per_step

        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        self.build_device = torch.device(self.accel.device_name(denv.local_rank))
        check_fits(
            recipe.model, self.build_device, t.precision, recipe.parallel.zero_stage, dims.dp, processes=local_ranks
        )  # before anything is allocated
        check_can_train(recipe, self.build_device, dims.sp, local_ranks)  # the precision, the micro-batches
        engine = self.make_engine()
        self.n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
        self.device = engine.device
        record = run_record.collect(dims.world_size, dims.dp, dims.sp, str(self.device), self.shards.manifest)
        # each non-reference kernel against its reference, on this device
        self.loss_kernel, record["kernels"] = at_start(t, recipe.model, engine.module, self.device, self.loss_kernel)
        self.per_rank_streams()
        loader = build_dataloader(
            recipe.data,
            "train",
            t.micro_batch_size,
            recipe.run.seed,
            sp_size=dims.sp,
            sp_rank=dims.sp_rank,
            replication=dims.replication,
            pin_memory=self.device.type != "cpu",
        )
        tokenizer = Tokenizer.read(self.shards.tokenizer_path, self.shards.tokenizer_sha256)
        self.state = TrainState(recipe, engine, loader, tokenizer, dims.world_size, record, param_names(engine.module))
        self.checkpointer = Checkpointer(self.out, recipe.checkpoint, self.state, dims)
        self.schedule = Schedule(recipe)
        self.guard = NonFiniteGuard(t.max_skipped_steps, self.checkpointer)
        self.shards_watch = ShardsWatch(recipe.data, self.shards.manifest)
        self.lr = lr_at(0, t)  # the rate of the last update (a host value)
        # What the host last read back from the device (read_results): the loss, the gradient norm,
        # the model's own metrics (e.g. dynamic chunking's compression_s1) and the sample ids.
        self.results: dict = {"loss": math.nan, "grad_norm": None, "model": {}, "sample_ids": None}
        self.sample_ids: list[torch.Tensor] = []  # log.sample_ids: this rank's since the last read
        self.train_time = 0.0  # seconds inside train_step (throughput excludes eval and checkpoints)
        # fp32 ZeRO 0 is the one setup in which DeepSpeed computes no gradient norm for us.
        self.own_grad_norm = recipe.parallel.zero_stage == 0 and t.precision == "fp32"
        self.components: list = []

    def make_engine(self):
        """The model, initialised from run.seed and built sharded where ZeRO-3 shards it
        (msllm.train.engine.build_model_for_training), made parallel and wrapped in DeepSpeed.
        Seeded from run.seed first; a rebuild then takes per_rank_streams() as a fresh run does."""
        from msllm.distributed.parallelize import parallelize  # noqa: PLC0415 (start-up: a finished run's msllm train imports no fairscale)

        recipe = self.recipe
        seed_everything(recipe.run.seed)
        # ZeRO-3 builds each rank's partitions between large temporaries: they must not stay as a
        # fragmented heap (below ZeRO 3 every rank holds the whole model anyway: glibc as it is)
        sharded = recipe.parallel.zero_stage == 3
        with freed_blocks_returned() if sharded else contextlib.nullcontext():
            model = build_model_for_training(recipe, self.build_device)
            if recipe.train.init_from:  # a Hugging Face Llama's weights, not the random init (a resume replaces them)
                load_initial_weights(model, recipe.model, recipe.train.init_from, self.shards.tokenizer_sha256)
            return build_engine(parallelize(model, self.dims, recipe), recipe, self.dims)

    def per_rank_streams(self) -> None:
        """The RNG streams of this rank from here on (after the model and the kernel check)."""
        seed_everything(self.recipe.run.seed + 1000003 * (self.denv.rank + 1))

    def fit(self, started: float | None = None) -> None:
        r, state = self.recipe, self.state
        resumed = self.checkpointer.load()
        if not resumed and self.checkpointer.engine_touched:
            # A checkpoint that failed to load may have left some of its values in the engine:
            # training starts over from the initial weights, exactly as a fresh run would.
            state.engine = self.make_engine()
            self.per_rank_streams()
        if resumed:
            say(f"resumed from {resumed} at step {state.step} ({state.tokens:,} tokens seen)")
        if self.denv.is_main:  # only once resume has accepted what is in output_dir
            self.out.mkdir(parents=True, exist_ok=True)
            write_new(self.out / "recipe.yaml", r.to_yaml())  # replaces a link, never writes through it
            run_record.write(state.run_record, self.out)
        say(f"run: {run_record.describe(state.run_record)}")
        say(
            f"training {r.model.arch}: {self.n_params:,} parameters | {self.tokens_per_step:,} tokens/step "
            f"(global batch {self.global_batch} = micro {r.train.micro_batch_size} x accum {self.gas} "
            f"x dp {self.dims.dp}, seq_len {r.data.seq_len}) | world {self.denv.world_size} "
            f"({self.dims.describe()}, {self.denv.launcher}) | "
            f"ZeRO {r.parallel.zero_stage} | {r.train.precision} on {self.accel.device_name()} | "
            f"loss {self.loss_kernel}" + (" (auto)" if r.train.loss_kernel == "auto" else "") + " | "
            f"steps {state.step}/{self.max_steps}"
            + (f" | ready in {fmt_duration(time.perf_counter() - started)}" if started else "")
        )
        if state.step >= self.max_steps:  # a finished run: no second eval row, no new checkpoint
            say(f"nothing to do: the latest checkpoint is at step {state.step} >= train.max_steps {self.max_steps}")
            return
        self.mfu = MfuMeter.for_run(r, self.device, self.denv.world_size)  # says the peak it uses
        self.components = self.make_components()
        batches = iter(state.loader)  # train loaders repeat epochs forever
        t_start = time.perf_counter()
        try:
            self.throughput = Throughput(self.tokens_per_step, self.max_steps, state.step, self.train_time)
            for component in self.components:
                component.on_train_start({"step": state.step, "tokens": state.tokens})
            self.schedule.signals.install()
            state.engine.train()
            while True:
                plan = self.schedule.at(state.step + 1)
                self.train_step(batches, plan)
                plan = self.guard.check(state.engine, plan)
                plan = self.shards_watch.check(plan)
                metrics = self.step_metrics(plan)
                if plan.log:
                    self.log(metrics)
                for component in self.components:
                    component.on_step(plan, metrics)
                if plan.checkpoint:
                    self.checkpointer.save(state.step)
                if plan.stop is not None:
                    if plan.stop.error is not None:
                        raise plan.stop.error
                    say(f"stopped after step {state.step} on {plan.stop.reason}: checkpoint saved; rerun to resume")
                    return
                if plan.last:
                    break
            summary = (
                f"finished {state.step} steps ({state.tokens:,} tokens) in "
                f"{fmt_duration(time.perf_counter() - t_start)}"
            )
            if self.eval.last_row:
                e = self.eval.last_row
                summary += (
                    f" | validation loss {e['loss']:.4f} | ppl {e['perplexity']:.2f} "
                    f"| bits per byte {e['bits_per_byte']:.4f}"
                )
            say(summary)
        finally:
            self.schedule.close()
            for component in self.components:
                component.close()

    def make_components(self) -> list:
        """The loggers on rank 0, then eval on every rank."""
        r, step = self.recipe, self.state.step
        components = []
        if self.denv.is_main:
            components.append(ConsoleLogger(self.max_steps))
            components.append(JsonlLogger(self.out / "metrics.jsonl", step))
            if r.log.tensorboard:
                components.append(TensorBoardLogger(self.out / "tensorboard", step))
        self.eval = EvalCallback(r, self.dims, self.shards, self.loss_kernel, self.state.engine, self.device, self.log)
        return components + [self.eval]

    def log(self, row: dict) -> None:
        """Hand a metrics row (kind "train" or "eval") to every component."""
        for component in self.components:
            component.on_log(row)

    def step_metrics(self, plan) -> dict:
        """The metrics of step `plan.step`: its step and tokens; at the steps that log, the whole
        train row (the loss and the gradient norm last read back, the rate, the throughput and MFU
        since the last row, memory, ETA, the model's own metrics and, with log.sample_ids, the
        samples read since the last row)."""
        state = self.state
        if not plan.log:
            return {"kind": "train", "step": plan.step, "tokens": state.tokens}
        res = self.results
        speed = self.throughput.at(plan.step, self.train_time)
        row = {
            "kind": "train",
            "step": plan.step,
            "loss": res["loss"],
            "lr": self.lr,
            "grad_norm": res["grad_norm"],
            "tokens": state.tokens,
            "tokens_per_s": speed["tokens_per_s"],
            **self.mfu.at(speed["tokens_per_s"]),  # mfu, peak_unreliable
            "peak_rss_bytes": peak_rss_bytes(),
            "accel_max_allocated_bytes": accelerator_max_allocated(),
            "step_time_s": speed["step_time_s"],
            "eta_s": speed["eta_s"],
            "time": time.time(),
            **res["model"],  # dynamic chunking: msllm.train.callbacks.CHUNKING_METRICS, per scale
        }
        if res["sample_ids"] is not None:  # log.sample_ids
            row["sample_ids"] = res["sample_ids"]
        return row

    def train_step(self, batches, plan) -> None:
        """One optimizer step over `grad_accum_steps` micro-batches; waits for the device only on
        steps whose plan reads results."""
        t0 = time.perf_counter()
        engine, state = self.state.engine, self.state
        ce_sum = grad_norm = None
        for micro in range(self.gas):
            batch = next(batches)
            if self.recipe.log.sample_ids and self.dims.sp_rank == 0:  # a group's ranks read the same samples
                self.sample_ids.append(batch["sample_id"].reshape(-1))
            ids = batch["input_ids"].to(self.device, non_blocking=True)
            labels = batch["labels"].to(self.device, non_blocking=True)
            ce = model_loss(engine, ids, labels, self.loss_kernel, self.recipe.train.loss_chunk_size)
            engine.backward(ce * self.grad_scale)
            if micro == self.gas - 1:
                self.lr = float(engine.get_lr()[0])  # the rate this update uses (a host value)
                if plan.reads_results and self.own_grad_norm:
                    grad_norm = _grad_norm(engine.module)
            engine.step()
            ce_sum = ce.detach() if ce_sum is None else ce_sum + ce.detach()
        state.step = plan.step
        state.tokens += self.tokens_per_step
        if plan.reads_results:
            self.read_results(ce_sum, grad_norm)
        self.train_time += time.perf_counter() - t0

    def read_results(self, ce_sum: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """The one place where the host waits for the device: the global loss of this step (one
        all-reduce of this rank's cross-entropy sum, on the device), the gradient norm (ours, or
        DeepSpeed's). A non-finite loss has non-finite gradients: that update was skipped."""
        res = self.results
        loss = collectives.all_reduce_sum(ce_sum.float().reshape(1).clone())
        res["loss"] = loss.item() / self.tokens_per_step
        if grad_norm is None:
            grad_norm = self.state.engine.get_global_grad_norm()
        res["grad_norm"] = None if grad_norm is None else float(grad_norm)
        # The model's own scalars of its last micro-batch (dynamic chunking's realised compression
        # per scale), averaged over the ranks: every rank has the same keys.
        if self.recipe.log.sample_ids:
            mine = torch.cat(self.sample_ids) if self.sample_ids else torch.zeros(0, dtype=torch.long)
            self.sample_ids = []
            res["sample_ids"] = sorted(collectives.all_gather_lists(mine.tolist()))
        metrics = self.state.engine.module.log_metrics()
        if metrics:
            values = collectives.all_reduce_sum(torch.stack([v.float() for v in metrics.values()]))
            res["model"] = dict(zip(metrics, (values / self.denv.world_size).tolist()))


def prepare_data(recipe):
    """Rank 0 writes the shards if they are missing (the others wait); every rank checks them and
    gets the same `Shards` record (manifest, tokenizer path and sha256)."""
    from msllm.data import check_shards, prepare_dataset  # noqa: PLC0415 (start-up: a finished run's msllm train imports no streaming)

    def prepare() -> None:
        if recipe.data.source != "shards":
            if not (Path(recipe.data.shards_dir) / "manifest.json").is_file():
                say(f"preparing shards in {recipe.data.shards_dir} (first run) ...")
            prepare_dataset(recipe.data, force=False)

    collectives.on_rank0(prepare)
    return check_shards(recipe.data)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _grad_norm(module: torch.nn.Module) -> torch.Tensor:
    """The global 2-norm of the gradients, left on the device."""
    grads = [p.grad.detach().float() for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def train(recipe, overwrite: bool = False) -> None:
    """Entry point of `msllm train` (one process, torchrun, deepspeed launcher or srun).
    `overwrite`: move a run already in run.output_dir aside first (msllm.checkpoint.runfolder)."""
    t0 = time.perf_counter()
    denv = read_env()
    dims = ParallelDims.from_recipe(recipe, denv.world_size, denv.rank)  # fails before any rank waits
    done = None if overwrite else finished_checkpoint(recipe)  # --overwrite starts afresh, whatever is there
    if done is not None:  # a finished run: no DeepSpeed, no peak measurement, no second eval row
        say(
            f"nothing to do: the latest checkpoint {done} is at step {read_meta(done)['step']} >= "
            f"train.max_steps {recipe.train.max_steps}"
        )
        return
    from msllm.data.jobcache import job_tag  # noqa: PLC0415 (start-up: a finished run's msllm train imports no streaming)

    job_tag()  # a bad MSLLM_DATA_JOB is one line before the run folder or the data cache is made
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if "OMP_NUM_THREADS" not in os.environ and local_world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))  # ranks share the cores
    collectives.init_distributed(denv)
    collectives.check_same_recipe(recipe.to_dict())  # a rank given other values would hang: all stop
    folder = claim_run_folder(recipe, denv.is_main, overwrite)  # one training per folder, one run in it
    try:
        Trainer(recipe, denv, dims).fit(started=t0)
    finally:
        folder.release()
    sys.stdout.flush()
