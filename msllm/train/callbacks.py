"""Small components called by the training loop (in the spirit of LLM Foundry's callbacks).

The loop only calls hooks; each concern lives in one class:

    SpeedMonitor        every log.every steps: builds the row (tokens/s, MFU, memory, ETA) and
                        hands it to the loggers through `trainer.log(row)`
    ConsoleLogger       one line per row on rank 0
    JsonlLogger         output_dir/metrics.jsonl, one JSON object per row
    TensorBoardLogger   output_dir/tensorboard, the same scalars
    EvalCallback        validation every eval.every steps and at the end
    CheckpointCallback  checkpoint every checkpoint.every steps, at the end, and on preemption
    PreemptionCallback  SIGTERM / SIGUSR1 -> finish the step, checkpoint, exit 0
"""

from __future__ import annotations

import json
import math
import resource
import signal
import sys
import time
from pathlib import Path

import torch


class Callback:
    def on_train_start(self, trainer) -> None: ...
    def on_step_end(self, trainer) -> None: ...
    def on_log(self, trainer, row: dict) -> None: ...
    def on_train_end(self, trainer) -> None: ...
    def close(self) -> None: ...


# ----------------------------------------------------------------------------------------------
# Measures
# ----------------------------------------------------------------------------------------------


# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s of known accelerators, from their vendors'
# data sheets, matched as a case-insensitive substring of the device name, first match wins (so
# the more specific names come first: "H100 PCIe" before "H100", "L40S" before "L40" before "L4").
ACCELERATOR_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
)


