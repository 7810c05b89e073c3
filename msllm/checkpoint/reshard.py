"""Resuming on another layout: a checkpoint is a statement about the model and the data position,
not about the ranks that wrote it.

What may change between a save and a resume: the number of ranks, dp, sp, the ZeRO stage (0-3),
and micro-batch with accumulation, as long as the global batch (micro x accumulation x dp) stays
the same (`checkpoint.keep_global_batch: false` lets it change). What may not: the tokenizer and
the model (checked before anything is loaded, msllm.checkpoint.files).

How each part continues:
- weights, optimizer, scheduler: on the same world size and ZeRO stage, and between ZeRO-0 runs
  of any size (ZeRO-0's model-states file holds everything), DeepSpeed loads its own files. Any
  other change goes through DeepSpeed's universal checkpoint format (Universal Checkpointing,
  arXiv 2406.18820): rank 0 converts the checkpoint once into `step_NNNNNNN.universal/` beside it
  (written under a `.partial` name, sealed with the checksums of every file, then renamed; the
  original is only read), with deepspeed.checkpoint.ds_to_universal for ZeRO 1-3 and
  `zero0_to_universal` here for ZeRO 0. A ZeRO 1-3 (or bf16) engine loads it with DeepSpeed's
  load_universal; a ZeRO-0 fp32 engine, whose optimizer is torch's AdamW, from the same files
  here (`load_universal_into_plain`).
- the data position: streaming's loader state is global (epoch, sample in epoch over the whole
  job, and num_canonical_nodes, which fixes the global sample order whatever the number of
  ranks), so every rank continues from rank 0's.
- the RNG streams: rank r continues the streams saved by rank r when the layout is the same;
  otherwise from rank r's if the saved run had a rank r, and ranks beyond the saved world start
  streams seeded from (run.seed, step, rank). (msllm.checkpoint.state.TrainState.load)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from msllm.checkpoint.files import _first_sentence, file_digest, safe_loading
from msllm.errors import CheckpointError, ReshardError

UNIVERSAL = ".universal"
SEAL = "UNIVERSAL_COMPLETE"  # checksums of every file of a converted folder, written last


@dataclass(frozen=True)
class Layout:
    """How a run is laid out over its ranks: what may differ between a save and a resume."""

    world_size: int
    sp: int
    zero_stage: int
    micro_batch_size: int
    grad_accum_steps: int

    @property
    def dp(self) -> int:
        return self.world_size // self.sp

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.dp

    def describe(self) -> str:
        return (
            f"{self.world_size} rank{'s' if self.world_size > 1 else ''} (dp {self.dp} x sp {self.sp}), ZeRO "
            f"{self.zero_stage}, global batch {self.global_batch} = micro {self.micro_batch_size} x accum "
            f"{self.grad_accum_steps} x dp {self.dp}"
        )

    @classmethod
    def of(cls, recipe, world_size: int) -> Layout:
        return cls(
            world_size,
            recipe.parallel.sp,
            recipe.parallel.zero_stage,
            recipe.train.micro_batch_size,
            recipe.train.grad_accum_steps,
        )


def same_files_layout(saved: Layout, now: Layout) -> bool:
    """Whether DeepSpeed can load the saved files as they are: the same ZeRO stage and world size
    (it splits ZeRO 1-3 states by rank), or ZeRO 0 on both sides (one file holds everything)."""
    if saved.zero_stage == now.zero_stage == 0:
        return True
    return saved.zero_stage == now.zero_stage and saved.world_size == now.world_size


def check_global_batch(ckpt: Path, saved: Layout, now: Layout, keep: bool) -> None:
    """A one-line CheckpointError when the global batch would change and the recipe keeps it,
    naming the `--set` that keeps it."""
    if not keep or saved.global_batch == now.global_batch:
        return
    per_step = now.micro_batch_size * now.dp
    if saved.global_batch % per_step == 0:
        fix = f"--set train.grad_accum_steps={saved.global_batch // per_step}"
    else:
        fix = (
            f"a train.micro_batch_size x train.grad_accum_steps of {saved.global_batch // now.dp} "
            "per data-parallel rank"
            if saved.global_batch % now.dp == 0
            else f"a data-parallel degree that divides {saved.global_batch}"
        )
    raise CheckpointError(
        f"{ckpt} was trained with a global batch of {saved.global_batch} ({saved.describe()}); this run has "
        f"{now.global_batch} ({now.describe()}): resume with {fix} to keep it, or set "
        "checkpoint.keep_global_batch: false to change it"
    )


# -- conversion (rank 0) ------------------------------------------------------------------------


def universal_folder(ckpt: Path) -> Path:
    return ckpt.with_name(ckpt.name + UNIVERSAL)


def convert(ckpt: Path, saved_zero_stage: int) -> Path:
    """Rank 0: the universal form of `ckpt` beside it, converted now unless a sealed one that
    passes its checksums is there already. The original is only read."""
    out = universal_folder(ckpt)
    if out.is_dir():
        if not verify_universal(out):
            return out
        shutil.rmtree(out)  # damaged: convert again (the original is the source of truth)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with safe_loading(ckpt):
            if saved_zero_stage == 0:
                zero0_to_universal(ckpt, partial)
            else:
                ds_to_universal(ckpt, partial)
            _both_model_state_names(partial, ckpt)
            _optimizer_state_for_every_stage(partial, ckpt)
        _seal(partial)
        os.replace(partial, out)
    except (
        CheckpointError,
        OSError,
        RuntimeError,
        KeyError,
        ValueError,
        TypeError,
        AssertionError,
        AttributeError,
    ) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise ReshardError(
            f"cannot convert {ckpt} to DeepSpeed's universal format: {_first_sentence(exc)}; the "
            "checkpoint is kept as it is: resume it on the ranks and ZeRO stage that saved it"
        ) from None
    return out


def _both_model_state_names(folder: Path, ckpt: Path) -> None:
    """A ZeRO-3 engine reads the scheduler and client state of a universal folder from
    `zero_pp_rank_0_mp_rank_00_model_states.pt`, the others from `mp_rank_00_model_states.pt`
    (neither reads weights from it: they come from zero/): give the folder both names."""
    names = (MODEL_STATES, "zero_pp_rank_0_" + MODEL_STATES)
    present = [folder / n for n in names if (folder / n).is_file()]
    source = present[0] if present else next(iter(sorted(ckpt.glob("*model_states.pt"))), None)
    if source is None:
        raise CheckpointError(f"{ckpt} holds no model-states file")
    for name in names:
        if not (folder / name).is_file():
            shutil.copy2(source, folder / name)


def ds_to_universal(ckpt: Path, out: Path) -> None:
    """DeepSpeed's converter for ZeRO 1-3 checkpoints, in this process, its prints kept off the
    console. `inject_missing_state`: msllm's models carry no universal-checkpoint info of their
    own (they have no tensor-parallel slices to describe)."""
    from deepspeed.checkpoint import ds_to_universal as converter  # noqa: PLC0415 (heavy: DeepSpeed)

    args = argparse.Namespace(
        input_folder=str(ckpt),
        output_folder=str(out),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        converter.main(args)


MODEL_STATES = "mp_rank_00_model_states.pt"


def zero0_to_universal(ckpt: Path, out: Path) -> None:
    """A ZeRO-0 checkpoint in the universal layout: zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt
    per parameter, zero/optimizer_state.pt with the parameter groups, and the model-states file
    (scheduler, client state). torch's optimizer state is indexed by position: the client state's
    `param_names` name the parameters in that order (msllm.train.engine.param_names)."""
    states = torch.load(ckpt / MODEL_STATES, map_location="cpu", weights_only=True)
    module, optimizer = states["module"], states.get("optimizer")
    order = (states.get("msllm") or {}).get("param_names")
    if optimizer is None or not isinstance(order, list):
        raise CheckpointError(
            f"{ckpt} holds no optimizer state with its parameters' names (saved before msllm 0.2 "
            "recorded them): resume it on ZeRO 0"
        )
    if len(order) != sum(len(g["params"]) for g in optimizer["param_groups"]) or any(n not in module for n in order):
        raise CheckpointError(f"{ckpt}: its optimizer state does not match this model's parameters")
    zero = out / "zero"
    for index, name in enumerate(order):
        folder = zero / name
        folder.mkdir(parents=True)
        torch.save({"param": module[name].float(), "cat_dim": 0}, folder / "fp32.pt")
        state = optimizer["state"].get(index, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                torch.save({"param": state[key].float(), "cat_dim": 0}, folder / f"{key}.pt")
        if "step" in state:
            torch.save(torch.as_tensor(state["step"], dtype=torch.float32), folder / "step.pt")
    groups = [{k: v for k, v in g.items()} for g in optimizer["param_groups"]]
    torch.save({"param_groups": groups}, zero / "optimizer_state.pt")
    shutil.copy2(ckpt / MODEL_STATES, out / MODEL_STATES)


def _optimizer_state_for_every_stage(folder: Path, ckpt: Path) -> None:
    """One layout, whichever converter wrote it and whichever DeepSpeed loader reads it:
    - zero/optimizer_state.pt: ZeRO 1-2 (and bf16) read the parameter groups from its top level,
      ZeRO-3 from `optimizer_state_dict`, with the step in its state 0; and the DeepSpeed version;
    - zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt as {"param": tensor of the parameter's shape,
      "cat_dim": 0} (the ZeRO-3 converter writes bare flat tensors, which ZeRO 1-2 cannot read),
      and step.pt beside them (the ZeRO-3 converter keeps the step in the optimizer state only)."""
    import deepspeed  # noqa: PLC0415 (heavy: DeepSpeed)

    path = folder / "zero" / "optimizer_state.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    inner = state.get("optimizer_state_dict") or {}
    groups = state.get("param_groups") or inner.get("param_groups")
    steps = [
        torch.load(p, map_location="cpu", weights_only=True) for p in sorted((folder / "zero").glob("*/step.pt"))[:1]
    ]
    step = steps[0] if steps else (inner.get("state") or {}).get(0, {}).get("step", torch.tensor(0.0))
    state["param_groups"] = groups
    state["optimizer_state_dict"] = {**inner, "param_groups": groups, "state": {0: {"step": step}}}
    state.setdefault("ds_version", deepspeed.__version__)
    torch.save(state, path)
    shapes = {}
    for model_states in sorted(ckpt.glob("*model_states.pt")):
        saved = torch.load(model_states, map_location="cpu", weights_only=True)
        for group in saved.get("param_shapes") or []:
            shapes.update({name: tuple(shape) for name, shape in group.items()})
        break
    for param_dir in (p for p in (folder / "zero").iterdir() if p.is_dir()):
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            f = param_dir / f"{key}.pt"
            if not f.is_file():
                continue
            value = torch.load(f, map_location="cpu", weights_only=True)
            if isinstance(value, torch.Tensor):
                shape = shapes.get(param_dir.name, tuple(value.shape))
                torch.save({"param": value.reshape(shape), "cat_dim": 0}, f)
        if not (param_dir / "step.pt").is_file():
            torch.save(torch.as_tensor(step, dtype=torch.float32), param_dir / "step.pt")


def _seal(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    digests = {str(p.relative_to(folder)): file_digest(p) for p in files}
    (folder / SEAL).write_text(json.dumps(digests, indent=0) + "\n")


def verify_universal(folder: Path) -> str:
    """ "" when every file recorded in the seal is there with its checksum and nothing else is,
    else the first problem."""
    try:
        recorded = json.loads((folder / SEAL).read_text())
    except (OSError, ValueError):
        return f"{SEAL} is missing or unreadable"
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {SEAL}
    if present != set(recorded):
        return "its files are not the ones it was sealed with"
    for name, digest in recorded.items():
        try:
            if file_digest(folder / name) != digest:
                return f"{name} fails its checksum"
        except OSError as exc:
            return f"{name}: {exc.strerror or exc}"
    return ""


# -- loading ------------------------------------------------------------------------------------


def load_universal(engine, folder: Path) -> tuple[str | None, dict | None]:
    """Load a universal folder into `engine`: DeepSpeed's load_universal for its ZeRO and bf16
    optimizers, `load_universal_into_plain` for torch's AdamW (fp32 ZeRO 0). (load path, client state)."""
    if not _deepspeed_optimizer(engine):
        return load_universal_into_plain(engine, folder)
    flag = engine._config.load_universal_checkpoint
    engine._config.load_universal_checkpoint = True  # the switch DeepSpeed reads at load time
    try:
        loaded = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    finally:
        engine._config.load_universal_checkpoint = flag
    # ZeRO-3's universal loader gives every group the first group's settings (weight decay on
    # the norms too): each group takes its own back, as the run that saved it had them.
    _restore_group_settings(engine.optimizer, folder)
    return loaded


