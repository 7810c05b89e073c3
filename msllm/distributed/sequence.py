"""Sequence parallelism for the multi-scale models, applied from outside the model code.

The ranks of a sequence-parallel group hold contiguous, equal slices of one sample: rank r holds
positions r*L/sp .. (r+1)*L/sp - 1 at the tokens, and the same fraction of every coarser scale.
`apply_sequence_parallel` swaps the few modules that look across positions for forms that talk
to the other ranks of the group:

- local attention (fine scales, and retina's fine level): the previous rank's last w keys and
  values (retina: w rounded up to a multiple of k) -- a halo exchange, O(w * d) per layer
  whatever L is;
- causal pooling's shift: the previous rank's last k-1 positions (a halo exchange);
- full attention (coarse scales): DeepSpeed-Ulysses, an all-to-all that trades the sequence split
  for a head split, attention over the whole scale, and the reverse all-to-all;
- retina's pooled distant keys: all-gathered over the group (L/k long, small; its module is
  retina's own, msllm/models/retina/parallelize.py, built on the primitives here);
- RoPE: positions counted from the rank's first position (passed explicitly, as to the
  attention kernels).

Each exchange is an autograd function whose backward returns the gradient to the rank that owns
the tensor, so the gradients are those of the unsplit model. With each rank averaging its loss over
its own tokens and gradients averaged over all dp * sp ranks (DeepSpeed's default), sp = N takes the
same optimizer step as sp = 1.
"""

from __future__ import annotations

import importlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from msllm.models.attention import LocalCausalAttention, local_attention
from msllm.models.layers import Rotary, ShiftRight, shift_right
from msllm.models.registry import SPECS
from msllm.models.spec import LOCAL, UNSUPPORTED


