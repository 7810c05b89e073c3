"""The loss of msllm: the summed token cross-entropy of the output head, never holding all the logits.

    lm_loss(hidden [.., d], weight [vocab, d], labels [..]) -> fp32 scalar
        the sum of -log softmax(hidden @ weight.T)[label] over the positions whose label is not
        IGNORE_INDEX (-100). Sums, not means: sequence parallelism adds the ranks' sums exactly.

    model_loss(model, input_ids, labels)  the same, through the model's forward (msllm.models'
        `forward(input_ids, loss)`): what training, eval, the bare step and msllm.train.memory call;
        with the model's auxiliary loss (dynamic chunking's ratio loss) added, but in eval.

A kernel computes it (`train.loss_kernel`; `choose_kernel` resolves "auto"):

    dense     logits [N, vocab] in full, log-softmax and NLL by torch: the reference of the tests.
              Keeps fp32 log-probabilities of N x vocab for backward and adds two buffers of that
              size in backward: at a 32k vocabulary, more than a multi-scale model's whole body.
    chunked   the CPU path, and the fallback on accelerators: `rows` positions at a time, the head
              matmul, log-softmax, NLL *and their gradients* (softmax - one-hot, times the hidden
              states and the weight), so that only one chunk of logits ever exists. The gradients
              are kept for backward, which only scales them by the incoming gradient: the same
              three matmuls as dense, no recomputation. Kept: a gradient the size of the hidden
              states and one the size of the weight.
    liger     Liger Kernel's fused linear cross-entropy (`pip install liger-kernel`; CUDA, Triton):
              the same scheme as chunked in fused kernels.
    cce       Apple's Cut Cross-Entropy (`pip install cut-cross-entropy`; CUDA, Triton, arXiv
              2411.09009): logits computed blockwise in on-chip memory, never written out. On CUDA
              msllm calls its `impl="cce"` (the Triton kernels: the one implementation that never
              writes the logits out, which is the point of it); on any other device its
              `impl="torch_compile"` (a compiled dense cross-entropy that holds every logit: the same
              library entry point and conventions, runnable on a CPU, no memory saving).

"auto" is liger on CUDA when it is installed, else cce when installed, else chunked; chunked on
every other device. The trainer logs what it chose, and checks a fused kernel against chunked
before the first step (msllm.train.kernel_check).

Fused kernels off CUDA (the tests, CI): with MSLLM_ALLOW_CPU_KERNELS=1 in the environment (or
`choose_kernel(..., allow_cpu=True)`), liger and cce are accepted on any device. Liger's Triton
kernels then need Triton's interpreter: TRITON_INTERPRET=1 must be set before liger_kernel is first
imported, and before triton is (`enable_cpu_kernels()` sets both variables, and refuses in one line
when it is too late); they run correct and slow (keep inputs tiny).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Callable

import torch

from msllm.errors import KernelError, RecipeError

IGNORE_INDEX = -100
KERNELS = ("auto", "dense", "chunked", "liger", "cce")
_FUSED = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}  # kernel -> the module that provides it
ALLOW_CPU_KERNELS = "MSLLM_ALLOW_CPU_KERNELS"  # "1": liger and cce accepted off CUDA (tests, CI)
# chunked: when train.loss_chunk_size is 0, positions per chunk such that one chunk's fp32 logits
# take about this many bytes (262 positions at a 32k vocabulary, 1,048 at 8k).
CHUNK_LOGIT_BYTES = 32 << 20


def installed(kernel: str) -> bool:
    """Whether the library behind a fused kernel can be imported here."""
    return importlib.util.find_spec(_FUSED[kernel]) is not None


def cpu_kernels_allowed() -> bool:
    """Whether MSLLM_ALLOW_CPU_KERNELS=1 lets liger and cce run off CUDA."""
    return os.environ.get(ALLOW_CPU_KERNELS, "") == "1"


def enable_cpu_kernels() -> None:
    """Let the fused kernels run on a CPU in this process (tests, CI): MSLLM_ALLOW_CPU_KERNELS=1 and,
    for Liger's Triton kernels, TRITON_INTERPRET=1. Triton reads the latter when a kernel (its own
    standard library's included) is defined, so this must run before triton and liger_kernel are
    imported; raises a one-line error if they were already, for a GPU."""
    if _triton_compiled_for_a_gpu(sys.modules):
        raise KernelError(
            "triton or liger_kernel was imported before TRITON_INTERPRET=1 was set: Liger's kernels "
            "cannot run on a CPU in this process; set TRITON_INTERPRET=1 in the environment before "
            "starting python"
        )
    os.environ[ALLOW_CPU_KERNELS] = "1"
    os.environ["TRITON_INTERPRET"] = "1"


def _triton_compiled_for_a_gpu(modules: dict) -> bool:
    """Whether Triton's own functions or liger_kernel's kernels were already defined for a GPU
    (imported without TRITON_INTERPRET=1: Triton's JITFunction, not its InterpretedFunction). An
    interpreted kernel cannot call them."""
    prefixes = ("triton.language", "liger_kernel.ops")
    if not any(name.startswith(prefixes) for name in modules):
        return False
    from triton.runtime.jit import JITFunction  # noqa: PLC0415 (optional: triton, with the [gpu] extra)

    return any(
        isinstance(value, JITFunction)
        for name, module in list(modules.items())
        if name.startswith(prefixes) and module is not None
        for value in list(vars(module).values())
    )


def choose_kernel(requested: str, device_type: str, allow_cpu: bool | None = None) -> str:
    """The kernel that runs for `requested` (one of KERNELS) on a device of `device_type`; raises a
    one-line error for a fused kernel that cannot run here. `allow_cpu` (default: the environment's
    MSLLM_ALLOW_CPU_KERNELS=1) accepts the fused kernels on any device (tests, CI); "auto" never
    picks them off CUDA."""
    if allow_cpu is None:
        allow_cpu = cpu_kernels_allowed()

    if requested == "auto":
        if device_type == "cuda":
            for kernel in ("liger", "cce"):
                if installed(kernel):
                    return kernel
        return "chunked"
    if requested in _FUSED:
        if device_type != "cuda" and not allow_cpu:
            raise RecipeError(
                f"train.loss_kernel: {requested} needs a CUDA GPU (this run is on {device_type}); use auto or "
                f"chunked (tests: {ALLOW_CPU_KERNELS}=1 runs it on the CPU)"
            )
        if not installed(requested):
            raise RecipeError(
                f"train.loss_kernel: {requested} is not installed: pip install {_FUSED[requested].replace('_', '-')} "
                "(or pip install 'msllm[gpu]'), or use auto or chunked"
            )
    return requested


def chunk_rows(vocab_size: int, chunk_size: int = 0) -> int:
    """Positions per chunk of the chunked kernel: `chunk_size`, or (0) as many as keep one chunk's
    fp32 logits near CHUNK_LOGIT_BYTES (at least 16)."""
    return chunk_size if chunk_size > 0 else max(16, CHUNK_LOGIT_BYTES // (4 * vocab_size))


def lm_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, kernel: str = "chunked", chunk_size: int = 0
) -> torch.Tensor:
    """Summed token cross-entropy (fp32 scalar) of `hidden` [.., d] under the head `weight`
    [vocab, d] against `labels` [..] (IGNORE_INDEX: no loss, no gradient). `kernel` is a resolved
    kernel (not "auto"); `chunk_size` is the chunked kernel's positions per chunk (0: automatic)."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if kernel == "dense":
        logits = torch.nn.functional.linear(hidden, weight)
        return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum", ignore_index=IGNORE_INDEX)
    if kernel == "chunked":
        rows = chunk_rows(weight.shape[0], chunk_size)
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, rows)
        return _chunked_forward(hidden, weight, labels, rows, need_hidden=False, need_weight=False)[0]
    if kernel in FUSED_LOSSES:
        return FUSED_LOSSES[kernel](hidden, weight, labels).float()
    raise ValueError(f"unknown loss kernel {kernel!r} (one of {', '.join(KERNELS[1:])})")


