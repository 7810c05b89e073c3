"""The memory of one training step, split by what holds it.

A training step keeps these in memory:

- parameters, gradients and optimizer state: bytes per parameter fixed by the precision and AdamW
  (table below), divided over the data-parallel ranks as far as the ZeRO stage shards them;
- activations, in two parts, each measured with `torch.autograd.graph.saved_tensors_hooks` on a
  real forward pass in the recipe's precision:
  - the body's: what the model's layers save for backward, up to the final hidden states;
  - the loss's: what the loss (msllm.train.loss, with the recipe's kernel) saves, plus the
    workspace it holds for a while (msllm.train.loss.loss_workspace_bytes). The dense kernel
    keeps fp32 log-probabilities of micro_batch x L x vocab and adds two buffers of that size in
    backward; the chunked one keeps a gradient the size of the hidden states and one the size of
    the head's weight, and one chunk of logits at a time.

`step_memory` computes the split; `measure_step_peak` runs real training steps and measures the
peak (CUDA's max_memory_allocated on an accelerator; on the CPU, every allocation and free that
torch's profiler records), so that the split is checked against a measurement (tests/unit/test_memory.py).
Gradients grow in backward while activations are freed; the transient buffers of backward (the
gradient flowing back through one block, the optimizer's temporaries) are not counted, so the
measured peak can lie above the total (11-14% at the paper experiment's small d_model 128: lab/results/paper.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from msllm.errors import RecipeError
from msllm.models import build_model, construct
from msllm.train.bare import bare_step
from msllm.train.loss import lm_loss, loss_workspace_bytes

# Bytes per parameter as (weights, gradients, optimizer state) for AdamW. fp32: weights, grads, and
# AdamW's two moments. bf16/fp16 (DeepSpeed): 16-bit weights and grads, and an fp32 master copy
# plus two fp32 moments in the optimizer (the "2 + 2 + 12" of the ZeRO paper).
BYTES_PER_PARAMETER = {"fp32": (4, 4, 8), "bf16": (2, 2, 12), "fp16": (2, 2, 12)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class StepMemory:
    """Bytes one rank holds for a training step."""

    parameters: int
    gradients: int
    optimizer: int
    body_activations: int  # saved for backward by the model's layers in one micro-batch
    loss_activations: int  # saved by the loss in one micro-batch, plus its workspace
    loss_kernel: str = "chunked"

    @property
    def activations(self) -> int:
        return self.body_activations + self.loss_activations

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations

    def as_dict(self) -> dict[str, int]:
        parts = {k: v for k, v in dataclasses.asdict(self).items() if k != "loss_kernel"}
        return {**parts, "activations": self.activations, "total": self.total}

    def format(self) -> str:
        mib = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
        return (
            f"total {mib(self.total)} = parameters {mib(self.parameters)} + gradients {mib(self.gradients)}"
            f" + optimizer {mib(self.optimizer)} + activations {mib(self.activations)} (body "
            f"{mib(self.body_activations)} + loss {mib(self.loss_activations)}, {self.loss_kernel})"
        )


def count_parameters(model: nn.Module) -> int:
    """Parameters of the model, tied ones once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def activation_bytes(model: nn.Module, input_ids: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward in the model's body (its forward up to the
    final hidden states) on `input_ids`; each storage counted once, parameters left out."""
    with saved_for_backward(exclude=model.parameters()) as storages:
        hidden = model.hidden_states(input_ids)
    del hidden
    return sum(storages.values())


def loss_activation_bytes(
    model: nn.Module, tokens: torch.Tensor, positions: int, kernel: str = "chunked", chunk_size: int = 0
) -> int:
    """Bytes the loss holds for a micro-batch of `positions` positions (micro-batch x L on this
    rank), measured on samples like `tokens` [1, n + 1] (inputs and labels): what it saves for
    backward, measured on one and on two such samples and extended linearly to `positions` (exact:
    the dense kernel's saved tensors grow with the positions; of the chunked one's, the hidden
    states' gradient does and the weight's does not), plus its workspace at `positions`
    (msllm.train.loss.loss_workspace_bytes)."""
    with torch.no_grad():
        hidden = model.hidden_states(tokens[:, :-1])
    labels = tokens[:, 1:]
    weight = model.lm_head.weight
    saved = []
    for n in (1, 2):
        h = hidden.expand(n, -1, -1).clone().requires_grad_()
        with saved_for_backward(exclude=model.parameters()) as storages:
            loss = lm_loss(h, weight, labels.expand(n, -1), kernel, chunk_size)
        saved.append(sum(storages.values()))
        del loss, h
    per_position = (saved[1] - saved[0]) / hidden.shape[1]
    fixed = saved[0] - per_position * hidden.shape[1]
    return round(fixed + per_position * positions) + loss_workspace_bytes(
        kernel, positions, weight.shape[0], hidden.shape[-1], hidden.dtype, chunk_size
    )


def sample_tokens(model: nn.Module, vocab_size: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """One random sample [1, seq_len + 1] on the model's device (the activations do not depend on
    which tokens)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, seq_len + 1), generator=generator).to(next(model.parameters()).device)


