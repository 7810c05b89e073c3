"""The training state: everything a checkpoint holds, and the one place that decides it.

    TrainState.meta()         what every rank agrees on: step, tokens seen, the architecture, ZeRO
                              stage, world size, the tokenizer's sha256, the run record; meta.json
                              holds it with the checksums, DeepSpeed's client state with the recipe
                              (client_state())
    TrainState.rank_state()   what differs per rank: the RNG states (python, numpy, torch, the
                              accelerator's) and the data loader's position in its epoch
    TrainState.files()        the resolved recipe and the tokenizer, as bytes
    TrainState.load(meta, rank_state)    the way back

The weights, optimizer and scheduler are the engine's (DeepSpeed saves them in its own files); the
state holds the engine so that the checkpointer saves and loads everything from one object. The
tokenizer's bytes are read once, when the run starts, so that a checkpoint holds the tokenizer
the run was trained with even if the shards folder changes or disappears while it trains.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from msllm.errors import CheckpointError, DataError


@dataclass(frozen=True)
class Tokenizer:
    """The tokenizer a run was started with: its bytes, their sha256, and where they came from."""

    data: bytes
    sha256: str
    path: str

    @classmethod
    def read(cls, path: str | Path, expected_sha256: str) -> Tokenizer:
        """Read once; a file that no longer has the sha256 the shards were checked with changed
        between the check and now: a one-line DataError."""
        path = Path(path)
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        if sha != expected_sha256:
            raise DataError(
                f"{path} changed while the run started (sha256 {sha[:12]}..., the shards were checked "
                f"with {expected_sha256[:12]}...): is `msllm prep` writing to this shards folder?"
            )
        return cls(data, sha, str(path.resolve()))


class TrainState:
    def __init__(
        self,
        recipe,
        engine,
        loader,
        tokenizer: Tokenizer,
        world_size: int,
        run_record: dict,
        param_names: list[str] | None = None,
    ):
        self.recipe = recipe
        self.param_names = param_names or []  # the optimizer's order (msllm.checkpoint.reshard needs it)
        self.engine = engine
        self.loader = loader
        self.tokenizer = tokenizer
        self.world_size = world_size
        self.run_record = run_record
        self.step = 0
        self.tokens = 0  # tokens seen: every rank of the job together

    def meta(self) -> dict:
        r = self.recipe
        return {
            "step": self.step,
            "tokens": self.tokens,
            "arch": r.model.arch,
            "zero_stage": r.parallel.zero_stage,
            "world_size": self.world_size,
            # streaming's number of canonical nodes: it fixes the global order of the samples
            "num_canonical_nodes": self.loader.state_dict().get("num_canonical_nodes"),
            "tokenizer_path": self.tokenizer.path,
            "tokenizer_sha256": self.tokenizer.sha256,
            "run_record": self.run_record,
        }

    def client_state(self) -> dict:
        """What DeepSpeed keeps with the weights: the meta and the resolved recipe."""
        return {**self.meta(), "recipe": self.recipe.to_dict(), "param_names": self.param_names}

    def rank_state(self) -> dict:
        return {"rng": rng_state(), "dataloader": self.loader.state_dict(), "step": self.step}

    def files(self) -> dict[str, bytes]:
        return {"recipe.yaml": self.recipe.to_yaml().encode(), "tokenizer.model": self.tokenizer.data}

    def load(self, meta: dict, loader_state: dict, rng: dict | None) -> None:
        """Continue from a checkpoint's meta, the data loader's state (the whole job's: streaming
        counts the samples of every rank) and this rank's RNG state, or fresh streams seeded from
        (run.seed, step, rank) when the saved run had no rank of this number (the engine is loaded
        by the checkpointer, from DeepSpeed's files)."""
        if "dataloader" not in loader_state:
            raise CheckpointError(
                "the saved trainer state has no dataloader entry: the checkpoint is damaged; "
                "resume from an older one or start a new run.output_dir"
            )
        self.step = int(meta["step"])
        self.tokens = int(meta["tokens"])
        self.loader.load_state_dict(loader_state["dataloader"])
        if rng is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            seed_streams(self.recipe.run.seed, self.step, rank)
        else:
            set_rng_state(rng)


def seed_streams(seed: int, step: int, rank: int) -> None:
    """Seed python's, numpy's and torch's generators for `rank` from (seed, step, rank): the
    streams of a rank that a resumed run has and the run that saved it had not."""
    mixed = int.from_bytes(hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()[:8], "little") & (2**63 - 1)
    random.seed(mixed)
    np.random.seed(mixed % 2**32)
    torch.manual_seed(mixed)


def rng_state() -> dict:
    """The RNG states, as tensors and plain values only (so that they load weights-only)."""
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415 (heavy: DeepSpeed)

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        state["accelerator"] = acc.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415 (heavy: DeepSpeed)

    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "accelerator" in state and get_accelerator().device_name() != "cpu":
        get_accelerator().set_rng_state(state["accelerator"])
