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
from msllm.safe_files import open_append_nofollow, write_new

# The model metrics of dynamic chunking (msllm.models.bottom_up.METRICS, each with _s<scale>): the
# realised compression, the ratio loss, the spread of p and its share near the 0.5 threshold, the
# share of boundaries at word starts and the share that random boundaries would give.
CHUNKING_METRICS = ("compression_s", "ratio_loss_s", "p_std_s", "p_near_threshold_s", "word_start_boundaries_s",
                    "word_start_rate_s")


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

    def __init__(self, flops_per_token: float | None, peak_flops: float | None, world_size: int,
                 remeasure=None):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops  # per device; None: unknown (n/a)
        self.world_size = world_size
        self.remeasure = remeasure  # () -> peak FLOP/s again, or None when the peak was given (train.peak_flops)
        self.peak_unreliable = False

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
        remeasure = None if recipe.train.peak_flops else (lambda: peak_flops(device)[0])
        return cls(fpt, peak, world_size, remeasure)

    def mfu(self, tokens_per_s: float) -> float | None:
        """Achieved over peak FLOP/s; never above 1. A rate above the peak means the peak was
        measured while other work shared the device (a busy CPU at start): measure it again (the
        CPU's best measurement is kept per machine); if the rate is still above it, the peak is
        unreliable and MFU is not given (the row says so)."""
        if not (self.flops_per_token and self.peak_flops):
            return None
        if self.peak_unreliable:
            return None
        mfu = self.flops_per_token * tokens_per_s / (self.peak_flops * self.world_size)
        if mfu > 1.0 and self.remeasure is not None:
            self.peak_flops = max(self.peak_flops, self.remeasure())
            mfu = self.flops_per_token * tokens_per_s / (self.peak_flops * self.world_size)
        if mfu > 1.0:
            self.peak_unreliable = True
            say(f"msllm: the peak ({self.peak_flops / 1e12:.3g} TFLOP/s per device) is below the achieved rate: MFU is "
                "not given from now on (set train.peak_flops to the device's real peak)")
            return None
        return mfu

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
        mfu = self.mfu(tokens_per_s)
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
            "peak_unreliable": self.peak_unreliable,
            "peak_rss_bytes": peak_rss_bytes(),
            "accel_max_allocated_bytes": accelerator_max_allocated(),
            "step_time_s": dt / steps,
            "eta_s": per_step * (trainer.max_steps - step),
            "time": time.time(),
            **trainer.last_model_metrics,  # dynamic chunking: CHUNKING_METRICS, per scale
        }
        if trainer.last_sample_ids is not None:  # log.sample_ids
            row["sample_ids"] = trainer.last_sample_ids
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
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else (
            "n/a (peak unreliable)" if row.get("peak_unreliable") else "n/a")
        mem = f"rss {row['peak_rss_bytes'] / 2**30:.2f}GiB"
        if row.get("accel_max_allocated_bytes") is not None:
            mem += f" acc {row['accel_max_allocated_bytes'] / 2**30:.2f}GiB"
        chunking = "".join(f" | compression s{key[len('compression_s'):]} {value:.2f}"
                           for key, value in row.items() if key.startswith("compression_s"))
        self.print(
            f"step {row['step']:>{self.width}}/{self.max_steps} | loss {row['loss']:.4f} | lr {row['lr']:.3e} | "
            f"grad {grad} | {row['tokens_per_s']:,.0f} tok/s | mfu {mfu} | {mem}{chunking} | "
            f"eta {fmt_duration(row['eta_s'])}",
        )


class JsonlLogger(Callback):
    """output_dir/metrics.jsonl. On resume from step k, rows after k (from the interrupted run) are
    dropped first, so that the file reads as one run."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():  # rewritten by rename: a link there is replaced, not followed
            kept = []
            for line in (path.read_text().splitlines() if resume_step and path.exists() else ()):
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except ValueError:
                    continue  # a torn last line
            write_new(path, "".join(k + "\n" for k in kept))
        self.f = open_append_nofollow(path)  # a link planted since: ELOOP, never a write through it

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

        self.logdir = logdir
        self.writer = SummaryWriter(str(logdir), purge_step=resume_step + 1)  # drop events of an earlier attempt

    def on_log(self, trainer, row: dict) -> None:
        if not self.logdir.is_dir():  # the run folder deleted under the run: its next check stops it, in one line
            return
        names = self.EVAL if row["kind"] == "eval" else self.TRAIN
        if row["kind"] == "train":  # dynamic chunking's scalars, whatever its scales are
            names = {**names, **{key: f"chunking/{key}" for key in row if key.startswith(CHUNKING_METRICS)}}
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


class ShardsWatch:
    """The shards must stay the ones the run started with (a `msllm prep --force` into the folder of
    a running training swaps the data and the tokenizer under it). Before every step that evaluates
    or checkpoints, rank 0 reads the manifest again:

    - changed: the run stops with a one-line DataError; the checkpoints so far stay (they hold the
      tokenizer the run started with: msllm.checkpoint.TrainState);
    - gone (the folder deleted): training goes on from this job's local copy of the shards, and says
      so once; evaluation is skipped while the validation split is not there.

    The run folder is checked there too: deleted or moved away (its lock with it), the run stops with
    one line (msllm.checkpoint.runfolder.check_run_folder_held) instead of saving into a new folder.
    """

    def __init__(self, data_cfg, manifest: dict):
        from msllm.run_record import manifest_sha256

        self.data_cfg = data_cfg
        self.sha256 = manifest_sha256(manifest)
        self.gone = False

    def check(self, plan):
        """The plan as the shards allow it (eval dropped while they are gone)."""
        import dataclasses

        if not (plan.eval or plan.checkpoint):
            return plan
        gone = collectives.on_rank0(self._gone)
        if gone and not self.gone:
            say(f"msllm: WARNING: the shards folder {self.data_cfg.shards_dir} is gone: training goes on from this "
                "job's local copy of the shards; evaluation is skipped until the folder is back")
        self.gone = gone
        return dataclasses.replace(plan, eval=False) if gone else plan

    def _gone(self) -> bool:
        """Rank 0: whether the manifest is gone; a DataError when it changed (a RunFolderError when
        the run folder is gone)."""
        from msllm.checkpoint.runfolder import check_run_folder_held
        from msllm.data.manifest import MANIFEST_FILENAME, is_remote, read_manifest
        from msllm.errors import DataError
        from msllm.run_record import manifest_sha256

        check_run_folder_held()
        shards_dir = self.data_cfg.shards_dir
        if not is_remote(shards_dir) and not (Path(shards_dir) / MANIFEST_FILENAME).is_file():
            return True
        try:
            now = manifest_sha256(read_manifest(shards_dir, self.data_cfg))
        except DataError:
            return True
        if now != self.sha256:
            raise DataError(
                f"the shards in {shards_dir} changed while this run trained (manifest sha256 {now[:12]}..., the run "
                f"started with {self.sha256[:12]}...: was `msllm prep --force` run on it?): the run stops; its "
                "checkpoints hold the data's old tokenizer. Put the old shards back and rerun to resume, or start a "
                "new run.output_dir for the new data"
            )
        return False