@contextlib.contextmanager
def saved_for_backward(exclude: Iterable[torch.Tensor] = ()) -> Iterator[dict[int, int]]:
    """Record the tensors autograd saves for backward inside the block: yields {storage address:
    bytes}, each storage once, the storages of `exclude` (parameters, a layer's inputs) left out."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield storages


def parameter_state_bytes(
    n_parameters: int, precision: str = "fp32", zero_stage: int = 0, dp: int = 1
) -> tuple[int, int, int]:
    """(parameters, gradients, optimizer state) bytes on one rank, as far as ZeRO shards them."""
    weight_bytes, grad_bytes, optim_bytes = BYTES_PER_PARAMETER[precision]
    parameters, gradients, optimizer = (
        n_parameters * weight_bytes,
        n_parameters * grad_bytes,
        n_parameters * optim_bytes,
    )
    if zero_stage >= 1:
        optimizer //= dp
    if zero_stage >= 2:
        gradients //= dp
    if zero_stage >= 3:
        parameters //= dp
    return parameters, gradients, optimizer


@dataclass(frozen=True)
class StartupPeak:
    """Bytes one rank holds at its start-up peak, from building the model to the first step
    (`startup_peak_bytes`): what it keeps, and the largest transient on top."""

    held: int  # kept when the first step starts: weights (or their partition), master and gradient partitions
    transient: int  # the largest short-lived allocation above `held` on the way (see `phase`)
    phase: str  # which phase peaks: "construction" or "deepspeed.initialize"
    total: int  # the estimated peak: max over the phases of what they hold at once


def startup_peak_bytes(
    n_parameters: int, largest_module: int, precision: str = "fp32", zero_stage: int = 0, dp: int = 1
) -> StartupPeak:
    """Estimated peak bytes one rank adds from just before the model is built to its first training
    step (msllm.train.engine.build_model_for_training, then deepspeed.initialize; no gradients or
    optimizer moments yet: torch's AdamW makes its moments in the first step). `largest_module`:
    the most parameters any one module holds directly (`largest_module_parameters`). The model is
    built in fp32; w = the precision's weight bytes, n = n_parameters. DeepSpeed 0.19, no offload:

    ZeRO-3   construction: zero.Init builds each module whole in fp32 for a moment and keeps this
             rank's partition; init_parameters computes one parameter's whole fp32 value at a
             time: n*4/dp + 2 * largest_module*4.
             deepspeed.initialize keeps three partitions: the weights' (n*w/dp, moved into one
             flat buffer), an fp32 master copy (n*4/dp; a copy even in fp32: DeepSpeed would step
             the weights in place when their device equals its device, but compares a
             torch.device with the device's name, a str, which is never equal) and the fp32
             gradient partitions (n*4/dp, allocated and zeroed before any step). The optimizer's
             zeroed gradient buffer of initialize_optimizer_states (n*4/dp) is freed before the
             gradient partitions are made. Peak: n*w/dp + 2 * n*4/dp, i.e. 3/dp of the fp32
             model, 0.75x the whole model at dp 4.
    ZeRO 0   the whole model, n*4 (materialised from the meta device, then cast to w), plus one
             parameter's fp32 init value; bf16/fp16: DeepSpeed's fp32 master copy, n*4.
    ZeRO 1-2 the whole model as at ZeRO 0; deepspeed.initialize flattens the weights into one
             buffer while they are still held (2*n*w for a moment) and keeps an fp32 partition
             (n*4/dp, a copy even in fp32) and, for a moment, a zeroed fp32 gradient partition.

    `msllm bench model-startup` (benchmarks/model-startup.md, 304M parameters, fp32) measured
    1,191 MiB for ZeRO 0 on one rank (this: 1,171) and 958 MiB per ZeRO-3 rank of 4 (this: 871;
    the rest is DeepSpeed's and the loader's own), with glibc returning large freed blocks at once
    (MALLOC_MMAP_THRESHOLD_=131072); with glibc's default dynamic threshold the construction's
    freed whole values stay in a fragmented heap and ZeRO-3's peak was 1,546-1,725 MiB. The 16-bit
    cases are this reading of DeepSpeed's code, not measured. Left out: the C allocator's slack,
    fixed overheads, and ZeRO-3's reduce bucket (torch.empty, untouched until a step writes it)."""
    n, w = n_parameters, BYTES_PER_PARAMETER[precision][0]
    module = largest_module * 4
    if zero_stage >= 3:
        held = n * w // dp + 2 * (n * 4 // dp)
        initialize = held
        construction = n * 4 // dp + 2 * module
    else:
        if zero_stage == 0:
            held = n * w + (0 if w == 4 else n * 4)
            initialize = held
        else:
            held = n * w + n * 4 // dp
            initialize = max(2 * n * w, held + n * 4 // dp)
        construction = n * 4 + module
    phase = "construction" if construction >= initialize else "deepspeed.initialize"
    total = max(construction, initialize, held)
    return StartupPeak(held=held, transient=total - held, phase=phase, total=total)


def largest_module_parameters(model: nn.Module) -> int:
    """The most parameter elements one module holds directly (not through its children): what
    ZeRO-3's zero.Init holds whole for a moment as it builds that module."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)


def step_memory(
    model: nn.Module,
    vocab_size: int,
    micro_batch: int,
    seq_len: int,
    precision: str = "fp32",
    zero_stage: int = 0,
    dp: int = 1,
    seed: int = 0,
    loss_kernel: str = "chunked",
    loss_chunk_size: int = 0,
    measure_len: int = 0,
) -> StepMemory:
    """The memory split of a training step of `model` (as built, with activation checkpointing
    applied if wanted; parameters on the device where the forward pass should run) on
    `micro_batch` x `seq_len` tokens per rank, at `precision`, with ZeRO `zero_stage` over `dp`
    data-parallel ranks and the loss kernel `loss_kernel`. Runs the body's forward on one sample
    (samples do not interact: the micro-batch is a multiple of it) and the loss on one and two, in
    `precision` on the model's device; the model is cast in place.

    `measure_len` (0: seq_len) measures on samples of that many tokens instead and extends the
    figures linearly to seq_len: for lengths too long to run here (activation bytes per token are
    flat in L for every architecture, tests/unit/test_models.py; the loss's extension is exact)."""
    parameters, gradients, optimizer = parameter_state_bytes(count_parameters(model), precision, zero_stage, dp)
    model.to(DTYPES[precision])
    measured = measure_len or seq_len
    tokens = sample_tokens(model, vocab_size, measured, seed)
    body = round(micro_batch * activation_bytes(model, tokens[:, :-1]) * seq_len / measured)
    loss = loss_activation_bytes(model, tokens, micro_batch * seq_len, loss_kernel, loss_chunk_size)
    return StepMemory(parameters, gradients, optimizer, body, loss, loss_kernel)


def measure_step_peak(model_cfg, micro_batch: int, seq_len: int, steps: int = 2, loss_kernel: str = "chunked") -> int:
    """Peak bytes of tensors alive during real training steps (forward, loss, backward, AdamW
    step) of a freshly built model, fp32, one rank, no ZeRO: compare with
    `step_memory(..., "fp32", loss_kernel=...).total`. On CUDA it is the allocator's peak (max_memory_allocated);
    on the CPU, the peak of the running sum of every allocation and free that torch's profiler
    records (exact tensor bytes, without the C allocator's slack)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = torch.randint(0, model_cfg.vocab_size, (micro_batch, seq_len + 1), device=device)

    def run() -> None:
        model = build_model(model_cfg).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)  # no flat copies
        for _ in range(steps):
            bare_step(model, optimizer, tokens[:, :-1], tokens[:, 1:], loss_kernel=loss_kernel)

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        return torch.cuda.max_memory_allocated() - base

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    changes = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in changes:
        live += nbytes
        peak = max(peak, live)
    return peak


def available_bytes(device: torch.device) -> int | None:
    """Memory free for this process's tensors on `device`: CUDA's free memory, or the host's
    MemAvailable (Linux); None where neither can be read."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(
    model_cfg,
    device: torch.device,
    precision: str = "fp32",
    zero_stage: int = 0,
    dp: int = 1,
    processes: int = 1,
    what: str = "train",
) -> None:
    """Refuse, before anything is allocated, a model whose weights, gradients and optimizer state
    alone (ZeRO-sharded as the recipe says; counted on the meta device, nothing allocated) do not
    fit in the memory `device` has free, shared by `processes` ranks on one host: a one-line
    RecipeError with both figures. Activations come on top, so passing is no promise."""
    free = available_bytes(device)
    if free is None:
        return
    with torch.device("meta"):
        n = count_parameters(construct(model_cfg))
    per_rank = sum(parameter_state_bytes(n, precision, zero_stage, dp)) if what == "train" else n * 4
    need = per_rank * (processes if device.type == "cpu" else 1)
    if need > free:
        held = "weights, gradients and optimizer state" if what == "train" else "fp32 weights"
        raise RecipeError(
            f"the model does not fit: {n / 1e6:,.1f}M parameters need {need / 2**30:,.1f} GiB for their {held}"
            + (
                f" ({precision}, ZeRO {zero_stage} over dp {dp}"
                + (f", {processes} ranks on this host" if processes > 1 else "")
                + ")"
                if what == "train"
                else ""
            )
            + f", and {device.type} has {free / 2**30:,.1f} GiB free: use a smaller model.d_model or fewer layers"
            + (", more data-parallel ranks with ZeRO 3, or parallel.offload_optimizer" if what == "train" else "")
        )


def micro_batch_bytes(model_cfg, seq_len: int, batch: int, precision: str = "fp32", training: bool = True) -> int:
    """A lower bound of the activations of one micro-batch of `batch` samples of `seq_len` tokens
    (one rank's slice): in training every layer saves at least its input, d_model values a
    position, at its scale's length (seq_len / the cumulative factor; a dynamic scale, whose length
    is learned, is left out; the architecture's own layers, ArchConfig.extra_layers, at the tokens'
    length); in evaluation (no autograd) one layer's input is alive at a time.
    2 bytes a value in bf16 and fp16, 4 in fp32."""
    width = 4 if precision == "fp32" else 2
    if not training:
        return batch * seq_len * model_cfg.d_model * width
    factors = model_cfg.cumulative_factors()
    positions = (
        sum(seq_len // f * scale.layers for f, scale in zip(factors, model_cfg.scales) if scale.pool == "fixed")
        + seq_len * model_cfg.arch_config.extra_layers()
    )
    return batch * positions * model_cfg.d_model * width


def check_micro_batch_fits(recipe, device: torch.device, sp: int = 1, processes: int = 1, what: str = "train") -> None:
    """Refuse, before a batch is drawn, a micro-batch whose activations alone (the lower bound of
    `micro_batch_bytes`) exceed the memory `device` has free, shared by `processes` ranks on one
    host: a one-line RecipeError naming the value to lower. `what`: "train" checks
    train.micro_batch_size and the evaluation's batch (eval.micro_batch_size, or the train one),
    "eval" the evaluation's batch only."""
    free = available_bytes(device)
    if free is None:
        return
    seq_len = recipe.data.seq_len // sp
    checks = [
        (
            "eval.micro_batch_size" if recipe.eval.micro_batch_size else "train.micro_batch_size",
            recipe.eval.micro_batch_size or recipe.train.micro_batch_size,
            False,
        )
    ]
    if what == "train":
        checks.insert(0, ("train.micro_batch_size", recipe.train.micro_batch_size, True))
    for key, batch, training in checks:
        need = micro_batch_bytes(
            recipe.model, seq_len, batch, recipe.train.precision if what == "train" else "fp32", training
        ) * (processes if device.type == "cpu" else 1)
        if need > free:
            raise RecipeError(
                f"{key} {batch:,} does not fit: one micro-batch's activations need at least {need / 2**30:,.1f} GiB "
                f"({'training' if training else 'evaluation'}: {batch:,} x {seq_len:,} positions x d_model "
                f"{recipe.model.d_model}{' x the layers' if training else ''}, a lower bound"
                + (f", {processes} ranks on this host" if processes > 1 and device.type == "cpu" else "")
                + f"), and {device.type} has {free / 2**30:,.1f} GiB free: lower {key}"
                + (
                    " (raise train.grad_accum_steps to keep the global batch)"
                    if key == "train.micro_batch_size" and training
                    else ""
                )
            )


def check_precision_supported(precision: str) -> None:
    """Refuse, before DeepSpeed starts, a train.precision that this machine's accelerator does not
    compute in (DeepSpeed would raise "Type fp16 is not supported on your device" with a
    traceback): fp16 on a CPU without fp16 kernels (AVX512-FP16 / AMX-FP16), bf16 on an older GPU."""
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415 (heavy: DeepSpeed)

    accel = get_accelerator()
    supported = {"fp32": True, "fp16": accel.is_fp16_supported(), "bf16": accel.is_bf16_supported()}[precision]
    if not supported:
        others = " or ".join(
            p for p in ("fp32", "bf16") if p != precision and (p == "fp32" or accel.is_bf16_supported())
        )
        raise RecipeError(
            f"train.precision {precision} is not supported on this {accel.device_name()} (DeepSpeed: "
            + (
                "fp16 needs a GPU, or a CPU with AVX512-FP16 or AMX-FP16"
                if precision == "fp16"
                else "bf16 needs a GPU of compute capability 8.0 or newer"
            )
            + "): "
            f"set train.precision to {others}"
        )


def check_can_train(recipe, device: torch.device, sp: int = 1, processes: int = 1) -> None:
    """What `check_fits` leaves out, before DeepSpeed starts: that the accelerator computes in
    train.precision, and that the train and eval micro-batches fit (one-line RecipeErrors)."""
    check_precision_supported(recipe.train.precision)
    check_micro_batch_fits(recipe, device, sp, processes)