class _FromPreviousRank(torch.autograd.Function):
    """Forward: each rank receives the previous rank's `tail` (rank 0 receives zeros).
    Backward: the gradient of what was received goes back to the rank that sent it."""

    @staticmethod
    def forward(ctx, tail: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _shift_along_group(tail.contiguous(), group, +1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _shift_along_group(grad.contiguous(), ctx.group, -1), None


def _shift_along_group(x: torch.Tensor, group: dist.ProcessGroup, step: int) -> torch.Tensor:
    """Send x to group rank (r + step) and receive from rank (r - step); zeros where no one sends."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    received = torch.zeros_like(x)
    ops = []
    if 0 <= rank + step < size:
        ops.append(dist.P2POp(dist.isend, x, dist.get_global_rank(group, rank + step), group))
    if 0 <= rank - step < size:
        ops.append(dist.P2POp(dist.irecv, received, dist.get_global_rank(group, rank - step), group))
    for work in dist.batch_isend_irecv(ops) if ops else []:
        work.wait()
    return received


class _GatherSequence(torch.autograd.Function):
    """Concatenate every rank's `x` along `dim`, in rank order. Backward: each rank gets the sum,
    over the group, of the gradients of its own part (an all-reduce: these tensors are small, and
    gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        size = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        mine = grad.chunk(dist.get_world_size(ctx.group), dim=ctx.dim)[dist.get_rank(ctx.group)]
        return mine, None, None


def gather_sequence(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """The whole sequence of `x` along `dim`, from every rank's slice (differentiable)."""
    return _GatherSequence.apply(x, dim, group)


def previous_rank_tail(x: torch.Tensor, n: int, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """The last `n` positions (along `dim`) of the previous rank's slice; zeros on the first rank."""
    return _FromPreviousRank.apply(x.narrow(dim, x.shape[dim] - n, n), group)


def previous_rank_keys(k: torch.Tensor, v: torch.Tensor, n: int, group: dist.ProcessGroup):
    """Keys and values [B, H, n, D] of the previous rank's last `n` positions (the halo of local
    and retina attention), in one message. The first rank receives zeros, which stand at negative
    positions and are masked; they stay in the graph so that its backward sends the matching
    gradient message."""
    kv = previous_rank_tail(torch.stack((k, v)), n, 3, group)
    return kv[0], kv[1]


class GroupMember:
    """What every sequence-parallel module knows: its group and its place in it."""

    def _join(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.sp_rank = dist.get_rank(group)
        self.sp_size = dist.get_world_size(group)

    def first_position(self, x: torch.Tensor, dim: int) -> int:
        """Position of this rank's first element of `x` in the whole sequence (equal slices)."""
        return self.sp_rank * x.shape[dim]


class HaloShiftRight(ShiftRight, GroupMember):
    """Causal pooling's shift, filled with the previous rank's last positions."""

    def __init__(self, shift: int, group: dist.ProcessGroup):
        super().__init__(shift)
        self._join(group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return shift_right(x, previous_rank_tail(x, self.shift, 1, self.group))


class SlicedRotary(Rotary, GroupMember):
    """RoPE of a slice: positions counted from the slice's first position in the whole sequence."""

    def __init__(self, rotary: Rotary, group: dist.ProcessGroup):
        nn.Module.__init__(self)
        self.register_buffer("inv_freq", rotary.inv_freq, persistent=False)
        self._join(group)

    def forward(self, q: torch.Tensor, k: torch.Tensor, first_position: int = 0):
        return super().forward(q, k, first_position=self.first_position(q, dim=-2))


class HaloLocalAttention(LocalCausalAttention, GroupMember):
    """Sliding-window attention whose first queries see the previous rank's last w keys."""

    def __init__(self, window: int, group: dist.ProcessGroup):
        super().__init__(window)
        self._join(group)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        past = previous_rank_keys(k, v, self.window, self.group)
        return local_attention(q, k, v, self.window, past, first_position=self.first_position(q, dim=2))


class UlyssesAttention(nn.Module, GroupMember):
    """Full causal attention over a split sequence through DeepSpeed-Ulysses: all-to-all from
    [B, L/sp, H, D] to [B, L, H/sp, D], causal SDPA over the whole scale, and back."""

    def __init__(self, group: dist.ProcessGroup):
        super().__init__()
        from deepspeed.sequence.layer import DistributedAttention  # noqa: PLC0415 (heavy: DeepSpeed)

        self._join(group)
        self.attention = DistributedAttention(_SdpaOverSequenceDim(), group, scatter_idx=2, gather_idx=1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D] -> [B, L, H, D]
        return self.attention(q, k, v, batch_dim_idx=0).transpose(1, 2)


class _SdpaOverSequenceDim(nn.Module):
    """Causal SDPA on [B, L, H, D] tensors, as DistributedAttention hands them over."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


def apply_sequence_parallel(model: nn.Module, group: dist.ProcessGroup | None) -> nn.Module:
    """Swap a built model's cross-position modules for their sequence-parallel forms, in place.
    They call torch.distributed's collectives directly (through this module's `dist`, and
    DeepSpeed-Ulysses through deepspeed.comm): `msllm bench sequence-parallel` counts the bytes
    sent by wrapping those (msllm.bench.sequence_parallel.count_traffic).

    What each module becomes is its architecture's spec's say (msllm.models.spec: a kind of SWAPS
    below, local, or unsupported); a module class no spec declares is refused, never left as it is.
    The parameters are untouched (none of these modules has any), so checkpoints are the same
    with or without sequence parallelism. Returns the model.
    """
    if group is None:
        return model
    kinds = _module_kinds(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            kind = kinds.get(type(child))
            if kind is None:
                raise TypeError(
                    f"{type(child).__name__} ({name} in {type(parent).__name__}) is declared by no "
                    "architecture's spec (msllm.models.spec): declare its sequence-parallel kind"
                )
            swap = SWAPS.get(kind) or own_swap(kind)
            if swap is not None:
                setattr(parent, name, swap(child, group))
            elif kind != LOCAL:
                raise ValueError(f"{type(child).__name__} does not run under sequence parallelism ({kind})")
    return model


# What each shared kind an architecture's spec declares (msllm.models.spec) is swapped for; an
# architecture's own module names its swap by its dotted path (retina's: retina/parallelize.py).
SWAPS = {
    "halo_attention": lambda child, group: HaloLocalAttention(child.window, group),
    "ulysses": lambda child, group: UlyssesAttention(group),
    "halo_shift": lambda child, group: HaloShiftRight(child.shift, group),
    "sliced_rotary": lambda child, group: SlicedRotary(child, group),
}


def own_swap(kind: str):
    """An architecture's own swap, which its spec names by the dotted path of a function
    (module, group) -> module ("msllm.models.retina.parallelize.sequence_parallel"); None otherwise."""
    if kind in (LOCAL, UNSUPPORTED) or "." not in kind:
        return None
    module, _, name = kind.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _module_kinds(model: nn.Module) -> dict[type, str]:
    """{module class: kind} for the architecture `model` is (by its class, in the registry)."""
    for arch in SPECS.values():
        if type(model) is arch.model:
            return arch.module_kinds()
    # A bare module (tests swap single blocks): the shared building blocks and every architecture's own.
    kinds: dict[type, str] = {}
    for arch in SPECS.values():
        kinds.update(arch.module_kinds())
    return kinds
