"""The hf/ folder of an export: a model that Hugging Face transformers loads, for every architecture.

    config.json              LlamaForCausalLM for vanilla with full attention; otherwise model_type
                             "msllm" with auto_map to the two files below
    configuration_msllm.py   (msllm models) the config class, assembled from msllm/config.py
    modeling_msllm.py        (msllm models) MsllmForCausalLM, assembled from msllm/models/*.py
    model.safetensors        fp32 weights: Llama's names, or msllm's under "model."
    generation_config.json   the tokenizer's bos/eos/pad ids, max_length = the trained context
    tokenizer.model          the sentencepiece tokenizer the model was trained with
    tokenizer.json           the same tokenizer for Hugging Face tokenizers (`tokenizer_json`)
    tokenizer_config.json    PreTrainedTokenizerFast over tokenizer.json, adding no BOS or EOS: it
                             encodes a text as msllm's data preparation does (documents follow an
                             EOS; none has a BOS)

The tokenizer is the same under transformers 4 and 5: both load tokenizer.json as it is. (Named
LlamaTokenizer, transformers 5 would rebuild a unigram tokenizer.model as BPE, which encodes 4 in 10
lines of the built-in corpus otherwise than sentencepiece; transformers 4 has no tokenizers-only
class that reads tokenizer.model.)

Needs neither transformers nor anything else beyond msllm's own dependencies to write.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from sentencepiece import sentencepiece_model_pb2

from msllm.checkpoint.llama import can_be_llama, llama_config, to_llama_names
from msllm.data.tokenizer import load_sentencepiece, special_ids
from msllm.use.hf.assemble import configuration_source, modeling_source

AUTO_MAP = {
    "AutoConfig": "configuration_msllm.MsllmConfig",
    "AutoModelForCausalLM": "modeling_msllm.MsllmForCausalLM",
}


def special_token_ids(tokenizer_path: Path) -> dict:
    """bos/eos/pad_token_id of the tokenizer (those it has: a reused tokenizer may lack a pad)."""
    ids = special_ids(load_sentencepiece(tokenizer_path))
    return {f"{kind}_token_id": ids[f"{kind}_id"] for kind in ("bos", "eos", "pad") if ids[f"{kind}_id"] >= 0}


def tokenizer_config(tokenizer_path: Path, seq_len: int) -> dict:
    sp = load_sentencepiece(tokenizer_path)
    pieces = {
        kind: sp.IdToPiece(i) for kind, i in ((k.removesuffix("_id"), v) for k, v in special_ids(sp).items()) if i >= 0
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",  # transformers 5: TokenizersBackend (its alias)
        "add_bos_token": False,
        "add_eos_token": False,
        **{f"{kind}_token": piece for kind, piece in pieces.items()},
        "legacy": True,  # for transformers 4's LlamaTokenizer, which reads tokenizer.model (docs/using.md, Export)
        "clean_up_tokenization_spaces": False,
        "model_max_length": seq_len,
    }


def tokenizer_json(tokenizer_path: Path) -> dict:
    """The sentencepiece model at `tokenizer_path` as a Hugging Face tokenizers file: what
    transformers 4's LlamaConverter (legacy) makes of it, without transformers: its pieces and
    scores (Unigram, or BPE with the merges sentencepiece's scores order), byte fallback, the
    whitespace marker prepended and put for every space (msllm's tokenizers normalize nothing
    else: normalization_rule_name identity, remove_extra_whitespaces off), control pieces as
    special tokens, and nothing added around a text."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(tokenizer_path).read_bytes())
    spec, normalizer = proto.trainer_spec, proto.normalizer_spec
    if (
        normalizer.name not in ("identity", "")
        or normalizer.remove_extra_whitespaces
        or spec.treat_whitespace_as_suffix
    ):
        raise ValueError(
            f"{tokenizer_path}: only sentencepiece models that normalize nothing (as msllm trains them) "
            f"can be exported for transformers (normalization {normalizer.name!r})"
        )
    kinds = sentencepiece_model_pb2.ModelProto.SentencePiece
    special = [(i, p.piece) for i, p in enumerate(proto.pieces) if p.type in (kinds.CONTROL, kinds.UNKNOWN)]
    if spec.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        model = {
            "type": "Unigram",
            "unk_id": spec.unk_id,
            "vocab": [[p.piece, 0.0 if p.type in (kinds.CONTROL, kinds.UNKNOWN) else p.score] for p in proto.pieces],
            "byte_fallback": spec.byte_fallback,
        }
    elif spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
        merges = []
        for merged, i in vocab.items():  # as transformers' SentencePieceExtractor orders them
            pairs = [
                (merged[:k], merged[k:]) for k in range(1, len(merged)) if merged[:k] in vocab and merged[k:] in vocab
            ]
            merges += [
                (left, right, proto.pieces[i].score)
                for left, right in sorted(pairs, key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
            ]
        merges.sort(key=lambda m: m[2], reverse=True)
        model = {
            "type": "BPE",
            "dropout": None,
            "unk_token": proto.pieces[spec.unk_id].piece,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": spec.byte_fallback,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [[left, right] for left, right, _ in merges],
        }
    else:
        raise ValueError(
            f"{tokenizer_path}: a sentencepiece model of type {spec.model_type} (only unigram and bpe "
            "can be exported for transformers)"
        )
    prefix = [{"type": "Prepend", "prepend": "\u2581"}] if normalizer.add_dummy_prefix else []
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": piece,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, piece in special
        ],
        "normalizer": {
            "type": "Sequence",
            "normalizers": [*prefix, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}],
        },
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                *([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if normalizer.add_dummy_prefix else []),
            ],
        },
        "model": model,
    }


def write_hf_folder(folder: Path, model_cfg, state: dict[str, torch.Tensor], seq_len: int, tokenizer_path: Path) -> str:
    """Write `folder` (which must not exist) for the model `model_cfg` with weights `state`
    (msllm's names); return what it holds, for the export's message."""
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
            "msllm": model_cfg.to_dict(),
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
    _write_json(folder / "tokenizer.json", tokenizer_json(tokenizer_path))
    _write_json(folder / "tokenizer_config.json", tokenizer_config(tokenizer_path, seq_len))
    return kind


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")
