"""Starting an msllm run from a local Hugging Face Llama folder (config.json, safetensors weights,
a sentencepiece tokenizer.model), in two steps:

    msllm import-hf FOLDER --out recipe.yaml     a recipe for that model: the model section read from
                                                 config.json, data.tokenizer.model = FOLDER/tokenizer.model,
                                                 train.init_from = FOLDER; edit its data section
    msllm train recipe.yaml                      the run starts from the folder's weights

`train.init_from` is where the weights are read (`load_initial_weights`, called by the trainer
before anything else touches the model): the recipe's model must be that Llama (every size and
constant compared) and the shards must use that tokenizer (sha256), else a one-line error.
The network is the same on both sides (msllm.use.hf.llama), so the logits after the import are
transformers' (tested).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from msllm.errors import CheckpointError


@dataclass
class LlamaFolder:
    model: dict  # msllm's model section (vanilla)
    max_position_embeddings: int
    tokenizer: Path  # its sentencepiece tokenizer.model
    folder: Path

    def weights(self) -> dict[str, torch.Tensor]:
        """Its weights under msllm's names (every safetensors file of the folder, in their dtype)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.folder}: no *.safetensors weights (save the model with safe_serialization)")
        state = {}
        for file in files:
            try:
                state.update(load_file(str(file)))
            except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
                raise CheckpointError(f"{file} is not a readable safetensors file ({str(exc).splitlines()[0][:200]})") from None
        from msllm.use.hf.llama import from_llama_names

        return from_llama_names(state, self.model["scales"][0]["layers"], self.model["tie_embeddings"], str(self.folder))


def read_llama_folder(folder: str | Path) -> LlamaFolder:
    """The Llama folder's config and tokenizer, checked (its weights are read on demand)."""
    from msllm.data.tokenizer import load_sentencepiece
    from msllm.errors import MsllmError
    from msllm.use.hf.llama import model_section_from_llama

    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{folder}: no config.json: not a Hugging Face model folder")
    try:
        config = json.loads(config_file.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_file} cannot be read ({str(exc).splitlines()[0][:200]})") from None
    model = model_section_from_llama(config, str(config_file))
    tokenizer = folder / "tokenizer.model"
    if not tokenizer.is_file():
        raise CheckpointError(f"{folder}: no tokenizer.model: msllm needs the model's sentencepiece tokenizer "
                              "(a tokenizer.json alone cannot be used)")
    try:
        pieces = load_sentencepiece(tokenizer).GetPieceSize()
    except MsllmError as exc:
        raise CheckpointError(str(exc)) from None
    if pieces > model["vocab_size"]:
        raise CheckpointError(f"{tokenizer} has {pieces} pieces, more than the model's vocab_size {model['vocab_size']}")
    return LlamaFolder(model, int(config.get("max_position_embeddings") or 0), tokenizer, folder)


def write_import_recipe(folder: str, out: str, force: bool = False) -> Path:
    """`msllm import-hf FOLDER --out RECIPE`: write a recipe that starts a vanilla run from FOLDER."""
    import yaml

    from msllm.config import Recipe, from_dict, validate

    llama = read_llama_folder(folder)
    out_path = Path(out)
    if out_path.exists() and not force:
        raise CheckpointError(f"{out_path} already exists: pass --force to replace it")
    raw = Recipe().to_dict()
    raw["run"].update(name=llama.folder.resolve().name, output_dir=f"runs/{llama.folder.resolve().name}")
    raw["model"] = llama.model
    raw["data"]["tokenizer"]["model"] = str(llama.tokenizer)
    if llama.max_position_embeddings:
        raw["data"]["seq_len"] = min(raw["data"]["seq_len"], llama.max_position_embeddings)
    raw["train"]["init_from"] = str(llama.folder)
    validate(from_dict(raw, source=str(out_path)), source=str(out_path))
    text = (f"# Starts from the Hugging Face Llama folder {llama.folder} (msllm import-hf): its model, tokenizer\n"
            "# and weights (train.init_from). Point the data section at your corpus before `msllm train`.\n"
            + yaml.safe_dump(raw, sort_keys=False))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.parent / f".{out_path.name}.tmp-{os.getpid()}"
    try:
        tmp.write_text(text)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {out_path}: vanilla, {llama.model['scales'][0]['layers']} layers, d_model {llama.model['d_model']}, "
          f"vocab {llama.model['vocab_size']}, starting from {llama.folder}")
    return out_path


# What must agree between the recipe's model and the Llama folder's: everything that changes a
# vanilla model's weights or outputs (init_std only changes a random init).
_COMPARED = ("vocab_size", "d_model", "n_heads", "hidden_dim", "rope_theta", "norm_eps", "tie_embeddings")


def load_initial_weights(model: torch.nn.Module, model_cfg, init_from: str, shards_tokenizer_sha256: str | None) -> None:
    """train.init_from: load the Llama folder's weights into `model` (the recipe's model_cfg),
    after checking that it is that model and that the shards use its tokenizer."""
    from msllm.config import ModelConfig, ScaleConfig
    from msllm.data.tokenizer import file_sha256

    llama = read_llama_folder(init_from)
    theirs = ModelConfig(**{**llama.model, "scales": [ScaleConfig(**llama.model["scales"][0])]})
    differ = [f"{key} {getattr(model_cfg, key)} vs {getattr(theirs, key)}" for key in _COMPARED
              if getattr(model_cfg, key) != getattr(theirs, key)]
    if model_cfg.scales[0].layers != theirs.scales[0].layers:
        differ.append(f"layers {model_cfg.scales[0].layers} vs {theirs.scales[0].layers}")
    if differ:
        raise CheckpointError(f"train.init_from {init_from}: the recipe's model is not that Llama (recipe vs folder: "
                              f"{'; '.join(differ)}): `msllm import-hf` writes the matching model section")
    if shards_tokenizer_sha256 and file_sha256(llama.tokenizer) != shards_tokenizer_sha256:
        raise CheckpointError(f"train.init_from {init_from}: the shards were written with another tokenizer than "
                              f"{llama.tokenizer}: set data.tokenizer.model to it (and a new data.shards_dir)")
    model.load_state_dict(llama.weights(), strict=True)
