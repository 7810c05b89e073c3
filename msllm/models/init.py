"""The initial weights: a function of the seed and each parameter's name, nothing else.

    build_model(cfg, seed, device)   the parameters built on the meta device (no memory, no RNG
                                     draws), then materialised on `device` and initialised here
    init_parameters(model, seed)     every parameter from its own generator, seeded by (seed, its
                                     name): the same values whatever the order of construction,
                                     the device, the world size or the ZeRO stage
    assign(param, value)             write a whole tensor into a parameter, or only this rank's
                                     partition of it when ZeRO-3 has partitioned it

Why per parameter: under ZeRO-3 (deepspeed.zero.Init) each rank keeps only its partition of each
parameter as the model is built, so no rank ever holds the whole model; each rank then computes
the value of one parameter at a time on the host and keeps its slice. One global RNG stream drawn
in construction order could not give every rank the same values without building everything.

The rules (Llama's, as before): normal(0, init_std) for linear weights, normal(0, the model's
embed_init_std) for embeddings (init_std, or 1.0 with dynamic chunking: ModelConfig.embedding_init_std);
the projections that write into the residual stream (attention `wo`, MLP `w_down`, Mamba-2's `wo`)
scaled by 1/sqrt(2 * residual_layers); RMSNorm weights one (the gated norm of Mamba-2 too); a
linear layer marked `init = "identity"` (dynamic chunking's router, H-Net's choice) the identity,
one marked `init = "zeros"` (H-Net's residual projection) zero, weight and bias. Mamba-2's own
parameters follow mamba_ssm's Mamba2 init (state-spaces/mamba mamba_ssm/modules/mamba2.py): A_log =
log(A), A ~ U(1, 16); dt_bias = softplus^-1(dt), dt log-uniform in [1e-3, 1e-1] (floored at 1e-4);
D one; the depthwise convolution's weight and bias U(-1/sqrt(d_conv), 1/sqrt(d_conv)) (torch's
default for a Conv1d, which Mamba-2 keeps). A parameter of any other kind has no rule and is an
error, so that a new module cannot silently keep torch's default init.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from msllm.models.layers import RMSNorm
from msllm.models.mamba2 import Mamba2Mixer


def init_parameters(model: nn.Module, seed: int) -> None:
    """Initialise every parameter of `model` (tied ones once) from (seed, its name)."""
    std = model.init_std
    embed_std = getattr(model, "embed_init_std", None) or std
    residual_std = std / math.sqrt(2 * max(model.residual_layers, 1))
    owned = []  # (module name, module, parameter name, parameter), tied parameters once
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                owned.append((module_name, module, param_name, param))
    # One host buffer holds each whole value in turn: values of many sizes allocated and freed one
    # after another would leave the heap fragmented (glibc keeps such blocks: measured under ZeRO-3,
    # benchmarks/model-startup.md).
    scratch = torch.empty(max((_numel(p) for *_, p in owned), default=0))
    for module_name, module, param_name, param in owned:
        name = f"{module_name}.{param_name}" if module_name else param_name
        shape = tuple(param.ds_shape) if hasattr(param, "ds_shape") else tuple(param.shape)
        value = scratch[: _numel(param)].view(shape)
        kind = getattr(module, "init", None)
        generator = _generator(seed, name)
        if isinstance(module, RMSNorm):
            value.fill_(1.0)
        elif isinstance(module, nn.Linear) and kind == "zeros":
            value.zero_()
        elif isinstance(module, nn.Embedding) and param_name == "weight":
            value.normal_(0.0, embed_std, generator=generator)
        elif isinstance(module, nn.Linear) and param_name == "weight":
            if kind == "identity":
                value.copy_(torch.eye(shape[0], shape[1]))
            else:
                last = module_name.rsplit(".", 1)[-1]
                value.normal_(0.0, residual_std if last in ("wo", "w_down") else std, generator=generator)
        elif isinstance(module, nn.Conv1d) and kind == "mamba2":
            bound = 1.0 / math.sqrt(shape[-1] if param_name == "weight" else module.kernel_size[0])
            value.uniform_(-bound, bound, generator=generator)
        elif isinstance(module, Mamba2Mixer) and param_name in ("A_log", "D", "dt_bias"):
            value.copy_(_mamba2_value(param_name, shape, generator))
        else:
            raise TypeError(
                f"no init rule for parameter {name} of {type(module).__name__}: add one to msllm/models/init.py"
            )
        assign(param, value)


def _numel(param: torch.Tensor) -> int:
    return param.ds_numel if hasattr(param, "ds_numel") else param.numel()


def _mamba2_value(name: str, shape: tuple, generator: torch.Generator) -> torch.Tensor:
    """Mamba-2's init of its per-head parameters (module docstring)."""
    if name == "A_log":
        return torch.empty(shape).uniform_(1.0, 16.0, generator=generator).log()
    if name == "D":
        return torch.ones(shape)
    low, high = math.log(1e-3), math.log(1e-1)
    dt = (torch.rand(shape, generator=generator) * (high - low) + low).exp().clamp(min=1e-4)
    return dt + torch.log(-torch.expm1(-dt))  # softplus^-1(dt)


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@torch.no_grad()
def assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """param = value (a whole tensor of the parameter's shape, on any device). A parameter that
    ZeRO-3 has partitioned (it has `ds_tensor`) keeps only this rank's slice of the flattened
    value, as DeepSpeed lays partitions out: rank r holds elements [r*n, (r+1)*n) of the padded
    flat tensor, n = ds_tensor's length."""
    if hasattr(param, "ds_tensor"):
        part = param.ds_tensor
        n = part.numel()
        start = n * dist.get_rank(group=param.ds_process_group)
        flat = value.reshape(-1)
        kept = max(0, min(n, flat.numel() - start))
        if kept:
            part.narrow(0, 0, kept).copy_(flat.narrow(0, start, kept))
        return
    param.copy_(value)


# parameters_on_meta patches nn.Module.register_parameter, which every thread shares: the patch is
# installed while any thread is inside (a count under a lock) and acts only in the threads that are
# (a thread-local depth). A plain save-patch-restore lost the original when two threads overlapped
# (the second saved the first's patch and restored it for good: every later model was built on meta).
_REGISTER_PARAMETER = nn.Module.register_parameter
_ON_META = threading.local()
_PATCH_LOCK = threading.Lock()
_patch_users = 0


def _register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    if getattr(_ON_META, "depth", 0) and param is not None and param.device.type != "meta":
        param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
    _REGISTER_PARAMETER(module, name, param)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside (in this thread) put their parameters on the meta device (their buffers
    stay where they are: RoPE's frequencies are small and computed once). Their own init then draws
    nothing."""
    global _patch_users
    with _PATCH_LOCK:
        _patch_users += 1
        nn.Module.register_parameter = _register_parameter
    _ON_META.depth = getattr(_ON_META, "depth", 0) + 1
    try:
        yield
    finally:
        _ON_META.depth -= 1
        with _PATCH_LOCK:
            _patch_users -= 1
            if not _patch_users:
                nn.Module.register_parameter = _REGISTER_PARAMETER


def materialise(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Give every meta parameter real (uninitialised) storage on `device`; tied parameters stay
    tied. Buffers move to `device` too."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) not in made:
                made[id(param)] = nn.Parameter(
                    torch.empty(param.shape, dtype=param.dtype, device=device), requires_grad=param.requires_grad
                )
            setattr(module, name, made[id(param)])
    return model.to(device)
