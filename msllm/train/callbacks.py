"""Small components that act on each step's plan and metrics (in the spirit of LLM Foundry's callbacks).

The trainer builds one metrics mapping per step (msllm.train.trainer.Trainer.step_metrics: the
step and the tokens seen; at the steps that log, the whole train row: loss, lr, tokens/s, MFU,
memory, ETA and the model's own metrics) and hands it, with the step's plan
(msllm.train.schedule.StepPlan: what is due), to every component; the rows to log reach them
through `on_log(row)`. No component reads the trainer. Each concern lives in one class:

    ConsoleLogger       one line per row on rank 0
    JsonlLogger         output_dir/metrics.jsonl, one JSON object per row
    TensorBoardLogger   output_dir/tensorboard, the same scalars
    EvalCallback        validation at the steps the plan says (eval.every, and the last)

The loggers write whatever keys a row holds; FIELDS below says how the console and TensorBoard
show the keys they know (a new metric needs an entry there only to be shown otherwise than by
default). Checkpoints are the Checkpointer's (msllm.checkpoint), stops the Schedule's, the
throughput and MFU msllm.metrics'.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from msllm.checkpoint.runfolder import check_run_folder_held
from msllm.distributed import collectives
from msllm.distributed.env import say
from msllm.errors import DataError, MsllmError
from msllm.metrics import fmt_duration
from msllm.run_record import manifest_sha256
from msllm.safe_files import open_append_nofollow, write_new
from msllm.train.evaluate import evaluate

# The model metrics of dynamic chunking (msllm.models.bottom_up.METRICS, each with _s<scale>): the
# realised compression, the ratio loss, the spread of p and its share near the 0.5 threshold, the
# share of boundaries at word starts and the share that random boundaries would give.
CHUNKING_METRICS = (
    "compression_s",
    "ratio_loss_s",
    "p_std_s",
    "p_near_threshold_s",
    "word_start_boundaries_s",
    "word_start_rate_s",
)


class Callback:
    def on_train_start(self, metrics: dict) -> None: ...
    def on_step(self, plan, metrics: dict) -> None: ...
    def on_log(self, row: dict) -> None: ...
    def close(self) -> None: ...


# ----------------------------------------------------------------------------------------------
# How the loggers show the keys of a row
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """How the loggers show one key of a row (or every key that starts with `prefix`).

    tag      TensorBoard's tag ("{key}" is replaced by the key); None: not a TensorBoard scalar
    console  (key, value, row) -> its text in the console line; None: not printed
    """

    key: str
    tag: str | None = None
    console: Callable[[str, object, dict], str] | None = None
    prefix: bool = False

    def names(self, key: str) -> bool:
        return key.startswith(self.key) if self.prefix else key == self.key


def _grad(key, value, row) -> str:
    return "grad " + ("n/a" if value is None else f"{value:.3f}")


def _mfu(key, value, row) -> str:
    return "mfu " + (
        f"{100 * value:.1f}%" if value is not None else "n/a (peak unreliable)" if row.get("peak_unreliable") else "n/a"
    )


def _memory(key, value, row) -> str:
    text = f"rss {value / 2**30:.2f}GiB"
    if row.get("accel_max_allocated_bytes") is not None:
        text += f" acc {row['accel_max_allocated_bytes'] / 2**30:.2f}GiB"
    return text


def _hidden(*keys: str) -> tuple[Field, ...]:
    """Keys the loggers know and show nowhere but in metrics.jsonl."""
    return tuple(Field(key) for key in keys)


# Per row kind, in the console's order (each row's keys that no field names follow, in the row's
# order: in TensorBoard as <kind>/<key> when they are finite numbers, in the console as "<key> <value>").
FIELDS: dict[str, tuple[Field, ...]] = {
    "train": (
        *_hidden("kind", "step"),
        Field("loss", "train/loss", lambda k, v, row: f"loss {v:.4f}"),
        Field("lr", "train/lr", lambda k, v, row: f"lr {v:.3e}"),
        Field("grad_norm", "train/grad_norm", _grad),
        Field("tokens", "train/tokens"),
        Field("tokens_per_s", "perf/tokens_per_s", lambda k, v, row: f"{v:,.0f} tok/s"),
        Field("mfu", "perf/mfu", _mfu),
        Field("peak_rss_bytes", "perf/peak_rss_bytes", _memory),
        Field("accel_max_allocated_bytes", "perf/accel_max_allocated_bytes"),  # printed with the rss
        # dynamic chunking's metrics, whatever its scales are: the compression printed
        Field(
            "compression_s",
            "chunking/{key}",
            lambda k, v, row: f"compression s{k[len('compression_s') :]} {v:.2f}",
            prefix=True,
        ),
        *(Field(key, "chunking/{key}", prefix=True) for key in CHUNKING_METRICS if key != "compression_s"),
        Field("eta_s", console=lambda k, v, row: f"eta {fmt_duration(v)}"),
        *_hidden("peak_unreliable", "step_time_s", "time", "sample_ids"),
    ),
    "eval": (
        *_hidden("kind", "step", "tokens", "time"),
        Field("loss", "eval/loss", lambda k, v, row: f"loss {v:.4f}"),
        Field("perplexity", "eval/perplexity", lambda k, v, row: f"ppl {v:.2f}"),
        Field("bits_per_byte", "eval/bits_per_byte", lambda k, v, row: f"bpb {v:.4f}"),
        Field("eval_tokens", console=lambda k, v, row: f"{v:,} tokens in {row['eval_time_s']:.1f}s"),
        *_hidden("eval_time_s"),
    ),
}


def _field(kind: str, key: str) -> Field | None:
    return next((f for f in FIELDS.get(kind, ()) if f.names(key)), None)


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------------------------
# Loggers (rank 0 only)
# ----------------------------------------------------------------------------------------------


class ConsoleLogger(Callback):
    def __init__(self, max_steps: int, printer=print):
        self.width = len(str(max_steps))
        self.max_steps = max_steps
        self.print = printer

    def on_log(self, row: dict) -> None:
        kind = row.get("kind", "train")
        head = (
            f"eval  step {row['step']:>{self.width}}"
            if kind == "eval"
            else f"step {row['step']:>{self.width}}/{self.max_steps}"
        )
        parts = [head]
        for field in FIELDS.get(kind, ()):  # the known keys in the layout's order
            if field.console is not None:
                parts += [field.console(key, value, row) for key, value in row.items() if field.names(key)]
        for key, value in row.items():  # then the others, as they come
            if _field(kind, key) is None:
                parts.append(f"{key} {value:.4g}" if _number(value) else f"{key} {value}")
        self.print(" | ".join(parts))


class JsonlLogger(Callback):
    """output_dir/metrics.jsonl. On resume from step k, rows after k (from the interrupted run) are
    dropped first, so that the file reads as one run."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():  # rewritten by rename: a link there is replaced, not followed
            kept = []
            for line in path.read_text().splitlines() if resume_step and path.exists() else ():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except ValueError:
                    continue  # a torn last line
            write_new(path, "".join(k + "\n" for k in kept))
        self.f = open_append_nofollow(path)  # a link planted since: ELOOP, never a write through it
        self.failed = False

    def on_log(self, row: dict) -> None:
        try:
            self.f.write(json.dumps(row, allow_nan=True) + "\n")  # line buffered: written (or failed) here
        except OSError as exc:
            self.failed = True
            raise self._write_error(exc) from None

    def close(self) -> None:
        try:
            self.f.close()  # flushes again what failed to write
        except OSError as exc:
            if not self.failed:  # else the first failure is already on its way, in one line
                raise self._write_error(exc) from None

    def _write_error(self, exc: OSError) -> MsllmError:
        """A failed write is one line naming the file (the OSError of a write names none). A rerun
        resumes from the last checkpoint, and drops the rows written after it, a torn one too."""
        folder = self.path.parent
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = f"free space in {folder} (or raise the quota)"
        else:
            fix = f"fix {folder}"
        return MsllmError(
            f"cannot write {self.path}: {exc.strerror or exc}: {fix}, then rerun: it resumes from the last checkpoint"
        )


