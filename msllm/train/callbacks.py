"""Small components that act on each step's plan (in the spirit of LLM Foundry's callbacks).

The loop hands every component the step's plan (msllm.train.schedule.StepPlan: what is due);
each concern lives in one class:

    SpeedMonitor        at the steps that log: builds the row (tokens/s, MFU, memory, ETA) and
                        hands it to the loggers through `trainer.log(row)`
    ConsoleLogger       one line per row on rank 0
    JsonlLogger         output_dir/metrics.jsonl, one JSON object per row
    TensorBoardLogger   output_dir/tensorboard, the same scalars
    EvalCallback        validation at the steps the plan says (eval.every, and the last)

Checkpoints are the Checkpointer's (msllm.checkpoint), stops the Schedule's.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from msllm.distributed import collectives
from msllm.distributed.env import say
from msllm.metrics import accelerator_max_allocated, fmt_duration, peak_flops, peak_rss_bytes


class Callback:
    def on_train_start(self, trainer) -> None: ...
    def on_step(self, trainer, plan) -> None: ...
    def on_log(self, trainer, row: dict) -> None: ...
    def close(self) -> None: ...


# ----------------------------------------------------------------------------------------------
# Metrics row builder
# ----------------------------------------------------------------------------------------------


class SpeedMonitor(Callback):
    """Throughput, MFU, memory and ETA over the steps since the last row."""

    def __init__(self, flops_per_token: float | None, peak_flops: float | None, world_size: int):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops  # per device; None: unknown (n/a)
        self.world_size = world_size

    @classmethod
    def for_run(cls, recipe, device, world_size: int) -> SpeedMonitor:
        """With the run's training FLOPs per token and the peak FLOP/s per device MFU is computed
        against (rank 0 measures or looks it up; every rank uses the same; the log says which)."""
        from msllm.models import flops_per_token

        try:
            fpt = float(flops_per_token(recipe.model, recipe.data.seq_len))
        except Exception as exc:  # MFU is informative; never stop a run for it
            say(f"(MFU unavailable: flops_per_token failed: {exc})")
            fpt = None
        peak, source = collectives.on_rank0(peak_flops, device, recipe.train.peak_flops)
        say(f"peak for MFU: {peak / 1e12:.3g} TFLOP/s per device ({source})")
        return cls(fpt, peak, world_size)

    def on_train_start(self, trainer) -> None:
        self.t_start = time.perf_counter()
        self.train_time_last = trainer.train_time
        self.step_last = self.step_start = trainer.state.step

    def on_step(self, trainer, plan) -> None:
        if not plan.log:
            return
        step = plan.step
        now = time.perf_counter()
        dt = max(trainer.train_time - self.train_time_last, 1e-9)
        steps = max(step - self.step_last, 1)
        tokens_per_s = steps * trainer.tokens_per_step / dt
        mfu = None
        if self.flops_per_token and self.peak_flops:
            mfu = self.flops_per_token * tokens_per_s / (self.peak_flops * self.world_size)
        per_step = (now - self.t_start) / max(step - self.step_start, 1)
        row = {
            "kind": "train",
            "step": step,
            "loss": trainer.last_loss,
            "lr": trainer.last_lr,
            "grad_norm": trainer.last_grad_norm,
            "tokens": trainer.state.tokens,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu,
            "peak_rss_bytes": peak_rss_bytes(),
            "accel_max_allocated_bytes": accelerator_max_allocated(),
            "step_time_s": dt / steps,
            "eta_s": per_step * (trainer.max_steps - step),
            "time": time.time(),
        }
        self.train_time_last, self.step_last = trainer.train_time, step
        trainer.log(row)


# ----------------------------------------------------------------------------------------------
# Loggers (rank 0 only)
# ----------------------------------------------------------------------------------------------


class ConsoleLogger(Callback):
    def __init__(self, max_steps: int, printer=print):
        self.width = len(str(max_steps))
        self.max_steps = max_steps
        self.print = printer

    def on_log(self, trainer, row: dict) -> None:
        if row["kind"] == "eval":
            self.print(
                f"eval  step {row['step']:>{self.width}} | loss {row['loss']:.4f} | ppl {row['perplexity']:.2f} | "
                f"bpb {row['bits_per_byte']:.4f} | {row['eval_tokens']:,} tokens in {row['eval_time_s']:.1f}s"
            )
            return
        grad = "n/a" if row["grad_norm"] is None else f"{row['grad_norm']:.3f}"
        mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        mem = f"rss {row['peak_rss_bytes'] / 2**30:.2f}GiB"
        if row.get("accel_max_allocated_bytes") is not None:
            mem += f" acc {row['accel_max_allocated_bytes'] / 2**30:.2f}GiB"
        self.print(
            f"step {row['step']:>{self.width}}/{self.max_steps} | loss {row['loss']:.4f} | lr {row['lr']:.3e} | "
            f"grad {grad} | {row['tokens_per_s']:,.0f} tok/s | mfu {mfu} | {mem} | "
            f"eta {fmt_duration(row['eta_s'])}",
        )


class JsonlLogger(Callback):
    """output_dir/metrics.jsonl. On resume from step k, rows after k (from the interrupted run) are
    dropped first, so that the file reads as one run."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except ValueError:
                    continue  # a torn last line
            path.write_text("".join(k + "\n" for k in kept) if resume_step else "")
        self.f = open(path, "a", buffering=1)

    def on_log(self, trainer, row: dict) -> None:
        self.f.write(json.dumps(row, allow_nan=True) + "\n")

    def close(self) -> None:
        self.f.close()


