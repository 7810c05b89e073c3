"""The files of a checkpoint: their layout, safe loading, checksums, and reading them back
(consolidated weights for eval, export and generate, without a DeepSpeed engine). What is written
is the TrainState's decision (state.py); when, and by whom, the Checkpointer's (checkpointer.py).

Layout of one checkpoint (`output_dir/checkpoints/step_0000200/`):

    mp_rank_00_model_states.pt, zero_pp_rank_*   DeepSpeed's save_checkpoint (weights, optimizer,
                                                 scheduler; the client state below)
    trainer_state_rank{r}.pt                     per rank: RNG states of python, numpy, torch (and the
                                                 accelerator), and the dataloader state
    meta.json                                    step, tokens seen, arch, ZeRO stage, world size,
                                                 tokenizer path and sha256
    recipe.yaml                                  the resolved recipe (vocab_size filled in)
    tokenizer.model                              the tokenizer the run started with (its bytes, read
                                                 once at start)
    COMPLETE                                     written last by rank 0 after every rank finished

A folder without COMPLETE is ignored by resume, eval, export and generate.

Loading never runs code from a file: every torch.load msllm makes, or DeepSpeed makes for it
(its checkpoint engine, zero_to_fp32), unpickles tensors, containers and the few DeepSpeed types
listed by `deepspeed_safe_globals` only (`safe_loading`); anything else is refused in one line.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import re
import shutil
import sys
from pathlib import Path

import torch
import xxhash
import yaml

from msllm.config import from_dict
from msllm.errors import CheckpointError, UnsafeCheckpointError

COMPLETE = "COMPLETE"
META = "meta.json"
_TAG = re.compile(r"^step_(\d{7,})$")


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def step_of(ckpt: Path) -> int:
    return int(_TAG.match(ckpt.name).group(1))


def is_complete(ckpt: Path) -> bool:
    return (ckpt / COMPLETE).is_file() and (ckpt / META).is_file()


def list_complete(root: Path) -> list[Path]:
    """Complete checkpoints under `root` (a checkpoints folder), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _TAG.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_complete(root: Path) -> Path | None:
    done = list_complete(root)
    return done[-1] if done else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint folder, a run's output_dir or its checkpoints/ folder."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if _TAG.match(p.name) and p.is_dir():
        if not is_complete(p):
            raise CheckpointError(f"{p} is an incomplete checkpoint (no {COMPLETE} marker): use an older one")
        return verified(p)
    for root in (p / "checkpoints", p):
        latest = latest_complete(root)
        if latest is not None:
            return verified(latest)
    raise CheckpointError(f"no complete checkpoint in {p}")


def read_meta(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / META).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{ckpt}: cannot read {META}: {exc}") from None


