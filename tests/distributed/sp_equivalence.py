"""Run under torchrun (gloo): the sequence-parallel forms of the halo exchange, DeepSpeed-Ulysses
attention and every architecture give, in float64, the outputs and input/parameter gradients of
the unsplit computation that every rank also does by itself.

    torchrun --nproc_per_node=2 tests/distributed/sp_equivalence.py
Prints one line `CHECKED <name> max_err=<e>` per check; exits non-zero on the first mismatch.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F

from msllm.config import ModelConfig, ScaleConfig
from msllm.distributed.dims import ParallelDims
from msllm.distributed.sequence import (
    HaloLocalAttention,
    UlyssesAttention,
    apply_sequence_parallel,
    previous_rank_tail,
)
from msllm.models import build_model
from msllm.models.attention import FullCausalAttention, local_attention
from msllm.models.registry import ARCHS, spec

TOL = 1e-10


def check(name: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    err = (got - expected).abs().max().item() if got.numel() else 0.0
    errs = torch.tensor([err], dtype=torch.float64)
    dist.all_reduce(errs, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        print(f"CHECKED {name} max_err={errs.item():.3g}", flush=True)
    if errs.item() > TOL:
        raise SystemExit(f"{name}: sequence-parallel result differs from the unsplit one by {errs.item():.3g}")


def my_slice(x: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    n = x.shape[dim] // size
    return x.narrow(dim, rank * n, n)


def check_op(name, op_full, op_split, x_full, dim, rank, size, out_dim=None):
    """Compare op_split on this rank's slice against op_full on the whole input: outputs, and the
    gradient of a random projection of the output with respect to the input. The sequence is
    dimension `dim` of the input and `out_dim` (default: the same) of the output."""
    out_dim = dim if out_dim is None else out_dim
    x_ref = x_full.clone().requires_grad_(True)
    y_ref = op_full(x_ref)
    g = torch.randn(y_ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    (y_ref * g).sum().backward()
    x_loc = my_slice(x_full, dim, rank, size).clone().requires_grad_(True)
    y_loc = op_split(x_loc)
    (y_loc * my_slice(g, out_dim, rank, size)).sum().backward()
    check(f"{name} forward", y_loc, my_slice(y_ref, out_dim, rank, size))
    check(f"{name} backward", x_loc.grad, my_slice(x_ref.grad, dim, rank, size))


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    sp = int(os.environ.get("SP", world))
    group = ParallelDims(world_size=world, rank=rank, sp=sp).sequence_parallel_group()
    sp_rank, sp_size = dist.get_rank(group), dist.get_world_size(group)
    torch.manual_seed(0)  # the same full inputs on every rank

    # Halo of the last 3 positions, used as a shift: y[t] = x[t - 3], zeros before the start.
    x = torch.randn(2, 16, 5, dtype=torch.float64)
    shift = lambda t: torch.cat((t.new_zeros(2, 3, 5), t[:, :-3]), dim=1)  # noqa: E731
    check_op(
        "halo-shift",
        shift,
        lambda t: torch.cat((previous_rank_tail(t, 3, 1, group), t[:, :-3]), dim=1),
        x,
        1,
        sp_rank,
        sp_size,
    )
    # Local attention with the halo of keys/values.
    qkv = torch.randn(3, 2, 4, 24, 8, dtype=torch.float64)
    halo = HaloLocalAttention(5, group)
    check_op(
        "halo-local-attention",
        lambda t: local_attention(t[0], t[1], t[2], 5),
        lambda t: halo(t[0], t[1], t[2]),
        qkv,
        3,
        sp_rank,
        sp_size,
        out_dim=2,
    )
    # Ulysses all-to-all attention.
    ulysses = UlyssesAttention(group)
    full = FullCausalAttention()
    check_op(
        "ulysses-attention",
        lambda t: full(t[0], t[1], t[2]),
        lambda t: ulysses(t[0], t[1], t[2]),
        qkv,
        3,
        sp_rank,
        sp_size,
        out_dim=2,
    )

    archs = {
        "vanilla": ([ScaleConfig(1, 2, "full")], {}),
        "vanilla-local": ([ScaleConfig(1, 2, "local", 6)], {}),
        "bottom_up": ([ScaleConfig(1, 1, "local", 6), ScaleConfig(2, 1, "full"), ScaleConfig(4, 1, "full")], {}),
        "top_down": ([ScaleConfig(1, 1, "local", 6), ScaleConfig(4, 1, "full"), ScaleConfig(2, 1, "local", 3)], {}),
        "retina": ([ScaleConfig(1, 2, "local", 6)], {}),
        # a window that is not a multiple of k: fine keys reach back w+k-2 positions, across the halo
        "retina-k4": ([ScaleConfig(1, 2, "local", 5)], {"retina_factor": 4, "retina_levels": 2}),
    }
    # Every registered architecture (msllm.models.registry) is checked: one not named above with its spec's tiny model.
    for arch in ARCHS:
        if arch not in archs:
            tiny = dict(spec(arch).tiny)
            archs[arch] = ([ScaleConfig(**scale) for scale in tiny.pop("scales")], tiny)
    own = {"retina": {"retina_factor": 2, "retina_levels": 3}, "bottom_up": {"aggregation": "attention"}}
    L = 32 * sp_size
    for name, (scales, fields) in archs.items():
        arch = name.split("-")[0]
        cfg = ModelConfig(
            arch=arch, vocab_size=50, d_model=16, n_heads=4, scales=scales, pooling="linear", **own.get(arch, {})
        )
        cfg = dataclasses.replace(cfg, **fields)
        torch.manual_seed(1)
        reference = build_model(cfg).double()
        split = apply_sequence_parallel(copy.deepcopy(reference), group)
        ids = torch.randint(0, 50, (2, L + 1), generator=torch.Generator().manual_seed(2))
        inputs, labels = ids[:, :-1], ids[:, 1:]
        logits = reference(inputs)
        F.cross_entropy(logits.reshape(-1, 50), labels.reshape(-1)).backward()
        local_logits = split(my_slice(inputs, 1, sp_rank, sp_size))
        loss = F.cross_entropy(local_logits.reshape(-1, 50), my_slice(labels, 1, sp_rank, sp_size).reshape(-1))
        loss.backward()
        check(f"{name} logits", local_logits, my_slice(logits, 1, sp_rank, sp_size))
        worst = 0.0
        for (_pname, p_ref), (_, p) in zip(reference.named_parameters(), split.named_parameters()):
            grad = p.grad.clone()
            dist.all_reduce(grad, group=group)  # the gradient averaging DeepSpeed does over ranks
            grad /= sp_size
            worst = max(worst, (grad - p_ref.grad).abs().max().item())
        check(f"{name} parameter gradients", torch.tensor([worst]), torch.tensor([0.0]))
    dist.barrier()
    if rank == 0:
        print("ALL CHECKS PASSED", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
