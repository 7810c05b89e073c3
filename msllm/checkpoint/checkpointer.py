"""The checkpointer: the one owner of a run's checkpoints (torchtitan's CheckpointManager is the model).

    save(step)       write checkpoint `step` of the TrainState: complete or not at all
    load()           resume: the newest checkpoint that verifies and fits this run, into the state
    verify(ckpt)     its files against the checksums of its meta.json
    prune()          keep the last `checkpoint.keep_last` (and always the last verified one)
    set_aside(...)   rename an unusable checkpoint out of the way, never delete it

When a checkpoint is due is the step plan's decision (msllm.train.schedule); what it holds is the
TrainState's (msllm.checkpoint.state). Every method is collective (every rank calls it) except
`set_aside` and `prune`, which rank 0 runs; rank 0 decides what touches the file system and every
rank learns the outcome (msllm.distributed.collectives: on_rank0, first_failure).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from msllm.checkpoint.files import (
    _TAG,
    COMPLETE,
    META,
    _first_sentence,
    _weights_finite,
    _write_synced,
    check_same_model,
    check_same_tokenizer,
    describe_write_error,
    file_digest,
    is_complete,
    latest_complete,
    list_complete,
    load_torch_file,
    read_meta,
    read_recipe,
    safe_loading,
    step_of,
    tag_for,
    verify_checkpoint,
)
from msllm.checkpoint.reshard import (
    Layout,
    check_global_batch,
    convert,
    load_universal,
    same_files_layout,
    universal_folder,
)
from msllm.checkpoint.state import TrainState
from msllm.distributed import collectives as dist
from msllm.distributed.env import say
from msllm.errors import CheckpointError, DivergenceError, ReshardError, UnsafeCheckpointError


class Checkpointer:
    def __init__(self, output_dir: str | Path, cfg, state: TrainState, dims):
        """`cfg` is the recipe's checkpoint section (keep_last, resume, restart_if_all_corrupt)."""
        self.root = Path(output_dir) / "checkpoints"
        self.cfg = cfg
        self.state = state
        self.dims = dims
        self.rank = dims.rank
        self.last_verified: Path | None = None  # never pruned: the newest checkpoint known to be good
        self.last_saved_step = -1

    def latest(self) -> Path | None:
        return latest_complete(self.root)

    # -- save ---------------------------------------------------------------------------------

    def save(self, step: int) -> Path:
        """Write checkpoint `step`. A write error of any kind (a full disk, a vanished folder, a file
        size limit) removes the partial folder, leaves earlier checkpoints untouched, and raises a
        one-line CheckpointError on every rank. Weights that are not all finite are never saved."""
        t0 = time.perf_counter()
        path = self.root / tag_for(step)
        engine = self.state.engine
        bad = torch.tensor([0.0 if _weights_finite(engine) else 1.0])
        dist.all_reduce_max(bad)
        if bad.item() > 0:
            raise DivergenceError(
                f"not saving checkpoint {path.name}: the weights hold NaN or inf values; {self.last_good()}"
            )
        # A cheap check first, so that a full disk is usually caught before anything is written.
        failure = dist.on_rank0(self._prepare_folder, path, engine)
        if not failure:
            in_deepspeed = True
            try:
                engine.save_checkpoint(
                    str(self.root), tag=path.name, client_state={"msllm": self.state.client_state()}, save_latest=False
                )
                in_deepspeed = False
                torch.save(self.state.rank_state(), path / f"trainer_state_rank{self.rank}.pt")
                if self.rank == 0:
                    for name, data in self.state.files().items():
                        (path / name).write_bytes(data)
            # torch.save reports a failed write as a RuntimeError ("unexpected pos", "basic_ios::clear"):
            # classified by type, never by its text.
            except (OSError, RuntimeError) as exc:
                failure = describe_write_error(exc, self.root)
                if in_deepspeed:
                    dist.barrier()  # DeepSpeed's save ends with a barrier the other ranks are waiting in
        self._raise_on_failure(dist.first_failure(failure), path)
        dist.barrier()
        self._raise_on_failure(dist.on_rank0(self._seal, path, step), path)
        self.last_verified, self.last_saved_step = path, step
        if self.rank == 0:
            self.prune()
        dist.barrier()
        say(f"saved checkpoint {path} ({time.perf_counter() - t0:.1f}s)")
        return path

    def _prepare_folder(self, path: Path, engine) -> str:
        """Rank 0: make the folder free for `path` and check the free space; the failure or ""."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if path.exists():
                shutil.rmtree(path)  # an incomplete attempt at the same step
            free = shutil.disk_usage(self.root).free
            need = _estimate_bytes(engine)
            if free < need:
                return (
                    f"no space left on device in {self.root}: needs about {need / 2**20:.1f} MiB, "
                    f"{free / 2**20:.1f} MiB free"
                )
        except OSError as exc:
            return describe_write_error(exc, self.root)
        return ""

    def _seal(self, path: Path, step: int) -> str:
        """Rank 0: checksums of every file, read back from disk (what resume, eval and export
        verify), then meta.json and COMPLETE; the failure or ""."""
        try:
            meta = self.state.meta()
            meta["files"] = {f.name: file_digest(f) for f in sorted(path.iterdir()) if f.is_file()}
            _write_synced(path / META, json.dumps(meta, indent=1) + "\n")
            # COMPLETE holds meta.json's checksum: an edited meta.json fails verification too.
            _write_synced(path / (COMPLETE + ".tmp"), f"step {step}\nmeta {file_digest(path / META)}\n")
            os.replace(path / (COMPLETE + ".tmp"), path / COMPLETE)
        except OSError as exc:
            return describe_write_error(exc, self.root)
        return ""

    def _raise_on_failure(self, failure: str, path: Path) -> None:
        if failure:
            if self.rank == 0:
                shutil.rmtree(path, ignore_errors=True)
            raise CheckpointError(f"could not save checkpoint {path}: {failure}; {self.last_good()}")

    def last_good(self) -> str:
        previous = self.last_verified if self.last_verified and is_complete(self.last_verified) else self.latest()
        return f"the last good checkpoint is {previous}" if previous else "there is no earlier checkpoint"

    # -- prune and set aside (rank 0) ------------------------------------------------------------

    def prune(self) -> None:
        """Keep the last `keep_last` complete checkpoints (0 keeps all), and always the last
        verified one; drop older incomplete ones. Folders set aside as corrupt are never touched."""
        done = list_complete(self.root)
        if self.cfg.keep_last:
            for old in done[: -self.cfg.keep_last]:
                if old != self.last_verified:
                    shutil.rmtree(universal_folder(old), ignore_errors=True)
                    shutil.rmtree(old, ignore_errors=True)
        if done:
            newest = step_of(done[-1])
            for p in self.root.iterdir():
                m = _TAG.match(p.name)
                if m and int(m.group(1)) < newest and not is_complete(p):
                    shutil.rmtree(p, ignore_errors=True)

    def set_aside(self, ckpt: Path, why: str, suffix: str = "corrupt") -> Path:
        """Rename an unusable checkpoint out of the way (never delete it) and say so in one line.
        Resume, eval, export and pruning no longer see it. Rank 0 only."""
        aside = ckpt.with_name(f"{ckpt.name}.{suffix}")
        n = 1
        while aside.exists():
            n += 1
            aside = ckpt.with_name(f"{ckpt.name}.{suffix}{n}")
        os.replace(ckpt, aside)
        if self.last_verified == ckpt:
            self.last_verified = None
        say(f"msllm: checkpoint {ckpt} is unusable ({why}): set aside as {aside.name}")
        return aside

    def set_aside_diverged(self, first_bad: int) -> str:
        """Set aside the checkpoints that hold the weights which gave the first non-finite gradients
        (the update of step first_bad - 1 made them); return where the run can resume from, in
        words. Collective."""

        def aside() -> str:
            for bad in list_complete(self.root):
                if step_of(bad) >= first_bad - 1:
                    self.set_aside(bad, f"its weights gave NaN or inf gradients at step {first_bad}", suffix="diverged")
            good = list_complete(self.root)
            return (
                f"the last good checkpoint is {good[-1]}: rerun with a lower train.lr to resume from it"
                if good
                else "no checkpoint before that is left: rerun with a lower train.lr to start over"
            )

        return dist.on_rank0(aside)

    # -- load (resume) ------------------------------------------------------------------------

    def load(self) -> Path | None:
        """Resume from the newest good checkpoint when the recipe resumes and there is one: load
        it into the state and return its path; None otherwise. A checkpoint whose files fail their
        checksums or cannot be read is set aside (renamed, kept) and the one before is tried; one
        that does not fit the recipe, or would run code, stops the run. A checkpoint saved on
        another layout (ranks, dp x sp, ZeRO stage) is loaded through DeepSpeed's universal format
        (msllm.checkpoint.reshard). When no checkpoint loads, `engine_touched` says whether a failed
        attempt may have left some of its values in the engine (the trainer then builds it anew)."""
        self.engine_touched = False
        if not self.cfg.resume:
            return None
        set_aside = 0
        while True:
            latest = self.latest()
            if latest is None:
                if set_aside:
                    self._restart_from_scratch(set_aside)
                return None
            problem = dist.on_rank0(verify_checkpoint, latest)
            if not problem:
                saved = self.check_resumable(latest)
                reshard = False
                try:
                    meta, loader_state, rng = self._load_files(latest, saved)
                    self.state.load(meta, loader_state, rng)
                    problem = ""
                except UnsafeCheckpointError:
                    raise
                except CheckpointError as exc:
                    problem, reshard = str(exc), isinstance(exc, ReshardError)
                problem = dist.first_failure(problem)
                if dist.any_rank(reshard):  # a sound checkpoint that this layout cannot take: kept, and a stop
                    raise ReshardError(problem)
                if not problem:
                    self.last_verified = latest
                    self.last_saved_step = self.state.step
                    self.engine_touched = False
                    return latest
            dist.on_rank0(self.set_aside, latest, problem)
            set_aside += 1

    def _restart_from_scratch(self, set_aside: int) -> None:
        """Every checkpoint was unusable: say so loudly, or stop if the recipe forbids a restart."""
        what = f"all {set_aside} checkpoint{'s' if set_aside > 1 else ''} in {self.root} were unusable and set aside"
        if not self.cfg.restart_if_all_corrupt:
            raise CheckpointError(
                f"{what}; checkpoint.restart_if_all_corrupt is false, so the run stops instead of "
                "starting again from step 0: repair or restore a checkpoint, or set it to true"
            )
        say(
            f"msllm: WARNING: {what}: training starts again from step 0 from the initial weights "
            "(set checkpoint.restart_if_all_corrupt: false to stop instead)"
        )

    def _load_files(self, ckpt: Path, saved: Layout) -> tuple[dict, dict, dict | None]:
        """Weights, optimizer and scheduler into the engine, directly or through the universal
        format; (the saved meta, the data loader's state, this rank's RNG state or None)."""
        now = Layout.of(self.state.recipe, self.dims.world_size)
        engine = self.state.engine
        if same_files_layout(saved, now):
            source = ckpt
        else:
            source = dist.on_rank0(self._converted, ckpt, saved)
        self.engine_touched = True
        try:
            with safe_loading(ckpt):
                if source == ckpt:
                    load_path, client = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name)
                else:
                    load_path, client = load_universal(engine, source)
        except CheckpointError:
            raise
        except (
            OSError,
            RuntimeError,
            KeyError,
            AssertionError,
            ValueError,
            TypeError,
            AttributeError,
            IndexError,
        ) as exc:
            if source != ckpt:
                raise ReshardError(
                    f"cannot resume {ckpt} (saved on {saved.describe()}) on {now.describe()}: loading "
                    f"{source.name} failed ({_first_sentence(exc)}); the checkpoint is kept as it is: "
                    "resume it on the ranks and ZeRO stage that saved it"
                ) from None
            raise CheckpointError(f"cannot load {source}: {_first_sentence(exc)}") from None
        if load_path is None:
            raise CheckpointError(f"cannot load {ckpt}: DeepSpeed found no checkpoint files there")
        if not isinstance(client, dict) or not isinstance(client.get("msllm"), dict):
            raise CheckpointError(f"{ckpt}: DeepSpeed's client state holds no msllm entry: not an msllm checkpoint")
        # The loader's state is the whole job's (the same on every saved rank): rank 0's is read.
        # The RNG streams: this rank's own when the layout is the same, or when the saved run had
        # a rank of this number; None (fresh streams) for ranks beyond the saved world.
        first = self._rank_file(ckpt, 0)
        rng = None
        if self.rank < saved.world_size:
            own = first if self.rank == 0 else self._rank_file(ckpt, self.rank)
            if "rng" not in own:
                raise CheckpointError(
                    f"the saved trainer state of rank {self.rank} has no rng entry: the checkpoint is "
                    "damaged; resume from an older one or start a new run.output_dir"
                )
            rng = own["rng"]
        return client["msllm"], first, rng

    @staticmethod
    def _rank_file(ckpt: Path, rank: int) -> dict:
        path = ckpt / f"trainer_state_rank{rank}.pt"
        if not path.is_file():
            raise CheckpointError(f"{ckpt} has no {path.name}: the checkpoint is incomplete")
        state = load_torch_file(path)
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} is not a trainer state: the checkpoint is damaged")
        return state

    def _converted(self, ckpt: Path, saved: Layout) -> Path:
        """Rank 0: the universal form of `ckpt`, converted once (msllm.checkpoint.reshard)."""
        folder = universal_folder(ckpt)
        if not folder.is_dir():
            say(f"converting {ckpt.name} (saved on {saved.describe()}) to DeepSpeed's universal format in {folder} ...")
        return convert(ckpt, saved.zero_stage)

    def check_resumable(self, ckpt: Path) -> Layout:
        """Raise a one-line CheckpointError unless this run can continue from `ckpt`: the same
        model, the same tokenizer, the same global batch (unless checkpoint.keep_global_batch is
        false) and a data order that the new number of nodes can keep. Any number of ranks, dp x
        sp and ZeRO stage will do. Returns the layout that saved it."""
        recipe, dims = self.state.recipe, self.dims
        saved_recipe = read_recipe(ckpt)
        check_same_model(ckpt, saved_recipe.model.to_dict(), recipe.model.to_dict())
        meta = read_meta(ckpt)
        check_same_tokenizer(ckpt, meta, self.state.tokenizer.sha256, recipe.data.shards_dir)
        try:
            saved_world = int(meta.get("world_size", 1))
            saved_stage = int(meta.get("zero_stage", saved_recipe.parallel.zero_stage))
        except (TypeError, ValueError):
            raise CheckpointError(
                f"{ckpt}/{META}: world_size is not a number: the file was edited or damaged"
            ) from None
        saved = Layout(
            saved_world,
            saved_recipe.parallel.sp,
            saved_stage,
            saved_recipe.train.micro_batch_size,
            saved_recipe.train.grad_accum_steps,
        )
        check_global_batch(ckpt, saved, Layout.of(recipe, dims.world_size), recipe.checkpoint.keep_global_batch)
        canonical = meta.get("num_canonical_nodes")
        if isinstance(canonical, int) and canonical > 0:
            check_canonical_nodes(ckpt, canonical, recipe.data.num_canonical_nodes, dims.world_size)
        return saved


def check_canonical_nodes(ckpt: Path, saved: int, wanted: int, world_size: int) -> None:
    """The global sample order of a run is fixed by its number of canonical nodes (streaming's
    elastic determinism); a resume keeps it, on a number of nodes that divides it or that it
    divides (streaming's rule)."""
    if wanted and wanted != saved:
        raise CheckpointError(
            f"{ckpt} was trained with data.num_canonical_nodes {saved}, this recipe sets {wanted}: it "
            f"fixes the order of the samples for the whole run; set it to {saved} (or 0)"
        )
    nodes = max(1, world_size // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))
    if saved % nodes and nodes % saved:
        raise CheckpointError(
            f"{ckpt}'s data order was fixed for {saved} canonical nodes (data.num_canonical_nodes); "
            f"{nodes} nodes neither divide it nor are a multiple of it: resume on a divisor or "
            f"multiple of {saved} nodes"
        )


def _estimate_bytes(engine) -> int:
    n = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
    return int(n * 4 * 4)  # weights + two Adam moments (+ master copy or slack), fp32


def finished_checkpoint(recipe) -> Path | None:
    """The checkpoint of a run that has nothing left to do: the newest complete one in
    run.output_dir, when the recipe resumes, it reached train.max_steps, verifies and holds the
    recipe's model. Read without DeepSpeed or the process group, so that a rerun of a finished
    training costs next to nothing; anything else (None) goes the whole way (resume and its rules)."""
    if not recipe.checkpoint.resume:
        return None
    latest = latest_complete(Path(recipe.run.output_dir) / "checkpoints")
    if latest is None:
        return None
    try:
        meta = read_meta(latest)
        # Only a checkpoint with recorded checksums can be known good without loading it.
        if not meta.get("files") or int(meta.get("step", 0)) < recipe.train.max_steps or verify_checkpoint(latest):
            return None
        saved = read_recipe(latest).model.to_dict()
    except (CheckpointError, TypeError, ValueError):
        return None
    wanted = recipe.model.to_dict()
    if wanted["vocab_size"] == 0:  # filled in from the tokenizer when the run started
        wanted["vocab_size"] = saved["vocab_size"]
    return latest if saved == wanted else None
