"""The start-up check of the kernels (`train.kernel_check`): every non-reference kernel a run chose
is run on the training device, on a small input, against its reference, before the first step.

    attention   "flex" (FlexAttention, CUDA) against "blocks" (blocked SDPA), on each attention
                pattern the model has (its sliding windows, its retina patterns), forward and the
                gradients of q, k, v. On a CPU FlexAttention has no backward: forward only, and the
                check says so.
    loss        "liger" or "cce" against "chunked" (msllm.train.loss), the summed loss and the
                gradients of the hidden states and of the head's weight, with ignored labels.

The tolerances are relative to the reference's largest magnitude (max |got - want| / max |want|),
per dtype of the training (fp32 / bf16 or fp16). They are there to catch a kernel that computes
something else (a wrong mask, a wrong reduction, a broken build), not to grade rounding: a
kernel 1% off is caught in fp32; in bf16 the loss still is (it is summed in fp32 by both), an
attention output or a gradient must be off by more than 3%.

    TOLERANCES[dtype] = {"loss": ..., "gradient": ..., "attention": ...}

A kernel that raises, or differs beyond its tolerance, fails. `check_kernels` then, per mode:
fallback: the reference replaces it (attention through msllm.models.attention.use_kernel, the loss
by the kernel name it returns), with one line saying so; strict: a KernelError (one line); off: no
check. `at_start` is what the trainer calls: it finds the model's patterns, runs the checks, agrees
with the other ranks (a kernel fails everywhere if it fails on one rank) and returns the loss kernel
and the record that run.json keeps under `kernels`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from msllm.distributed import collectives
from msllm.distributed.env import say
from msllm.errors import KernelError, clip
from msllm.models.attention import LocalCausalAttention, SlidingWindow, kernel_for, local_attention, use_kernel
from msllm.models.retina import retina_attention
from msllm.train.loss import IGNORE_INDEX, lm_loss

MODES = ("fallback", "strict", "off")
REFERENCES = {"flex": "blocks", "liger": "chunked", "cce": "chunked"}  # kernel -> its reference
_LOW = {"loss": 2e-3, "gradient": 3e-2, "attention": 3e-2}
TOLERANCES = {
    torch.float32: {"loss": 1e-4, "gradient": 1e-3, "attention": 1e-3},
    torch.bfloat16: _LOW,
    torch.float16: _LOW,
}
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LOSS_POSITIONS = 128  # the loss check's positions (its width and vocabulary are the model's)


@dataclass
class KernelCheck:
    """The outcome of one kernel's check."""

    what: str  # "attention" or "loss"
    kernel: str  # the kernel checked
    reference: str
    device: str
    dtype: str
    passed: bool
    backward: bool  # whether the gradients were compared too
    differences: dict  # what was compared -> its largest relative difference (empty: it raised)
    tolerances: dict  # what was compared -> its tolerance
    detail: str  # one line: what was compared, or the exception
    used: str = ""  # the kernel that runs after the check (filled by check_kernels)

    def line(self) -> str:
        """One log line."""
        what = f"{self.what} kernel {self.kernel} on {self.device} ({self.dtype})"
        if self.passed:
            return f"kernel check: {what} matches {self.reference}: {self.detail}"
        after = f"; using {self.used} instead" if self.used == self.reference else ""
        return f"kernel check: {what} FAILED against {self.reference}: {self.detail}{after}"


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (inf where got is not finite)."""
    got, want = got.detach().float(), want.detach().float()
    if got.shape != want.shape:
        raise ValueError(f"the kernel's result has shape {tuple(got.shape)} instead of {tuple(want.shape)}")
    if not want.numel():
        return 0.0
    if not torch.isfinite(got).all():
        return float("inf")
    return (got - want).abs().max().item() / max(want.abs().max().item(), 1e-12)


def _run(what: str, kernel: str, device: torch.device, dtype: torch.dtype, backward: bool, compare) -> KernelCheck:
    """`compare()` -> ({name: largest relative difference}, {name: tolerance}, what was compared);
    an exception fails the check."""
    common = dict(
        what=what,
        kernel=kernel,
        reference=REFERENCES[kernel],
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        backward=backward,
    )
    try:
        differences, tolerances, compared = compare()
    except Exception as exc:  # any failure of the kernel is the check's finding, not a crash
        text = str(exc).strip()
        message = f": {text.splitlines()[0]}" if text else ""
        return KernelCheck(
            **common,
            passed=False,
            differences={},
            tolerances={},
            detail=clip(f"raised {type(exc).__name__}{message}", 300),
        )
    passed = all(differences[name] <= tolerances[name] for name in differences)
    shown = ", ".join(f"{name} {differences[name]:.2g} (tolerance {tolerances[name]:g})" for name in differences)
    return KernelCheck(
        **common,
        passed=passed,
        differences=differences,
        tolerances=tolerances,
        detail=f"{compared}; largest relative differences: {shown}",
    )


def check_loss(
    kernel: str,
    device: torch.device,
    dtype: torch.dtype,
    d_model: int,
    vocab_size: int,
    positions: int = LOSS_POSITIONS,
    seed: int = 0,
) -> KernelCheck:
    """`kernel` ("liger" or "cce") against the chunked loss on `positions` random hidden states of
    width `d_model`, a head of `vocab_size` rows and labels with every 7th ignored, in `dtype` on
    `device`: the summed loss and both gradients."""
    tolerance = TOLERANCES[dtype]

    def compare():
        g = torch.Generator().manual_seed(seed)
        hidden = torch.randn(positions, d_model, generator=g).to(device, dtype)
        weight = (torch.randn(vocab_size, d_model, generator=g) / d_model**0.5).to(device, dtype)
        labels = torch.randint(0, vocab_size, (positions,), generator=g).to(device)
        labels[::7] = IGNORE_INDEX
        results = []
        for name in (kernel, "chunked"):
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            loss = lm_loss(h, w, labels, name)
            loss.backward()
            results.append((loss, h.grad, w.grad))
        (loss, *grads), (ref_loss, *ref_grads) = results
        if any(g is None for g in grads):
            raise RuntimeError("no gradient reached the hidden states or the weight")
        differences = {
            "loss": _relative(loss, ref_loss),
            "gradients": max(_relative(g, r) for g, r in zip(grads, ref_grads)),
        }
        tolerances = {"loss": tolerance["loss"], "gradients": tolerance["gradient"]}
        return differences, tolerances, f"loss and gradients at N={positions}, d={d_model}, vocab={vocab_size}"

    return _run("loss", kernel, device, dtype, True, compare)


def attention_backward_runs(kernel: str, device: torch.device) -> bool:
    """Whether `kernel` has a backward on `device` (FlexAttention has none on the CPU)."""
    return not (kernel == "flex" and device.type != "cuda")


def check_attention(
    kernel: str, device: torch.device, dtype: torch.dtype, patterns, head_dim: int = 32, seed: int = 0
) -> KernelCheck:
    """`kernel` ("flex") against the blocks kernel for each of `patterns` (SlidingWindow or
    RetinaPattern) on one sequence of 2 heads, long enough for three blocks of queries and a
    partial one (at least 300 positions), in `dtype` on `device`: the output, and the gradients of
    q, k and v where the kernel has a backward on this device."""
    backward = attention_backward_runs(kernel, device)
    tolerance = TOLERANCES[dtype]["attention"]

    def compare():
        worst, lengths = 0.0, []
        for pattern in patterns:
            L = max(300, 3 * pattern.block + 37)
            lengths.append(L)
            g = torch.Generator().manual_seed(seed)
            inputs = [torch.randn(1, 2, L, head_dim, generator=g).to(device, dtype) for _ in range(3)]
            grad_out = torch.randn(1, 2, L, head_dim, generator=g).to(device, dtype)
            results = []
            for name in (kernel, "blocks"):
                q, k, v = (x.clone().requires_grad_(backward) for x in inputs)
                if isinstance(pattern, SlidingWindow):
                    out = local_attention(q, k, v, pattern.window, kernel=name)
                else:
                    out = retina_attention(q, k, v, pattern, kernel=name)
                grads = torch.autograd.grad((out * grad_out).sum(), (q, k, v)) if backward else ()
                results.append((out.detach(), *grads))
            worst = max([worst] + [_relative(a, b) for a, b in zip(*results)])
        compared = (
            "output and gradients"
            if backward
            else "output only (FlexAttention has no backward on the CPU: gradients not checked)"
        )
        return (
            {"attention": worst},
            {"attention": tolerance},
            f"{compared} of {len(patterns)} pattern(s) at L={','.join(map(str, lengths))}",
        )

    return _run("attention", kernel, device, dtype, backward, compare)


def check_kernels(
    loss_kernel: str,
    attention_kernel: str | None,
    device: torch.device,
    dtype: torch.dtype,
    mode: str,
    *,
    d_model: int = 64,
    vocab_size: int = 512,
    patterns=(),
    head_dim: int = 32,
    agree: Callable[[bool], bool] = lambda failed: failed,
    say: Callable[[str], None] = print,
) -> tuple[str, str | None, dict]:
    """Check the chosen non-reference kernels (`attention_kernel` None: the model has no local or
    retina attention) -> (loss kernel, attention kernel, record). `agree(failed)` -> whether the
    kernel failed on any rank (collectives.any_rank in a distributed run). In fallback mode a
    failed kernel is replaced by its reference (and msllm.models.attention.use_kernel is set); in
    strict mode it raises KernelError. The record: {"mode", "loss": {...}, "attention": {...}}, each
    entry the kernel, the one used, and its check (None where nothing was checked)."""
    if mode not in MODES:
        raise KernelError(f"train.kernel_check: {mode!r} is not one of {', '.join(MODES)}")
    record: dict = {"mode": mode}
    chosen = {"loss": loss_kernel, "attention": attention_kernel}
    for what, kernel in chosen.items():
        entry = {"kernel": kernel, "used": kernel, "check": None}
        record[what] = entry
        if kernel not in REFERENCES or mode == "off":
            continue
        if what == "loss":
            result = check_loss(kernel, device, dtype, d_model, vocab_size)
        else:
            result = check_attention(kernel, device, dtype, patterns, head_dim)
        failed_here = not result.passed
        if agree(failed_here) and result.passed:  # it failed on another rank
            result.passed = False
            result.detail += "; failed on another rank"
        result.used = kernel if result.passed else REFERENCES[kernel]
        entry.update(used=result.used, check=asdict(result))
        if not result.passed and mode == "strict":
            raise KernelError(
                f"{result.line()} (train.kernel_check: strict; set it to fallback to train on "
                f"{REFERENCES[kernel]} instead)"
            )
        say(result.line())
        if not result.passed:
            if what == "attention":
                use_kernel(result.used)
            chosen[what] = result.used
    return chosen["loss"], chosen["attention"], record


def attention_patterns(model: torch.nn.Module) -> list:
    """The distinct patterns of the model's local and retina attention (empty: full attention only)."""
    patterns = []
    for module in model.modules():
        if getattr(module, "pattern", None) is not None:  # an attention core that carries its pattern (retina's)
            pattern = module.pattern
        elif isinstance(module, LocalCausalAttention):
            pattern = SlidingWindow(module.window)
        else:
            continue
        if pattern not in patterns:
            patterns.append(pattern)
    return patterns


def at_start(
    train_config, model_config, model: torch.nn.Module, device: torch.device, loss_kernel: str
) -> tuple[str, dict]:
    """The trainer's call, before the first step: check `loss_kernel` and, if `model` has local or
    retina attention, the attention kernel chosen for `device`, as `train_config.kernel_check` says,
    in the training precision; every rank agrees. -> (the loss kernel to train with, the record for
    run.json)."""
    patterns = attention_patterns(model)
    loss_kernel, _, record = check_kernels(
        loss_kernel,
        kernel_for(device) if patterns else None,
        device,
        PRECISIONS[train_config.precision],
        train_config.kernel_check,
        d_model=model_config.d_model,
        vocab_size=model_config.vocab_size,
        patterns=patterns,
        head_dim=model_config.head_dim,
        agree=collectives.any_rank,
        say=say,
    )
    return loss_kernel, record