def _restore_group_settings(optimizer, folder: Path) -> None:
    saved = torch.load(folder / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=True)["param_groups"]
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's ZeRO optimizers wrap torch's
    if len(inner.param_groups) != len(saved):
        raise CheckpointError(f"{folder}: {len(saved)} parameter groups saved, {len(inner.param_groups)} in this run")
    for group, settings in zip(inner.param_groups, saved):
        group.update({k: v for k, v in settings.items() if k != "params"})
    # ZeRO-3's loader hands one step tensor to every group, which torch's AdamW then counts up in
    # place once per group and step: each state gets a step of its own.
    for state in inner.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def _deepspeed_optimizer(engine) -> bool:
    return bool(engine.zero_optimization()) or engine.bfloat16_enabled() or engine.fp16_enabled()


@torch.no_grad()
def load_universal_into_plain(engine, folder: Path) -> tuple[str, dict]:
    """Weights, AdamW state and scheduler of a universal folder into an engine whose optimizer is
    torch's own (fp32 ZeRO 0): each parameter and its moments by name."""
    states = torch.load(folder / MODEL_STATES, map_location="cpu", weights_only=True)
    optimizer = engine.optimizer
    device = next(engine.module.parameters()).device
    for name, param in engine.module.named_parameters():
        where = folder / "zero" / name
        if not (where / "fp32.pt").is_file():
            raise CheckpointError(f"{folder}: no weights for {name}")
        param.copy_(torch.load(where / "fp32.pt", map_location="cpu", weights_only=True)["param"].view_as(param))
        state = {}
        for key in ("exp_avg", "exp_avg_sq"):
            if (where / f"{key}.pt").is_file():
                value = torch.load(where / f"{key}.pt", map_location="cpu", weights_only=True)["param"]
                state[key] = value.view_as(param).to(device=device, dtype=param.dtype).clone()
        if (where / "step.pt").is_file():
            state["step"] = torch.load(where / "step.pt", map_location="cpu", weights_only=True).float().reshape(())
        if state:
            optimizer.state[param] = state
    _restore_group_settings(optimizer, folder)  # the rates (the scheduler's state holds none)
    if engine.lr_scheduler is not None and states.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(states["lr_scheduler"])
    for key in ("global_steps", "global_samples", "skipped_steps"):
        if key in states:
            setattr(engine, key, states[key])
    return str(folder), states.get("msllm") and {"msllm": states["msllm"]}
