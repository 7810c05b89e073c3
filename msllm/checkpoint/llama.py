"""msllm's vanilla model <-> Hugging Face LlamaForCausalLM, both ways: the config, the parameter
names, and a Llama folder read as the weights a run starts from. The two are the same network
(pre-norm RMSNorm, rotate-half RoPE, SwiGLU, no biases), so the weights are the same tensors under
other names; q and k need no permutation, as both sides rotate halves. Export (msllm.use.hf) writes
with it, the trainer (`train.init_from`) and `msllm import-hf` read with it.

    llama_config(model_cfg, seq_len, special)   msllm's model section -> LlamaConfig's config.json
    to_llama_names(state, tie)                  msllm's parameter names -> Llama's
    model_section_from_llama(config, where)     a Llama config.json -> msllm's model section (checked)
    from_llama_names(state, tie, where)         Llama's parameter names -> msllm's
    read_llama_folder(folder)                   a local Llama folder's config and tokenizer, checked
    load_initial_weights(model, cfg, folder, sha)  train.init_from: its weights into the model, checked
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from msllm.config import ModelConfig, ScaleConfig
from msllm.errors import CheckpointError, MsllmError, short_repr
from msllm.models.registry import ARCH_CONFIGS


def llama_arch() -> str:
    """The architecture a Hugging Face Llama imports as (the registered one with ArchConfig.llama)."""
    return next(name for name, cls in ARCH_CONFIGS.items() if cls.llama)


def can_be_llama(model_cfg) -> bool:
    """Llama has full attention only: an architecture that is Llama's layout (ArchConfig.llama:
    vanilla) with local attention exports as an msllm model."""
    return model_cfg.arch_config.llama and model_cfg.scales[0].attention == "full"


def llama_config(model_cfg, seq_len: int, special: dict) -> dict:
    """config.json of LlamaForCausalLM for msllm's vanilla `model_cfg` (full attention), with the
    tokenizer's special ids `special` (special_token_ids)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model_cfg.vocab_size,
        "hidden_size": model_cfg.d_model,
        "intermediate_size": model_cfg.hidden_dim,
        "num_hidden_layers": model_cfg.scales[0].layers,
        "num_attention_heads": model_cfg.n_heads,
        "num_key_value_heads": model_cfg.n_heads,
        "head_dim": model_cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": seq_len,
        "rms_norm_eps": model_cfg.norm_eps,
        "rope_theta": model_cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": model_cfg.tie_embeddings,
        "initializer_range": model_cfg.init_std,
        "use_cache": True,
        "torch_dtype": "float32",
        **special,
    }


_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w_gate.weight": "mlp.gate_proj.weight",
    "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.w_down.weight": "mlp.down_proj.weight",
}
_ENDS = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def _llama_name(name: str) -> str | None:
    if name in _ENDS:
        return _ENDS[name]
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        if rest in _LAYER:
            return f"model.layers.{i}.{_LAYER[rest]}"
    return None


def to_llama_names(state: dict[str, torch.Tensor], tie: bool) -> dict[str, torch.Tensor]:
    """msllm vanilla names -> Hugging Face Llama names (a tied head is stored once, as Llama does)."""
    out = {}
    for name, t in state.items():
        target = _llama_name(name)
        if target is None:
            raise CheckpointError(f"export: no Hugging Face Llama name for parameter {name}")
        if not (tie and name == "lm_head.weight"):
            out[target] = t.contiguous()
    return out


def from_llama_names(state: dict[str, torch.Tensor], n_layers: int, tie: bool, where: str) -> dict[str, torch.Tensor]:
    """Hugging Face Llama names -> msllm vanilla names; every parameter of an n_layers model, no other."""
    names = ["embed.weight", "norm.weight"] + [f"layers.{i}.{rest}" for i in range(n_layers) for rest in _LAYER]
    names += [] if tie else ["lm_head.weight"]
    out, used = {}, set()
    for name in names:
        source = _llama_name(name)
        if source not in state:
            raise CheckpointError(f"{where}: no {source} among the weights: not a LlamaForCausalLM of this config")
        out[name] = state[source]
        used.add(source)
    if tie:
        out["lm_head.weight"] = out["embed.weight"]
        used.add("lm_head.weight")
    extra = sorted(k for k in set(state) - used if not k.endswith("rotary_emb.inv_freq"))
    if extra:
        raise CheckpointError(f"{where}: weights msllm's vanilla model has no place for: {', '.join(extra[:5])}")
    return out