def _liger_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy  # noqa: PLC0415 (optional: liger-kernel, the [gpu] extra)

    return liger_fused_linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def _cce_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from cut_cross_entropy import linear_cross_entropy  # noqa: PLC0415 (optional: cut-cross-entropy, the [gpu] extra)

    # CUDA: the Triton kernels, which never write the logits out. Elsewhere: the library's
    # torch.compile implementation (its Triton kernels do not run under Triton's interpreter).
    impl = "cce" if hidden.device.type == "cuda" else "torch_compile"
    return linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE_INDEX, reduction="sum", impl=impl)


# The fused kernels, (hidden [N, d], weight [vocab, d], labels [N]) -> summed loss. A table, so that
# the tests can put a broken kernel in (msllm.train.kernel_check must catch it).
FUSED_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "liger": _liger_loss,
    "cce": _cce_loss,
}


def model_loss(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    kernel: str = "chunked",
    chunk_size: int = 0,
    auxiliary: bool = True,
) -> torch.Tensor:
    """`lm_loss` of `model` (an msllm model, or a DeepSpeed engine around one) on one batch,
    computed inside the model's forward from its final hidden states and its head's weight, plus
    the model's auxiliary loss (dynamic chunking's ratio loss, summed over positions as the LM
    loss is) unless `auxiliary` is False (eval: the LM loss alone)."""
    loss = functools.partial(lm_loss, labels=labels, kernel=kernel, chunk_size=chunk_size)
    return model(input_ids, loss=loss, auxiliary=auxiliary)


