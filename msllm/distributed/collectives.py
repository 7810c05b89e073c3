"""The collectives msllm needs, and the two ways "rank 0 decides, every rank agrees" is written.

    init_distributed    start torch.distributed through DeepSpeed, on its accelerator's backend
    barrier, all_reduce_sum, all_reduce_max, broadcast_object, any_rank, all_gather_lists
    first_failure(msg)  every rank passes its failure ("" for none); every rank gets the first
                        rank's message: so that all ranks raise together, with the same reason
    on_rank0(fn)        run fn on rank 0 alone; every rank gets its value, or raises its error
    check_same_recipe   every rank was started with the same resolved recipe, or all stop with one
                        line naming the keys that differ (a rank given another --set would hang)
    lost_peer(exc)      the one-line error for a collective that failed because another rank died

Each is a no-op wrapper around the plain call when torch.distributed is not started (one process).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os

import torch

from msllm.distributed.env import DistEnv, check_master_resolves
from msllm.errors import MsllmError, PeerLostError, RecipeError, short_repr


def init_distributed(denv: DistEnv) -> None:
    """Start torch.distributed (through DeepSpeed, on its accelerator's backend) if not started."""
    import deepspeed  # noqa: PLC0415 (heavy: DeepSpeed)
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415 (heavy: DeepSpeed)

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(denv.local_rank)
    if denv.world_size > 1:
        check_master_resolves()  # one line naming MASTER_ADDR, not a rendezvous traceback
    deepspeed.init_distributed(
        dist_backend=get_accelerator().communication_backend_name(),
        auto_mpi_discovery=False,
        verbose=False,
        timeout=datetime.timedelta(minutes=60),
    )


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    if is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t


_host_group = None  # a gloo group over all ranks, when the default backend is not gloo


def _host():
    """The group of host-side collectives (gloo): the default one, or one made at the first call
    (every rank gets there at the same call)."""
    global _host_group
    if torch.distributed.get_backend() != "gloo" and _host_group is None:
        _host_group = torch.distributed.new_group(backend="gloo")
    return _host_group


def any_rank(flag: bool) -> bool:
    """Whether `flag` is true on any rank. A host-side all-reduce (gloo, on CPU tensors): it waits
    for the other ranks' hosts, never for an accelerator. Collective: every rank calls it."""
    if not is_initialized() or torch.distributed.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=_host())
    return bool(t.item())


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"train.max_steps": 12, ...} of a nested dict."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_same_recipe(resolved: dict) -> None:
    """Stop every rank with one RecipeError when the ranks were not given the same resolved recipe
    (`resolved`: Recipe.to_dict(), overrides applied; run.seed included): a rank with other steps,
    sizes or seed would otherwise wait forever in a collective the others never reach. One
    all-gather of a sha256 per rank; only when they differ, the flattened recipes of the ranks
    that differ from rank 0 are gathered to name the keys. Collective: every rank calls it, right
    after the process group starts."""
    if not is_initialized() or torch.distributed.get_world_size() == 1:
        return
    text = json.dumps(resolved, sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()
    world = torch.distributed.get_world_size()
    digests: list = [None] * world
    torch.distributed.all_gather_object(digests, digest, group=_host())
    if len(set(digests)) == 1:
        return
    rank = torch.distributed.get_rank()
    mine = flatten(resolved) if rank == 0 or digests[rank] != digests[0] else None
    recipes: list = [None] * world
    torch.distributed.all_gather_object(recipes, mine, group=_host())
    reference, missing = recipes[0], object()
    differences = []
    for other, flat in enumerate(recipes):
        if flat is None or other == 0:
            continue
        keys = sorted(k for k in set(reference) | set(flat) if reference.get(k, missing) != flat.get(k, missing))
        shown = "; ".join(f"{k} {short_repr(flat.get(k), 40)} vs {short_repr(reference.get(k), 40)}" for k in keys[:4])
        differences.append(f"rank {other} vs rank 0: {shown}{' ...' if len(keys) > 4 else ''}")
    raise RecipeError(
        f"the ranks were started with different recipes ({'; '.join(differences[:2])}"
        f"{f'; and {len(differences) - 2} more ranks' if len(differences) > 2 else ''}): start every rank with "
        "the same recipe file and the same --set overrides"
    )


def broadcast_object(obj, src: int = 0):
    if is_initialized() and torch.distributed.get_world_size() > 1:
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def all_gather_lists(values: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank. Collective."""
    if not is_initialized() or torch.distributed.get_world_size() == 1:
        return list(values)
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, values)
    return [v for part in gathered for v in part]


def first_failure(failure: str) -> str:
    """The failure of the lowest rank that has one ("" on every rank when none has), on every rank.
    Collective: every rank calls it, with its own failure or "". One all-reduce when nothing failed."""
    flag = torch.tensor([1.0 if failure else 0.0])
    all_reduce_max(flag)
    if flag.item() == 0:
        return ""
    if not is_initialized() or torch.distributed.get_world_size() == 1:
        return failure
    failures: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(failures, failure)
    return next(f for f in failures if f)


def on_rank0(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` on rank 0 only; every rank returns its value. When it raises, rank 0
    re-raises its exception and the other ranks raise one of the same MsllmError type with the same
    message (any other exception: an MsllmError naming it), so that no rank waits for a rank that
    has failed. Collective: every rank calls it; the value must be picklable."""
    rank = torch.distributed.get_rank() if is_initialized() else 0
    error: BaseException | None = None
    outcome = None
    if rank == 0:
        try:
            outcome = ("value", fn(*args, **kwargs))
        except Exception as exc:  # told to every rank, then re-raised here
            error = exc
            kind = type(exc) if isinstance(exc, MsllmError) else MsllmError
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            outcome = ("error", (kind, message if isinstance(exc, MsllmError) else f"rank 0 failed: {message}"))
    outcome = broadcast_object(outcome)
    if outcome[0] == "value":
        return outcome[1]
    if error is not None:
        raise error
    kind, message = outcome[1]
    raise kind(message)


# What a collective's error says when the process at the other end is gone: gloo's "Read error ...
# Connection reset by peer" (or closed, or a broken pipe on write), the TCPStore's, NCCL's remote error.
_PEER_GONE = (
    "connection reset by peer",
    "connection closed by peer",
    "broken pipe",
    "ncclremoteerror",
    "remote process exit",
)


def lost_peer(exc: BaseException, last_checkpoint: str) -> PeerLostError | None:
    """The one-line error for `exc`, a collective (or the store) that failed because another rank
    died or its node was lost (a kill -9, an out-of-memory kill, a lost machine); None for any other
    error. The lost rank is named when it is knowable: with two ranks, it is the other one (gloo
    names only an address). `last_checkpoint`: what a rerun resumes from, in words."""
    seen, cause = set(), exc
    while cause is not None and id(cause) not in seen:  # the error itself or one it was raised from
        seen.add(id(cause))
        if isinstance(cause, RuntimeError) and any(s in str(cause).lower() for s in _PEER_GONE):
            break
        cause = cause.__cause__ or cause.__context__
    else:
        return None
    if is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    who = f"rank {1 - rank}" if world == 2 else "a peer rank"
    return PeerLostError(
        f"lost {who} of the job (its connection was reset: the process died or its node was lost), so "
        f"rank {rank} stops too: rerun the same command: training resumes from {last_checkpoint}"
    )
