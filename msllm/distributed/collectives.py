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
import socket
import time

import torch

from msllm.distributed.env import START_TIMEOUT_ENV, DistEnv, check_master_resolves, start_timeout_s
from msllm.errors import LauncherError, MsllmError, PeerLostError, RecipeError, first_line, short_repr

# How long a collective may wait for the other ranks once all have started (a checkpoint written
# by rank 0 alone, an eval on one rank, may hold the others at a barrier that long).
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=60)
WAITING_NOTE_AFTER_S = 10.0  # a start still waiting after this says whom it waits for


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
        # Started here on a store whose rendezvous is bounded and says whom it waits for
        # (DeepSpeed's env:// start waits the whole PROCESS_GROUP_TIMEOUT in silence); DeepSpeed
        # then adopts the started group. A bound device, as DeepSpeed gives it on CUDA.
        device = get_accelerator().device_name()
        torch.distributed.init_process_group(
            get_accelerator().communication_backend_name(),
            store=rendezvous(denv),
            rank=denv.rank,
            world_size=denv.world_size,
            timeout=PROCESS_GROUP_TIMEOUT,
            **({"device_id": torch.device(device, denv.local_rank)} if device == "cuda" else {}),
        )
    deepspeed.init_distributed(
        dist_backend=get_accelerator().communication_backend_name(),
        auto_mpi_discovery=False,
        verbose=False,
        timeout=PROCESS_GROUP_TIMEOUT,
    )


def rendezvous(denv: DistEnv) -> torch.distributed.TCPStore:
    """The job's store at MASTER_ADDR:MASTER_PORT once every rank has reached it, within
    MSLLM_START_TIMEOUT (msllm.distributed.env.start_timeout_s). A rank still waiting after
    WAITING_NOTE_AFTER_S prints whom it waits for, where and how long; at the bound it stops with
    one LauncherError naming the ranks that never came (or rank 0, whose store never opened).

    Rank 0 hosts the store, unless torchrun's agent already does at that address (as torch's own
    env:// rendezvous decides). Each rank marks itself present under a key of this start (a
    torchrun restart reuses the agent's store: the key names the restart)."""
    host, port, world = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), denv.world_size
    where, limit = f"{host}:{port}", start_timeout_s()
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    prefix = f"msllm/start/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    hosts = denv.rank == 0 and not agent
    started = time.monotonic()
    waiting = _WaitingNote(started, limit)
    # A client waits for the server's port with plain connects: a TCPStore's own retries print a
    # C++ stack trace at each failed attempt.
    while not hosts and not _listening(host, port):
        waiting.say(f"rank {denv.rank}: waiting for rank 0 to open the job's store at {where}")
        if time.monotonic() - started >= limit:
            raise LauncherError(
                f"rank {denv.rank}: rank 0 did not open the job's store at {where} within {limit:g} s "
                f"({START_TIMEOUT_ENV}): start rank 0 with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE, "
                "or check that this host reaches it"
            )
        time.sleep(0.5)
    try:
        store = torch.distributed.TCPStore(
            host,
            port,
            world,
            is_master=hosts,
            timeout=datetime.timedelta(seconds=max(1.0, started + limit - time.monotonic())),
            wait_for_workers=False,
            multi_tenant=True,
        )
    except torch.distributed.DistNetworkError as exc:
        what = "open" if hosts else "reach"  # rank 0: MASTER_PORT taken; another: the server went away
        raise LauncherError(
            f"launcher environment: rank {denv.rank} cannot {what} the job's store at {where} ({first_line(exc)}): "
            + ("set MASTER_PORT to a free port" if hosts else "check that rank 0 is running and reachable")
        ) from None
    try:
        store.set(f"{prefix}/rank/{denv.rank}", "1")
        arrived = store.add(f"{prefix}/arrived", 1)
        while arrived < world:
            waiting.say(f"waiting for {world - arrived} more rank(s) at {where}")
            if time.monotonic() - started >= limit:
                missing = [r for r in range(world) if not store.check([f"{prefix}/rank/{r}"])]
                shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
                raise LauncherError(
                    f"rank(s) {shown} of {world} did not join the job at {where} within {limit:g} s "
                    f"({START_TIMEOUT_ENV}): start them with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE, "
                    "or check that they reach it"
                )
            time.sleep(0.2)
            arrived = store.add(f"{prefix}/arrived", 0)
    except torch.distributed.DistError:  # rank 0 gave up first (and said whom it waited for), or died
        raise LauncherError(
            f"rank {denv.rank}: the job's store at {where} closed before every rank joined: rank 0 stopped "
            f"(its own line says why; a rank that never started stops it after {START_TIMEOUT_ENV})"
        ) from None
    store.set_timeout(PROCESS_GROUP_TIMEOUT)
    return store


class _WaitingNote:
    """The line a rank prints, once, when the start has taken WAITING_NOTE_AFTER_S (or half the
    bound, if shorter): who is awaited, where, and how long it will wait (stdout, with the rank's
    other progress lines). Asked before each check of the bound, so it always comes before the
    line that gives up."""

    def __init__(self, started: float, limit: float):
        self.started, self.limit, self.printed = started, limit, False
        self.after = min(WAITING_NOTE_AFTER_S, limit / 2)

    def say(self, who: str) -> None:
        if self.printed or time.monotonic() - self.started < self.after:
            return
        self.printed = True
        print(f"{who} (up to {self.limit:g} s; set {START_TIMEOUT_ENV} to change)", flush=True)


def _listening(host: str, port: int) -> bool:
    """Whether something accepts connections at host:port now."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


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
