"""The hf/ folder of an export: a model that Hugging Face transformers loads, for every architecture.

    config.json              LlamaForCausalLM for vanilla with full attention; otherwise model_type
                             "msllm" with auto_map to the two files below
    configuration_msllm.py   (msllm models) the config class, assembled from msllm/config.py
    modeling_msllm.py        (msllm models) MsllmForCausalLM, assembled from msllm/models/*.py
    model.safetensors        fp32 weights: Llama's names, or msllm's under "model."
    generation_config.json   the tokenizer's bos/eos/pad ids, max_length = the trained context
    tokenizer.model          the sentencepiece tokenizer the model was trained with
    tokenizer_config.json    LlamaTokenizer(Fast) over it, adding no BOS or EOS: it encodes a text
                             as msllm's data preparation does (documents follow an EOS; none has a BOS)

Needs neither transformers nor anything else beyond msllm's own dependencies to write.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from msllm.checkpoint.llama import can_be_llama, llama_config, to_llama_names

AUTO_MAP = {
    "AutoConfig": "configuration_msllm.MsllmConfig",
    "AutoModelForCausalLM": "modeling_msllm.MsllmForCausalLM",
}


def special_token_ids(tokenizer_path: Path) -> dict:
    """bos/eos/pad_token_id of the tokenizer (those it has: a reused tokenizer may lack a pad)."""
    from msllm.data.tokenizer import load_sentencepiece, special_ids

    ids = special_ids(load_sentencepiece(tokenizer_path))
    return {f"{kind}_token_id": ids[f"{kind}_id"] for kind in ("bos", "eos", "pad") if ids[f"{kind}_id"] >= 0}


def tokenizer_config(tokenizer_path: Path, seq_len: int) -> dict:
    from msllm.data.tokenizer import load_sentencepiece, special_ids

    sp = load_sentencepiece(tokenizer_path)
    pieces = {kind: sp.IdToPiece(i) for kind, i in
              ((k.removesuffix("_id"), v) for k, v in special_ids(sp).items()) if i >= 0}
    return {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        **{f"{kind}_token": piece for kind, piece in pieces.items()},
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": seq_len,
    }


def write_hf_folder(folder: Path, model_cfg, state: dict[str, torch.Tensor], seq_len: int, tokenizer_path: Path) -> str:
    """Write `folder` (which must not exist) for the model `model_cfg` with weights `state`
    (msllm's names); return what it holds, for the export's message."""
    from safetensors.torch import save_file

    from msllm.use.hf.assemble import configuration_source, modeling_source

    folder.mkdir()
    special = special_token_ids(tokenizer_path)
    if can_be_llama(model_cfg):
        config = llama_config(model_cfg, seq_len, special)
        weights = to_llama_names(state, model_cfg.tie_embeddings)
        kind = "LlamaForCausalLM"
    else:
        config = {
            "architectures": ["MsllmForCausalLM"],
            "model_type": "msllm",
            "auto_map": AUTO_MAP,
            "msllm": dataclasses.asdict(model_cfg),
            "max_position_embeddings": seq_len,
            "torch_dtype": "float32",
            **special,
        }
        weights = {f"model.{name}": t.contiguous() for name, t in state.items()}
        (folder / "configuration_msllm.py").write_text(configuration_source())
        (folder / "modeling_msllm.py").write_text(modeling_source())
        kind = "MsllmForCausalLM, trust_remote_code"
    _write_json(folder / "config.json", config)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _write_json(folder / "generation_config.json", {**special, "max_length": seq_len})
    shutil.copyfile(tokenizer_path, folder / "tokenizer.model")
    _write_json(folder / "tokenizer_config.json", tokenizer_config(tokenizer_path, seq_len))
    return kind


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")