class TensorBoardLogger(Callback):
    TRAIN = {
        "loss": "train/loss",
        "lr": "train/lr",
        "grad_norm": "train/grad_norm",
        "tokens_per_s": "perf/tokens_per_s",
        "mfu": "perf/mfu",
        "peak_rss_bytes": "perf/peak_rss_bytes",
        "accel_max_allocated_bytes": "perf/accel_max_allocated_bytes",
        "tokens": "train/tokens",
    }
    EVAL = {"loss": "eval/loss", "perplexity": "eval/perplexity", "bits_per_byte": "eval/bits_per_byte"}

    def __init__(self, logdir: Path, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(logdir), purge_step=resume_step + 1)  # drop events of an earlier attempt

    def on_log(self, trainer, row: dict) -> None:
        names = self.EVAL if row["kind"] == "eval" else self.TRAIN
        for key, tag in names.items():
            value = row.get(key)
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(tag, value, global_step=row["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


# ----------------------------------------------------------------------------------------------
# Eval, checkpoints, preemption (all ranks)
# ----------------------------------------------------------------------------------------------


class EvalCallback(Callback):
    """Validation loss, perplexity and bits per byte at the steps the plan says: one pass over this
    rank's share of the validation split (at most eval.max_batches batches)."""

    def __init__(self, recipe, dims, shards, loss_kernel: str):
        self.recipe = recipe
        self.dims = dims
        self.manifest = shards.manifest
        self.loss_kernel = loss_kernel
        self.batch_size = recipe.eval.micro_batch_size or recipe.train.micro_batch_size
        self.loader = None  # built at the first evaluation, once: streaming refuses two datasets on one folder
        self.last_row: dict | None = None

    def on_step(self, trainer, plan) -> None:
        if plan.eval:
            self.evaluate(trainer)

    def evaluate(self, trainer) -> dict:
        from msllm.data import build_dataloader
        from msllm.train.evaluate import evaluate

        r, dims = self.recipe, self.dims
        if self.loader is None:
            self.loader = build_dataloader(
                r.data, "validation", self.batch_size, r.run.seed, sp_size=dims.sp, sp_rank=dims.sp_rank,
                replication=dims.replication, shuffle=False,
            )
        engine = trainer.state.engine
        engine.eval()
        try:
            row = evaluate(engine, self.loader, self.manifest, self.batch_size, r.eval.max_batches,
                           trainer.device, dp_size=dims.dp, loss_kernel=self.loss_kernel,
                           loss_chunk_size=r.train.loss_chunk_size)
        finally:
            engine.train()
        row.update(step=trainer.state.step, tokens=trainer.state.tokens, time=time.time())
        self.last_row = row
        trainer.log(row)
        return row