def read_recipe(ckpt: Path):
    """The resolved recipe saved in a checkpoint, as a Recipe."""
    try:
        raw = yaml.safe_load((ckpt / "recipe.yaml").read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{ckpt}: cannot read recipe.yaml: {exc}") from None
    return from_dict(raw, source=str(ckpt / "recipe.yaml"))


# ----------------------------------------------------------------------------------------------
# Architecture check
# ----------------------------------------------------------------------------------------------


def describe_model(model: dict) -> str:
    scales = "/".join(f"{s['factor']}x{s['layers']}{s['attention'][0]}" for s in model.get("scales", []))
    return (
        f"{model.get('arch')} (d_model={model.get('d_model')}, n_heads={model.get('n_heads')}, "
        f"vocab={model.get('vocab_size')}, scales={scales})"
    )


_INIT_ONLY = ("init_std",)  # model fields that do not change what a checkpoint holds


def check_same_model(ckpt: Path, saved: dict, wanted: dict) -> None:
    """Raise a one-line CheckpointError when the checkpoint's model section differs from the recipe's."""
    saved = {k: v for k, v in saved.items() if k not in _INIT_ONLY}
    wanted = {k: v for k, v in wanted.items() if k not in _INIT_ONLY}
    if saved == wanted:
        return
    diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    raise CheckpointError(
        f"{ckpt} holds a different architecture: checkpoint {describe_model(saved)} vs recipe "
        f"{describe_model(wanted)} (differs in model.{', model.'.join(diff)})"
    )


def check_same_tokenizer(ckpt: Path, meta: dict, tokenizer_sha256: str | None, shards_dir: str) -> None:
    """Raise a one-line CheckpointError when the checkpoint was trained with another tokenizer than
    the one the shards were written with (resume and `msllm eval` both ask)."""
    saved_sha = meta.get("tokenizer_sha256")
    if saved_sha and tokenizer_sha256 and saved_sha != tokenizer_sha256:
        raise CheckpointError(
            f"{ckpt} was trained with tokenizer sha256 {saved_sha[:12]}..., the shards in "
            f"{shards_dir} use {tokenizer_sha256[:12]}..."
        )


# ----------------------------------------------------------------------------------------------
# Safe loading
# ----------------------------------------------------------------------------------------------

# torch.load obeys this even where a caller (DeepSpeed's TorchCheckpointEngine.load, zero_to_fp32)
# passes weights_only=False.
_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_FORCE_NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def deepspeed_safe_globals() -> list[type]:
    """The Python types DeepSpeed's checkpoint files hold besides tensors and plain containers.

    Found with torch.serialization.get_unsafe_globals_in_checkpoint on every file of real ZeRO 0, 1,
    2 and 3 checkpoints in fp32, bf16 and fp16 (DeepSpeed 0.19): the optimizer states of ZeRO 1-3
    hold the loss scaler, the ZeRO stage and the fragment addresses of the flat parameter groups.
    The model states hold none. These classes are rebuilt from their saved fields; no code runs.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler  # noqa: PLC0415 (heavy: DeepSpeed)
    from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: PLC0415 (heavy: DeepSpeed)
    from deepspeed.utils.tensor_fragment import fragment_address  # noqa: PLC0415 (heavy: DeepSpeed)

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def safe_loading(ckpt: Path, deepspeed_types: bool = True):
    """Inside: every torch.load is weights-only, with DeepSpeed's types allowed (unless
    `deepspeed_types` is false: msllm's own files need none). A file that would import anything
    else (`os.system` in a tampered file) or is not a torch file at all raises a one-line
    CheckpointError naming it; nothing in it is executed."""
    allowed = deepspeed_safe_globals() if deepspeed_types else []
    saved = {k: os.environ.pop(k, None) for k in (_FORCE_WEIGHTS_ONLY, _FORCE_NO_WEIGHTS_ONLY)}
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    except (pickle.UnpicklingError, EOFError) as exc:
        message, unsafe = _unloadable(ckpt, exc, allowed)
        raise (UnsafeCheckpointError if unsafe else CheckpointError)(message) from None
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


def _unloadable(ckpt: Path, exc: BaseException, allowed_types: list[type]) -> tuple[str, bool]:
    """Which file of `ckpt` (a checkpoint folder or one file) could not be unpickled, and why; and
    whether it is unsafe (it would import something) rather than merely unreadable."""
    allowed = {f"{t.__module__}.{t.__qualname__}" for t in allowed_types}
    files = [ckpt] if ckpt.is_file() else sorted(ckpt.glob("*.pt"))
    for f in files:
        try:
            foreign = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(f) if g not in allowed]
        except Exception:  # not a torch zip file at all: reported below
            continue
        if foreign:
            return (
                f"refused to load {f}: it would import {', '.join(sorted(foreign))}, which no msllm or DeepSpeed "
                f"checkpoint holds (checkpoints are loaded weights-only; is the file tampered with or foreign?)"
            ), True
    # torch's own text for these suggests weights_only=False: never pass that advice on.
    why = "empty or truncated" if isinstance(exc, EOFError) else "corrupt or not written by torch.save"
    what = "it is" if ckpt.is_file() else "a file in it is"
    return f"cannot read {ckpt}: {what} not a readable torch checkpoint file ({why})", False


def load_torch_file(path: Path):
    """torch.load of one of msllm's own files (or a ZeRO-0 model states file, which holds no
    DeepSpeed types), weights only, with every failure as a one-line CheckpointError."""
    with safe_loading(path, deepspeed_types=False):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"cannot read {path}: {_first_sentence(exc)}") from None


def _first_sentence(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(". ")[0]


def describe_write_error(exc: BaseException, root: Path) -> str:
    """One line for a failed write, classified by errno, or (for torch.save's RuntimeErrors, which
    carry none) by the free space left."""
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"no space left on device ({exc.filename or f'while writing in {root}'})"
        return f"{exc.strerror or exc} ({exc.filename})" if exc.filename else _first_sentence(exc)
    try:
        if shutil.disk_usage(root).free < 1 << 20:
            return f"no space left on device (while writing in {root})"
    except OSError:
        pass
    return f"write failed ({_first_sentence(exc)})"


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _weights_finite(engine) -> bool:
    """Whether this rank's share of the weights is all finite (ZeRO-3 keeps a partition per rank)."""
    parts = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
    parts = [t.detach() for t in parts if t is not None and t.numel()]
    if not parts:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in parts]).all())