def model_section_from_llama(config: dict, where: str) -> dict:
    """msllm's model section (vanilla) for a Hugging Face Llama config.json, or a CheckpointError
    naming the first value that is malformed (a size that is not a positive integer, a constant
    that is not a number) or that msllm's vanilla model cannot represent."""

    def need(condition: bool, what: str) -> None:
        if not condition:
            raise CheckpointError(f"{where}: {what}: msllm's vanilla model cannot represent it")

    def get(key: str):
        if key not in config:
            raise CheckpointError(f"{where}: no {key}: not a Llama config.json")
        return config[key]

    def malformed(key: str, value, what: str) -> CheckpointError:
        return CheckpointError(
            f"{where}: {key} {short_repr(value, 40)} is not {what}: fix it in config.json "
            "(the folder's model is not a readable Llama)"
        )

    def size(key: str, optional: bool = False) -> int | None:
        """A positive integer (JSON integers only: "64", 64.0, [64], true are refused)."""
        value = config.get(key) if optional else get(key)
        if optional and value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise malformed(key, value, "a positive integer")
        return value

    def number(key: str, default: float) -> float:
        value = config.get(key, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise malformed(key, value, "a positive number")
        return float(value)

    need(config.get("model_type") == "llama", f"model_type {short_repr(config.get('model_type'), 40)} is not 'llama'")
    d, heads = size("hidden_size"), size("num_attention_heads")
    need(d % heads == 0, f"hidden_size {d} is not a multiple of num_attention_heads {heads}")
    kv_heads, head_dim = size("num_key_value_heads", optional=True), size("head_dim", optional=True)
    vocab, hidden, layers = size("vocab_size"), size("intermediate_size"), size("num_hidden_layers")
    size("max_position_embeddings", optional=True)
    need(
        (kv_heads or heads) == heads,
        "grouped-query attention (num_key_value_heads "
        f"{config.get('num_key_value_heads')} != num_attention_heads {heads})",
    )
    need((head_dim or d // heads) == d // heads, f"head_dim {config.get('head_dim')} != hidden_size / heads")
    need(config.get("hidden_act", "silu") == "silu", f"hidden_act {config.get('hidden_act')!r}")
    need(not config.get("attention_bias") and not config.get("mlp_bias"), "biases in attention or MLP")
    rope = config.get("rope_parameters") or {}  # newer transformers keep rope_theta there
    if not isinstance(rope, dict):
        raise malformed("rope_parameters", rope, "a JSON object")
    need(
        not config.get("rope_scaling") and rope.get("rope_type", "default") == "default",
        f"RoPE scaling {short_repr(config.get('rope_scaling') or rope, 60)}",
    )
    if "rope_theta" not in config and "rope_theta" in rope:
        config = {**config, "rope_theta": rope["rope_theta"]}
    return {
        "arch": llama_arch(),
        "vocab_size": vocab,
        "d_model": d,
        "n_heads": heads,
        "mlp_hidden": hidden,
        "scales": [{"factor": 1, "layers": layers, "attention": "full"}],
        "rope_theta": number("rope_theta", 10000.0),
        "norm_eps": number("rms_norm_eps", 1e-6),
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "init_std": number("initializer_range", 0.02),
    }


_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def check_regular(path: Path, what: str) -> None:
    """A CheckpointError when `path` (followed if a link) exists and is not a regular file: reading
    a FIFO would wait forever, a device would read without end."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # absent (or unreadable): the caller's own check says so
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise CheckpointError(f"{path} is {kind}, not a file: {what}; remove it or replace it by the real file")


@dataclass
class LlamaFolder:
    model: dict  # msllm's model section (vanilla)
    max_position_embeddings: int
    tokenizer: Path  # its sentencepiece tokenizer.model
    folder: Path

    def weights(self) -> dict[str, torch.Tensor]:
        """Its weights under msllm's names (every safetensors file of the folder, in their dtype)."""
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.folder}: no *.safetensors weights (save the model with safe_serialization)")
        for file in files:  # all checked before any is read
            check_regular(file, f"{self.folder} holds it as a weights file")
        state = {}
        for file in files:
            try:
                state.update(load_file(str(file)))
            except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
                raise CheckpointError(
                    f"{file} is not a readable safetensors file ({str(exc).splitlines()[0][:200]})"
                ) from None
        return from_llama_names(
            state, self.model["scales"][0]["layers"], self.model["tie_embeddings"], str(self.folder)
        )


def read_llama_folder(folder: str | Path) -> LlamaFolder:
    """The Llama folder's config and tokenizer, checked (its weights are read on demand)."""
    from msllm.data.tokenizer import load_sentencepiece  # noqa: PLC0415 (start-up: a finished run's msllm train imports no streaming)

    folder = Path(folder)
    config_file = folder / "config.json"
    check_regular(config_file, f"{folder} is read as a Hugging Face model folder")
    check_regular(folder / "tokenizer.model", f"{folder} is read as a Hugging Face model folder")
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
        raise CheckpointError(
            f"{folder}: no tokenizer.model: msllm needs the model's sentencepiece tokenizer "
            "(a tokenizer.json alone cannot be used)"
        )
    try:
        pieces = load_sentencepiece(tokenizer).GetPieceSize()
    except MsllmError as exc:
        raise CheckpointError(str(exc)) from None
    if pieces > model["vocab_size"]:
        raise CheckpointError(
            f"{tokenizer} has {pieces} pieces, more than the model's vocab_size {model['vocab_size']}"
        )
    return LlamaFolder(model, int(config.get("max_position_embeddings") or 0), tokenizer, folder)


# What must agree between the recipe's model and the Llama folder's: everything that changes a
# vanilla model's weights or outputs (init_std only changes a random init).
_COMPARED = ("vocab_size", "d_model", "n_heads", "hidden_dim", "rope_theta", "norm_eps", "tie_embeddings")


def load_initial_weights(
    model: torch.nn.Module, model_cfg, init_from: str, shards_tokenizer_sha256: str | None
) -> None:
    """train.init_from: load the Llama folder's weights into `model` (the recipe's model_cfg),
    after checking that it is that model and that the shards use its tokenizer."""
    from msllm.data.tokenizer import file_sha256  # noqa: PLC0415 (start-up: a finished run's msllm train imports no streaming)

    llama = read_llama_folder(init_from)
    theirs = ModelConfig(**{**llama.model, "scales": [ScaleConfig(**llama.model["scales"][0])]})
    differ = [
        f"{key} {getattr(model_cfg, key)} vs {getattr(theirs, key)}"
        for key in _COMPARED
        if getattr(model_cfg, key) != getattr(theirs, key)
    ]
    if model_cfg.scales[0].layers != theirs.scales[0].layers:
        differ.append(f"layers {model_cfg.scales[0].layers} vs {theirs.scales[0].layers}")
    if differ:
        raise CheckpointError(
            f"train.init_from {init_from}: the recipe's model is not that Llama (recipe vs folder: "
            f"{'; '.join(differ)}): `msllm import-hf` writes the matching model section"
        )
    if shards_tokenizer_sha256 and file_sha256(llama.tokenizer) != shards_tokenizer_sha256:
        raise CheckpointError(
            f"train.init_from {init_from}: the shards were written with another tokenizer than "
            f"{llama.tokenizer}: set data.tokenizer.model to it (and a new data.shards_dir)"
        )
    weights = llama.weights()
    for name, param in model.named_parameters():
        shape = tuple(getattr(param, "ds_shape", param.shape))  # a ZeRO-3 partition: its full shape
        if name in weights and tuple(weights[name].shape) != shape:
            raise CheckpointError(
                f"train.init_from {init_from}: {_llama_name(name)} has shape "
                f"{list(weights[name].shape)}, but its config.json makes it {list(shape)}: "
                "the weights are not those of this config.json"
            )
    model.load_state_dict(weights, strict=True)