class TensorBoardLogger(Callback):
    """The finite numbers of each row, as FIELDS names them (the others as <kind>/<key>)."""

    def __init__(self, logdir: Path, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 (heavy: TensorBoard, only when train.tensorboard)

        self.logdir = logdir
        self.writer = SummaryWriter(str(logdir), purge_step=resume_step + 1)  # drop events of an earlier attempt

    def on_log(self, row: dict) -> None:
        if not self.logdir.is_dir():  # the run folder deleted under the run: its next check stops it, in one line
            return
        kind = row.get("kind", "train")
        for key, value in row.items():
            field = _field(kind, key)
            tag = f"{kind}/{key}" if field is None else field.tag
            if tag is not None and _number(value):
                self.writer.add_scalar(tag.format(key=key), value, global_step=row["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


# ----------------------------------------------------------------------------------------------
# Eval, checkpoints, preemption (all ranks)
# ----------------------------------------------------------------------------------------------


class EvalCallback(Callback):
    """Validation loss, perplexity and bits per byte at the steps the plan says: one pass over this
    rank's share of the validation split (at most eval.max_batches batches). Its row goes to `log`."""

    def __init__(self, recipe, dims, shards, loss_kernel: str, engine, device, log: Callable[[dict], None]):
        self.recipe = recipe
        self.dims = dims
        self.manifest = shards.manifest
        self.loss_kernel = loss_kernel
        self.engine, self.device, self.log = engine, device, log
        self.batch_size = recipe.eval.micro_batch_size or recipe.train.micro_batch_size
        self.loader = None  # built at the first evaluation, once: streaming refuses two datasets on one folder
        self.last_row: dict | None = None

    def on_step(self, plan, metrics: dict) -> None:
        if plan.eval:
            self.evaluate(metrics)

    def evaluate(self, metrics: dict) -> dict:
        """The eval row at the step and tokens of `metrics`."""
        from msllm.data import build_dataloader  # noqa: PLC0415 (start-up: a finished run's msllm train imports no streaming)

        r, dims = self.recipe, self.dims
        if self.loader is None:
            self.loader = build_dataloader(
                r.data,
                "validation",
                self.batch_size,
                r.run.seed,
                sp_size=dims.sp,
                sp_rank=dims.sp_rank,
                replication=dims.replication,
                shuffle=False,
            )
        engine = self.engine
        engine.eval()
        try:
            row = evaluate(
                engine,
                self.loader,
                self.manifest,
                self.batch_size,
                r.eval.max_batches,
                self.device,
                dp_size=dims.dp,
                loss_kernel=self.loss_kernel,
                loss_chunk_size=r.train.loss_chunk_size,
            )
        finally:
            engine.train()
        row.update(step=metrics["step"], tokens=metrics["tokens"], time=time.time())
        self.last_row = row
        self.log(row)
        return row


class ShardsWatch:
    """The shards must stay the ones the run started with (a `msllm prep --force` into the folder of
    a running training swaps the data and the tokenizer under it). Before every step that evaluates
    or checkpoints, rank 0 reads the manifest again:

    - changed: the run stops with a one-line DataError; the checkpoints so far stay (they hold the
      tokenizer the run started with: msllm.checkpoint.state.TrainState);
    - gone (the folder deleted): training goes on from this job's local copy of the shards, and says
      so once; evaluation is skipped while the validation split is not there.

    The run folder is checked there too: deleted or moved away (its lock with it), the run stops with
    one line (msllm.checkpoint.runfolder.check_run_folder_held) instead of saving into a new folder.
    """

    def __init__(self, data_cfg, manifest: dict):
        self.data_cfg = data_cfg
        self.sha256 = manifest_sha256(manifest)
        self.gone = False

    def check(self, plan):
        """The plan as the shards allow it (eval dropped while they are gone)."""
        if not (plan.eval or plan.checkpoint):
            return plan
        gone = collectives.on_rank0(self._gone)
        if gone and not self.gone:
            say(
                f"msllm: WARNING: the shards folder {self.data_cfg.shards_dir} is gone: training goes on from this "
                "job's local copy of the shards; evaluation is skipped until the folder is back"
            )
        self.gone = gone
        return dataclasses.replace(plan, eval=False) if gone else plan

    def _gone(self) -> bool:
        """Rank 0: whether the manifest is gone; a DataError when it changed (a RunFolderError when
        the run folder is gone)."""
        from msllm.data.manifest import MANIFEST_FILENAME, is_remote, read_manifest  # noqa: PLC0415 (start-up: a finished run's msllm train imports no streaming)

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