def known_peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a known accelerator by its name (torch's get_device_name), else None."""
    name = device_name.lower()
    for key, flops in ACCELERATOR_PEAK_FLOPS:
        if key.lower() in name:
            return flops
    return None


def measure_matmul_flops(n: int = 1024, reps: int = 8, device: torch.device | str = "cpu",
                         dtype: torch.dtype = torch.float32) -> float:
    """Dense matmul FLOP/s of this process on `device` (on the CPU: with its current thread count);
    the best of three timed rounds after a warm-up."""
    from deepspeed.accelerator import get_accelerator

    device = torch.device(device)
    sync = (lambda: None) if device.type == "cpu" else get_accelerator().synchronize
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = math.inf
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 * reps / best


def peak_flops(device: torch.device, configured: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s per device for MFU, where it comes from). Never unknown: train.peak_flops if set;
    on an accelerator the table of known devices, else a measured bf16 matmul; on the CPU the best
    measured fp32 matmul (what CPU training runs in)."""
    if configured:
        return configured, "train.peak_flops"
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return cpu_peak_flops(), f"best measured fp32 matmul, {threads} thread{'s' if threads != 1 else ''}"
    module = getattr(torch, device.type, None)
    name = module.get_device_name(device) if hasattr(module, "get_device_name") else device.type
    known = known_peak_flops(name)
    if known:
        return known, f"{name}: dense bf16 peak from the table of known devices"
    return measure_matmul_flops(n=8192, reps=10, device=device, dtype=torch.bfloat16), f"{name}: measured bf16 matmul"


def cpu_peak_flops() -> float:
    """The CPU's dense fp32 matmul rate for this thread count: the best of this measurement and of
    earlier ones on this machine (cached in ~/.cache/msllm), so that a measurement taken while other
    processes share the cores does not pass for the peak."""
    import os
    import platform

    key = f"{platform.node()}|{platform.processor() or platform.machine()}|{os.cpu_count()}|{torch.get_num_threads()}"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "msllm" / "cpu_matmul_flops.json"
    measured = measure_matmul_flops()
    try:
        known = json.loads(cache.read_text()) if cache.is_file() else {}
    except (OSError, ValueError):
        known = {}
    best = max(measured, float(known.get(key, 0.0)))
    if best > float(known.get(key, 0.0)):
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            known[key] = best
            tmp = cache.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(known, indent=1))
            os.replace(tmp, cache)
        except OSError:
            pass
    return best


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def accelerator_max_allocated() -> int | None:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return None
    try:
        return int(acc.max_memory_allocated())
    except Exception:  # not every accelerator reports it
        return None


def fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


# ----------------------------------------------------------------------------------------------
# Metrics row builder
# ----------------------------------------------------------------------------------------------


class SpeedMonitor(Callback):
    """Throughput, MFU, memory and ETA over the steps since the last row."""

    def __init__(self, every: int, flops_per_token: float | None, peak_flops: float | None, world_size: int):
        self.every = every
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops  # per device; None: unknown (n/a)
        self.world_size = world_size

    def on_train_start(self, trainer) -> None:
        self.t_start = time.perf_counter()
        self.train_time_last = trainer.train_time
        self.step_last = self.step_start = trainer.step

    def on_step_end(self, trainer) -> None:
        step = trainer.step
        if step % self.every and step != trainer.max_steps and not trainer.should_stop:
            return
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
            "tokens": trainer.tokens,
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
    """Validation loss, perplexity and bits per byte every eval.every steps and at the end: one pass
    over this rank's share of the validation split (at most eval.max_batches batches)."""

    def __init__(self, recipe, dims, shards):
        self.every = recipe.eval.every
        self.recipe = recipe
        self.dims = dims
        self.manifest = shards.manifest
        self.batch_size = recipe.eval.micro_batch_size or recipe.train.micro_batch_size
        self.loader = None  # built at the first evaluation, once: streaming refuses two datasets on one folder
        self.last_step = -1
        self.last_row: dict | None = None

    def evaluate(self, trainer) -> dict:
        from msllm.data import build_dataloader
        from msllm.train.evaluate import evaluate

        r, dims = self.recipe, self.dims
        if self.loader is None:
            self.loader = build_dataloader(
                r.data, "validation", self.batch_size, r.run.seed, sp_size=dims.sp, sp_rank=dims.sp_rank,
                replication=dims.replication, shuffle=False,
            )
        trainer.engine.eval()
        try:
            row = evaluate(trainer.engine, self.loader, self.manifest, self.batch_size, r.eval.max_batches,
                           trainer.device, dp_size=dims.dp, loss_kernel=trainer.loss_kernel,
                           loss_chunk_size=r.train.loss_chunk_size)
        finally:
            trainer.engine.train()
        row.update(step=trainer.step, tokens=trainer.tokens, time=time.time())
        self.last_step, self.last_row = trainer.step, row
        trainer.log(row)
        return row

    def on_step_end(self, trainer) -> None:
        if self.every and trainer.step % self.every == 0 and trainer.step != trainer.max_steps and not trainer.should_stop:
            self.evaluate(trainer)

    def on_train_end(self, trainer) -> None:
        if not trainer.should_stop and self.last_step != trainer.step:
            self.evaluate(trainer)


class CheckpointCallback(Callback):
    """A complete checkpoint every checkpoint.every steps, at the end, and when the run stops early
    (preemption, train.stop_at_step): DeepSpeed's state plus what an exact resume needs."""

    def __init__(self, recipe, dims, shards):
        self.every = recipe.checkpoint.every
        self.recipe = recipe
        self.dims = dims
        self.shards = shards
        self.last_step = -1

    def save(self, trainer) -> Path:
        from msllm.train.checkpoint import rng_state
        from msllm.train.dist import say

        r = self.recipe
        client = {
            "step": trainer.step,
            "tokens": trainer.tokens,
            "arch": r.model.arch,
            "zero_stage": r.parallel.zero_stage,
            "world_size": self.dims.world_size,
            "tokenizer_path": str(Path(self.shards.tokenizer_path).resolve()),
            "tokenizer_sha256": self.shards.tokenizer_sha256,
            "recipe": r.to_dict(),
            "run_record": trainer.run_record,
        }
        rank_state = {"rng": rng_state(), "dataloader": trainer.loader.state_dict(), "step": trainer.step}
        t0 = time.perf_counter()
        path = trainer.ckpt.save(trainer.engine, trainer.step, client, rank_state, r.to_yaml(), str(self.shards.tokenizer_path))
        say(f"saved checkpoint {path} ({time.perf_counter() - t0:.1f}s)")
        self.last_step = trainer.step
        return path

    def on_train_start(self, trainer) -> None:
        self.last_step = trainer.step if trainer.resumed else -1

    def on_step_end(self, trainer) -> None:
        if trainer.nonfinite.in_a_row:  # weights that give NaN gradients are no checkpoint to resume
            return
        if trainer.should_stop or (self.every and trainer.step % self.every == 0):
            self.save(trainer)

    def on_train_end(self, trainer) -> None:
        if self.last_step != trainer.step:
            self.save(trainer)


class PreemptionCallback(Callback):
    """On SIGTERM or SIGUSR1 (what slurm sends before preemption or the time limit) or SIGINT
    (Ctrl-C), note it; the trainer agrees on it across ranks after the current step, checkpoints
    and returns (exit 0). A second SIGINT stops at once (KeyboardInterrupt, exit 130)."""

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

    def on_train_start(self, trainer) -> None:
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