# ----------------------------------------------------------------------------------------------
# Checksums
# ----------------------------------------------------------------------------------------------


def file_digest(path: Path) -> str:
    """ "xxh3_128:HEX" of a file's bytes (xxhash, which streaming already depends on: GB/s)."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return f"xxh3_128:{h.hexdigest()}"


def verify_checkpoint(ckpt: Path) -> str:
    """ "" when meta.json has the checksum COMPLETE recorded for it and every file it lists is there
    with its recorded checksum, else the first problem in a few words. Checkpoints written before
    checksums were recorded pass unverified."""
    try:
        recorded = dict(line.split(" ", 1) for line in (ckpt / COMPLETE).read_text().splitlines() if " " in line)
        if "meta" in recorded and file_digest(ckpt / META) != recorded["meta"]:
            return f"{META} fails its checksum (edited or damaged)"
        meta = json.loads((ckpt / META).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return f"{META} is unreadable"
    if not isinstance(meta, dict) or not isinstance(meta.get("files") or {}, dict):
        return f"{META} is not an msllm checkpoint's"
    for name, digest in (meta.get("files") or {}).items():
        f = ckpt / name
        try:
            if file_digest(f) != digest:
                return f"{name} fails its checksum"
        except OSError as exc:
            return f"{name}: {exc.strerror or exc}"
    return ""


def verified(ckpt: Path) -> Path:
    """`ckpt` if its files pass their checksums, else a one-line CheckpointError naming an older
    complete one (for eval, export and generate, which never rename anything)."""
    problem = verify_checkpoint(ckpt)
    if not problem:
        return ckpt
    older = [p for p in list_complete(ckpt.parent) if p.name < ckpt.name]
    hint = f": use an older one, e.g. {older[-1]}" if older else ""
    raise CheckpointError(f"checkpoint {ckpt} is corrupt ({problem}){hint}")


# ----------------------------------------------------------------------------------------------
# Consolidated weights (eval, export, generate): no DeepSpeed engine needed
# ----------------------------------------------------------------------------------------------


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a complete checkpoint, whatever its ZeRO stage and world size."""
    meta = read_meta(ckpt)
    try:
        if int(meta.get("zero_stage", 0)) == 0:
            sd = load_torch_file(ckpt / "mp_rank_00_model_states.pt")["module"]
        else:
            # DeepSpeed's first import logs the accelerator it picked ("Setting accelerator to CPU")
            # through a handler bound to sys.stdout at that moment: imported with stdout sent to
            # stderr, that line and DeepSpeed's later ones stay out of what `msllm generate` prints.
            with contextlib.redirect_stdout(sys.stderr):
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: PLC0415 (heavy: DeepSpeed)

            with contextlib.redirect_stdout(io.StringIO()), safe_loading(ckpt):
                sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"cannot read the weights of {ckpt}: {_first_sentence(exc)}") from None
    # fairscale's checkpoint_wrapper patches forward in place, so the names need no stripping.
    return {k: v.detach().to(torch.float32).clone().contiguous() for k, v in sd.items()}
