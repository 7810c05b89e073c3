"""`load_model(source)`: the one way to load a trained model, from a checkpoint folder, a run's
output_dir (its newest complete checkpoint) or an `msllm export` folder.

It returns a LoadedModel: the model (fp32, eval mode, on the CPU), the recipe it was trained with,
the metadata (a checkpoint's meta.json or an export's export.json), the tokenizer (a
sentencepiece processor) and the folder it came from. Everything is checked on the way, each
problem one line naming the file: checkpoint checksums, weights that do not fit the recipe's model
(wrong or lying safetensors headers included), a tokenizer that is not the one the model was
trained with (sha256) or has fewer tokens than the model, and unreadable metadata.
`msllm eval`, `msllm generate` and `msllm export` are thin commands over it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from msllm.checkpoint.files import consolidated_state_dict, read_meta, read_recipe, resolve_checkpoint
from msllm.data.tokenizer import file_sha256, load_tokenizer_file
from msllm.errors import CheckpointError, MsllmError, first_line
from msllm.models import build_model

EXPORT_FILES = ("model.safetensors", "recipe.yaml", "tokenizer.model", "export.json")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    recipe: object  # msllm.config.Recipe
    meta: dict
    tokenizer: object  # msllm.data.tokenizer's interface (sentencepiece or bytes)
    path: Path  # the checkpoint folder or the export folder
    kind: str  # "checkpoint" or "export"

    @property
    def step(self) -> int:
        return int(self.meta.get("step") or 0)


def is_export(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() and (folder / "export.json").is_file()


def load_model(source: str | Path) -> LoadedModel:
    """The model in `source` (see the module doc), checked and ready for inference."""
    folder = Path(source)
    if folder.is_dir() and is_export(folder):
        return _load_export(folder)
    return _load_checkpoint(folder)


def _load_checkpoint(source: Path) -> LoadedModel:
    ckpt = resolve_checkpoint(source)  # verified against its checksums
    recipe = read_recipe(ckpt)
    meta = read_meta(ckpt)
    tokenizer = _tokenizer(ckpt / "tokenizer.model", meta.get("tokenizer_sha256"), recipe.model.vocab_size)
    model = _build(recipe, consolidated_state_dict(ckpt), ckpt)
    return LoadedModel(model, recipe, meta, tokenizer, ckpt, "checkpoint")


def _load_export(folder: Path) -> LoadedModel:
    missing = [name for name in EXPORT_FILES if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{folder} is not a complete msllm export: {', '.join(missing)} missing (export it again)"
        )
    try:
        meta = json.loads((folder / "export.json").read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{folder}/export.json cannot be read ({first_line(exc)[:200]}): export the checkpoint again"
        ) from None
    recipe = read_recipe(folder)
    tokenizer = _tokenizer(folder / "tokenizer.model", meta.get("tokenizer_sha256"), recipe.model.vocab_size)
    try:
        state = load_file(str(folder / "model.safetensors"))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{folder}/model.safetensors is not a readable safetensors file ({first_line(exc)[:200]}): "
            "export the checkpoint again"
        ) from None
    return LoadedModel(_build(recipe, state, folder), recipe, meta, tokenizer, folder, "export")


def _build(recipe, state: dict, where: Path) -> torch.nn.Module:
    """The recipe's model with `state` loaded (strictly: every name, every shape)."""
    model = build_model(recipe.model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{where}: the weights do not fit its recipe's model ({recipe.model.arch}): {first_line(exc)[:200]}"
        ) from None
    return model.eval()


def _tokenizer(path: Path, expected_sha256: str | None, vocab_size: int):
    """The tokenizer at `path`, checked to be the one the model was trained with."""
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no tokenizer.model (the tokenizer the model was trained with)")
    if expected_sha256 and file_sha256(path) != expected_sha256:
        raise CheckpointError(
            f"{path} is not the tokenizer the model was trained with (its sha256 differs from the "
            "recorded one): put the original tokenizer.model back, or export the checkpoint again"
        )
    try:
        tokenizer = load_tokenizer_file(path)
    except MsllmError as exc:
        raise CheckpointError(str(exc)) from None
    if tokenizer.vocab_size > vocab_size:
        raise CheckpointError(
            f"{path} has {tokenizer.vocab_size} tokens, more than the model's {vocab_size}: "
            "not the tokenizer this model was trained with"
        )
    return tokenizer
