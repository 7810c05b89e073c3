"""`msllm export SOURCE --out DIR`: consolidated weights anyone can load without DeepSpeed (SOURCE:
a checkpoint or a run's output_dir, loaded and checked by msllm.use.load).

    DIR/model.safetensors   fp32 weights under msllm's parameter names (any ZeRO stage)
    DIR/config.json         the model section of the recipe (vocab_size filled in)
    DIR/recipe.yaml         the resolved recipe of the run
    DIR/tokenizer.model     the sentencepiece tokenizer (byte-level models: the bytes descriptor)
    DIR/export.json         step, tokens seen, tokenizer sha256, source checkpoint, run record
    DIR/hf/                 a Hugging Face folder (msllm.use.hf.folder): LlamaForCausalLM for vanilla
                            with full attention, else MsllmForCausalLM (trust_remote_code)

The folder is written under a temporary name next to DIR and renamed into place at the end; an
existing DIR is replaced only with --force, and only if it is an export (it holds export.json) or
an empty folder: a file, a link or a folder of other files is refused in one line, whatever the
flags. The old export is moved aside (`.DIR.old-<time>-<pid>`) until the new one is in place. Every file gets
the mode a plain file gets here.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import save_file

from msllm.checkpoint.files import describe_write_error
from msllm.errors import CheckpointError
from msllm.use.hf.folder import write_hf_folder
from msllm.use.load import load_model


def export_checkpoint(source: str, out: str, force: bool = False) -> Path:
    """Export the model in `source` (a checkpoint, a run's output_dir: msllm.use.load) to `out`."""
    out_dir = Path(out)
    origin, target = Path(source).resolve(), out_dir.resolve()
    if target == origin or origin in target.parents or target in origin.parents:
        raise CheckpointError(
            f"--out {out_dir} is, contains or lies inside the checkpoint source {source}: export to another folder"
        )
    refuse_foreign_export(out_dir)
    if out_dir.exists() and not force:
        raise CheckpointError(f"{out_dir} already exists: pass --force to replace it")
    return write_export(load_model(source), out_dir)


def is_msllm_export(folder: Path) -> bool:
    """Whether `folder` is an export msllm wrote: a folder (not a link) holding export.json."""
    return folder.is_dir() and not folder.is_symlink() and (folder / "export.json").is_file()


def refuse_foreign_export(out_dir: Path) -> None:
    """A CheckpointError if --out holds what msllm did not write (a file, a link, a folder without
    export.json that is not empty): --force never replaces it, so the message never offers it."""
    if not (out_dir.exists() or out_dir.is_symlink()) or is_msllm_export(out_dir):
        return
    if out_dir.is_dir() and not out_dir.is_symlink():
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in out_dir.iterdir())
        if not entries:
            return
        what = (
            f"holds files that msllm did not put there ({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''})"
        )
    else:
        what = "is a link" if out_dir.is_symlink() else "is a file"
    raise CheckpointError(
        f"--out {out_dir} {what} and is not an msllm export: msllm never replaces what it did not write; "
        "export to a new or empty folder"
    )


def write_export(loaded, out_dir: Path) -> Path:
    """Write the export of `loaded` (an msllm.use.load.LoadedModel) to out_dir, replacing it if it exists."""
    recipe, meta = loaded.recipe, loaded.meta
    # Shared tensors (tied embeddings) are stored once per name: safetensors refuses aliases.
    state = {k: v.detach().clone().contiguous() for k, v in loaded.model.state_dict().items()}
    tokenizer = loaded.path / "tokenizer.model"

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "arch": recipe.model.arch})
        (tmp / "config.json").write_text(json.dumps(recipe.model.to_dict(), indent=2) + "\n")
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        shutil.copyfile(tokenizer, tmp / "tokenizer.model")
        info = {
            "checkpoint": str(loaded.path.resolve()),
            "step": meta.get("step"),
            "tokens": meta.get("tokens"),
            "seq_len": recipe.data.seq_len,
            "tokenizer_sha256": meta.get("tokenizer_sha256"),
            "run_record": meta.get("run_record"),
        }
        (tmp / "export.json").write_text(json.dumps(info, indent=2) + "\n")
        if loaded.tokenizer.kind == "bytes":
            hf_note = "(no hf/: byte-level models are not exported to Hugging Face)"
        else:
            hf_note = (
                "and hf/ (" + write_hf_folder(tmp / "hf", recipe.model, state, recipe.data.seq_len, tokenizer) + ")"
            )
        _match_modes(tmp)
        if out_dir.exists() or out_dir.is_symlink():
            refuse_foreign_export(out_dir)  # checked again: it may have changed while the export was written
            old = out_dir.parent / f".{out_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            os.replace(out_dir, old)  # aside until the new export is in place
            os.replace(tmp, out_dir)
            if is_msllm_export(old):
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.rmdir()  # an empty folder
        else:
            os.replace(tmp, out_dir)
    except BaseException as exc:  # a full disk, an interrupt, a library's own error: no half export stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (OSError, SafetensorError)):  # safetensors reports a failed write as its own error
            raise CheckpointError(
                f"could not write the export {out_dir}: {describe_write_error(exc, out_dir.parent)}"
            ) from None
        raise
    print(
        f"exported {loaded.path} (step {meta.get('step')}) to {out_dir}: model.safetensors, config.json, "
        f"recipe.yaml, tokenizer.model {hf_note}"
    )
    return out_dir


def _match_modes(folder: Path) -> None:
    """Every file the mode a plain file gets here (safetensors writes its files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.rglob("*"):
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)