def _chunked_forward(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, rows: int, need_hidden: bool, need_weight: bool
):
    """(summed loss, d loss / d hidden or None, d loss / d weight or None), `rows` positions at a
    time. The gradient of the summed cross-entropy with respect to one position's logits is
    softmax - one-hot (zero where the label is ignored); the chunk's logits buffer becomes it in
    place."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    # fp32, accumulated over the chunks by fp32 matmuls (the softmax gradient is fp32 already).
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    for start in range(0, hidden.shape[0], rows):
        h = hidden[start : start + rows]
        y = labels[start : start + rows]
        valid = y != IGNORE_INDEX
        target = torch.where(valid, y, torch.zeros_like(y)).unsqueeze(1)
        # The one [rows, vocab] buffer (computed under autocast as dense's), worked on in place:
        # shifted by its row maxima, exponentiated, normalised into the softmax.
        logits = (h @ weight.t()).float()
        logits.sub_(logits.amax(dim=1, keepdim=True))
        picked = logits.gather(1, target).squeeze(1)
        sums = logits.exp_().sum(dim=1, keepdim=True)
        total += ((sums.squeeze(1).log() - picked) * valid).sum()  # log-sum-exp minus the label's logit
        if not (need_hidden or need_weight):
            continue
        with torch.autocast(hidden.device.type, enabled=False):
            grad_logits = logits.div_(sums)  # softmax
            grad_logits.scatter_add_(1, target, torch.full(target.shape, -1.0, device=target.device))
            grad_logits.mul_(valid.unsqueeze(1))
            if need_hidden:
                grad_hidden[start : start + rows] = grad_logits.to(weight.dtype) @ weight
            if need_weight:
                grad_weight.addmm_(grad_logits.t(), h.float())
    return total, grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """The chunked kernel with autograd: forward computes the loss and its gradients chunk by
    chunk and keeps the gradients; backward scales them by the incoming (scalar) gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, rows):
        total, grad_hidden, grad_weight = _chunked_forward(
            hidden, weight, labels, rows, need_hidden=ctx.needs_input_grad[0], need_weight=ctx.needs_input_grad[1]
        )
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = lambda g: None if g is None else g * grad_total.to(g.dtype)  # noqa: E731
        return scale(grad_hidden), scale(grad_weight), None, None


def loss_workspace_bytes(
    kernel: str, positions: int, vocab_size: int, d_model: int, dtype: torch.dtype, chunk_size: int = 0
) -> int:
    """Bytes the loss holds for a while beyond what it saves for backward (msllm.train.memory adds them to
    the loss's activations). dense: the two fp32 buffers of the logits' size that its backward makes
    (the gradients of the log-probabilities and of the logits) while everything saved is alive.
    chunked: one chunk's fp32 logits and its hidden-state gradient, and, below fp32, the logits' cast
    for the matmul and the fp32 weight-gradient accumulator (in fp32 the accumulator is what is
    saved). The fused kernels' workspaces are their libraries' and are not counted."""
    item = torch.tensor([], dtype=dtype).element_size()
    if kernel == "dense":
        return 2 * positions * vocab_size * 4
    if kernel == "chunked":
        rows = min(positions, chunk_rows(vocab_size, chunk_size))
        per_chunk = rows * vocab_size * 4 + rows * d_model * item
        if item != 4:
            per_chunk += rows * vocab_size * item + rows * d_model * 4 + vocab_size * d_model * 4
        return per_chunk
    return 0
