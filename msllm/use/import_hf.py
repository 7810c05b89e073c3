"""Starting an msllm run from a local Hugging Face Llama folder (config.json, safetensors weights,
a sentencepiece tokenizer.model), in two steps:

    msllm import-hf FOLDER --out recipe.yaml     a recipe for that model: the model section read from
                                                 config.json, data.tokenizer.model = FOLDER/tokenizer.model,
                                                 train.init_from = FOLDER; edit its data section
    msllm train recipe.yaml                      the run starts from the folder's weights

`train.init_from` is where the weights are read (msllm.checkpoint.llama.load_initial_weights,
called by the trainer before anything else touches the model): the recipe's model must be that
Llama (every size and constant compared) and the shards must use that tokenizer (sha256), else a
one-line error. --out is replaced (with --force) only if it is a recipe import-hf wrote (its
first line says so): never a file of the user's. The network is the same on both sides, so the
logits after the import are transformers' (tested).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from msllm.checkpoint.llama import read_llama_folder
from msllm.config import Recipe, from_dict, validate
from msllm.errors import CheckpointError
from msllm.safe_files import write_new

_HEADER = "# Starts from the Hugging Face Llama folder "  # the first line of every recipe import-hf writes


def _written_by_import(path: Path) -> bool:
    """Whether `path` is a file whose first line is the one import-hf writes."""
    try:
        with open(path, "rb") as f:
            return path.is_file() and f.read(len(_HEADER)) == _HEADER.encode()
    except OSError:
        return False


def write_import_recipe(folder: str, out: str, force: bool = False) -> Path:
    """`msllm import-hf FOLDER --out RECIPE`: write a recipe that starts a vanilla run from FOLDER."""
    llama = read_llama_folder(folder)
    out_path = Path(out)
    if out_path.exists() or out_path.is_symlink():
        if not _written_by_import(out_path):  # --force or not: never a file msllm did not write
            raise CheckpointError(
                f"--out {out_path} exists and is not a recipe `msllm import-hf` wrote: msllm never replaces "
                "what it did not write; choose another --out"
            )
        if not force:
            raise CheckpointError(f"{out_path} already exists: pass --force to replace it")
    raw = Recipe().to_dict()
    raw["run"].update(name=llama.folder.resolve().name, output_dir=f"runs/{llama.folder.resolve().name}")
    raw["model"] = llama.model
    raw["data"]["tokenizer"]["model"] = str(llama.tokenizer)
    if llama.max_position_embeddings:
        raw["data"]["seq_len"] = min(raw["data"]["seq_len"], llama.max_position_embeddings)
    raw["train"]["init_from"] = str(llama.folder)
    validate(from_dict(raw, source=str(out_path)), source=str(out_path))
    text = (
        f"{_HEADER}{llama.folder} (msllm import-hf): its model, tokenizer\n"
        "# and weights (train.init_from). Point the data section at your corpus before `msllm train`.\n"
        + yaml.safe_dump(raw, sort_keys=False)
    )
    existed = out_path.exists()
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        write_new(out_path, text)  # by rename: a link at --out is replaced, never written through
    except OSError as exc:
        raise CheckpointError(
            f"cannot write --out {out_path}: {exc.strerror or exc}"
            + ("; the recipe there is unchanged" if existed else "")
        ) from None
    print(
        f"wrote {out_path}: vanilla, {llama.model['scales'][0]['layers']} layers, d_model {llama.model['d_model']}, "
        f"vocab {llama.model['vocab_size']}, starting from {llama.folder}"
    )
    return out_path
