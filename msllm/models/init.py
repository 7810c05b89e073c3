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

The rules (Llama's, as before): normal(0, init_std) for linear and embedding weights; the
projections that write into the residual stream (attention `wo`, MLP `w_down`) scaled by
1/sqrt(2 * residual_layers); RMSNorm weights one; a linear layer marked `init = "identity"` (dynamic
chunking's router, H-Net's choice) the identity. A parameter of any other kind has no rule and is
an error, so that a new module cannot silently keep torch's default init.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from typing import Iterator

import torch
from torch import nn

from msllm.models.layers import RMSNorm


def init_parameters(model: nn.Module, seed: int) -> None:
    """Initialise every parameter of `model` (tied ones once) from (seed, its name)."""
    std = model.init_std
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
        if isinstance(module, RMSNorm):
            value.fill_(1.0)
        elif isinstance(module, (nn.Linear, nn.Embedding)) and param_name == "weight":
            if getattr(module, "init", None) == "identity":
                value.copy_(torch.eye(shape[0], shape[1]))
            else:
                last = module_name.rsplit(".", 1)[-1]
                value.normal_(0.0, residual_std if last in ("wo", "w_down") else std, generator=_generator(seed, name))
        else:
            raise TypeError(f"no init rule for parameter {name} of {type(module).__name__}: add one to msllm/models/init.py")
        assign(param, value)


def _numel(param: torch.Tensor) -> int:
    return param.ds_numel if hasattr(param, "ds_numel") else param.numel()


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
        import torch.distributed as dist

        part = param.ds_tensor
        n = part.numel()
        start = n * dist.get_rank(group=param.ds_process_group)
        flat = value.reshape(-1)
        kept = max(0, min(n, flat.numel() - start))
        if kept:
            part.narrow(0, 0, kept).copy_(flat.narrow(0, start, kept))
        return
    param.copy_(value)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside put their parameters on the meta device (their buffers stay where they
    are: RoPE's frequencies are small and computed once). Their own init then draws nothing."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def materialise(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Give every meta parameter real (uninitialised) storage on `device`; tied parameters stay
    tied. Buffers move to `device` too."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) not in made:
                made[id(param)] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=device),
                                               requires_grad=param.requires_grad)
            setattr(module, name, made[id(param)])
    return model.to(device)
