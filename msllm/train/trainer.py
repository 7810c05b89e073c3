"""`msllm train`: the training loop on DeepSpeed.

The loop itself is short: for each optimizer step, `grad_accum_steps` micro-batches go through
forward, the loss and DeepSpeed's backward/step; then the callbacks run (logging, eval,
checkpoints, preemption). Everything else is a small function: the launcher environment
(`dist.read_env`), the data (`prepare_data`), the model (`build`), the parallel wrapping
(`wrap_model`, the one place where the model meets DeepSpeed), resume (`Trainer.resume`).

Loss convention (kept so that sequence parallelism can slot in): each rank sums the token
cross-entropies of its own slice and divides by the number of tokens of the whole global batch;
the gradients are then summed over all ranks. DeepSpeed averages gradients over its data-parallel
ranks and over accumulation steps, so the loss handed to its backward is multiplied back by that
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

from msllm.errors import CheckpointError, DataError, RecipeError
from msllm.train import dist
from msllm.train.callbacks import (
    CheckpointCallback,
    ConsoleLogger,
    EvalCallback,
    JsonlLogger,
    PreemptionCallback,
    SpeedMonitor,
    TensorBoardLogger,
    cpu_peak_flops,
    fmt_duration,
)
from msllm.data.tokenizer import file_sha256
from msllm.train.checkpoint import CheckpointManager, check_same_model, read_recipe, rng_state, set_rng_state
from msllm.train.evaluate import evaluate, token_cross_entropy_sum
from msllm.train.optim import build_optimizer, build_scheduler, deepspeed_config, lr_at


def say(*args) -> None:
    """Print on rank 0 only."""
    if os.environ.get("RANK", "0") == "0":
        print(*args, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_data(recipe, denv) -> dict:
    """Rank 0 writes the shards if they are missing (the others wait); every rank checks them."""
    from msllm.data import check_shards, prepare_dataset

    if denv.is_main and recipe.data.source != "shards":
        manifest_file = Path(recipe.data.shards_dir) / "manifest.json"
        if not manifest_file.is_file():
            say(f"preparing shards in {recipe.data.shards_dir} (first run) ...")
        try:
            prepare_dataset(recipe.data, force=False)
            err = ""
        except Exception as exc:  # tell the waiting ranks, then fail here with the real error
            dist.broadcast_object(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise
    else:
        err = ""
    err = dist.broadcast_object(err)
    if err:
        raise DataError(f"rank 0 could not prepare the shards: {err}")
    return check_shards(recipe.data)


def tokenizer_file(recipe) -> str | None:
    try:
        from msllm.data.manifest import tokenizer_path

        p = tokenizer_path(recipe.data.shards_dir, recipe.data)
    except (ImportError, OSError, DataError):
        p = Path(recipe.data.shards_dir) / "tokenizer.model"
    return str(p) if Path(p).is_file() else None


def wrap_model(model: torch.nn.Module, recipe, device_name: str):
    """The seam where the plain model meets parallelism: sequence parallelism over groups of
    `parallel.sp` contiguous ranks (msllm.parallel.sequence swaps the modules that look across
    positions), then DeepSpeed ZeRO (stage 0-3) with gradients averaged over all ranks."""
    import deepspeed

    from msllm.parallel.sequence import apply_sequence_parallel, new_sequence_parallel_group

    model = apply_sequence_parallel(model, new_sequence_parallel_group(recipe.parallel.sp))

    optimizer = build_optimizer(model, recipe, device_name)
    scheduler = build_scheduler(optimizer, recipe.train)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(recipe)
    )
    return engine


class Trainer:
    def __init__(self, recipe, denv):
        from deepspeed.accelerator import get_accelerator

        from msllm.data import build_dataloader
        from msllm.models import apply_activation_checkpointing, build_model

        self.denv = denv
        self.dp = dist.check_parallel(recipe, denv.world_size)
        self.sp = recipe.parallel.sp
        self.accel = get_accelerator()
        self.out = Path(recipe.run.output_dir)

        self.manifest = prepare_data(recipe, denv)
        if recipe.model.vocab_size == 0:
            recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, vocab_size=int(self.manifest["vocab_size"])))
        elif recipe.model.vocab_size < int(self.manifest["vocab_size"]):
            raise RecipeError(
                f"model.vocab_size {recipe.model.vocab_size} is smaller than the tokenizer's "
                f"{self.manifest['vocab_size']} (set it to 0 to take the tokenizer's)"
            )
        if int(self.manifest["seq_len"]) != recipe.data.seq_len:
            raise DataError(
                f"{recipe.data.shards_dir} holds windows for seq_len {self.manifest['seq_len']}, "
                f"the recipe asks for data.seq_len {recipe.data.seq_len}"
            )
        self.recipe = recipe
        t = recipe.train
        self.max_steps = t.max_steps
        self.gas = t.grad_accum_steps
        self.global_batch = t.micro_batch_size * self.gas * self.dp
        self.tokens_per_step = self.global_batch * recipe.data.seq_len
        # sum of CE over the global batch / global tokens; DeepSpeed divides by world and gas.
        self.grad_scale = denv.world_size * self.gas / self.tokens_per_step
        self.tokenizer_path = tokenizer_file(recipe)
        self.tokenizer_sha = self.manifest.get("tokenizer_sha256") or (
            file_sha256(self.tokenizer_path) if self.tokenizer_path else None
        )

        seed_everything(recipe.run.seed)  # identical initial weights on every rank
        model = build_model(recipe.model)
        self.n_params = sum(p.numel() for p in model.parameters())
        if recipe.parallel.activation_checkpointing:
            model = apply_activation_checkpointing(model, offload=recipe.parallel.offload_activations)
        self.engine = wrap_model(model, recipe, self.accel.device_name())
        self.device = self.engine.device
        seed_everything(recipe.run.seed + 1000003 * (denv.rank + 1))  # per-rank streams from here

        self.sp_rank = denv.rank % self.sp
        self.loader = build_dataloader(
            recipe.data, "train", t.micro_batch_size, recipe.run.seed, sp_size=self.sp, sp_rank=self.sp_rank
        )
        self.ckpt = CheckpointManager(self.out, recipe.checkpoint.keep_last, denv.rank, denv.world_size)

        self.step = 0
        self.tokens = 0
        self.resumed = False
        self.should_stop = False
        self.last_loss = math.nan
        self.last_lr = lr_at(0, t)
        self.last_grad_norm = None
        self.callbacks = []
        self.eval_loader = None
        self.last_eval: dict | None = None
        self.train_time = 0.0  # seconds inside train_step (throughput excludes eval and checkpoints)
        self.preemption = PreemptionCallback()

    # -- resume -----------------------------------------------------------------------------

    def resume(self) -> None:
        if not self.recipe.checkpoint.resume:
            return
        latest = self.ckpt.latest()
        if latest is None:
            return
        saved = read_recipe(latest)
        check_same_model(latest, dataclasses.asdict(saved.model), dataclasses.asdict(self.recipe.model))
        from msllm.train.checkpoint import read_meta

        meta = read_meta(latest)
        if meta.get("tokenizer_sha256") and self.tokenizer_sha and meta["tokenizer_sha256"] != self.tokenizer_sha:
            raise CheckpointError(
                f"{latest} was trained with tokenizer sha256 {meta['tokenizer_sha256'][:12]}..., the shards in "
                f"{self.recipe.data.shards_dir} use {self.tokenizer_sha[:12]}..."
            )
        saved_world, saved_sp = int(meta.get("world_size", 1)), saved.parallel.sp
        saved_dp = saved_world // saved_sp
        if saved_world != self.denv.world_size and (saved_dp != self.dp or saved.parallel.zero_stage or self.recipe.parallel.zero_stage):
            raise CheckpointError(
                f"{latest} was saved by {saved_world} ranks (dp {saved_dp} x sp {saved_sp}), this run has "
                f"{self.denv.world_size} (dp {self.dp} x sp {self.sp}): changing the world size needs the same "
                f"data-parallel degree and ZeRO stage 0 (DeepSpeed splits ZeRO 1-3 states by rank); keep the "
                f"world size or start a new output_dir"
            )
        # The ranks of a sequence-parallel group read the same samples, so this rank continues from
        # the state of the first rank of the same data-parallel replica in the saved run.
        client, rank_state = self.ckpt.load(self.engine, latest, state_rank=(self.denv.rank // self.sp) * saved_sp)
        self.step = int(client["step"])
        self.tokens = int(client["tokens"])
        self.loader.load_state_dict(rank_state["dataloader"])
        set_rng_state(rank_state["rng"])
        self.resumed = True
        say(f"resumed from {latest} at step {self.step} ({self.tokens:,} tokens seen)")

    # -- the pieces the callbacks call ------------------------------------------------------

    def log(self, row: dict) -> None:
        if row["kind"] == "eval":
            self.last_eval = row
        for cb in self.callbacks:
            cb.on_log(self, row)

    def save_checkpoint(self, _trainer=None) -> Path:
        client = {
            "step": self.step,
            "tokens": self.tokens,
            "arch": self.recipe.model.arch,
            "zero_stage": self.recipe.parallel.zero_stage,
            "world_size": self.denv.world_size,
            "tokenizer_path": str(Path(self.tokenizer_path).resolve()) if self.tokenizer_path else None,
            "tokenizer_sha256": self.tokenizer_sha,
            "recipe": self.recipe.to_dict(),
        }
        rank_state = {"rng": rng_state(), "dataloader": self.loader.state_dict(), "step": self.step}
        t0 = time.perf_counter()
        path = self.ckpt.save(self.engine, self.step, client, rank_state, self.recipe.to_yaml(), self.tokenizer_path)
        say(f"saved checkpoint {path} ({time.perf_counter() - t0:.1f}s)")
        return path

    def run_eval(self, _trainer=None) -> dict:
        from msllm.data import build_dataloader

        r = self.recipe
        batch = r.eval.micro_batch_size or r.train.micro_batch_size
        if self.eval_loader is None:  # built once: streaming does not like two datasets on one folder
            self.eval_loader = build_dataloader(
                r.data, "validation", batch, r.run.seed, sp_size=self.sp, sp_rank=self.sp_rank, shuffle=False
            )
        self.engine.eval()
        try:
            row = evaluate(self.engine, self.eval_loader, self.manifest, batch, r.eval.max_batches, self.device, dp_size=self.dp)
        finally:
            self.engine.train()
        row.update(step=self.step, tokens=self.tokens, time=time.time())
        return row

    # -- the loop ----------------------------------------------------------------------------

    def train_step(self, batches) -> None:
        t0 = time.perf_counter()
        engine = self.engine
        ce_total = torch.zeros((), dtype=torch.float64)
        grad_norm = None
        for micro in range(self.gas):
            batch = next(batches)
            ids = batch["input_ids"].to(self.device, non_blocking=True)
            labels = batch["labels"].to(self.device, non_blocking=True)
            logits = engine(ids)
            ce = token_cross_entropy_sum(logits, labels)
            engine.backward(ce * self.grad_scale)
            if micro == self.gas - 1:
                lr = engine.get_lr()[0]  # the rate this update uses (fp16 overflow steps do not advance it)
                if self._own_grad_norm:
                    grad_norm = _grad_norm(engine.module)
            engine.step()
            ce_total += ce.detach().double().cpu()
        # One small all-reduce per step: the global loss and whether any rank was signalled.
        stop = 1.0 if self.preemption.received else 0.0
        packed = torch.tensor([ce_total.item(), stop], dtype=torch.float64)
        dist.all_reduce_sum(packed)
        self.last_loss = packed[0].item() / self.tokens_per_step
        self.should_stop = packed[1].item() > 0 or self.step + 1 == self.recipe.train.stop_at_step
        self.last_lr = float(lr)
        if grad_norm is None:
            grad_norm = engine.get_global_grad_norm()
        self.last_grad_norm = None if grad_norm is None else float(grad_norm)
        self.step += 1
        self.tokens += self.tokens_per_step
        self.train_time += time.perf_counter() - t0

    def fit(self, started: float | None = None) -> None:
        r = self.recipe
        self._own_grad_norm = r.parallel.zero_stage == 0 and r.train.precision == "fp32"
        self.resume()
        if self.denv.is_main:  # only once resume has accepted what is in output_dir
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "recipe.yaml").write_text(r.to_yaml())
        fpt, peak = self._flops()
        self.callbacks = [SpeedMonitor(r.log.every, fpt, peak, self.denv.world_size)]
        if self.denv.is_main:
            self.callbacks.append(ConsoleLogger(self.max_steps))
            self.callbacks.append(JsonlLogger(self.out / "metrics.jsonl", self.step))
            if r.log.tensorboard:
                self.callbacks.append(TensorBoardLogger(self.out / "tensorboard", self.step))
        self.callbacks += [
            EvalCallback(r.eval.every, self.run_eval),
            CheckpointCallback(r.checkpoint.every, self.save_checkpoint),
            self.preemption,
        ]
        say(
            f"training {r.model.arch}: {self.n_params:,} parameters | {self.tokens_per_step:,} tokens/step "
            f"(global batch {self.global_batch} = micro {r.train.micro_batch_size} x accum {self.gas} x dp {self.dp}, "
            f"seq_len {r.data.seq_len}) | world {self.denv.world_size} (dp {self.dp} x sp {self.sp}, {self.denv.launcher}) | "
            f"ZeRO {r.parallel.zero_stage} | {r.train.precision} on {self.accel.device_name()} | "
            f"steps {self.step}/{self.max_steps}"
            + (f" | ready in {fmt_duration(time.perf_counter() - started)}" if started else "")
        )
        if self.step >= self.max_steps:
            say(f"nothing to do: the latest checkpoint is at step {self.step} >= train.max_steps {self.max_steps}")
        batches = self._batches()
        t_start = time.perf_counter()
        try:
            for cb in self.callbacks:
                cb.on_train_start(self)
            self.engine.train()
            while self.step < self.max_steps:
                self.train_step(batches)
                if not math.isfinite(self.last_loss):
                    raise RecipeError(f"training diverged: loss is {self.last_loss} at step {self.step} (lower train.lr?)")
                for cb in self.callbacks:
                    cb.on_step_end(self)
                if self.should_stop:
                    why = self.preemption.received or (
                        "train.stop_at_step" if self.step == r.train.stop_at_step else "a signal to another rank"
                    )
                    say(f"stopped after step {self.step} on {why}: checkpoint saved; rerun to resume")
                    return
            for cb in self.callbacks:
                cb.on_train_end(self)
            summary = f"finished {self.step} steps ({self.tokens:,} tokens) in {fmt_duration(time.perf_counter() - t_start)}"
            if self.last_eval:
                e = self.last_eval
                summary += f" | validation loss {e['loss']:.4f} | ppl {e['perplexity']:.2f} | bits per byte {e['bits_per_byte']:.4f}"
            say(summary)
        finally:
            for cb in self.callbacks:
                cb.close()

    def _batches(self):
        while True:
            got = False
            for batch in self.loader:
                got = True
                yield batch
            if not got:
                raise DataError(f"{self.recipe.data.shards_dir}: the train split yields no batches")

    def _flops(self) -> tuple[float | None, float | None]:
        from msllm.models import flops_per_token

        try:
            fpt = float(flops_per_token(self.recipe.model, self.recipe.data.seq_len))
        except Exception as exc:  # MFU is informative; never stop a run for it
            say(f"(MFU unavailable: flops_per_token failed: {exc})")
            fpt = None
        peak = self.recipe.train.peak_flops or None
        if peak is None and self.accel.device_name() == "cpu":
            if self.denv.is_main:
                peak = cpu_peak_flops()
                say(f"CPU peak for MFU: {peak / 1e9:.1f} GFLOP/s per rank (best measured fp32 matmul, {torch.get_num_threads()} threads)")
            peak = dist.broadcast_object(peak)
        return fpt, peak


def _grad_norm(module: torch.nn.Module) -> float:
    grads = [p.grad.detach().float() for p in module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()


def train(recipe) -> None:
    """Entry point of `msllm train` (one process, torchrun, deepspeed launcher or srun)."""
    t0 = time.perf_counter()
    denv = dist.read_env()
    dist.check_parallel(recipe, denv.world_size, source="recipe")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if "OMP_NUM_THREADS" not in os.environ and local_world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))  # ranks share the cores
    dist.init_distributed(denv)
    trainer = Trainer(recipe, denv)
    trainer.fit(started=t0)
    sys.stdout.flush()
